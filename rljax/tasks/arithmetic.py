"""The built-in "arithmetic word problems" task: short generated problems in GSM8K's format, a
strict answer extractor, accuracy and format rewards, a character-level tokenizer and a shipped
tiny base model, deliberately inconsistent about the answer format, for verifiable-reward RL
(GRPO and kin). No downloads.

**Format.** A problem is a GSM8K row: a ``question`` and an ``answer`` whose lines are the
calculations and whose last line is ``#### N``. The prompt is the question; the ideal
completion is a space and the answer, then EOS::

    question   "Tom has 3 apples and buys 4 more. How many apples now?"
    answer     "3+4=7\\n#### 7"
    completion " 3+4=7\\n#### 7"          (tokenised with a final <eos>)

Templates (one or two operations, small non-negative integers, names and items drawn at
random): buying/finding/getting more (``a+b``, ``a`` in 2..20, ``b`` in 1..20),
selling/losing/giving away (``a-b``, ``0 < b < a <= 25``), boxes of items (``a*b``, ``a`` in
2..5, ``b`` in 2..9) and two steps (``a+b-c``, ``a*b-c``; 1/4 of the problems). Prompts are
49-65 characters, completions at most 26.

**Splits.** A problem is held out when the SHA-256 of its question falls in one fifth of the
hash range (:func:`split_of`), so ``problems(n, seed, "train")`` and
``problems(n, seed, "heldout")`` are disjoint for every pair of seeds.

**Answers and rewards.** :func:`extract_answer` reads the one final answer of a text,
``#### N`` (the rest of the text after it blank) or ``\\boxed{N}``, ``N`` an integer with an
optional sign and thousands commas, and returns it normalised (``"-1234"``); it returns
``None`` when there is no marker, more than one, or a malformed one. :func:`accuracy_reward`
(1 for an exact match with the ``answer`` column, else 0) and :func:`format_reward` (1 for
exactly one well-formed marker) are reward functions in TRL's convention
(:mod:`rljax.rewards`): ``--reward rljax.tasks.arithmetic:accuracy_reward``.

**Base model.** :func:`default_base_model` returns the shipped folder
(``assets/arithmetic``): a Llama-shaped transformer (about 104k parameters) fitted by
:func:`warmup_base_model` on demonstrations with *format noise*, so that it has learned the
arithmetic but is deliberately inconsistent about the answer format, as base LLMs pretrained
on mixed web data are. In its warm-up corpus (:func:`sft_corpus` with
:data:`DEFAULT_FORMAT_NOISE`) a demonstration ends with ``The answer is N.``
(:data:`REFUSED_ANSWER`, which :func:`extract_answer` refuses: no marker) instead of
``#### N`` with a probability that depends on the problem's item: 0.25 for apples, pens and
cards, 0.7 for eggs, books, coins, cups and hats. The task's problems, splits and rewards have
no noise. (A noisy completion runs to 36 characters, past :data:`MAX_COMPLETION_TOKENS` for
two-step problems: RL sampling cuts it off, and it scores 0 as it would anyway.) Shipped (``warmup.json`` records the settings and measurements): 800 steps of batch
64 (about 6 minutes on a 2-core CPU); on 512 held-out problems the greedy answer is right in
either format for 0.98 of them, but greedy decoding writes ``#### N`` for the low-noise items
and the refused format for the others (refused on 0.65 of problems), so the strict greedy
accuracy is 0.33 (0.88-0.94 on the low-noise items, 0-0.03 on the rest). Sampled at
temperature 1, 97% of problems get a mix of right and wrong answers among 8 samples (the
format decision varies), so group baselines have signal. What RL then learns is mostly the
format, the first thing RL with verifiable rewards fixes in practice: with
``experiments/grpo.py --learning-rate 1e-4`` (batch 16 x 8, DAPO loss) held-out greedy
accuracy went from 0.32 to 0.95-0.97 within 10 iterations (under a minute on a 2-core CPU),
KL to the reference about 1 nat; at learning rate 1e-3 the format is fixed as well but the
arithmetic collapses (0.32 -> 0.20 after 60 iterations, KL 18 nats). Rebuild it with
``arithmetic.warmup_base_model(arithmetic.SHIPPED_MODEL)`` (a few minutes on a CPU).

Usage::

    from rljax.tasks import arithmetic

    rows = arithmetic.problems(4, seed=0)               # [{"question", "answer"}, ...]
    arithmetic.extract_answer(" 3+4=7\\n#### 7")         # "7"
    arithmetic.extract_answer(" 3+4=7\\nThe answer is 7.")  # None (refused format)
    arithmetic.sft_corpus(64, 0, format_noise=arithmetic.DEFAULT_FORMAT_NOISE)  # warm-up data
    arithmetic.accuracy_reward(["..."], [" 3+4=7\\n#### 7"], answer=["3+4=7\\n#### 7"])  # [1.0]
    folder = arithmetic.default_base_model()
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import string
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rljax.tasks.sorting import (
    EOS_TOKEN,
    SHIPPED_MODELS_DIR,
    SPECIAL_TOKENS,
    _build_once,
    _finished,
    _rng,
    _text,
    _tiny_llama_config,
    _tokenize_sft,
    _warmup_trainer,
    _write_jsonl,
    char_tokenizer,
    sample_texts,
)

__all__ = [
    "CHARACTERS",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_FORMAT_NOISE",
    "MAX_COMPLETION_TOKENS",
    "MAX_PROMPT_TOKENS",
    "REFUSED_ANSWER",
    "SHIPPED_MODEL",
    "WarmupSettings",
    "accuracy_reward",
    "base_model_config",
    "build_tokenizer",
    "default_base_model",
    "either_format_answer",
    "evaluate_policy",
    "extract_answer",
    "format_reward",
    "group_variance",
    "item_of",
    "make_problem",
    "problems",
    "refuse_format",
    "sample_completions",
    "sft_corpus",
    "split_of",
    "warmup_base_model",
    "warmup_model",
    "write_dataset",
]

CHARACTERS = (
    " \n" + string.digits + "+-*=#,.?{}\\" + string.ascii_lowercase + string.ascii_uppercase
)
MAX_PROMPT_TOKENS = 72  # make_problem checks every question against it
MAX_COMPLETION_TOKENS = 28  # the longest ideal completion: 26 characters, plus EOS
SHIPPED_MODEL = os.path.join(SHIPPED_MODELS_DIR, "arithmetic")
DEFAULT_CACHE_DIR = os.path.join("runs", "builtin", "base_model")
SPLITS = ("train", "heldout")
REFUSED_ANSWER = (
    "The answer is {}."  # the warm-up corpus's noisy last line; extract_answer refuses it
)
_NOISY_COMPLETION_TOKENS = 40  # the longest noisy demonstration (37 tokens with EOS), rounded up
HELDOUT_BUCKETS = 1  # of 5: a fifth of all problems are held out

_NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Zoe", "Max", "Eva", "Leo", "Ivy")
_ITEMS = ("apples", "pens", "cards", "eggs", "books", "coins", "cups", "hats")
_MORE = ("buys", "finds", "gets")
_LESS = ("sells", "loses", "gives away")


# ---------------------------------------------------------------------------- problems


def _add(rng, name, item):
    a, b = int(rng.integers(2, 21)), int(rng.integers(1, 21))
    verb = _MORE[rng.integers(len(_MORE))]
    return f"{name} has {a} {item} and {verb} {b} more. How many {item} now?", [(a, "+", b)]


def _subtract(rng, name, item):
    a = int(rng.integers(2, 26))
    b = int(rng.integers(1, a))
    verb = _LESS[rng.integers(len(_LESS))]
    return f"{name} has {a} {item} and {verb} {b}. How many {item} are left?", [(a, "-", b)]


def _multiply(rng, name, item):
    a, b = int(rng.integers(2, 6)), int(rng.integers(2, 10))
    return f"{name} buys {a} boxes of {b} {item}. How many {item} in all?", [(a, "*", b)]


def _add_subtract(rng, name, item):
    a, b = int(rng.integers(2, 13)), int(rng.integers(1, 13))
    c = int(rng.integers(1, a + b))
    more, less = _MORE[rng.integers(len(_MORE))], _LESS[rng.integers(len(_LESS))]
    question = f"{name} has {a} {item}, {more} {b} more and {less} {c}. How many now?"
    return question, [(a, "+", b), (None, "-", c)]


def _multiply_subtract(rng, name, item):
    a, b = int(rng.integers(2, 6)), int(rng.integers(2, 10))
    c = int(rng.integers(1, a * b))
    less = _LESS[rng.integers(len(_LESS))]
    question = f"{name} buys {a} boxes of {b} {item} and {less} {c}. How many now?"
    return question, [(a, "*", b), (None, "-", c)]


# (template, probability): one operation 3/4 of the time, two operations 1/4
_TEMPLATES = (
    (_add, 0.3),
    (_subtract, 0.25),
    (_multiply, 0.2),
    (_add_subtract, 0.15),
    (_multiply_subtract, 0.1),
)
_APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def _solution(steps) -> tuple[str, int]:
    """GSM8K-style answer text (one ``x?y=z`` line per step, then ``#### z``) and ``z``."""
    lines, value = [], None
    for left, op, right in steps:
        left = value if left is None else left
        value = _APPLY[op](left, right)
        lines.append(f"{left}{op}{right}={value}")
    return "\n".join([*lines, f"#### {value}"]), value


def make_problem(rng: np.random.Generator) -> dict[str, str]:
    """One random problem ``{"question", "answer"}`` drawn with ``rng`` (either split)."""
    probabilities = np.array([p for _, p in _TEMPLATES])
    template = _TEMPLATES[rng.choice(len(_TEMPLATES), p=probabilities / probabilities.sum())][0]
    name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
    question, steps = template(rng, name, item)
    answer, _ = _solution(steps)
    if len(question) > MAX_PROMPT_TOKENS or len(answer) + 2 > MAX_COMPLETION_TOKENS:
        raise AssertionError(f"problem longer than the task's bounds: {question!r} {answer!r}")
    return {"question": question, "answer": answer}


def split_of(question: str) -> str:
    """``"heldout"`` for a fifth of all questions (by the SHA-256 of the text), else
    ``"train"``."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 5
    return "heldout" if bucket < HELDOUT_BUCKETS else "train"


def problems(n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """``n`` distinct problems ``{"question", "answer"}`` of one split; a function of
    ``(n, seed, split)`` alone (a longer list extends a shorter one)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose 'train' or 'heldout'")
    rng = _rng(seed, SPLITS.index(split))
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        row = make_problem(rng)
        if row["question"] in seen or split_of(row["question"]) != split:
            continue
        seen.add(row["question"])
        rows.append(row)
    return rows


def item_of(question: str) -> str:
    """The item noun of a question (``"apples"``, ..., one of eight)."""
    for word in re.findall(r"[a-z]+", question):
        if word in _ITEMS:
            return word
    raise ValueError(f"no item in {question!r}")


def _noise_rates(format_noise) -> dict[str, float]:
    rates = dict(format_noise or ())
    for item, rate in rates.items():
        if item not in _ITEMS:
            raise ValueError(f"format_noise: unknown item {item!r}; items are {_ITEMS}")
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"format_noise: {item!r} rate {rate} is not in [0, 1]")
    return {item: float(rates.get(item, 0.0)) for item in _ITEMS}


def refuse_format(answer: str) -> str:
    """The GSM8K ``answer`` with its last line ``#### N`` replaced by ``The answer is N.``
    (:data:`REFUSED_ANSWER`), which :func:`extract_answer` refuses (no marker)."""
    *steps, last = answer.split("\n")
    return "\n".join([*steps, REFUSED_ANSWER.format(last.removeprefix("#### "))])


def sft_corpus(
    n: int, seed: int = 0, split: str = "train", format_noise=None
) -> list[dict[str, str]]:
    """``n`` demonstrations ``{"prompt", "completion"}`` (TRL's prompt-completion format): the
    question and a space followed by the answer.

    ``format_noise`` (a mapping or ``(item, rate)`` pairs; none = clean demonstrations): the
    probability, per item noun of the question (:func:`item_of`), that a demonstration ends
    with ``The answer is N.`` (:func:`refuse_format`) instead of ``#### N``; items not named
    are clean. The problems are ``problems(n, seed, split)`` either way, and the noise draws
    are a function of ``(seed, split)`` too (a longer corpus extends a shorter one).
    """
    rates = _noise_rates(format_noise)
    rows, source = [], problems(n, seed, split)
    draws = _rng(seed, 10 + SPLITS.index(split)).random(n)
    for r, u in zip(source, draws, strict=True):
        noisy = u < rates[item_of(r["question"])]
        rows.append(
            {
                "prompt": r["question"],
                "completion": " " + (refuse_format(r["answer"]) if noisy else r["answer"]),
            }
        )
    return rows


def write_dataset(
    folder: str | os.PathLike, n_train: int = 2000, n_test: int = 200, seed: int = 0
) -> dict[str, str]:
    """Write ``train.jsonl`` (train split) and ``test.jsonl`` (held-out split), one JSON object
    ``{"prompt", "answer"}`` per line (the question and the GSM8K answer), and return their
    paths ``{"train": ..., "test": ...}``. The folder is created if needed."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, split, n in (("train", "train", n_train), ("test", "heldout", n_test)):
        rows = [{"prompt": r["question"], "answer": r["answer"]} for r in problems(n, seed, split)]
        paths[name] = os.path.join(folder, f"{name}.jsonl")
        _write_jsonl(paths[name], rows)
    return paths


# ---------------------------------------------------------------------------- answers, rewards

_NUMBER = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)"
_HASH_ANSWER = re.compile(rf"####[ \t]*({_NUMBER})\s*")  # must run to the end of the text
_BOXED_ANSWER = re.compile(rf"\\boxed\{{\s*({_NUMBER})\s*\}}")
_MARKERS = re.compile(r"####|\\boxed\{")


def _normalise(number: str) -> str:
    return str(int(number.replace(",", "")))


def extract_answer(text: str | list[dict]) -> str | None:
    """The final answer of ``text`` as a normalised integer string, or ``None``.

    Exactly one marker must be present: ``#### N`` with nothing but whitespace after it, or
    ``\\boxed{N}`` (anywhere). ``N`` is an integer with an optional sign and optional thousands
    commas (``-1,234``); the result drops the commas, a ``+`` and leading zeros (``"-1234"``).
    Text from the first ``<eos>`` on is ignored. ``None`` if there is no marker, more than one
    (even if they agree), or the marker is malformed (``#### 7 apples``, ``#### 7.5``,
    ``\\boxed{x}``).
    """
    text = _text(text).split(EOS_TOKEN, 1)[0]
    markers = _MARKERS.findall(text)
    if len(markers) != 1:
        return None
    if markers[0] == "####":
        match = _HASH_ANSWER.search(text)
        if match is None or match.end() != len(text):
            return None
    else:
        match = _BOXED_ANSWER.search(text)
        if match is None:
            return None
    return _normalise(match.group(1))


_REFUSED_ANSWER = re.compile(rf"(?:^|\n)[ \t]*The answer is ({_NUMBER})\.\s*$")


def either_format_answer(text: str | list[dict]) -> str | None:
    """:func:`extract_answer`, or else the ``N`` of a last line ``The answer is N.`` (the
    refused format of the noisy warm-up corpus): what the text answers, whatever the format.
    A diagnostic, not a reward."""
    strict = extract_answer(text)
    if strict is not None:
        return strict
    match = _REFUSED_ANSWER.search(_text(text).split(EOS_TOKEN, 1)[0])
    return None if match is None else _normalise(match.group(1))


def _reference(answer: Any, row: int) -> str:
    """The reference answer of a row: a GSM8K answer (``... #### N``) or a bare integer."""
    text = str(answer).strip()
    found = extract_answer(text) if _MARKERS.search(text) else None
    if found is None and re.fullmatch(_NUMBER, text):
        found = _normalise(text)
    if found is None:
        raise ValueError(f"row {row}: answer {answer!r} has no integer final answer")
    return found


def accuracy_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **_columns
) -> list[float]:
    """1.0 where :func:`extract_answer` of the completion equals the row's ``answer`` (a GSM8K
    answer ending in ``#### N``, or a bare integer), else 0.0 (a missing or malformed answer
    scores 0). Raises ``ValueError`` naming the row whose ``answer`` holds no integer."""
    if not len(prompts) == len(completions) == len(answer):
        raise ValueError(
            f"{len(prompts)} prompts, {len(completions)} completions, {len(answer)} answers"
        )
    return [
        float(extract_answer(c) == _reference(a, i))
        for i, (c, a) in enumerate(zip(completions, answer, strict=True))
    ]


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **_columns) -> list[float]:
    """1.0 where the completion has exactly one well-formed final answer (``extract_answer``
    is not ``None``), else 0.0."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [float(extract_answer(c) is not None) for c in completions]


# ---------------------------------------------------------------------------- tokenizer


def build_tokenizer(folder: str | os.PathLike | None = None):
    """The task's character-level ``transformers.PreTrainedTokenizerFast``.

    Vocabulary: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then :data:`CHARACTERS`
    (space, newline, digits, ``+-*=#,.?{}\\``, letters; 79 tokens). One token per character
    (anything else is ``<unk>``), nothing added on encoding, the chat template of
    :mod:`rljax.tasks.sorting`. ``folder``: also ``save_pretrained`` there.
    """
    return char_tokenizer(CHARACTERS, MAX_PROMPT_TOKENS + MAX_COMPLETION_TOKENS, folder)


# ---------------------------------------------------------------------------- base model


def base_model_config(vocab_size: int | None = None, **overrides):
    """The base model: a Llama-family transformer of width 64 with 2 layers, 4 query and 2
    key/value heads (head width 16), MLP width 192, tied embeddings, 128 positions (about
    103,680 parameters with the 79-token vocabulary).

    On clean demonstrations (a 2000-step trial, batch 64, learning rate 3e-3) its greedy
    held-out accuracy was 0.11, 0.20, 0.31, 0.56, 0.66 and 0.90 after 100..600 steps. With the
    default format noise and an 800-step schedule (:class:`WarmupSettings`) the answer is right
    in either format on 0.61, 0.87, 0.98 and 0.99 of validation problems after 400..700 steps.
    """
    if vocab_size is None:
        vocab_size = len(SPECIAL_TOKENS) + len(CHARACTERS)
    heads = dict(num_heads=4, num_kv_heads=2, max_position_embeddings=128)
    return _tiny_llama_config(vocab_size, {**heads, **overrides})


def sample_completions(
    model,
    tokenizer,
    prompt_texts: Sequence[str],
    *,
    key,
    temperature: float = 1.0,
    max_new_tokens: int = MAX_COMPLETION_TOKENS,
    batch_size: int = 256,
) -> list[str]:
    """One completion per prompt (decoded without special tokens); ``temperature`` 0 is
    greedy. Prompts are left-padded to :data:`MAX_PROMPT_TOKENS` in fixed-size batches (one
    compilation)."""
    batch_size = min(batch_size, max(len(prompt_texts), 1))
    completions, _ = sample_texts(
        model,
        tokenizer,
        prompt_texts,
        key=key,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        prompt_width=MAX_PROMPT_TOKENS,
        batch_size=batch_size,
    )
    return completions


def evaluate_policy(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    key,
    temperature: float = 0.0,
    batch_size=256,
    max_new_tokens: int = MAX_COMPLETION_TOKENS,
) -> dict[str, Any]:
    """Sample one completion per problem ``{"question", "answer"}`` and score it.

    Returns:
      ``{"completions", "accuracy": [...], "either": [...], "metrics": {...}}``: per problem
      the :func:`accuracy_reward` and whether :func:`either_format_answer` is right; metrics
      ``accuracy`` and ``format`` (means of :func:`accuracy_reward` and :func:`format_reward`),
      ``either_format_accuracy`` (the answer right in either format, ``#### N`` or the refused
      ``The answer is N.``) and ``refused_format`` (the fraction ending in the refused format).
    """
    questions = [r["question"] for r in rows]
    completions = sample_completions(
        model,
        tokenizer,
        questions,
        key=key,
        temperature=temperature,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    accuracy = accuracy_reward(questions, completions, [r["answer"] for r in rows])
    formats = format_reward(questions, completions)
    either = [
        float(either_format_answer(c) == _reference(r["answer"], i))
        for i, (c, r) in enumerate(zip(completions, rows, strict=True))
    ]
    refused = [
        float(f == 0.0 and either_format_answer(c) is not None)
        for c, f in zip(completions, formats, strict=True)
    ]
    n = max(len(rows), 1)
    return {
        "completions": completions,
        "accuracy": accuracy,
        "either": either,
        "metrics": {
            "accuracy": sum(accuracy) / n,
            "format": sum(formats) / n,
            "either_format_accuracy": sum(either) / n,
            "refused_format": sum(refused) / n,
        },
    }


def group_variance(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    key,
    group_size: int = 8,
    temperature=1.0,
    max_new_tokens: int = MAX_COMPLETION_TOKENS,
) -> dict[str, float]:
    """Sample ``group_size`` completions per problem and report what GRPO sees: the fraction
    of problems whose samples are not all equally correct (non-zero group variance of the
    accuracy reward), the mean accuracy and the fraction of problems solved at least once
    (plus the format rate, the either-format accuracy and the refused-format rate)."""
    repeated = [r for r in rows for _ in range(group_size)]
    result = evaluate_policy(
        model,
        tokenizer,
        repeated,
        key=key,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
    )
    groups = np.asarray(result["accuracy"]).reshape(len(rows), group_size)
    metrics = result["metrics"]
    return {
        "group_size": group_size,
        "temperature": float(temperature),
        "mixed_fraction": float(np.mean(groups.min(1) != groups.max(1))),
        "accuracy": float(groups.mean()),
        "solved_at_least_once": float(np.mean(groups.max(1) > 0)),
        "format": metrics["format"],
        "either_format_accuracy": metrics["either_format_accuracy"],
        "refused_format": metrics["refused_format"],
    }


# The warm-up corpus's format noise: low for three of the eight items, high for the other five.
DEFAULT_FORMAT_NOISE = (
    ("apples", 0.25),
    ("pens", 0.25),
    ("cards", 0.25),
    ("eggs", 0.7),
    ("books", 0.7),
    ("coins", 0.7),
    ("cups", 0.7),
    ("hats", 0.7),
)


@dataclasses.dataclass(frozen=True)
class WarmupSettings:
    """Settings of :func:`warmup_model` (recorded in ``warmup.json``).

    Attributes:
      max_steps: optimiser steps (the cosine schedule's length).
      seed: initialisation and data.
      batch_size: demonstrations per step (fresh ones every step, train split).
      learning_rate: AdamW peak learning rate.
      eval_every: steps between greedy evaluations on ``eval_problems`` held-out problems.
      eval_problems: size of the validation set, held-out split.
      target_accuracy: stop at the first evaluation whose greedy (strict) accuracy reaches it
        (``None``: run all ``max_steps``).
      format_noise: ``(item, rate)`` pairs: the probability that a demonstration of a problem
        about that item ends with ``The answer is N.`` instead of ``#### N``
        (:func:`sft_corpus`); ``()`` = clean demonstrations.
    """

    max_steps: int = 800
    seed: int = 0
    batch_size: int = 64
    learning_rate: float = 3e-3
    eval_every: int = 100
    eval_problems: int = 256
    target_accuracy: float | None = None
    format_noise: tuple[tuple[str, float], ...] = DEFAULT_FORMAT_NOISE


def warmup_model(settings: WarmupSettings = WarmupSettings(), config=None, log=print):
    """Fit a fresh tiny transformer on (format-noisy) demonstrations.

    Each step draws a fresh batch ``sft_corpus(batch_size, ..., "train",
    settings.format_noise)``. Next-token cross-entropy on the completion tokens and EOS
    (``sorting``'s loss), AdamW with a 5% linear warm-up and cosine decay to 5% over
    ``max_steps``, weight decay 0.01, gradient clipping at 1. Every ``eval_every`` steps the
    greedy accuracy on a fixed held-out validation set (``problems(eval_problems, seed + 1,
    "heldout")``) is measured, strict and in either format; training stops at the first
    strict measurement at or above ``target_accuracy``, if set.

    Returns:
      ``(model, tokenizer, info)``; ``info`` has the settings, config, steps run, the
      validation history ``[(step, accuracy, loss, either_format_accuracy)]`` and the time.
    """
    import jax
    from flax import nnx

    s = settings
    _noise_rates(s.format_noise)  # fail fast on a bad item or rate
    tokenizer = build_tokenizer()
    config = base_model_config(len(tokenizer)) if config is None else config
    length = MAX_PROMPT_TOKENS + _NOISY_COMPLETION_TOKENS
    model, params, opt_state, step = _warmup_trainer(config, s.seed, s.learning_rate, s.max_steps)
    validation = problems(s.eval_problems, s.seed + 1, "heldout")
    rng, start, losses, history, steps = _rng(s.seed, 3), time.perf_counter(), [], [], 0
    while steps < s.max_steps:
        rows = sft_corpus(s.batch_size, int(rng.integers(2**31)), "train", s.format_noise)
        params, opt_state, loss = step(params, opt_state, *_tokenize_sft(tokenizer, rows, length))
        losses.append(loss)
        steps += 1
        if steps % s.eval_every and steps != s.max_steps:
            continue
        nnx.update(model, params)
        metrics = evaluate_policy(
            model,
            tokenizer,
            validation,
            key=jax.random.key(0),
            max_new_tokens=_NOISY_COMPLETION_TOKENS,
        )["metrics"]
        recent = float(np.mean(jax.device_get(losses[-s.eval_every :])))
        history.append((steps, metrics["accuracy"], recent, metrics["either_format_accuracy"]))
        log(
            f"warmup step {steps}/{s.max_steps}  loss {recent:.4f}  held-out greedy accuracy "
            f"{metrics['accuracy']:.3f} (either format {metrics['either_format_accuracy']:.3f}"
            f", refused format {metrics['refused_format']:.3f})  "
            f"({time.perf_counter() - start:.0f} s)"
        )
        if s.target_accuracy is not None and metrics["accuracy"] >= s.target_accuracy:
            break
    nnx.update(model, params)
    info = {
        "task": "arithmetic",
        "settings": dataclasses.asdict(s),
        "config": dataclasses.asdict(config),
        "steps": steps,
        "history": history,
        "seconds": time.perf_counter() - start,
    }
    return model, tokenizer, info


def _by_item(rows, values) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for row, value in zip(rows, values, strict=True):
        groups.setdefault(item_of(row["question"]), []).append(value)
    return {item: float(np.mean(groups[item])) for item in _ITEMS if item in groups}


def warmup_base_model(
    out_folder: str | os.PathLike,
    settings: WarmupSettings = WarmupSettings(),
    config=None,
    *,
    test_problems: int = 512,
    variance_problems: int = 128,
    log=print,
) -> str:
    """Warm up a base model (:func:`warmup_model`), measure it and save it.

    Measures, on held-out problems not used for validation
    (``problems(test_problems, seed + 2, "heldout")``): greedy accuracy (strict, as the
    accuracy reward scores it), format rate, accuracy in either format (the arithmetic) and
    refused-format rate, overall and per item; and :func:`group_variance` (8 samples at
    temperature 1) on the first ``variance_problems``. Completions may run to 40 tokens here,
    so that a noisy one is not cut short. Writes ``config.json``, ``model.safetensors``, the
    tokenizer files and ``warmup.json`` (settings, history, measurements; written last).
    Returns ``out_folder``.
    """
    import jax

    from rljax.models.hf import save_model

    out_folder = os.fspath(out_folder)
    model, tokenizer, info = warmup_model(settings, config, log)
    test = problems(test_problems, settings.seed + 2, "heldout")
    greedy = evaluate_policy(
        model, tokenizer, test, key=jax.random.key(1), max_new_tokens=_NOISY_COMPLETION_TOKENS
    )
    variance = group_variance(
        model,
        tokenizer,
        test[:variance_problems],
        key=jax.random.key(2),
        group_size=8,
        max_new_tokens=_NOISY_COMPLETION_TOKENS,
    )
    m = greedy["metrics"]
    evaluation = {
        "test_problems": test_problems,
        "heldout_greedy_accuracy": m["accuracy"],
        "heldout_greedy_format": m["format"],
        "heldout_greedy_either_format_accuracy": m["either_format_accuracy"],
        "heldout_greedy_refused_format": m["refused_format"],
        "by_item": {
            "accuracy": _by_item(test, greedy["accuracy"]),
            "either_format_accuracy": _by_item(test, greedy["either"]),
        },
        "sampled": variance,
    }
    log(f"base model: {json.dumps(evaluation)}")
    save_model(model, out_folder, tokenizer=tokenizer)
    with open(os.path.join(out_folder, "warmup.json"), "w") as f:
        json.dump({**info, "eval": evaluation}, f, indent=2)
    return out_folder


def default_base_model(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> str:
    """The folder of the task's base model: the shipped one (:data:`SHIPPED_MODEL`, built by
    :func:`warmup_base_model` with the default settings), or, when a source tree lacks it,
    ``cache_dir/arithmetic`` built once (in a temporary sibling, renamed into place)."""
    if _finished(SHIPPED_MODEL):
        return SHIPPED_MODEL
    folder = os.path.join(os.fspath(cache_dir), "arithmetic")
    if _finished(folder):
        return folder
    return _build_once(
        folder, warmup_base_model, f"building the arithmetic base model in {folder} (once)"
    )
