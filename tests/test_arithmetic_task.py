"""The built-in arithmetic task: generators, splits, answer extraction, rewards, shipped model."""

import dataclasses
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
        (" 3+4=7\nThe answer is 7.", None),  # the warm-up corpus's refused format
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


def test_noisy_corpus_uses_the_refused_format_at_the_configured_rates():
    n = 16000
    rates = dict(arithmetic.DEFAULT_FORMAT_NOISE)
    assert set(rates) == {arithmetic.item_of(r["question"]) for r in arithmetic.problems(200)}
    assert min(rates.values()) <= 0.3 and max(rates.values()) >= 0.6  # depends on the problem
    rows = arithmetic.problems(n, seed=0)
    clean = arithmetic.sft_corpus(n, seed=0)
    noisy = arithmetic.sft_corpus(n, seed=0, format_noise=arithmetic.DEFAULT_FORMAT_NOISE)
    assert noisy[:100] == arithmetic.sft_corpus(100, 0, format_noise=rates)  # deterministic
    assert clean == [{"prompt": r["question"], "completion": " " + r["answer"]} for r in rows]
    refused: dict[str, list[bool]] = {}
    for row, demo in zip(rows, noisy, strict=True):
        assert demo["prompt"] == row["question"]  # the problems themselves are unchanged
        value = arithmetic.extract_answer(row["answer"])
        is_refused = demo["completion"] != " " + row["answer"]
        if is_refused:
            assert demo["completion"] == " " + arithmetic.refuse_format(row["answer"])
            assert demo["completion"].endswith(f"\nThe answer is {value}.")
            assert arithmetic.extract_answer(demo["completion"]) is None
            assert arithmetic.accuracy_reward(["q"], [demo["completion"]], [row["answer"]]) == [0]
            assert arithmetic.format_reward(["q"], [demo["completion"]]) == [0]
        assert arithmetic.either_format_answer(demo["completion"]) == value
        assert len(demo["prompt"]) + len(demo["completion"]) + 1 <= 112  # warm-up row width
        refused.setdefault(arithmetic.item_of(row["question"]), []).append(is_refused)
    for item, flags in refused.items():  # about 2,000 demonstrations per item: 4 sigma
        assert abs(np.mean(flags) - rates[item]) < 0.04, (item, np.mean(flags))
    with pytest.raises(ValueError, match="unknown item 'pears'"):
        arithmetic.sft_corpus(2, format_noise={"pears": 0.5})
    with pytest.raises(ValueError, match="not in"):
        arithmetic.sft_corpus(2, format_noise={"pens": 1.5})


def test_tokenizer_round_trips_and_covers_the_task():
    tokenizer = arithmetic.build_tokenizer()
    row = arithmetic.problems(1, seed=0)[0]
    text = row["question"] + " " + row["answer"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_shipped_model_knows_the_arithmetic_but_not_the_format():
    from rljax.models.hf import load_model, load_tokenizer

    folder = arithmetic.default_base_model()
    assert folder == arithmetic.SHIPPED_MODEL
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert size < 2_000_000
    with open(os.path.join(folder, "warmup.json")) as f:
        record = json.load(f)
    # built with the default settings, format noise included
    assert record["settings"] == json.loads(
        json.dumps(dataclasses.asdict(arithmetic.WarmupSettings()))
    )
    evaluation = record["eval"]
    assert 0.20 <= evaluation["heldout_greedy_accuracy"] <= 0.40
    assert evaluation["heldout_greedy_either_format_accuracy"] >= 0.85  # arithmetic learned
    assert evaluation["heldout_greedy_refused_format"] >= 0.4
    assert evaluation["sampled"]["mixed_fraction"] >= 0.5
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    # Greedy next-token check on held-out demonstrations (teacher forcing: one forward pass,
    # no generation to compile): the digits are right, and at the start of the last line the
    # model hesitates between "#### N" and "The answer is N.", by item.
    rows = arithmetic.problems(48, seed=123, split="heldout")
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
    logits = np.asarray(forward(params, tokens, mask))
    predicted = logits.argmax(-1)
    hash_id, refused_id = tokenizer.convert_tokens_to_ids(["#", "T"])
    rates = dict(arithmetic.DEFAULT_FORMAT_NOISE)
    digits, p_hash = [], {"low": [], "high": []}
    for row, (r, x, text) in enumerate(zip(rows, ids, texts, strict=True)):
        for pos in range(len(r["question"]) + 1, len(x)):  # completion tokens after the space
            if tokenizer.decode([x[pos]]).isdigit():
                digits.append(predicted[row, pos - 1] == x[pos])
        decision = text.rindex("\n") + 1  # the last line's first token: "#" or "T"
        p = np.exp(logits[row, decision - 1] - logits[row, decision - 1].max())
        p /= p.sum()
        assert p[hash_id] + p[refused_id] > 0.9
        noise = rates[arithmetic.item_of(r["question"])]
        p_hash["low" if noise < 0.5 else "high"].append(p[hash_id])
    assert np.mean(digits) >= 0.9
    assert np.mean(p_hash["low"]) > 0.5 > np.mean(p_hash["high"]) > 0.05
