"""rljax.data: loading, validation, tokenisation (hand-computed ids and masks) and batching."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rljax.data import (
    Batches,
    load_rows,
    tokenize_completions,
    tokenize_preferences,
    tokenize_prompts,
    validate_completions,
    validate_preferences,
)

# ----------------------------------------------------------------------------- tiny tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<user>", "<assistant>", "<system>"]
WORDS = ["the", "sky", "is", "blue", "green", "what", "color", "?", "red", "a", "b", "c", "d"]
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
PAD, EOS, BOS, USER, ASSISTANT = 0, 1, 2, 4, 5
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {{ eos_token }} "
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


def ids(text):
    return [VOCAB[w] for w in text.split()]


def make_tokenizer():
    """Word-level tokenizer over VOCAB: whitespace split, BOS added to plain text, a chat
    template that ends every turn with <eos>."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<eos>",
        pad_token="<pad>",
        bos_token="<bos>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


PLAIN = {"prompt": "the sky is", "chosen": "blue", "rejected": "green green"}
CHAT = {"prompt": user("what color ?"), "chosen": assistant("blue"), "rejected": assistant("red")}


# ----------------------------------------------------------------------------- loading


def test_load_jsonl_and_bad_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PLAIN) + "\n\n" + json.dumps(CHAT) + "\n")
    assert load_rows(path) == [PLAIN, CHAT]
    path.write_text(json.dumps(PLAIN) + "\n" + json.dumps(CHAT) + "\n{not json}\n")
    with pytest.raises(ValueError, match=r"line 3: invalid JSON"):
        load_rows(path)
    path.write_text(json.dumps(PLAIN) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 2: a JSON list, expected a JSON object"):
        load_rows(path)
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps([PLAIN, CHAT]))
    assert load_rows(array) == [PLAIN, CHAT]
    with pytest.raises(ValueError, match=r"unknown data format '\.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_rows(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "missing.jsonl")


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install 'rljax[data]')")
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT, CHAT]), path)
    assert load_rows(path) == [CHAT, CHAT]
    pq.write_table(pa.Table.from_pylist([PLAIN]), path)
    assert load_rows(path) == [PLAIN]


def test_load_datasets_folder(tmp_path):
    datasets = pytest.importorskip(
        "datasets", reason="datasets not installed (pip install 'rljax[data]')"
    )
    single = tmp_path / "single"
    datasets.Dataset.from_list([CHAT, CHAT]).save_to_disk(str(single))
    assert load_rows(single) == [CHAT, CHAT]
    with pytest.raises(ValueError, match="single Dataset"):
        load_rows(single, split="train")
    both = tmp_path / "both"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list([PLAIN, PLAIN]), test=datasets.Dataset.from_list([PLAIN])
    ).save_to_disk(str(both))
    assert load_rows(both, split="test") == [PLAIN]
    assert len(load_rows(both, split="train")) == 2
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]: pass split="):
        load_rows(both)
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_rows(both, split="dev")


# ----------------------------------------------------------------------------- validation

BAD_ROWS = [
    ({"prompt": "the sky is", "chosen": "blue"}, "missing_field", "field 'rejected' is missing"),
    ({"prompt": "the", "chosen": None, "rejected": "b"}, "missing_field", "'chosen' is missing"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty_field", "field 'prompt' is empty"),
    ({"prompt": "the", "chosen": "a", "rejected": ""}, "empty_field", "'rejected' is empty"),
    ({"prompt": "the", "chosen": 3, "rejected": "b"}, "wrong_type", "field 'chosen' is a int"),
    ({**CHAT, "prompt": "what color ?"}, "wrong_type", "mixes plain text and messages"),
    ("the sky is blue", "wrong_type", "is a str, expected a dict"),
    ({**CHAT, "chosen": []}, "empty_field", "field 'chosen' is an empty list"),
    ({**CHAT, "chosen": ["blue"]}, "malformed_messages", "'chosen', message 0 is a str"),
    (
        {**CHAT, "rejected": [{"role": "assistant"}]},
        "malformed_messages",
        "field 'rejected', message 0 has no 'content'",
    ),
    (
        {**CHAT, "prompt": [{"role": "user", "content": 5}]},
        "malformed_messages",
        "'prompt', message 0: 'content' is a int",
    ),
    (
        {**CHAT, "prompt": user("a") + assistant("b")},
        "malformed_messages",
        "'prompt' ends with an assistant message",
    ),
    ({**CHAT, "chosen": user("blue")}, "malformed_messages", "'chosen' starts with role 'user'"),
    ({**CHAT, "chosen": assistant(" ")}, "empty_field", "'chosen' has only empty messages"),
    ({"prompt": "the", "chosen": "a b", "rejected": "a b"}, "identical_completions", "identical"),
    ({**CHAT, "rejected": CHAT["chosen"]}, "identical_completions", "identical"),
    (
        {"chosen": "the sky is blue", "rejected": "the sky is red"},
        "missing_field",
        "field 'prompt' is missing; only conversational rows",
    ),
    (
        {"chosen": user("a") + assistant("b"), "rejected": user("c") + assistant("b")},
        "missing_field",
        "share no leading messages",
    ),
]


@pytest.mark.parametrize(("bad", "reason", "message"), BAD_ROWS)
def test_validation_errors_name_row_and_field(bad, reason, message):
    rows = [PLAIN, CHAT, bad, PLAIN]
    with pytest.raises(ValueError, match="row 2: .*" + message) as error:
        validate_preferences(rows)
    assert "skip_invalid=True" in str(error.value)
    valid, report = validate_preferences(rows, skip_invalid=True)
    assert valid == [PLAIN, CHAT, PLAIN]
    assert (report.total, report.kept, report.num_skipped) == (4, 3, 1)
    assert report.skipped == {reason: 1}
    assert report.first_rows == {reason: [2]}
    assert report.kept_rows == [0, 1, 3]
    assert reason in str(report) and "rows 2" in str(report)


def test_skip_counts_per_reason():
    rows = [PLAIN] + [bad for bad, _, _ in BAD_ROWS] * 2
    valid, report = validate_preferences(rows, skip_invalid=True)
    assert valid == [PLAIN]
    expected = {}
    for _, reason, _ in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 2
    assert report.skipped == expected
    assert report.num_skipped == 2 * len(BAD_ROWS)
    assert report.first_rows["wrong_type"] == [5, 6, 7, 5 + len(BAD_ROWS), 6 + len(BAD_ROWS)]
    assert str(report).count("...") >= 1


def test_implicit_prompt_split():
    row = {
        "chosen": user("what color ?") + assistant("blue"),
        "rejected": user("what color ?") + assistant("red"),
        "score": 1.0,
    }
    (valid,), _ = validate_preferences([row])
    assert valid == {**CHAT, "score": 1.0}


def test_validate_completions():
    rows = [
        {"prompt": "the sky is", "completion": "blue"},
        {"prompt": user("what color ?"), "completion": assistant("blue")},
        {"prompt": "the sky is"},
        {"prompt": "the sky is", "completion": ""},
        {"prompt": user("a"), "completion": "b"},
    ]
    with pytest.raises(ValueError, match="row 2: field 'completion' is missing"):
        validate_completions(rows)
    valid, report = validate_completions(rows, skip_invalid=True)
    assert valid == rows[:2]
    assert report.skipped == {"missing_field": 1, "empty_field": 1, "wrong_type": 1}


# ----------------------------------------------------------------------------- tokenisation


def row_arrays(arrays, prefix, i):
    return (
        arrays[f"{prefix}tokens"][i].tolist(),
        arrays[f"{prefix}mask"][i].astype(int).tolist(),
        arrays[f"{prefix}loss_mask"][i].astype(int).tolist(),
    )


def test_plain_and_conversational_tokens(tokenizer):
    arrays, report = tokenize_preferences([PLAIN, CHAT], tokenizer, max_length=16)
    sides, fields = ("chosen", "rejected"), ("tokens", "mask", "loss_mask")
    assert set(arrays) == {f"{s}_{f}" for s in sides for f in fields} | {"prompt_lengths"}
    assert arrays["chosen_tokens"].dtype == np.int32 and arrays["chosen_mask"].dtype == bool
    assert arrays["chosen_tokens"].shape == arrays["rejected_tokens"].shape == (2, 9)
    # plain: BOS from the tokenizer, then the prompt; completion + EOS; right-padded.
    prompt = [BOS, *ids("the sky is")]
    assert row_arrays(arrays, "chosen_", 0) == (
        [*prompt, *ids("blue"), EOS, PAD, PAD, PAD],
        [1] * 6 + [0] * 3,
        [0] * 4 + [1, 1] + [0] * 3,
    )
    assert row_arrays(arrays, "rejected_", 0) == (
        [*prompt, *ids("green green"), EOS, PAD, PAD],
        [1] * 7 + [0] * 2,
        [0] * 4 + [1, 1, 1] + [0] * 2,
    )
    # conversational: the template's <eos> closes the turn; no second EOS is appended.
    chat_prompt = [BOS, USER, *ids("what color ?"), EOS, ASSISTANT]
    assert row_arrays(arrays, "chosen_", 1) == (
        [*chat_prompt, *ids("blue"), EOS],
        [1] * 9,
        [0] * 7 + [1, 1],
    )
    assert row_arrays(arrays, "rejected_", 1)[0] == [*chat_prompt, *ids("red"), EOS]
    assert arrays["prompt_lengths"].tolist() == [4, 7]
    assert arrays["prompt_lengths"].dtype == np.int32
    assert not arrays["chosen_loss_mask"][:, 0].any()
    assert (report.total, report.kept, report.truncated, report.dropped) == (2, 2, 0, 0)
    assert report.kept_rows == [0, 1] and report.length == 9


def test_eos_not_duplicated_and_add_eos_false(tokenizer):
    row = {"prompt": "the sky is", "chosen": "blue <eos>", "rejected": "red"}
    arrays, _ = tokenize_preferences([row], tokenizer, max_length=16)
    assert arrays["chosen_tokens"][0].tolist() == [BOS, *ids("the sky is blue"), EOS]
    assert arrays["rejected_tokens"][0].tolist() == [BOS, *ids("the sky is red"), EOS]
    arrays, _ = tokenize_preferences([PLAIN], tokenizer, max_length=16, add_eos=False)
    assert arrays["chosen_tokens"][0].tolist() == [BOS, *ids("the sky is blue"), PAD]
    assert arrays["rejected_loss_mask"][0].astype(int).tolist() == [0, 0, 0, 0, 1, 1]


def test_pad_to_and_implicit_prompt(tokenizer):
    implicit = {
        "chosen": user("what color ?") + assistant("blue"),
        "rejected": user("what color ?") + assistant("red"),
    }
    arrays, _ = tokenize_preferences([implicit], tokenizer, max_length=12, pad_to=12)
    expected, _ = tokenize_preferences([CHAT], tokenizer, max_length=12, pad_to=12)
    assert arrays["chosen_tokens"].shape == (1, 12)
    for key in arrays:
        np.testing.assert_array_equal(arrays[key], expected[key])
    with pytest.raises(ValueError, match="pad_to=8 is shorter than max_length=12"):
        tokenize_preferences([CHAT], tokenizer, max_length=12, pad_to=8)


LONG = {"prompt": "a b c d the", "chosen": "blue blue blue", "rejected": "red"}


def test_truncation_modes(tokenizer):
    # prompt [BOS a b c d the] (6) -> 3 tokens; completion budget 7 - 3 = 4.
    keep_end, report = tokenize_preferences(
        [LONG, PLAIN], tokenizer, max_length=7, max_prompt_length=3
    )
    assert keep_end["chosen_tokens"][0].tolist() == [*ids("c d the blue blue blue"), EOS]
    assert keep_end["rejected_tokens"][0].tolist() == [*ids("c d the red"), EOS, PAD, PAD]
    assert keep_end["chosen_loss_mask"][0].astype(int).tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert keep_end["prompt_lengths"].tolist() == [3, 3]
    # PLAIN's prompt [BOS the sky is] (4) -> keep_end drops the BOS.
    assert keep_end["chosen_tokens"][1].tolist()[:3] == ids("the sky is")
    assert (report.truncated, report.dropped, report.prompt_truncated) == (2, 0, 2)
    assert report.truncated_rows == [0, 1]
    keep_start, _ = tokenize_preferences(
        [LONG], tokenizer, max_length=7, max_prompt_length=3, truncation_mode="keep_start"
    )
    assert keep_start["chosen_tokens"][0].tolist() == [BOS, *ids("a b blue blue blue"), EOS]
    # completion cut at its end to fit max_length (its EOS goes with it).
    cut, report = tokenize_preferences([LONG], tokenizer, max_length=8, max_prompt_length=6)
    assert cut["chosen_tokens"][0].tolist() == [BOS, *ids("a b c d the blue blue")]
    assert cut["rejected_tokens"][0].tolist() == [BOS, *ids("a b c d the red"), EOS]
    assert (report.prompt_truncated, report.completion_truncated, report.truncated) == (0, 1, 1)
    # no max_prompt_length: the prompt is still cut to leave one completion token.
    tight, _ = tokenize_preferences([LONG], tokenizer, max_length=4)
    assert tight["chosen_tokens"][0].tolist() == ids("c d the blue")
    assert tight["chosen_loss_mask"][0].astype(int).tolist() == [0, 0, 0, 1]


def test_overflow_drop_vs_truncate(tokenizer):
    rows = [PLAIN, LONG, CHAT, LONG]
    kept, report = tokenize_preferences(rows, tokenizer, max_length=9, overflow="drop")
    assert (report.total, report.kept, report.dropped, report.truncated) == (4, 2, 2, 0)
    assert report.dropped_rows == [1, 3] and report.kept_rows == [0, 2]
    assert "dropped 2 (rows 1, 3)" in str(report)
    alone, _ = tokenize_preferences([PLAIN, CHAT], tokenizer, max_length=9)
    for key in alone:
        np.testing.assert_array_equal(kept[key], alone[key])
    truncated, report = tokenize_preferences(rows, tokenizer, max_length=9)
    assert truncated["chosen_tokens"].shape == (4, 9)
    assert (report.kept, report.dropped, report.truncated, report.completion_truncated) == (
        4,
        0,
        2,
        2,
    )
    assert "truncated 2 (rows 1, 3)" in str(report)


def test_tokenize_completions(tokenizer):
    rows = [
        {"prompt": "the sky is", "completion": "blue"},
        {"prompt": user("what color ?"), "completion": assistant("red")},
    ]
    arrays, report = tokenize_completions(rows, tokenizer, max_length=16)
    assert set(arrays) == {"tokens", "mask", "loss_mask"}
    assert arrays["tokens"].tolist() == [
        [BOS, *ids("the sky is blue"), EOS, PAD, PAD, PAD],
        [BOS, USER, *ids("what color ?"), EOS, ASSISTANT, *ids("red"), EOS],
    ]
    assert arrays["loss_mask"].astype(int).tolist() == [
        [0, 0, 0, 0, 1, 1, 0, 0, 0],
        [0] * 7 + [1, 1],
    ]
    assert arrays["mask"].sum(1).tolist() == [6, 9]
    assert report.kept == 2
    with pytest.raises(ValueError, match="row 0: field 'completion' is missing"):
        tokenize_completions([PLAIN], tokenizer, max_length=16)


def test_tokenize_prompts_left_padded(tokenizer):
    tokens, mask = tokenize_prompts(["the sky", user("what color ?"), CHAT], tokenizer, 8)
    assert tokens.dtype == np.int32 and mask.dtype == bool
    chat_prompt = [BOS, USER, *ids("what color ?"), EOS, ASSISTANT]
    assert tokens.tolist() == [
        [PAD, PAD, PAD, PAD, BOS, *ids("the sky")],
        chat_prompt,
        chat_prompt,
    ]
    assert mask.astype(int).tolist()[0] == [0, 0, 0, 0, 1, 1, 1]
    # same prompt ids as the preference arrays' prompt
    arrays, _ = tokenize_preferences([CHAT], tokenizer, max_length=16)
    assert arrays["chosen_tokens"][0, :7].tolist() == chat_prompt
    with pytest.warns(UserWarning, match="truncated 1 of 2 prompts"):
        tokens, mask = tokenize_prompts(["a b c d the", "the"], tokenizer, 3, pad_to=4)
    assert tokens.tolist() == [[PAD, *ids("c d the")], [PAD, PAD, BOS, VOCAB["the"]]]
    with pytest.warns(UserWarning, match=r"\(keep_start\); rows \[0\]"):
        tokens, _ = tokenize_prompts(["a b c d the"], tokenizer, 3, truncation_mode="keep_start")
    assert tokens.tolist() == [[BOS, *ids("a b")]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing cut, no warning
        tokenize_prompts(["a b"], tokenizer, 3)
    with pytest.raises(ValueError, match="row 1: field 'prompt' is empty"):
        tokenize_prompts(["the", ""], tokenizer, 8)


def test_tokenizer_errors(tokenizer):
    with pytest.raises(ValueError, match="row 0: field 'rejected' is missing"):
        tokenize_preferences([{"prompt": "a", "chosen": "b"}], tokenizer, max_length=8)
    with pytest.raises(ValueError, match="truncation_mode='left'"):
        tokenize_preferences([PLAIN], tokenizer, max_length=8, truncation_mode="left")
    with pytest.raises(ValueError, match="overflow='error'"):
        tokenize_preferences([PLAIN], tokenizer, max_length=8, overflow="error")
    no_template = make_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="row 0: conversational rows need a tokenizer with"):
        tokenize_preferences([CHAT], no_template, max_length=8)
    bad_template = make_tokenizer()
    bad_template.chat_template = "{% for m in messages|reverse %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(ValueError, match="row 0: field 'chosen': the chat template"):
        tokenize_preferences([CHAT], bad_template, max_length=8)


# ----------------------------------------------------------------------------- batching


def data(n=10):
    return {"x": np.arange(n), "y": np.arange(n * 2).reshape(n, 2)}


def test_batches_shuffle_is_deterministic():
    a = Batches(data(), 3, seed=7)
    b = Batches(data(), 3, seed=7)
    assert len(a) == 3 and a.rows_left_out == 1
    first = [next(a)["x"].tolist() for _ in range(9)]
    assert first == [next(b)["x"].tolist() for _ in range(9)]
    for epoch in range(3):
        order = np.random.default_rng([7, epoch]).permutation(10)
        flat = [x for batch in first[3 * epoch : 3 * epoch + 3] for x in batch]
        assert flat == order[:9].tolist()
    assert first[:3] != first[3:6]  # a new order each epoch
    assert [next(Batches(data(), 3, seed=8))["x"].tolist()] != first[:1]
    batch = Batches(data(), 4, seed=0).__next__()
    np.testing.assert_array_equal(batch["y"], data()["y"][batch["x"]])  # rows stay aligned
    assert "1 rows left out" in repr(a)


def test_batches_exact_resume():
    original = Batches(data(), 3, seed=1)
    for _ in range(4):
        next(original)
    state = original.state()
    assert state == {"epoch": 1, "index": 1}
    resumed = Batches(data(), 3, seed=1, state=state)
    restored = Batches(data(), 3, seed=1)
    restored.restore(json.loads(json.dumps(state)))
    for _ in range(7):
        expected = next(original)["x"].tolist()
        assert next(resumed)["x"].tolist() == expected
        assert next(restored)["x"].tolist() == expected
    assert resumed.state() == original.state()
    with pytest.raises(ValueError, match="outside 0 <= index <= 3"):
        Batches(data(), 3, seed=1, state={"epoch": 0, "index": 4})
    with pytest.raises(ValueError, match="expected \\{'epoch'"):
        original.restore({"epoch": 0})


def test_batches_epochs_and_drop_last():
    batches = Batches(data(), 4, seed=0, shuffle=False, drop_last=False)
    assert [b["x"].tolist() for b in batches.epoch()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches.state() == {"epoch": 1, "index": 0} and batches.rows_left_out == 0
    dropped = Batches(data(), 4, seed=0, shuffle=False)
    assert [b["x"].tolist() for b in dropped.epoch()] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dropped.rows_left_out == 2
    next(dropped)
    assert len(list(dropped.epoch())) == 1  # the rest of epoch 1
    with pytest.raises(ValueError, match="same number of rows"):
        Batches({"x": np.zeros(3), "y": np.zeros(4)}, 2, seed=0)
    with pytest.raises(ValueError, match="make no full batch of 4"):
        Batches(data(3), 4, seed=0)


def test_batches_from_tokenized(tokenizer):
    arrays, _ = tokenize_preferences([PLAIN, CHAT, LONG], tokenizer, max_length=16)
    batch = next(Batches(arrays, 2, seed=0))
    assert set(batch) == set(arrays)
    assert batch["chosen_tokens"].shape == (2, arrays["chosen_tokens"].shape[1])


def test_core_imports_without_pyarrow_or_datasets():
    code = (
        "import sys, rljax.data; "
        "assert not {'pyarrow', 'datasets'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )


WORD = st.sampled_from(WORDS)
TEXT = st.lists(WORD, min_size=1, max_size=8).map(" ".join)


@given(
    st.lists(st.tuples(TEXT, TEXT, TEXT), min_size=1, max_size=4),
    st.integers(2, 12),
    st.one_of(st.none(), st.integers(1, 6)),
    st.sampled_from(["keep_end", "keep_start"]),
    st.sampled_from(["truncate", "drop"]),
)
def test_tokenized_invariants(tokenizer, triples, max_length, max_prompt_length, mode, overflow):
    rows = [{"prompt": p, "chosen": c, "rejected": r + " ?"} for p, c, r in triples]
    arrays, report = tokenize_preferences(
        rows,
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=mode,
        overflow=overflow,
    )
    assert report.kept + report.dropped == len(rows) and len(report.kept_rows) == report.kept
    assert arrays["chosen_tokens"].shape[0] == report.kept
    prompt_lengths = arrays["prompt_lengths"]
    for side in ("chosen", "rejected"):
        tokens, mask, loss_mask = (arrays[f"{side}_{k}"] for k in ("tokens", "mask", "loss_mask"))
        assert tokens.shape[1] <= max_length
        lengths = mask.sum(1)
        assert (mask == (np.arange(mask.shape[1]) < lengths[:, None])).all()  # right-padded
        assert (tokens[~mask] == PAD).all()
        assert not loss_mask[:, :1].any() and (loss_mask <= mask).all()
        assert (loss_mask.sum(1) == lengths - prompt_lengths).all()
        assert (loss_mask.sum(1) >= 1).all()
        for i, row in enumerate(report.kept_rows):
            prompt = [BOS, *ids(rows[row]["prompt"])]
            completion = [*ids(rows[row][side]), EOS]
            limit = min(max_length - 1, max_prompt_length or max_length)
            kept_prompt = prompt[-limit:] if mode == "keep_end" else prompt[:limit]
            expected = (kept_prompt + completion)[:max_length]
            assert tokens[i, : lengths[i]].tolist() == expected
            if overflow == "drop":
                assert expected == prompt + completion
    if max_prompt_length is not None:
        assert (prompt_lengths <= max_prompt_length).all()
