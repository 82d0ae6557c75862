"""The built-in "sort the letters" task: generated prompts, a programmatic oracle, a
character-level tokenizer and a warmed-up tiny base model. No downloads.

**Format.** A prompt is ``"sort: " + letters + " ->"`` where ``letters`` are ``k`` distinct
random lowercase letters (``k`` uniform in ``[min_letters, max_letters]``, default 3..6); the
ideal completion is a space and the same letters in alphabetical order, then EOS::

    prompt     "sort: dbca ->"
    completion " abcd"            (tokenised with a final <eos>)

**Oracle.** :func:`score` is 0 when the completion (whitespace removed, anything from the
first ``<eos>`` on ignored) is not a permutation of the prompt's letters, and otherwise the
fraction of letter pairs in the right order,

.. math:: s = \\frac{1}{\\binom{k}{2}} \\sum_{i < j} [c_i < c_j] = \\frac{1 + \\tau}{2},

with :math:`\\tau` Kendall's rank correlation between the completion and the sorted order
(Kendall, 1938). It is 1 exactly when the completion is sorted and 1/2 on average for a
uniformly random permutation. :func:`prefer` compares two completions by score (the
preference oracle); :func:`score_batch` has the signature of a TRL reward function.

**Data.** :func:`sft_corpus` pairs each prompt with a *random* permutation of its letters, so a
model fitted on it (:func:`warmup_base_model`) writes valid permutations in a random order: a
reference policy with mean score near 1/2 that preference learning or RL can improve on.
:func:`preference_pairs` labels two different random permutations with the oracle, and
:func:`write_dataset` writes TRL's standard (not conversational) JSONL files.

**Tokenizer.** :func:`build_tokenizer` makes one token per character (the 26 letters, space,
``:``, ``-``, ``>``) plus ``<pad>`` (id 0), ``<eos>`` (1), ``<bos>`` (2) and ``<unk>`` (3).
Nothing is added automatically (no BOS, no EOS): a prompt's ids are exactly its characters'.
Its chat template renders each message's content verbatim and an ``<eos>`` after every
assistant message, so the conversational form of a row tokenises like the standard form.

Usage::

    from rljax.tasks import sorting

    folder = sorting.default_base_model()          # warmed up once, cached under runs/builtin
    sorting.score("sort: dbca ->", " abcd")        # 1.0
    sorting.score("sort: dbca ->", " abdc")        # 5/6
    sorting.prefer("sort: dbca ->", " abcd", " dcba")  # True
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ALPHABET",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "DEFAULT_CACHE_DIR",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SHIPPED_MODELS_DIR",
    "UNK_TOKEN",
    "base_model_config",
    "build_tokenizer",
    "default_base_model",
    "evaluate_policy",
    "ideal_completion",
    "is_valid",
    "letters_of",
    "make_prompt",
    "max_completion_tokens",
    "max_prompt_tokens",
    "prefer",
    "preference_pairs",
    "prompts",
    "score",
    "score_batch",
    "sft_corpus",
    "warmup_base_model",
    "warmup_model",
    "write_dataset",
]

ALPHABET = string.ascii_lowercase
PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3
TASK_CHARACTERS = " :->" + ALPHABET  # ids 4.. in this order
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)
MIN_LETTERS, MAX_LETTERS = 3, 6
DEFAULT_CACHE_DIR = os.path.join("runs", "builtin", "base_model")
SHIPPED_MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
_PREFIX, _SUFFIX = "sort: ", " ->"
_PROMPT_RE = re.compile(r"sort:\s*([a-z]*)\s*->")


# ---------------------------------------------------------------------------- format and oracle


def make_prompt(letters: str) -> str:
    """The prompt for ``letters`` (in the given order): ``"sort: " + letters + " ->"``."""
    return f"{_PREFIX}{letters}{_SUFFIX}"


def _text(x: Any) -> str:
    """A string, or the concatenated contents of a conversational message list."""
    if isinstance(x, str):
        return x
    if isinstance(x, Sequence) and all(isinstance(m, dict) and "content" in m for m in x):
        return "".join(str(m["content"]) for m in x)
    raise TypeError(f"expected a string or a list of messages, got {type(x).__name__}")


def letters_of(prompt: str | list[dict]) -> str:
    """The letters of a prompt, in prompt order (``"sort: dbca ->"`` -> ``"dbca"``).

    Raises:
      ValueError: the prompt is not in the task's format.
    """
    match = _PROMPT_RE.search(_text(prompt))
    if match is None:
        raise ValueError(f"not a sorting prompt (expected 'sort: <letters> ->'): {prompt!r}")
    return match.group(1)


def ideal_completion(prompt: str | list[dict]) -> str:
    """The completion that scores 1: a space and the prompt's letters sorted (no EOS)."""
    return " " + "".join(sorted(letters_of(prompt)))


def _clean(completion: str | list[dict]) -> str:
    """The completion's characters: text from the first ``<eos>`` on dropped, ``<pad>`` and
    whitespace removed."""
    text = _text(completion).split(EOS_TOKEN, 1)[0].replace(PAD_TOKEN, "")
    return "".join(text.split())


def is_valid(prompt: str | list[dict], completion: str | list[dict]) -> bool:
    """Whether the completion (whitespace removed) is a permutation of the prompt's letters."""
    return sorted(_clean(completion)) == sorted(letters_of(prompt))


def score(prompt: str | list[dict], completion: str | list[dict]) -> float:
    """The oracle: 0 for a non-permutation, else the fraction of correctly ordered pairs.

    Args:
      prompt: a task prompt (string, or a conversational message list).
      completion: model output text. Whitespace is ignored, as is everything from the first
        ``<eos>`` on (decode with ``skip_special_tokens=True`` or not; both work).

    Returns:
      ``0.0`` if the completion is not a permutation of the prompt's letters; otherwise
      ``#{i < j : c_i < c_j} / (k (k - 1) / 2)`` in ``[0, 1]``, which is ``1.0`` exactly when
      the completion is sorted (a one-letter prompt scores 1 for its one valid completion).
      The reversed order also scores 0; :func:`is_valid` tells it apart from an invalid answer.
    """
    letters = letters_of(prompt)
    chars = _clean(completion)
    if sorted(chars) != sorted(letters):
        return 0.0
    k = len(chars)
    if k < 2:
        return 1.0
    ordered = sum(a < b for a, b in itertools.combinations(chars, 2))
    return ordered / (k * (k - 1) // 2)


def score_batch(
    prompts: Sequence[str | list[dict]], completions: Sequence[str | list[dict]], **kwargs
) -> list[float]:
    """:func:`score` of each ``(prompt, completion)`` pair.

    The signature of a TRL reward function (``reward_funcs=[score_batch]``; extra dataset
    columns arrive as keyword arguments and are ignored).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [score(p, c) for p, c in zip(prompts, completions, strict=True)]


def prefer(prompt: str | list[dict], a: str | list[dict], b: str | list[dict]) -> bool:
    """The preference oracle: True if completion ``a`` is preferred to ``b``.

    ``a`` wins if its :func:`score` is higher. Ties are broken deterministically: the
    completion whose cleaned text (see :func:`score`) is lexicographically smaller wins, then the
    raw text, and ``a`` wins if both are identical. So for ``a != b``,
    ``prefer(p, a, b) == (not prefer(p, b, a))``.
    """
    sa, sb = score(prompt, a), score(prompt, b)
    if sa != sb:
        return sa > sb
    ka, kb = (_clean(a), _text(a)), (_clean(b), _text(b))
    return ka <= kb


# ---------------------------------------------------------------------------- generated data


def _rng(seed: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream)])


def _check_range(min_letters: int, max_letters: int) -> None:
    if not 1 <= min_letters <= max_letters <= len(ALPHABET):
        raise ValueError(
            f"need 1 <= min_letters <= max_letters <= {len(ALPHABET)}, got "
            f"min_letters={min_letters}, max_letters={max_letters}"
        )


def _random_letters(rng: np.random.Generator, min_letters: int, max_letters: int) -> str:
    k = int(rng.integers(min_letters, max_letters + 1))
    return "".join(ALPHABET[i] for i in rng.choice(len(ALPHABET), size=k, replace=False))


def _permutation(rng: np.random.Generator, letters: str) -> str:
    return "".join(letters[i] for i in rng.permutation(len(letters)))


def _prompt_stream(rng, min_letters, max_letters):
    while True:
        yield make_prompt(_random_letters(rng, min_letters, max_letters))


def prompts(
    n: int, seed: int = 0, *, min_letters: int = MIN_LETTERS, max_letters: int = MAX_LETTERS
) -> list[str]:
    """``n`` prompts with ``k`` distinct random letters each, ``k`` uniform in
    ``[min_letters, max_letters]``; a function of ``seed`` alone."""
    _check_range(min_letters, max_letters)
    return list(itertools.islice(_prompt_stream(_rng(seed), min_letters, max_letters), n))


def sft_corpus(
    n: int, seed: int = 0, *, min_letters: int = MIN_LETTERS, max_letters: int = MAX_LETTERS
) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "completion"}`` (TRL's prompt-completion format) whose
    completions are a space and a uniformly RANDOM permutation of the prompt's letters.

    A model fitted on these learns the format and the letters but no order: the reference
    policy of the preference experiments (mean oracle score about 1/2).
    """
    _check_range(min_letters, max_letters)
    rng = _rng(seed, 1)
    rows = []
    for _ in range(n):
        letters = _random_letters(rng, min_letters, max_letters)
        rows.append(
            {"prompt": make_prompt(letters), "completion": " " + _permutation(rng, letters)}
        )
    return rows


def preference_pairs(
    n: int,
    seed: int = 0,
    *,
    min_letters: int = MIN_LETTERS,
    max_letters: int = MAX_LETTERS,
    exclude_prompts: set[str] | frozenset[str] = frozenset(),
) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}`` (TRL's standard preference format).

    Each row draws a prompt and two different random permutations of its letters; the oracle
    (:func:`score`) labels the better one ``chosen``. Pairs with equal scores are skipped (a
    new prompt is drawn), so every row has ``score(chosen) > score(rejected)``. Prompts in
    ``exclude_prompts`` are skipped too (to keep a test set apart from a training set).
    """
    _check_range(min_letters, max_letters)
    if max_letters < 2:
        raise ValueError("preference pairs need max_letters >= 2 (one letter has one order)")
    rng = _rng(seed, 2)
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        letters = _random_letters(rng, min_letters, max_letters)
        prompt = make_prompt(letters)
        a, b = _permutation(rng, letters), _permutation(rng, letters)
        if prompt in exclude_prompts or score(prompt, a) == score(prompt, b):
            continue  # also covers a == b and one-letter prompts
        if score(prompt, b) > score(prompt, a):
            a, b = b, a
        rows.append({"prompt": prompt, "chosen": " " + a, "rejected": " " + b})
    return rows


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_dataset(
    folder: str | os.PathLike,
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    kind: str = "preference",
    min_letters: int = MIN_LETTERS,
    max_letters: int = MAX_LETTERS,
) -> dict[str, str]:
    """Write ``train.jsonl`` and ``test.jsonl`` (one JSON object per line) in TRL's standard
    format, and return their paths ``{"train": ..., "test": ...}``.

    Args:
      folder: created if needed; the two files are replaced.
      n_train, n_test: rows per split.
      seed: the data are a function of ``seed`` (and the other arguments) alone.
      kind: ``"preference"`` (``prompt``, ``chosen``, ``rejected``; :func:`preference_pairs`),
        ``"sft"`` (``prompt``, ``completion``; :func:`sft_corpus`) or ``"prompt"``
        (``prompt`` only, for on-policy RL). Test prompts never occur in the training split.
    """
    folder = os.fspath(folder)
    kw = dict(min_letters=min_letters, max_letters=max_letters)
    if kind == "preference":
        train = preference_pairs(n_train, seed, **kw)
        test = preference_pairs(
            n_test, seed + 1_000_003, exclude_prompts={r["prompt"] for r in train}, **kw
        )
    elif kind in ("sft", "prompt"):
        make = (
            sft_corpus
            if kind == "sft"
            else lambda n, s, **k: [{"prompt": p} for p in prompts(n, s, **k)]
        )
        train = make(n_train, seed, **kw)
        seen = {r["prompt"] for r in train}
        test, test_seed = [], seed + 1_000_003
        while len(test) < n_test:  # top up with fresh seeds until enough unseen prompts
            test += [r for r in make(n_test, test_seed, **kw) if r["prompt"] not in seen]
            test_seed += 1
        test = test[:n_test]
    else:
        raise ValueError(f"kind {kind!r}: choose 'preference', 'sft' or 'prompt'")
    os.makedirs(folder, exist_ok=True)
    paths = {
        "train": os.path.join(folder, "train.jsonl"),
        "test": os.path.join(folder, "test.jsonl"),
    }
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["test"], test)
    return paths


# ---------------------------------------------------------------------------- tokenizer


def build_tokenizer(folder: str | os.PathLike | None = None):
    """The task's character-level ``transformers.PreTrainedTokenizerFast``.

    Vocabulary: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then space, ``:``, ``-``,
    ``>`` and ``a``..``z`` (34 tokens). Each character is one token (anything else is
    ``<unk>``), decoding concatenates, and no special tokens are added on encoding.
    ``pad_token``/``eos_token``/``bos_token``/``unk_token`` are set and ``chat_template`` is
    :data:`CHAT_TEMPLATE`.

    Args:
      folder: if given, the tokenizer is also written there with ``save_pretrained``, so
        ``rljax.models.hf.load_tokenizer(folder)`` loads it.
    """
    return char_tokenizer(TASK_CHARACTERS, 512, folder)


def char_tokenizer(characters: str, max_length: int, folder: str | os.PathLike | None = None):
    """A character-level ``transformers.PreTrainedTokenizerFast`` (the built-in tasks'):
    ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then ``characters`` in order; one
    token per character (anything else is ``<unk>``), decoding concatenates, nothing added on
    encoding, right padding, ``model_max_length=max_length``, :data:`CHAT_TEMPLATE`.
    ``folder``: also ``save_pretrained`` there."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *characters))}
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
        model_max_length=max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if folder is not None:
        tokenizer.save_pretrained(os.fspath(folder))
    return tokenizer


def max_prompt_tokens(max_letters: int = MAX_LETTERS) -> int:
    """Tokens in the longest prompt (one per character)."""
    return len(make_prompt("x" * max_letters))


def max_completion_tokens(max_letters: int = MAX_LETTERS) -> int:
    """Tokens in the longest valid completion, EOS included (space + letters + EOS)."""
    return max_letters + 2


# ---------------------------------------------------------------------------- base model


def base_model_config(vocab_size: int | None = None, **overrides):
    """The default base model: a Llama-family transformer of width 64 with 2 layers, 8 query
    and 4 key/value heads (head width 8), MLP width 192, initialiser std 0.05 (100,800 parameters
    with the 34-token vocabulary).

    In a 1000-step trial these heads and this initialisation left the copying plateau (loss
    ~2.26: uniform over all letters) after ~200 steps, where 4/2 heads with std 0.02 were
    still near it after 500.
    """
    if vocab_size is None:
        vocab_size = len(SPECIAL_TOKENS) + len(TASK_CHARACTERS)
    heads = dict(num_heads=8, num_kv_heads=4, max_position_embeddings=64)
    return _tiny_llama_config(vocab_size, {**heads, **overrides})


def _tiny_llama_config(vocab_size: int, fields: dict[str, Any]):
    """The built-in tasks' base-model shape, a Llama-family transformer of width 64 with 2
    layers, MLP width 192 and initialiser std 0.05, with ``fields`` (heads, positions,
    overrides) on top."""
    from rljax.models.transformer import TransformerConfig

    shape = dict(hidden_size=64, num_layers=2, intermediate_size=192, initializer_range=0.05)
    return TransformerConfig.llama(vocab_size=vocab_size, **{**shape, **fields})


def _tokenize_sft(tokenizer, rows, length: int):
    """Right-padded ``tokens``, ``mask`` and ``loss_mask`` (``int32``/``bool [B, length]``) of
    prompt + completion + EOS; ``loss_mask`` is True at completion tokens and the EOS.

    Minimal and private: the same arrays as ``rljax.data.tokenize_completions(rows, tokenizer,
    max_length=length, pad_to=length)`` (a test checks it), about five times faster on these
    short rows, which matters when every warm-up step draws a fresh batch.
    """
    b = len(rows)
    tokens = np.full((b, length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((b, length), bool)
    loss_mask = np.zeros((b, length), bool)
    encode = lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    prompt_ids = encode(r["prompt"] for r in rows)
    completion_ids = encode(r["completion"] for r in rows)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        ids = [*p, *c, tokenizer.eos_token_id]
        if len(ids) > length:
            raise ValueError(f"row {i}: {len(ids)} tokens, more than length={length}")
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = True
        loss_mask[i, len(p) : len(ids)] = True
    return tokens, mask, loss_mask


def _completion_loss_fn(graphdef):
    """``loss(params, tokens, mask, loss_mask)``: mean next-token cross-entropy over the
    positions with ``loss_mask`` (completion tokens and EOS)."""
    import jax.numpy as jnp
    from flax import nnx

    from rljax.logprobs import masked_mean, token_logprobs

    def loss(params, tokens, mask, loss_mask):
        model = nnx.merge(graphdef, params)
        logits = model(tokens, mask)
        logps = token_logprobs(logits[:, :-1], tokens[:, 1:])
        return -masked_mean(logps, loss_mask[:, 1:].astype(jnp.float32))

    return loss


def _warmup_trainer(config, seed: int, learning_rate: float, steps: int):
    """A fresh model and its supervised warm-up step, as both built-in tasks fit theirs.

    Returns ``(model, params, opt_state, step)``: the model initialised from
    ``nnx.Rngs(seed)``, its ``nnx.Param`` state, the optimiser state and the jitted
    ``step(params, opt_state, tokens, mask, loss_mask) -> (params, opt_state, loss)`` (loss of
    :func:`_completion_loss_fn`; AdamW with a 5% linear warm-up and cosine decay to 5% of
    ``learning_rate`` over ``steps``, weight decay 0.01, gradient clipping at 1).
    """
    import jax
    import optax
    from flax import nnx

    from rljax.models.transformer import Transformer

    model = Transformer(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 20), max(steps, 1), learning_rate * 0.05
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)
    )
    loss_fn = _completion_loss_fn(graphdef)

    @jax.jit
    def step(params, opt_state, tokens, mask, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask, loss_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return model, params, optimizer.init(params), step


@dataclasses.dataclass(frozen=True)
class _WarmupSettings:
    steps: int
    seed: int
    batch_size: int
    learning_rate: float
    min_letters: int
    max_letters: int


def warmup_model(
    *,
    steps: int = 1000,
    seed: int = 0,
    config=None,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    min_letters: int = MIN_LETTERS,
    max_letters: int = MAX_LETTERS,
    log_every: int = 250,
):
    """Fit a fresh tiny transformer on :func:`sft_corpus` (in memory; see
    :func:`warmup_base_model` for the saved folder).

    Supervised warm-up: next-token cross-entropy on the completion tokens and EOS only (not the
    prompt), AdamW (``learning_rate``, cosine decay to 5% after a 5% linear warm-up, weight
    decay 0.01, gradient clipping at 1), one jitted step over ``nnx.split`` parameters, a fresh
    batch of ``batch_size`` generated rows per step. Prints a progress line every ``log_every``
    steps.

    Args:
      steps: optimiser steps.
      seed: seeds the initialisation (``nnx.Rngs(seed)``) and the data.
      config: a ``TransformerConfig`` (default :func:`base_model_config`); its ``vocab_size``
        must cover the tokenizer.

    Returns:
      ``(model, tokenizer, info)``; ``info`` holds the settings, the config, the mean loss of
      the last ``log_every`` steps and the training time in seconds (compilation included).
    """
    import jax
    from flax import nnx

    _check_range(min_letters, max_letters)
    tokenizer = build_tokenizer()
    config = base_model_config(len(tokenizer)) if config is None else config
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"config.vocab_size {config.vocab_size} < tokenizer size {len(tokenizer)}")
    length = max_prompt_tokens(max_letters) + max_completion_tokens(max_letters)
    model, params, opt_state, step = _warmup_trainer(config, seed, learning_rate, steps)
    rng = _rng(seed, 3)
    start = time.perf_counter()
    losses = []
    for i in range(steps):
        batch_seed = int(rng.integers(2**31))
        rows = sft_corpus(batch_size, batch_seed, min_letters=min_letters, max_letters=max_letters)
        params, opt_state, loss = step(params, opt_state, *_tokenize_sft(tokenizer, rows, length))
        losses.append(loss)  # not read back: the next batch is built while this step runs
        if (i + 1) % log_every == 0 or i + 1 == steps:
            recent = float(np.mean(jax.device_get(losses[-log_every:])))
            print(
                f"warmup step {i + 1}/{steps}  completion loss {recent:.4f}  "
                f"({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    nnx.update(model, params)
    settings = _WarmupSettings(steps, seed, batch_size, learning_rate, min_letters, max_letters)
    info = {
        "task": "sorting",
        "settings": dataclasses.asdict(settings),
        "config": dataclasses.asdict(config),
        "final_loss": float(np.mean(jax.device_get(losses[-log_every:]))) if losses else None,
        "seconds": time.perf_counter() - start,
    }
    return model, tokenizer, info


def warmup_base_model(
    out_folder: str | os.PathLike,
    *,
    steps: int = 1000,
    seed: int = 0,
    config=None,
    eval_prompts: int = 256,
    **warmup_kwargs,
) -> str:
    """Warm up a base model (:func:`warmup_model`), measure it and save it.

    After training it samples ``eval_prompts`` held-out prompts at temperature 1
    (:func:`evaluate_policy`) and prints the validity rate, mean oracle score and sorted rate.

    Args:
      out_folder: written with ``rljax.models.hf.save_model(model, out_folder, tokenizer=...)``:
        ``config.json``, ``model.safetensors``, the tokenizer files, and ``warmup.json`` (the
        settings, final loss, time and evaluation; written last).
      steps, seed, config, **warmup_kwargs: as in :func:`warmup_model`.
      eval_prompts: prompts for the final evaluation (0 skips it).

    Returns:
      ``out_folder`` as a string; ``rljax.models.hf.load_model`` and ``load_tokenizer`` read it.
    """
    import jax

    from rljax.models.hf import save_model

    out_folder = os.fspath(out_folder)
    model, tokenizer, info = warmup_model(steps=steps, seed=seed, config=config, **warmup_kwargs)
    metrics: dict[str, Any] = {}
    if eval_prompts:
        settings = info["settings"]
        held_out = prompts(
            eval_prompts,
            seed + 7_919,
            min_letters=settings["min_letters"],
            max_letters=settings["max_letters"],
        )
        metrics = evaluate_policy(
            model,
            tokenizer,
            held_out,
            key=jax.random.key(seed),
            temperature=1.0,
            max_letters=settings["max_letters"],
        )["metrics"]
        print(
            f"base model (temperature 1, {eval_prompts} held-out prompts): validity "
            f"{metrics['validity']:.3f}, mean score {metrics['mean_score']:.3f}, sorted "
            f"{metrics['sorted_rate']:.3f}",
            flush=True,
        )
    save_model(model, out_folder, tokenizer=tokenizer)
    with open(os.path.join(out_folder, "warmup.json"), "w") as f:
        json.dump({**info, "eval": metrics}, f, indent=2)
    return out_folder


def sample_texts(
    model,
    tokenizer,
    prompt_texts: Sequence[str],
    *,
    key,
    temperature: float,
    max_new_tokens: int,
    prompt_width: int,
    batch_size: int,
) -> tuple[list[str], list[bool]]:
    """One completion per prompt from a built-in task's model: ``(completions, finished)``,
    completions decoded without special tokens, ``finished`` whether each stopped at EOS.
    Prompts are left-padded to at least ``prompt_width`` in batches of exactly ``batch_size``
    rows (the last batch filled with copies of its first prompt: one compilation);
    ``temperature`` 0 is greedy; batch ``start`` samples with ``fold_in(key, start)``."""
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
    completions, finished = [], []
    for start in range(0, len(prompt_texts), batch_size):
        chunk = list(prompt_texts[start : start + batch_size])
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        ids += [ids[0]] * (batch_size - len(ids))  # a fixed batch shape: one compilation
        length = max(prompt_width, *map(len, ids))
        tokens, mask = left_pad(ids, tokenizer.pad_token_id, length=length)
        out = generate_fn(params, tokens, mask, jax.random.fold_in(key, start))
        out_tokens, out_mask, done = jax.device_get(
            (out.completions, out.completion_mask, out.finished)
        )
        for row in range(len(chunk)):
            kept = [int(t) for t, m in zip(out_tokens[row], out_mask[row], strict=True) if m]
            completions.append(tokenizer.decode(kept, skip_special_tokens=True))
            finished.append(bool(done[row]))
    return completions, finished


def evaluate_policy(
    model,
    tokenizer,
    prompt_texts: Sequence[str],
    *,
    key,
    temperature: float = 1.0,
    max_letters: int = MAX_LETTERS,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Sample one completion per prompt and score it with the oracle.

    Args:
      model: a :class:`~rljax.models.transformer.Transformer` with an LM head.
      tokenizer: the task tokenizer.
      prompt_texts: task prompts.
      key: PRNG key; ``temperature`` 0 is greedy.
      max_letters: sets ``max_new_tokens`` (:func:`max_completion_tokens`).

    Returns:
      ``{"completions": [...], "scores": [...], "metrics": {"validity", "mean_score",
      "sorted_rate", "eos_rate"}}``; completions are decoded without special tokens.
    """
    completions, finished = sample_texts(
        model,
        tokenizer,
        prompt_texts,
        key=key,
        temperature=temperature,
        max_new_tokens=max_completion_tokens(max_letters),
        prompt_width=max_prompt_tokens(max_letters),
        batch_size=batch_size,
    )
    scores = score_batch(list(prompt_texts), completions)
    valid = [is_valid(p, c) for p, c in zip(prompt_texts, completions, strict=True)]
    n = max(len(scores), 1)
    metrics = {
        "validity": sum(valid) / n,
        "mean_score": sum(scores) / n,
        "sorted_rate": sum(s == 1.0 for s in scores) / n,
        "eos_rate": sum(finished) / n,
    }
    return {"completions": completions, "scores": scores, "metrics": metrics}


_CACHE_VERSION = 1
#: The TransformerConfig fields of the cache key when it was fixed. A field added since enters
#: the key only when it differs from its default, so a new field does not change the key of the
#: model that ships with the package (which would rebuild it, 1000 warm-up steps, on every
#: fresh machine, with other weights and results).
_KEY_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "intermediate_size", "max_position_embeddings", "family", "norm_eps", "hidden_act",
    "qkv_bias", "o_bias", "mlp_bias", "tie_word_embeddings", "rope_theta", "rope_type",
    "rope_scaling", "lm_head", "head", "param_dtype", "dtype", "remat", "attention_impl",
    "initializer_range",
)  # fmt: skip


def _config_key(config) -> dict[str, Any]:
    """``dataclasses.asdict(config)`` without the fields added after :data:`_KEY_FIELDS` where
    they hold their defaults."""
    defaults = {}
    for field in dataclasses.fields(config):
        if field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
        else:
            defaults[field.name] = field.default
    fields = dataclasses.asdict(config)
    return {
        name: value
        for name, value in fields.items()
        if name in _KEY_FIELDS or value != defaults[name]
    }


def default_base_model(
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    *,
    steps: int = 1000,
    seed: int = 0,
    config=None,
    **warmup_kwargs,
) -> str:
    """The folder of the warmed-up base model, built by :func:`warmup_base_model` once per
    ``cache_dir`` and settings.

    The folder is ``cache_dir/<hash>``, the hash covering the settings, the model config, the
    tokenizer's vocabulary and a format version; a finished folder has ``warmup.json`` and is
    reused as is. The model of the default settings ships with the package
    (:data:`SHIPPED_MODELS_DIR`, built by this function on the development machine: 1000 steps,
    seed 0; 0.4 MB) and is returned when ``cache_dir`` has none, so no run has to build it. It is built in a temporary sibling and renamed into place, so an interrupted
    build leaves nothing that looks finished.
    """
    tokenizer_vocab = sorted(build_tokenizer().get_vocab().items())
    config = base_model_config(len(tokenizer_vocab)) if config is None else config
    key = json.dumps(
        {
            "version": _CACHE_VERSION,
            "steps": steps,
            "seed": seed,
            "config": _config_key(config),
            "vocab": tokenizer_vocab,
            "warmup": warmup_kwargs,
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = os.path.join(os.fspath(cache_dir), f"sorting-{digest}")
    if _finished(folder):
        return folder
    shipped = os.path.join(SHIPPED_MODELS_DIR, f"sorting-{digest}")
    if _finished(shipped):
        return shipped  # the default settings' model ships with the package (read it only)
    return _build_once(
        folder,
        lambda tmp: warmup_base_model(tmp, steps=steps, seed=seed, config=config, **warmup_kwargs),
        f"building the base model in {folder} (once per settings)",
    )


def _finished(folder: str) -> bool:
    """Whether ``folder`` holds a finished base model (``warmup.json`` is written last)."""
    return os.path.exists(os.path.join(folder, "warmup.json"))


def _build_once(folder: str, build: Callable[[str], Any], message: str) -> str:
    """Build a base-model folder: ``build(tmp)`` writes it in a temporary sibling, which is
    then renamed to ``folder``, so an interrupted build leaves nothing that looks finished
    (:func:`_finished`). A concurrent build that finished first wins. Prints ``message``
    first; returns ``folder``."""
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}-", dir=parent)
    try:
        print(message, flush=True)
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _finished(folder):
                raise  # not a concurrent build that finished first
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
