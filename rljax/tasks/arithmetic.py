"""The built-in "arithmetic word problems" task: short generated problems in GSM8K's format, a
strict answer extractor, accuracy and format rewards, a character-level tokenizer and a shipped,
deliberately under-trained tiny base model for verifiable-reward RL (GRPO and kin). No
downloads.

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
(``assets/arithmetic``): a Llama-shaped transformer fitted on demonstrations by
:func:`warmup_base_model` and stopped early, once its greedy held-out accuracy passed a target,
so that it writes the format but gets only some answers right (its ``warmup.json`` records the
settings and measurements). Shipped: stopped after 225 steps (about 3 minutes on a CPU), greedy
held-out accuracy 0.24 on 512 problems (products 0.69, differences 0.24, sums and two-step
problems about 0.09), format 1.0; sampled at temperature 1, 57% of problems get a mix of right
and wrong answers among 8 samples, so group baselines have signal. The same model trained on
reaches 0.9 by step 600: RL has room to improve it. Rebuild it with
``arithmetic.warmup_base_model(arithmetic.SHIPPED_MODEL)`` (a few minutes on a CPU).

Usage::

    from rljax.tasks import arithmetic

    rows = arithmetic.problems(4, seed=0)               # [{"question", "answer"}, ...]
    arithmetic.extract_answer(" 3+4=7\\n#### 7")         # "7"
    arithmetic.accuracy_reward(["..."], [" 3+4=7\\n#### 7"], answer=["3+4=7\\n#### 7"])  # [1.0]
    folder = arithmetic.default_base_model()
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import string
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rljax.tasks.sorting import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    SHIPPED_MODELS_DIR,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    _completion_loss_fn,
    _rng,
    _text,
    _tokenize_sft,
    _write_jsonl,
)

__all__ = [
    "CHARACTERS",
    "DEFAULT_CACHE_DIR",
    "MAX_COMPLETION_TOKENS",
    "MAX_PROMPT_TOKENS",
    "SHIPPED_MODEL",
    "WarmupSettings",
    "accuracy_reward",
    "base_model_config",
    "build_tokenizer",
    "default_base_model",
    "evaluate_policy",
    "extract_answer",
    "format_reward",
    "group_variance",
    "make_problem",
    "problems",
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


def sft_corpus(n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """``n`` demonstrations ``{"prompt", "completion"}`` (TRL's prompt-completion format): the
    question and a space followed by the answer."""
    return [
        {"prompt": r["question"], "completion": " " + r["answer"]} for r in problems(n, seed, split)
    ]


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
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        model_max_length=MAX_PROMPT_TOKENS + MAX_COMPLETION_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if folder is not None:
        tokenizer.save_pretrained(os.fspath(folder))
    return tokenizer


# ---------------------------------------------------------------------------- base model


def base_model_config(vocab_size: int | None = None, **overrides):
    """The base model: a Llama-family transformer of width 64 with 2 layers, 4 query and 2
    key/value heads (head width 16), MLP width 192, tied embeddings, 128 positions (about
    103,680 parameters with the 79-token vocabulary).

    In a 2000-step trial (batch 64, learning rate 3e-3) its greedy held-out accuracy was 0.11,
    0.20, 0.31, 0.56, 0.66 and 0.90 after 100..600 steps: it learns the task, and stopping
    early leaves a model that is right on some problems only.
    """
    from rljax.models.transformer import TransformerConfig

    kwargs = dict(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS) if vocab_size is None else vocab_size,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=192,
        max_position_embeddings=128,
        initializer_range=0.05,
    )
    return TransformerConfig.llama(**{**kwargs, **overrides})


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
    import jax
    from flax import nnx

    from rljax.models.generate import SamplingConfig, left_pad, make_generate_fn

    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    graphdef, params = nnx.split(model)
    generate_fn = make_generate_fn(graphdef, sampling)
    batch_size = min(batch_size, max(len(prompt_texts), 1))
    completions = []
    for start in range(0, len(prompt_texts), batch_size):
        chunk = list(prompt_texts[start : start + batch_size])
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        ids += [ids[0]] * (batch_size - len(ids))  # a fixed batch shape
        tokens, mask = left_pad(
            ids, tokenizer.pad_token_id, length=max(MAX_PROMPT_TOKENS, *map(len, ids))
        )
        out = generate_fn(params, tokens, mask, jax.random.fold_in(key, start))
        out_tokens, out_mask = jax.device_get((out.completions, out.completion_mask))
        for row in range(len(chunk)):
            kept = out_tokens[row][out_mask[row].astype(bool)].tolist()
            completions.append(tokenizer.decode(kept, skip_special_tokens=True))
    return completions


def evaluate_policy(
    model, tokenizer, rows: Sequence[dict], *, key, temperature: float = 0.0, batch_size=256
) -> dict[str, Any]:
    """Sample one completion per problem ``{"question", "answer"}`` and score it.

    Returns:
      ``{"completions", "accuracy": [...], "metrics": {"accuracy", "format"}}`` (means of
      :func:`accuracy_reward` and :func:`format_reward`).
    """
    questions = [r["question"] for r in rows]
    completions = sample_completions(
        model, tokenizer, questions, key=key, temperature=temperature, batch_size=batch_size
    )
    accuracy = accuracy_reward(questions, completions, [r["answer"] for r in rows])
    formats = format_reward(questions, completions)
    n = max(len(rows), 1)
    return {
        "completions": completions,
        "accuracy": accuracy,
        "metrics": {"accuracy": sum(accuracy) / n, "format": sum(formats) / n},
    }


def group_variance(
    model, tokenizer, rows: Sequence[dict], *, key, group_size: int = 8, temperature=1.0
) -> dict[str, float]:
    """Sample ``group_size`` completions per problem and report what GRPO sees: the fraction
    of problems whose samples are not all equally correct (non-zero group variance of the
    accuracy reward), the mean accuracy and the fraction of problems solved at least once."""
    repeated = [r for r in rows for _ in range(group_size)]
    result = evaluate_policy(model, tokenizer, repeated, key=key, temperature=temperature)
    groups = np.asarray(result["accuracy"]).reshape(len(rows), group_size)
    return {
        "group_size": group_size,
        "temperature": float(temperature),
        "mixed_fraction": float(np.mean(groups.min(1) != groups.max(1))),
        "accuracy": float(groups.mean()),
        "solved_at_least_once": float(np.mean(groups.max(1) > 0)),
        "format": result["metrics"]["format"],
    }


@dataclasses.dataclass(frozen=True)
class WarmupSettings:
    """Settings of :func:`warmup_model` (recorded in ``warmup.json``).

    Attributes:
      max_steps: the most optimiser steps (the cosine schedule's length).
      seed: initialisation and data.
      batch_size: demonstrations per step (fresh ones every step, train split).
      learning_rate: AdamW peak learning rate.
      eval_every: steps between greedy evaluations on ``eval_problems`` held-out problems.
      eval_problems: size of the early-stopping (validation) set, held-out split.
      target_accuracy: stop at the first evaluation whose greedy accuracy reaches it (``None``
        never stops early).
    """

    max_steps: int = 2000
    seed: int = 0
    batch_size: int = 64
    learning_rate: float = 3e-3
    eval_every: int = 25
    eval_problems: int = 256
    target_accuracy: float | None = 0.25


def _make_step(graphdef, optimizer):
    import jax
    import optax

    loss_fn = _completion_loss_fn(graphdef)

    @jax.jit
    def step(params, opt_state, tokens, mask, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask, loss_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def warmup_model(settings: WarmupSettings = WarmupSettings(), config=None, log=print):
    """Fit a fresh tiny transformer on demonstrations (:func:`sft_corpus`) and stop early.

    Next-token cross-entropy on the completion tokens and EOS (``sorting``'s loss), AdamW with
    a 5% linear warm-up and cosine decay to 5% over ``max_steps``, weight decay 0.01, gradient
    clipping at 1. Every ``eval_every`` steps the greedy accuracy on a fixed held-out
    validation set (``problems(eval_problems, seed + 1, "heldout")``) is measured; training
    stops at the first measurement at or above ``target_accuracy``.

    Returns:
      ``(model, tokenizer, info)``; ``info`` has the settings, config, steps run, the
      validation history ``[(step, accuracy, loss)]`` and the time.
    """
    import jax
    import optax
    from flax import nnx

    from rljax.models.transformer import Transformer

    s = settings
    tokenizer = build_tokenizer()
    config = base_model_config(len(tokenizer)) if config is None else config
    length = MAX_PROMPT_TOKENS + MAX_COMPLETION_TOKENS
    model = Transformer(config, rngs=nnx.Rngs(s.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, s.learning_rate, max(1, s.max_steps // 20), s.max_steps, s.learning_rate * 0.05
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)
    )
    opt_state = optimizer.init(params)
    step = _make_step(graphdef, optimizer)
    validation = problems(s.eval_problems, s.seed + 1, "heldout")
    rng, start, losses, history, steps = _rng(s.seed, 3), time.perf_counter(), [], [], 0
    while steps < s.max_steps:
        rows = sft_corpus(s.batch_size, int(rng.integers(2**31)), "train")
        params, opt_state, loss = step(params, opt_state, *_tokenize_sft(tokenizer, rows, length))
        losses.append(loss)
        steps += 1
        if steps % s.eval_every and steps != s.max_steps:
            continue
        nnx.update(model, params)
        accuracy = evaluate_policy(model, tokenizer, validation, key=jax.random.key(0))
        recent = float(np.mean(jax.device_get(losses[-s.eval_every :])))
        history.append((steps, accuracy["metrics"]["accuracy"], recent))
        log(
            f"warmup step {steps}/{s.max_steps}  loss {recent:.4f}  held-out greedy accuracy "
            f"{history[-1][1]:.3f}  ({time.perf_counter() - start:.0f} s)"
        )
        if s.target_accuracy is not None and history[-1][1] >= s.target_accuracy:
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

    Measures, on held-out problems not used for early stopping
    (``problems(test_problems, seed + 2, "heldout")``): greedy accuracy and format rate, and
    :func:`group_variance` (8 samples at temperature 1) on the first ``variance_problems``.
    Writes ``config.json``, ``model.safetensors``, the tokenizer files and ``warmup.json``
    (settings, history, measurements; written last). Returns ``out_folder``.
    """
    import jax

    from rljax.models.hf import save_model

    out_folder = os.fspath(out_folder)
    model, tokenizer, info = warmup_model(settings, config, log)
    test = problems(test_problems, settings.seed + 2, "heldout")
    greedy = evaluate_policy(model, tokenizer, test, key=jax.random.key(1))["metrics"]
    variance = group_variance(
        model, tokenizer, test[:variance_problems], key=jax.random.key(2), group_size=8
    )
    evaluation = {
        "test_problems": test_problems,
        "heldout_greedy_accuracy": greedy["accuracy"],
        "heldout_greedy_format": greedy["format"],
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
    if os.path.exists(os.path.join(SHIPPED_MODEL, "warmup.json")):
        return SHIPPED_MODEL
    folder = os.path.join(os.fspath(cache_dir), "arithmetic")
    if os.path.exists(os.path.join(folder, "warmup.json")):
        return folder
    os.makedirs(os.fspath(cache_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".arithmetic-", dir=os.fspath(cache_dir))
    try:
        print(f"building the arithmetic base model in {folder} (once)", flush=True)
        warmup_base_model(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.exists(os.path.join(folder, "warmup.json")):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
