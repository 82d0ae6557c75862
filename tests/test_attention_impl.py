"""``attention_impl="grouped"`` (rljax's grouped-query attention as two batched matmuls, the CPU
default) against ``"xla"`` (``jax.nn.dot_product_attention``) on the same float32 weights: the
logits of a left-padded batch, of a sliding-window model and of packed rows, greedy KV-cache
decoding and the parameter gradient agree to float32 rounding; and which one the default
picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_llama

from rljax.models import generate
from rljax.models.transformer import Transformer

TOL = dict(rtol=2e-5, atol=2e-5)


def models(**overrides):
    """The same weights (the same seed: the implementation holds no parameters) under both."""
    return [
        Transformer(
            tiny_llama(attention_impl=impl, initializer_range=0.2, **overrides), rngs=nnx.Rngs(0)
        )
        for impl in ("grouped", "xla")
    ]


def batch(rows=5, length=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 60, size=(rows, length)).astype(np.int32)
    lengths = rng.integers(1, length + 1, size=rows)
    mask = np.arange(length)[None, :] >= length - lengths[:, None]  # left padding
    return tokens, mask


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 4}], ids=["causal", "window"])
def test_logits_and_gradients_agree(overrides):
    grouped, xla = models(**overrides)
    tokens, mask = batch()
    a, b = (np.asarray(jax.jit(lambda t, m, f=f: f(t, m))(tokens, mask)) for f in (grouped, xla))
    np.testing.assert_allclose(a[mask], b[mask], **TOL)  # padding positions are not outputs

    def loss(model):
        logits = model(tokens, mask)
        return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits) * 0.01, 0.0))

    grads = [nnx.state(jax.jit(nnx.grad(loss))(m)) for m in (grouped, xla)]
    for x, y in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_packed_rows_agree():
    grouped, xla = models()
    tokens, _ = batch(rows=2, length=10)
    segment_ids = np.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0], [1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
    a, b = (np.asarray(m(tokens, segment_ids=segment_ids)) for m in (grouped, xla))
    real = segment_ids > 0
    np.testing.assert_allclose(a[real], b[real], **TOL)


def test_kv_cache_decoding_agrees():
    grouped, xla = models()
    tokens, mask = batch(rows=4, length=8, seed=1)
    config = generate.SamplingConfig(max_new_tokens=6, temperature=0.0)
    a, b = (generate.generate(m, tokens, mask, jax.random.key(0), config) for m in (grouped, xla))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.policy_logprobs, b.policy_logprobs, **TOL)


def test_the_default_is_grouped_on_cpu_only():
    default = Transformer(tiny_llama(), rngs=nnx.Rngs(0))
    assert default._uses_grouped_attention() == (jax.default_backend() == "cpu")
    assert not Transformer(
        tiny_llama(attention_impl="xla"), rngs=nnx.Rngs(0)
    )._uses_grouped_attention()
    with pytest.raises(ValueError, match="attention_impl"):
        tiny_llama(attention_impl="flash")
