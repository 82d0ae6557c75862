"""Helpers shared by the tests: tiny model configs, batch builders, numpy references, tolerances
and a loader for the repository's scripts. Test files import them as ``from helpers import ...``
(pytest puts ``tests/`` on ``sys.path``: the folder has no ``__init__.py``).

Nothing here calls the code under test except to build inputs (model configs, ``jax.jit``); the
numpy references are written from the definitions, in float64.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest
from hypothesis import strategies as st

from rljax.models.transformer import TransformerConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# scripts
# ---------------------------------------------------------------------------------------------


def load_script(relative_path, name=None):
    """Import a script of the repository (``"benchmarks/lm_speed.py"``) as a module named
    ``name`` (default: the file's stem), registered in ``sys.modules`` so that its dataclasses
    resolve their annotations. Each call executes the file afresh."""
    path = ROOT / relative_path
    name = path.stem if name is None else name
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_experiment(name):
    """``experiments/<name>.py`` as the module ``name``."""
    return load_script(f"experiments/{name}.py")


def run_preference_script(name, tmp_path, model, *extra, steps=4):
    """Run ``experiments/<name>.py`` at CI size on the base model folder ``model`` (the
    built-in sorting task: 32 training pairs, batches of 8, 4 win-rate prompts); check the
    files every preference run writes and the oracle summary, and return ``(summary,
    per-step metric rows)`` with one row for each of the ``steps`` steps."""
    import json

    from rljax import cli

    script = load_experiment(name)
    out = tmp_path / "run"
    flags = [
        "--model", str(model), *extra,
        "--steps", str(steps), "--batch-size", "8", "--train-pairs", "32", "--eval-pairs", "8",
        "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2",
        "--win-rate-prompts", "4", "--out", str(out),
    ]  # fmt: skip
    summary = script.main(cli.parse(script.Config, flags))
    for file in ("metrics.jsonl", "summary.json", "training.png", "policy/config.json"):
        assert (out / file).exists(), file
    assert summary["oracle"]["prompts"] == 4 and 0.0 <= summary["oracle"]["win_rate"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    return summary, rows


def reward_module_that_dies(tmp_path, monkeypatch, score_expression):
    """A reward-function spec (``MODULE:score``) whose function returns
    ``score_expression`` (over ``c``, each completion) and raises once the returned path
    exists: a test creates the file to kill a run mid-iteration."""
    module = tmp_path / "dies.py"
    module.write_text(
        "import os\n"
        "def score(prompts, completions, **columns):\n"
        "    if os.path.exists(os.environ['RLJAX_TEST_DIE']):\n"
        "        raise RuntimeError('killed')\n"
        f"    return [{score_expression} for c in completions]\n"
    )
    die = tmp_path / "die"
    monkeypatch.setenv("RLJAX_TEST_DIE", str(die))
    return f"{module}:score", die


def assert_greedy_matches_transformers(ours, hf_model, tokens, mask, new_tokens):
    """Greedy generation of ``new_tokens`` tokens after ``(tokens, mask)`` gives the same
    tokens in rljax (``ours``, a Transformer) as in transformers' ``generate``
    (``hf_model``)."""
    import jax.numpy as jnp
    import torch

    from rljax.models.generate import SamplingConfig, generate

    out = generate(
        ours,
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(mask),
        jax.random.key(0),
        SamplingConfig(max_new_tokens=new_tokens, temperature=0.0),
    )
    with torch.no_grad():
        want = hf_model.generate(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[:, tokens.shape[1] :].numpy()
    np.testing.assert_array_equal(np.asarray(out.completions), want)


def rl_update_batch(rng, prompt_mask, completion_mask, vocab, *, critic, old_logp_mean):
    """An RL update's batch around the given masks (``[B, P]`` prompt, ``[B, N]``
    completion): random tokens, old log-probs about ``old_logp_mean``, per-token advantages,
    and with ``critic`` returns and old values (0 at padding, float32). Draws from ``rng`` in
    this order: tokens, old log-probs, advantages, returns, old values."""
    rows, n = completion_mask.shape
    tokens = rng.integers(0, vocab, (rows, prompt_mask.shape[1] + n)).astype(np.int32)
    per_token = lambda mean=0.0, scale=1.0: np.where(
        completion_mask, rng.normal(mean, scale, (rows, n)), 0
    ).astype(np.float32)
    batch = {
        "tokens": tokens,
        "mask": np.concatenate([prompt_mask, completion_mask], axis=1),
        "completion_mask": completion_mask,
        "old_logps": per_token(old_logp_mean, 0.3),
        "advantages": per_token(),
    }
    if critic:
        batch["returns"] = per_token()
        batch["old_values"] = per_token()
    return batch


#: A tiny transformers Llama-family config (two layers, 64 positions, eager attention, the
#: attention the parity tests compare against): ``dict(HF_TINY_LLAMA, vocab_size=...)``.
HF_TINY_LLAMA = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, attn_implementation="eager",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# eager and jit, tolerances, hypothesis strategies
# ---------------------------------------------------------------------------------------------

# Every function under test runs both eagerly and under jit.
TRANSFORMS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]

# float64 results to 1e-10 relative; float32 inputs against the float64 reference on the same
# float32-rounded inputs to 1e-5 relative, with an absolute floor of 1e-6 (a result near 0 is a
# difference of O(1) terms, each rounded to ~6e-8 in float32).
TOL = {
    np.dtype(np.float64): dict(rtol=1e-10, atol=0.0),
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6),
}

# The relative tolerances alone, and each dtype's machine epsilon (for absolute floors).
RTOL = {dtype: tol["rtol"] for dtype, tol in TOL.items()}
EPS = {np.dtype(np.float64): np.finfo(np.float64).eps, np.dtype(np.float32): 2.0**-23}

# Few distinct shapes: un-jitted jax compiles every primitive once per new shape (~0.5 s for a
# loss), so the eager runs stay fast only if tests share shapes.
SHAPES = [(6,), (3, 4)]

seed_st = st.integers(0, 2**32 - 1)
shape_st = st.sampled_from(SHAPES)
dtype_st = st.sampled_from([np.float64, np.float32])


def assert_close(actual, expected, dtype=np.float64):
    """``actual`` has dtype ``dtype`` and matches ``expected`` within ``TOL[dtype]``."""
    actual = np.asarray(actual)
    assert actual.dtype == np.dtype(dtype), (actual.dtype, dtype)
    np.testing.assert_allclose(actual, expected, **TOL[np.dtype(dtype)])


def assert_close_per_element(got, want, dtype, rtol, atol=0.0):
    """``|got - want| <= atol + rtol |want|`` elementwise, where ``atol`` may be an array (one
    floor per element; ``np.testing.assert_allclose`` only takes a scalar); ``got`` has dtype
    ``dtype`` and is compared in float64. Equal values (infinities too) always pass."""
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    got64, want = got.astype(np.float64), np.asarray(want, np.float64)
    assert got64.shape == want.shape, (got64.shape, want.shape)
    err = np.abs(got64 - want)
    ok = (err <= atol + rtol * np.abs(want)) | (got64 == want)
    assert np.all(ok), (
        f"rtol={rtol} atol={atol}: worst at {np.argwhere(~ok)[:5].tolist()}\n"
        f"got  {got64[~ok][:5]}\nwant {want[~ok][:5]}\nerr  {err[~ok][:5]}"
    )


def count_traces(fn):
    """``(counted, traces)``: ``counted`` calls ``fn`` and appends to ``traces`` whenever it runs
    in Python, so under ``jax.jit`` a test can check that new values of traced arguments reuse
    one trace."""
    traces = []

    def counted(*args, **kwargs):
        traces.append(1)
        return fn(*args, **kwargs)

    return counted, traces


# The metrics TRL's DPOTrainer logs for a batch (besides the loss).
TRL_DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)

# ---------------------------------------------------------------------------------------------
# numpy references (float64)
# ---------------------------------------------------------------------------------------------


def np_log_softmax(z):
    """``z - logsumexp(z)`` over the last axis in float64, the max subtracted first so that
    ``exp`` cannot overflow."""
    z = np.asarray(z, np.float64)
    s = z - np.max(z, axis=-1, keepdims=True)
    return s - np.log(np.sum(np.exp(s), axis=-1, keepdims=True))


def np_probs(logits):
    """Softmax over the last axis in float64."""
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_gaussian_kl(p, q):
    """0.5 (tr(S_q^-1 S_p) + d^T S_q^-1 d - k + log det S_q - log det S_p), d = mu_q - mu_p."""
    (mp, lp), (mq, lq) = p, q
    mp, mq = np.asarray(mp, np.float64), np.asarray(mq, np.float64)
    sp = np.broadcast_to(np.exp(np.asarray(lp, np.float64)), mp.shape)
    sq = np.broadcast_to(np.exp(np.asarray(lq, np.float64)), mq.shape)
    out = np.zeros(mp.shape[:-1])
    for idx in np.ndindex(out.shape):
        cov_p, cov_q = np.diag(sp[idx] ** 2), np.diag(sq[idx] ** 2)
        inv_q = np.linalg.inv(cov_q)
        d = mq[idx] - mp[idx]
        out[idx] = 0.5 * (
            np.trace(inv_q @ cov_p)
            + d @ inv_q @ d
            - mp.shape[-1]
            + np.linalg.slogdet(cov_q)[1]
            - np.linalg.slogdet(cov_p)[1]
        )
    return out


def np_logsigmoid(x):
    """``log(sigmoid(x))`` in float64 without overflow."""
    x = np.asarray(x, np.float64)
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def finite_diff(fn, x, *args, h=1e-6):
    """Central finite differences in ``x`` of the scalar numpy function ``fn(x, *args)`` at the
    float64 array ``x``, each divided by the step actually taken (``x + h`` and ``x - h`` are
    rounded)."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        grad[idx] = (fn(xp, *args) - fn(xm, *args)) / (xp[idx] - xm[idx])
    return grad


# ---------------------------------------------------------------------------------------------
# tiny models and batches
# ---------------------------------------------------------------------------------------------

# The two-layer models' common shape: 64 tokens, width 32, 4 heads.
TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4)


def tiny_llama(**overrides):
    """A two-layer Llama (:data:`TINY`, the 4 query heads sharing 2 key/value heads, MLP width
    64); ``overrides`` replace any setting."""
    return TransformerConfig.llama(
        **{**TINY, "num_kv_heads": 2, "intermediate_size": 64, **overrides}
    )


def tiny_gpt2(**overrides):
    """A two-layer GPT-2 (:data:`TINY`, MLP width 4 x 32); ``overrides`` replace any setting."""
    return TransformerConfig.gpt2(**{**TINY, **overrides})


# The one-layer model: width 16, 2 query heads sharing 1 key/value head, MLP width 32.
ONE_LAYER = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)


def one_layer_llama(vocab_size, **overrides):
    """A one-layer Llama (:data:`ONE_LAYER`, 32 positions) over ``vocab_size`` tokens, for tests
    that run many steps or differentiate through the whole model."""
    settings = {**ONE_LAYER, "max_position_embeddings": 32, **overrides}
    return TransformerConfig.llama(vocab_size=vocab_size, **settings)


def preference_batch(rng, pairs, time, vocab_size, token_ranges=None):
    """Right-padded preference pairs following the rljax.data contract: a shared prompt of 1 to 3
    tokens, then a completion of at least one token on each side (``*_loss_mask``).

    ``token_ranges``: ``{"chosen": (low, high), "rejected": (low, high)}`` for the completion
    tokens (default: the whole vocabulary). Draws from ``rng`` in a fixed order, so a caller may
    draw more from it afterwards.
    """
    prompt = rng.integers(1, 4, pairs)  # shared prompt length per pair
    prompt_tokens = rng.integers(0, vocab_size, (pairs, time))
    pos = np.arange(time)[None]
    batch = {}
    for side in ("chosen", "rejected"):
        low, high = (0, vocab_size) if token_ranges is None else token_ranges[side]
        length = prompt + rng.integers(1, time - 3, pairs)  # prompt + completion (>= 1 token)
        mask = pos < length[:, None]
        completion = rng.integers(low, high, (pairs, time))
        tokens = np.where(pos < prompt[:, None], prompt_tokens, completion) * mask
        batch[f"{side}_tokens"] = tokens.astype(np.int32)
        batch[f"{side}_mask"] = mask
        batch[f"{side}_loss_mask"] = mask & (pos >= prompt[:, None])
    assert not batch["chosen_loss_mask"][:, 0].any()
    return batch
