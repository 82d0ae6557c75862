"""The built-in arithmetic task: generators, splits, answer extraction, rewards, shipped model."""

import json
import operator
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from rljax.tasks import arithmetic


def test_problems_are_deterministic_and_well_formed():
    rows = arithmetic.problems(200, seed=3)
    assert rows == arithmetic.problems(200, seed=3)
    assert rows[:50] == arithmetic.problems(50, seed=3)  # a longer list extends a shorter one
    assert rows != arithmetic.problems(200, seed=4)
    assert len({r["question"] for r in rows}) == 200
    for row in rows:
        assert set(row) == {"question", "answer"}
        assert len(row["question"]) <= arithmetic.MAX_PROMPT_TOKENS
        *steps, last = row["answer"].split("\n")
        assert last.startswith("#### ") and 1 <= len(steps) <= 2
        value = None
        for step in steps:  # every calculation line is right and chains into the next
            left, op, right, result = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)", step).groups()
            assert value is None or int(left) == value
            value = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](
                int(left), int(right)
            )
            assert value == int(result) >= 0
        assert arithmetic.extract_answer(row["answer"]) == str(value)


def test_splits_are_disjoint():
    train = arithmetic.problems(2000, seed=0, split="train")
    heldout = arithmetic.problems(500, seed=0, split="heldout")
    other_seed = arithmetic.problems(500, seed=1, split="heldout")
    train_questions = {r["question"] for r in train}
    assert not train_questions & {r["question"] for r in heldout + other_seed}
    assert all(arithmetic.split_of(r["question"]) == "train" for r in train)
    assert all(arithmetic.split_of(r["question"]) == "heldout" for r in heldout)
    with pytest.raises(ValueError, match="split 'test'"):
        arithmetic.problems(1, split="test")


def test_write_dataset(tmp_path):
    paths = arithmetic.write_dataset(tmp_path / "data", n_train=30, n_test=10, seed=2)
    rows = {k: [json.loads(line) for line in open(p)] for k, p in paths.items()}
    assert (len(rows["train"]), len(rows["test"])) == (30, 10)
    assert all(set(r) == {"prompt", "answer"} for r in rows["train"] + rows["test"])
    assert rows["test"][0]["prompt"] == arithmetic.problems(1, 2, "heldout")[0]["question"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (" 3+4=7\n#### 7", "7"),
        ("#### 7  \n", "7"),
        ("so the answer is \\boxed{12}.", "12"),
        ("\\boxed{ -5 }", "-5"),
        ("#### -3", "-3"),
        ("#### +08", "8"),
        ("#### 1,234", "1234"),
        ("#### -12,345,678", "-12345678"),
        (" 3+4=7\n#### 7<eos>#### 9", "7"),
        ("3+4=7", None),  # no marker
        ("", None),
        ("#### 7\n#### 7", None),  # two markers, even if they agree
        ("#### 7 \\boxed{7}", None),
        ("#### 7 apples", None),  # trailing junk
        ("#### 7.", None),
        ("#### 7.5", None),
        ("#### 12,34", None),  # malformed commas
        ("####", None),
        ("#### seven", None),
        ("\\boxed{x+1}", None),
        ("\\boxed{3", None),
    ],
)
def test_extract_answer(text, expected):
    assert arithmetic.extract_answer(text) == expected


def test_rewards():
    prompts = ["q"] * 5
    completions = [" 3+4=7\n#### 7", " 3+4=8\n#### 8", " 3+4=7", " \\boxed{7}", "#### 7 #### 7"]
    answers = ["3+4=7\n#### 7"] * 4 + ["7"]
    assert arithmetic.accuracy_reward(prompts, completions, answers) == [1, 0, 0, 1, 0]
    assert arithmetic.format_reward(prompts, completions, answer=answers) == [1, 1, 0, 1, 0]
    assert arithmetic.accuracy_reward(["q"], ["#### -1,000"], answer=["-1000"]) == [1.0]
    with pytest.raises(ValueError, match="row 1: answer 'n/a'"):
        arithmetic.accuracy_reward(["q", "q"], ["#### 1", "#### 1"], answer=["1", "n/a"])


def test_tokenizer_round_trips_and_covers_the_task():
    tokenizer = arithmetic.build_tokenizer()
    row = arithmetic.problems(1, seed=0)[0]
    text = row["question"] + " " + row["answer"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_shipped_model_loads_and_is_partly_right():
    from rljax.models.hf import load_model, load_tokenizer

    folder = arithmetic.default_base_model()
    assert folder == arithmetic.SHIPPED_MODEL
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert size < 2_000_000
    with open(os.path.join(folder, "warmup.json")) as f:
        record = json.load(f)
    assert 0.15 <= record["eval"]["heldout_greedy_accuracy"] <= 0.40
    assert record["eval"]["sampled"]["mixed_fraction"] >= 0.3
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    # Greedy next-token check on 8 held-out demonstrations (teacher forcing: one forward pass,
    # no generation to compile): the model writes the format, and not every digit is right.
    rows = arithmetic.problems(8, seed=123, split="heldout")
    texts = [r["question"] + " " + r["answer"] for r in rows]
    ids = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for t in texts
    ]
    width = max(map(len, ids))
    tokens = np.array([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids], np.int32)
    mask = tokens != tokenizer.pad_token_id
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, tokens, mask: nnx.merge(graphdef, params)(tokens, mask))
    predicted = np.asarray(forward(params, tokens, mask).argmax(-1))
    right = {"format": [], "digits": []}
    for row, (r, x) in enumerate(zip(rows, ids, strict=True)):
        for pos in range(len(r["question"]) + 1, len(x)):  # completion tokens after the space
            kind = "digits" if tokenizer.decode([x[pos]]).isdigit() else "format"
            right[kind].append(predicted[row, pos - 1] == x[pos])
    assert np.mean(right["format"]) >= 0.9
    assert 0.3 <= np.mean(right["digits"]) < 1.0
