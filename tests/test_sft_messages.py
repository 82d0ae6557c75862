"""Conversational SFT (TRL's ``messages`` rows) with an assistant-only loss: every assistant
turn of a conversation rendered with a real (Qwen2 / ChatML) chat template is trained on and
nothing else, checked by decoding the counted tokens against strings written out here; a
conversation with one reply at the end gives what the prompt/completion split gives; templates
that hide the spans, a missing template and malformed rows are refused with the row named;
packing keeps the masks."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest

from rljax import data, experiment
from rljax.tasks import sorting

# Qwen2's chat template (Qwen/Qwen2-0.5B-Instruct), as published
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# like Qwen3's: the reasoning of a reply is shown only when it is the last message, so the
# rendering of an earlier reply changes once later turns follow
REWRITES_EARLIER_TURNS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>{{ m['reasoning'] }}</think>"
    "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# renders the other turns only (and no generation prompt)
HIDES_REPLIES = (
    "{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
)


def make_tokenizer(template=QWEN2):
    """The built-in tasks' character-level tokenizer (one token per character, <eos> 1) with
    ChatML's two special tokens added and ``template``."""
    tokenizer = sorting.char_tokenizer(string.ascii_letters + string.digits + " .,?!\n'<>/", 512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def message(role, content, **extra):
    return {"role": role, "content": content, **extra}


MULTI_TURN = [
    message("system", "Be brief."),
    message("user", "Capital of France?"),
    message("assistant", "Paris."),
    message("user", "And of Italy?"),
    message("assistant", "Rome."),
]
MULTI_TURN_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nCapital of France?<|im_end|>\n"
    "<|im_start|>assistant\nParis.<|im_end|>\n"
    "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
    "<|im_start|>assistant\nRome.<|im_end|>\n"
)


def sequences(rows, tokenizer, **settings):
    config = experiment.SFTRunConfig(**settings)
    return experiment.sft_sequences(rows, data.RowNumbers.of(len(rows)), tokenizer, config)


def counted_runs(tokenizer, ids, mask):
    """The decoded text of each maximal run of counted tokens."""
    runs, current = [], []
    for token, counted in zip(ids, mask, strict=True):
        if counted:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def test_every_assistant_turn_and_nothing_else(tokenizer):
    (ids,), (mask,), report = sequences([{"messages": MULTI_TURN}], tokenizer)
    assert tokenizer.decode(ids) == MULTI_TURN_TEXT + "<eos>"
    # counted: each reply's content, its end-of-turn marker and the newline the template
    # writes after it (all it writes after the generation prompt), plus the EOS appended at
    # the end; never the system or user turns or the "<|im_start|>assistant\n" headers
    assert counted_runs(tokenizer, ids, mask) == [
        "Paris.<|im_end|>\n",
        "Rome.<|im_end|>\n<eos>",
    ]
    assert mask.sum() == len("Paris.") + 2 + len("Rome.") + 3
    assert report == {
        "rows": 1, "format": "messages", "examples": 1, "skipped": {}, "truncated": 0,
        "dropped": 0, "unknown_tokens": 0,
    }  # fmt: skip
    (_,), (everything,), _ = sequences(
        [{"messages": MULTI_TURN}], tokenizer, completion_only_loss=False
    )
    assert everything.all() and len(everything) == len(ids)


def test_render_conversation_counts_consecutive_and_tool_turns(tokenizer):
    messages = [
        message("user", "Weather?"),
        message("assistant", "Checking."),
        message("assistant", "Calling the tool."),
        message("tool", "sunny"),
        message("assistant", "Sunny."),
    ]
    ids, assistant, unknown = data.render_conversation(tokenizer, messages)
    assert unknown == 0
    assert counted_runs(tokenizer, ids, assistant) == [
        "Checking.<|im_end|>\n",  # the next header, "<|im_start|>assistant\n", is not
        "Calling the tool.<|im_end|>\n",
        "Sunny.<|im_end|>\n",
    ]


def test_one_reply_at_the_end_is_the_prompt_completion_split(tokenizer):
    """A conversation whose only assistant message is the last gives the tokens and loss mask
    of the prompt/completion row (every earlier message the prompt), the format's code path
    before assistant-only training existed, under truncation, dropping and the full loss."""
    conversations = [
        [message("user", "Capital of France?"), message("assistant", "Paris.")],
        [message("system", "Be brief."), message("user", "Hi?"), message("assistant", "Hi!")],
        [message("user", "x" * 60), message("assistant", "ok")],
        [message("user", "Hi?"), message("assistant", "y" * 60)],
        # an opening assistant message is context, as in the prompt
        [
            message("assistant", "Hey."),
            message("user", "Hi?"),
            message("assistant", "Hello."),
        ],
    ]
    messages_rows = [{"messages": c} for c in conversations]
    split_rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in conversations]
    for settings in (
        {},
        {"max_length": 90},
        {"max_length": 90, "overflow": "drop"},
        {"max_length": 90, "completion_only_loss": False},
    ):
        got_ids, got_masks, got = sequences(messages_rows, tokenizer, **settings)
        want_ids, want_masks, want = sequences(split_rows, tokenizer, **settings)
        assert len(got_ids) == len(want_ids) > 0, settings
        for a, b in zip(got_ids + got_masks, want_ids + want_masks, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=str(settings))
        assert {**got, "format": None} == {**want, "format": None}, settings
        if "max_length" in settings:  # the cuts were exercised: 2 rows too long
            assert got["truncated"] + got["dropped"] == 2, settings


def test_truncation_cuts_the_end_of_the_conversation(tokenizer):
    rows = [{"messages": MULTI_TURN}]
    (full,), _, _ = sequences(rows, tokenizer)
    cut = len(full) - 4  # without "Rome.<|im_end|>\n<eos>"'s last 4 tokens
    (ids,), (mask,), report = sequences(rows, tokenizer, max_length=cut)
    assert report["truncated"] == 1 and len(ids) == cut
    assert tokenizer.decode(ids) == MULTI_TURN_TEXT.removesuffix(".<|im_end|>\n")
    assert counted_runs(tokenizer, ids, mask) == ["Paris.<|im_end|>\n", "Rome"]
    ids, _, report = sequences(rows, tokenizer, max_length=cut, overflow="drop")
    assert ids == [] and report["dropped"] == 1


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tokenizer = make_tokenizer(REWRITES_EARLIER_TURNS)
    single = [message("user", "Hi?"), message("assistant", "Hello.", reasoning="greet")]
    multi = [*single, message("user", "Bye?"), message("assistant", "Bye.", reasoning="end")]
    (ids,), (mask,), _ = sequences([{"messages": single}], tokenizer)  # one reply: fine
    assert counted_runs(tokenizer, ids, mask) == ["<think>greet</think>Hello.<|im_end|>\n<eos>"]
    rows = [{"messages": single}, {"messages": multi}]
    with pytest.raises(ValueError, match=r"row 1: .*not a prefix.*'prompt' \+ 'completion'"):
        sequences(rows, tokenizer)


def test_a_template_that_hides_the_replies_is_refused():
    rows = [{"messages": MULTI_TURN}]
    with pytest.raises(ValueError, match=r"row 0: .*assistant message 2 as nothing.*hides"):
        sequences(rows, make_tokenizer(HIDES_REPLIES))


def test_no_chat_template_is_refused():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"row 0: .*need a tokenizer with a chat_template"):
        sequences([{"messages": MULTI_TURN}], tokenizer)


BAD_ROWS = [
    ({"messages": [message("system", "Be brief."), message("user", "Hi?")]}, "no assistant"),
    ({"messages": [message("assistant", "Hi, how can I help?")]}, "no assistant"),
    ({"messages": [*MULTI_TURN, message("user", "Thanks!")]}, "ends with role 'user'"),
    ({"messages": "Hi?"}, "field 'messages' is a str"),
    ({"messages": [message("user", "Hi?"), "Hello."]}, "message 1 is a str"),
    ({"messages": [message("user", 3), message("assistant", "3")]}, "'content' is a int"),
    ({"messages": [{"content": "Hi?"}, message("assistant", "Hi")]}, "has no 'role'"),
    ({"messages": [message("user", "Hi?"), message("assistant", " ")]}, "every assistant"),
]


@pytest.mark.parametrize("row,error", BAD_ROWS, ids=[e for _, e in BAD_ROWS])
def test_invalid_rows_are_named_or_skipped(tokenizer, row, error):
    rows = [{"messages": MULTI_TURN}, row]
    with pytest.raises(ValueError, match=f"row 1: .*{error}.*--skip-invalid"):
        sequences(rows, tokenizer)
    ids, _, report = sequences(rows, tokenizer, skip_invalid=True)
    assert len(ids) == 1 and report["examples"] == 1 and sum(report["skipped"].values()) == 1


def test_packing_keeps_the_masks(tokenizer):
    rows = [
        {"messages": MULTI_TURN},
        {"messages": [message("user", "Hi?"), message("assistant", "Hello.")]},
        {"messages": MULTI_TURN[1:3]},
    ]
    config = experiment.SFTRunConfig(max_length=300)
    ids, masks, _ = experiment.sft_sequences(rows, data.RowNumbers.of(3), tokenizer, config)
    arrays, layout = experiment.sft_arrays(ids, masks, config)
    assert layout["rows"] == 1
    segments = arrays["segment_ids"][0]
    found = []
    for s in range(1, segments.max() + 1):
        span = segments == s
        tokens, loss = arrays["tokens"][0][span], arrays["loss_mask"][0][span]
        (i,) = [i for i, seq in enumerate(ids) if np.array_equal(seq, tokens)]
        np.testing.assert_array_equal(loss, masks[i])
        found.append(i)
    assert sorted(found) == [0, 1, 2]
    assert arrays["loss_mask"].sum() == sum(m.sum() for m in masks)


def test_load_sft_data_reads_a_multi_turn_file(tmp_path, tokenizer):
    path = tmp_path / "chats.jsonl"
    rows = [{"messages": MULTI_TURN}] * 9 + [{"messages": [message("user", "Hi?")]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = experiment.SFTRunConfig(data=str(path), eval_data=str(path), max_length=256)
    with pytest.raises(ValueError, match=r"line 10 \(1-based\): .*no assistant message"):
        experiment.load_sft_data(config, tokenizer)
    config = experiment.SFTRunConfig(
        data=str(path), eval_data=str(path), max_length=256, skip_invalid=True
    )
    train, _, report = experiment.load_sft_data(config, tokenizer)
    assert report["train"]["examples"] == 9
    assert report["train"]["skipped"] == {"malformed_messages": 1}
    assert train["loss_mask"].sum() == 9 * (len("Paris.") + 2 + len("Rome.") + 3)
