"""Tests of :func:`rljax.logprobs.chunked_token_logprobs` and its entropy sibling.

Values are compared with the unchunked ``token_logprobs(hidden @ W, targets)`` and with an
independent float64 numpy reference (``z = h @ W`` in float64, then ``z - logsumexp(z)`` with
the max subtracted); gradients (from the ``custom_vjp``) with ``jax.grad`` of the unchunked
version and with the numpy closed form ``dz = g (onehot - p) - g_H p (z - E[z])``,
``dh = dz W^T``, ``dW = h^T dz``, always under a random (not all-ones) cotangent.

Tolerances: float64 1e-10 relative, float32 1e-5 relative, both against the float64 reference
on the same rounded inputs. A log-probability ``z_y - logsumexp(z)`` near 0 inherits the
absolute rounding error of ``z``, which for ``z = h @ W`` is a few ``eps * max (|h| @ |W|)``,
hence the absolute floor ``ABS_FLOOR``. The memory test reads XLA's compiled memory analysis
(a property of the compiled program, not a timing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import EPS, RTOL, TRANSFORMS, assert_close_per_element, np_log_softmax

from rljax.logprobs import (
    chunked_token_logprobs,
    chunked_token_logprobs_and_entropy,
    entropy_from_logits,
    token_logprobs,
)
from rljax.models.transformer import Transformer, TransformerConfig

B, T, D, V = 3, 5, 8, 13  # B * T = 15 tokens
# 15 tokens: chunk sizes 1, 5, 15 divide it, 4 does not (padding), 64 exceeds it (clamped).
CHUNKS = [1, 4, 15, 64]
GRAD_CHUNKS = [4, 5, 64]


def ABS_FLOOR(dtype, h, w):
    """Absolute error floor: a few ``eps`` times the largest ``|h| @ |W|`` (see module)."""
    mag = np.abs(np.asarray(h, np.float64)) @ np.abs(np.asarray(w, np.float64))
    return 16 * EPS[np.dtype(dtype)] * max(1.0, float(mag.max()))


# ---------------------------------------------------------------------------------------------
# numpy references (float64)
# ---------------------------------------------------------------------------------------------


def np_logits(h, w):
    return np.asarray(h, np.float64) @ np.asarray(w, np.float64)


def np_onehot(y, v):
    out = np.zeros((*np.shape(y), v))
    for idx in np.ndindex(np.shape(y)):
        out[idx][int(np.asarray(y)[idx])] = 1.0
    return out


def np_logps_entropy(h, w, y):
    z = np_logits(h, w)
    ls = np_log_softmax(z)
    logps = np.sum(ls * np_onehot(y, z.shape[-1]), axis=-1)
    entropy = -np.sum(np.exp(ls) * ls, axis=-1)
    return logps, entropy


def np_grads(h, w, y, g_logp, g_ent):
    """Closed-form gradients of ``sum(g_logp * logp + g_ent * H)`` wrt ``h`` and ``W``."""
    h64, w64 = np.asarray(h, np.float64), np.asarray(w, np.float64)
    z = np_logits(h64, w64)
    p = np.exp(np_log_softmax(z))
    mean_z = np.sum(p * z, axis=-1, keepdims=True)
    dz = g_logp[..., None] * (np_onehot(y, z.shape[-1]) - p) - g_ent[..., None] * p * (z - mean_z)
    dh = dz @ w64.T
    dw = h64.reshape(-1, h64.shape[-1]).T @ dz.reshape(-1, dz.shape[-1])
    return dh, dw


def make_inputs(seed, shape=(B, T), d=D, v=V, dtype=np.float64, scale=1.0):
    rng = np.random.default_rng(seed)
    h = (scale * rng.normal(size=(*shape, d))).astype(dtype)
    w = rng.normal(size=(d, v)).astype(dtype)
    y = rng.integers(0, v, shape)
    # some targets are the argmax (log-probability near 0, the hardest case relatively)
    argmax = np.argmax(np_logits(h, w), axis=-1)
    y = np.where(rng.random(shape) < 0.3, argmax, y)
    return h, w, y


def assert_close(got, want, dtype, atol=0.0, rtol=None):
    rtol = RTOL[np.dtype(dtype)] if rtol is None else rtol
    assert_close_per_element(got, want, dtype, rtol, atol)


# ---------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_values_match_unchunked_and_numpy(transform, dtype, chunk_size):
    h, w, y = make_inputs(0, dtype=dtype, scale=3.0)
    hj, wj, yj = jnp.asarray(h), jnp.asarray(w), jnp.asarray(y)
    got = transform(lambda a, b, c: chunked_token_logprobs(a, b, c, chunk_size=chunk_size))(
        hj, wj, yj
    )
    assert got.shape == (B, T)
    atol = ABS_FLOOR(dtype, h, w)
    want_logps, want_entropy = np_logps_entropy(h, w, y)
    assert_close(got, want_logps, dtype, atol=atol)
    assert_close(got, token_logprobs(hj @ wj, yj), dtype, atol=atol)

    logps, entropy = transform(
        lambda a, b, c: chunked_token_logprobs_and_entropy(a, b, c, chunk_size=chunk_size)
    )(hj, wj, yj)
    assert_close(logps, want_logps, dtype, atol=atol)
    assert_close(entropy, want_entropy, dtype, atol=atol)
    assert_close(entropy, entropy_from_logits(hj @ wj), dtype, atol=atol)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), (1, 1)])
def test_leading_dims(shape):
    h, w, y = make_inputs(1, shape=shape)
    got = jax.jit(lambda a, b, c: chunked_token_logprobs(a, b, c, chunk_size=5))(h, w, y)
    assert got.shape == shape
    assert_close(got, np_logps_entropy(h, w, y)[0], np.float64, atol=ABS_FLOOR(np.float64, h, w))


def test_large_logits_stay_finite():
    # |z| ~ 1e3: a naive exp(z) overflows; the max-subtracted softmax does not.
    h, w, y = make_inputs(2, dtype=np.float32, scale=300.0)
    logps, entropy = jax.jit(
        lambda a, b, c: chunked_token_logprobs_and_entropy(a, b, c, chunk_size=4)
    )(h, w, y)
    assert np.abs(np_logits(h, w)).max() > 1e3
    want_logps, want_entropy = np_logps_entropy(h, w, y)
    atol = ABS_FLOOR(np.float32, h, w)
    assert_close(logps, want_logps, np.float32, atol=atol)
    assert_close(entropy, want_entropy, np.float32, atol=atol)


def test_int32_and_int64_targets_and_empty():
    h, w, y = make_inputs(3)
    want = np_logps_entropy(h, w, y)[0]
    for ydt in (np.int32, np.int64):
        got = chunked_token_logprobs(jnp.asarray(h), jnp.asarray(w), jnp.asarray(y.astype(ydt)))
        assert_close(got, want, np.float64, atol=ABS_FLOOR(np.float64, h, w))
    empty = chunked_token_logprobs(jnp.zeros((0, 4, D)), jnp.asarray(w), jnp.zeros((0, 4), int))
    assert empty.shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# gradients (custom_vjp)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("chunk_size", GRAD_CHUNKS)
def test_grads_match_unchunked_and_closed_form(transform, chunk_size):
    h, w, y = make_inputs(4, scale=2.0)
    rng = np.random.default_rng(5)
    g_logp, g_ent = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    hj, wj, yj = jnp.asarray(h), jnp.asarray(w), jnp.asarray(y)

    def chunked(a, b):
        return jnp.sum(g_logp * chunked_token_logprobs(a, b, yj, chunk_size=chunk_size))

    def unchunked(a, b):
        return jnp.sum(g_logp * token_logprobs(a @ b, yj))

    def chunked_ent(a, b):
        logps, ent = chunked_token_logprobs_and_entropy(a, b, yj, chunk_size=chunk_size)
        return jnp.sum(g_logp * logps + g_ent * ent)

    def unchunked_ent(a, b):
        z = a @ b
        return jnp.sum(g_logp * token_logprobs(z, yj) + g_ent * entropy_from_logits(z))

    cases = [
        (chunked, unchunked, np.zeros((B, T))),
        (chunked_ent, unchunked_ent, g_ent),
    ]
    for f, f_ref, ge in cases:
        val, (dh, dw) = transform(jax.value_and_grad(f, (0, 1)))(hj, wj)
        val_ref, (dh_ref, dw_ref) = jax.value_and_grad(f_ref, (0, 1))(hj, wj)
        dh_np, dw_np = np_grads(h, w, y, g_logp, ge)
        assert_close(val, val_ref, np.float64, atol=1e-12)
        # onehot - p cancels towards 0 for a dominant target: floor relative to the largest entry
        for got, want, want_np in ((dh, dh_ref, dh_np), (dw, dw_ref, dw_np)):
            assert got.shape == want.shape
            atol = 1e-13 * float(np.abs(want_np).max())
            assert_close(got, want, np.float64, atol=atol)
            assert_close(got, want_np, np.float64, atol=atol)


def test_grad_ignores_padding_and_works_under_vmap():
    # 15 tokens in chunks of 4: the padded row must not leak into dW
    h, w, y = make_inputs(6)
    f = lambda a, b, c: jnp.sum(chunked_token_logprobs(a, b, c, chunk_size=4) ** 2)
    g = lambda a, b, c: jnp.sum(token_logprobs(a @ b, c) ** 2)
    dw = jax.jit(jax.grad(f, 1))(h, w, y)
    assert_close(dw, jax.grad(g, 1)(h, w, y), np.float64, atol=1e-12)
    per_example = jax.vmap(jax.grad(f, 1), in_axes=(0, None, 0))(h, w, y)
    per_example_ref = jax.vmap(jax.grad(g, 1), in_axes=(0, None, 0))(h, w, y)
    assert_close(per_example, per_example_ref, np.float64, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_bfloat16_close_to_float32(transform):
    h, w, y = make_inputs(7, shape=(4, 8), d=32, v=50, dtype=np.float32)
    h_bf, w_bf = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    # the float32 run sees exactly the bfloat16-rounded inputs
    h32, w32 = h_bf.astype(jnp.float32), w_bf.astype(jnp.float32)
    g = jnp.asarray(np.random.default_rng(8).normal(size=(4, 8)), jnp.float32)

    def loss(a, b):
        logps, ent = chunked_token_logprobs_and_entropy(a, b, y, chunk_size=6)
        return jnp.sum(g * logps + 0.5 * g * ent), (logps, ent)

    (_, (lp_bf, ent_bf)), (dh_bf, dw_bf) = transform(jax.value_and_grad(loss, (0, 1), True))(
        h_bf, w_bf
    )
    (_, (lp32, ent32)), (dh32, dw32) = jax.value_and_grad(loss, (0, 1), True)(h32, w32)
    assert lp_bf.dtype == ent_bf.dtype == jnp.float32
    assert dh_bf.dtype == dw_bf.dtype == jnp.bfloat16
    # bfloat16 products are exact in float32 and accumulate in float32: values are float32-close
    scale = float(np.abs(np.asarray(h32) @ np.abs(np.asarray(w32))).max())
    assert_close(lp_bf, lp32, np.float32, rtol=1e-4, atol=1e-5 * scale)
    assert_close(ent_bf, ent32, np.float32, rtol=1e-4, atol=1e-5 * scale)
    # the backward matmuls take the logit cotangent rounded to bfloat16: loose
    for got, want in ((dh_bf, dh32), (dw_bf, dw32)):
        got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want)
        assert np.max(np.abs(got - want)) <= 2e-2 * np.max(np.abs(want))


# ---------------------------------------------------------------------------------------------
# with the transformer, errors, memory
# ---------------------------------------------------------------------------------------------


def test_matches_model_logits():
    cfg = TransformerConfig.llama(
        vocab_size=61, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 61, (2, 9)), jnp.int32)
    hidden = nnx.jit(lambda m, t: m.decode(t)[0])(model, tokens)
    targets = jnp.roll(tokens, -1, axis=1)
    got = chunked_token_logprobs(hidden, model.unembedding(), targets, chunk_size=5)
    want = token_logprobs(model.logits(hidden), targets)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [4, 64])
def test_softcap_values_and_grads_match_capped_logits(chunk_size):
    """``softcap=c``: log-probs, entropies and both gradients of ``c tanh(h W / c)`` (Gemma 2's
    final logits), against the unchunked computation on the capped logits."""
    cap = 3.0
    h, w, y = make_inputs(6, scale=2.0)
    g_logp, g_ent = np.random.default_rng(6).normal(size=(2, B, T))
    hj, wj, yj = jnp.asarray(h), jnp.asarray(w), jnp.asarray(y)
    assert np.abs(np_logits(h, w)).max() > 3 * cap  # the cap binds

    def chunked(a, b):
        logps, ent = chunked_token_logprobs_and_entropy(
            a, b, yj, chunk_size=chunk_size, softcap=cap
        )
        alone = chunked_token_logprobs(a, b, yj, chunk_size=chunk_size, softcap=cap)
        return jnp.sum(g_logp * (logps + alone) + g_ent * ent)

    def capped(a, b):
        z = cap * jnp.tanh(a @ b / cap)
        return jnp.sum(2 * g_logp * token_logprobs(z, yj) + g_ent * entropy_from_logits(z))

    val, grads = jax.value_and_grad(chunked, (0, 1))(hj, wj)
    val_ref, grads_ref = jax.value_and_grad(capped, (0, 1))(hj, wj)
    assert_close(val, val_ref, np.float64, atol=1e-12)
    for got, want in zip(grads, grads_ref, strict=True):
        assert_close(got, want, np.float64, atol=1e-12 * float(np.abs(want).max()))
    uncapped = chunked_token_logprobs(hj, wj, yj, chunk_size=chunk_size)
    assert (
        np.abs(
            np.asarray(uncapped) - np.asarray(token_logprobs(cap * jnp.tanh(hj @ wj / cap), yj))
        ).max()
        > 0.1
    )
    with pytest.raises(ValueError, match="softcap"):
        chunked_token_logprobs(hj, wj, yj, softcap=0.0)


def test_update_log_probs_of_a_soft_capped_model_match_its_logits():
    """The updates' chunked log-probs (rljax.updates.lm.token_logps) of a Gemma 2 model with a
    final logit soft-cap are those of its capped logits."""
    from rljax.updates.lm import token_logps

    cfg = TransformerConfig.gemma(
        vocab_size=61, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
        sliding_window=4, final_logit_softcap=2.0, initializer_range=0.5,
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 61, (2, 9)), jnp.int32)
    mask = jnp.ones(tokens.shape, bool)
    graphdef, params = nnx.split(model)

    def both(params):
        return token_logps(graphdef, params, tokens, mask), nnx.merge(graphdef, params)(tokens)

    got, logits = jax.jit(both)(params)
    assert np.abs(np.asarray(logits)).max() > 1.5  # near the cap of 2
    want = token_logprobs(logits[:, :-1], tokens[:, 1:])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_errors():
    h, w, y = jnp.zeros((2, 3, D)), jnp.zeros((D, V)), jnp.zeros((2, 3), jnp.int32)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="chunk_size"):
            chunked_token_logprobs(h, w, y, chunk_size=bad)
    with pytest.raises(ValueError, match="hidden size"):
        chunked_token_logprobs(h, jnp.zeros((D + 1, V)), y)
    with pytest.raises(AssertionError):
        chunked_token_logprobs(h, w, jnp.zeros((2,), jnp.int32))  # wrong rank
    with pytest.raises(AssertionError):
        chunked_token_logprobs(h, w, jnp.zeros((2, 4), jnp.int32))  # leading shape mismatch
    with pytest.raises(AssertionError):
        chunked_token_logprobs(h, w, jnp.zeros((2, 3), jnp.float32))  # float targets
    with pytest.raises(AssertionError):
        chunked_token_logprobs(h, jnp.zeros((D, V, 1)), y)  # unembedding not [D, V]


def test_memory_of_value_and_grad_is_much_smaller():
    # B*T = 1024 tokens, V = 32768: the float32 logits alone are 128 MiB.
    n, d, v = 1024, 64, 32768
    args = (
        jax.ShapeDtypeStruct((4, n // 4, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((4, n // 4), jnp.int32),
    )

    def temp_bytes(loss):
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    unchunked = temp_bytes(lambda h, w, y: token_logprobs(h @ w, y).sum())
    chunked = temp_bytes(lambda h, w, y: chunked_token_logprobs(h, w, y, chunk_size=128).sum())
    assert unchunked >= n * v * 4  # at least the float32 logits
    assert chunked < unchunked / 4, (chunked, unchunked)
