"""Tests of rljax.models.transformer beyond Hugging Face parity (tests/test_hf.py):

padding and position invariances, cached decoding against the full forward pass, remat,
dtypes, heads, the RoPE rotation against an independent complex-number reference, config
validation and the parameter count.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TINY, tiny_gpt2, tiny_llama

from rljax.models.transformer import (
    Transformer,
    TransformerConfig,
    last_valid_index,
    positions_from_mask,
    rope_inverse_frequencies,
)

V = 61


# The shared two-layer shapes over a 61-token vocabulary, with a wide initialisation.
SETTINGS = dict(vocab_size=V, initializer_range=0.2)


def llama_config(**kw):
    return tiny_llama(**{**SETTINGS, "intermediate_size": 48, "tie_word_embeddings": False, **kw})


def gpt2_config(**kw):
    return tiny_gpt2(**{**SETTINGS, "max_position_embeddings": 24, **kw})


def gemma_config(generation=2, **kw):
    """A two-layer Gemma (sliding window of 3 on layer 0, global layer 1; Gemma 2 soft-caps
    or Gemma 3's q/k norms and local RoPE)."""
    settings = dict(num_kv_heads=2, intermediate_size=48, sliding_window=3)
    if generation == 2:
        settings.update(attn_logit_softcap=2.0, final_logit_softcap=5.0)
    layer_types = ("sliding_attention", "full_attention")
    return TransformerConfig.gemma(
        generation=generation, **{**TINY, **SETTINGS, **settings, "layer_types": layer_types, **kw}
    )


CONFIGS = {
    "llama": llama_config,
    "gpt2": gpt2_config,
    "qwen2": lambda **kw: llama_config(qkv_bias=True, **kw),
    "mqa": lambda **kw: llama_config(num_kv_heads=1, **kw),
    # Sliding windows of 3 on layer 1 only (Qwen2/Qwen3's max_window_layers=1).
    "window": lambda **kw: llama_config(
        sliding_window=3, layer_types=("full_attention", "sliding_attention"), **kw
    ),
    "gemma2": gemma_config,
    "gemma3": lambda **kw: gemma_config(generation=3, **kw),
}


def make(name, seed=0, **kw):
    return Transformer(CONFIGS[name](**kw), rngs=nnx.Rngs(seed))


def tokens_and_mask(batch=3, time=9, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, V, (batch, time)), jnp.int32)
    mask = np.ones((batch, time), bool)
    mask[0, :3] = False  # left padding
    mask[1, -2:] = False  # right padding
    return tokens, jnp.asarray(mask)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count_and_logical_axes(name):
    model = make(name)
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert sum(v[...].size for v in leaves) == model.config.num_params
    for v in leaves:
        axes = v.get_metadata()["logical_axes"]
        assert len(axes) == v[...].ndim, (axes, v[...].shape)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padding_does_not_change_valid_logits(name):
    """A row's logits at its real tokens do not depend on padding on either side."""
    model = make(name)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (1, 6)), jnp.int32)
    alone = model(tokens)
    pad = jnp.full((1, 3), 7, jnp.int32)
    left = model(
        jnp.concatenate([pad, tokens], 1), jnp.concatenate([jnp.zeros((1, 3)), jnp.ones((1, 6))], 1)
    )
    right = model(
        jnp.concatenate([tokens, pad], 1), jnp.concatenate([jnp.ones((1, 6)), jnp.zeros((1, 3))], 1)
    )
    np.testing.assert_allclose(left[:, 3:], alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(right[:, :6], alone, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(left)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_causality(name):
    model = make(name)
    tokens, _ = tokens_and_mask(batch=2, time=8)
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % V)
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(a[:, 5:] - b[:, 5:])).max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "gpt2", "mqa", "window", "gemma2", "gemma3"])
@pytest.mark.parametrize("jit", [False, True])
def test_cached_decoding_equals_full_forward(name, jit):
    """Prefill 4 tokens, then 1, then 4 more through the cache = one full forward pass."""
    model = make(name)
    tokens, mask = tokens_and_mask(batch=3, time=9)
    mask = mask.at[1].set(True)  # left padding only, as generation uses
    full = model(tokens, mask)
    graphdef, state = nnx.split(model)

    def step(state, cache, toks, m):
        mdl = nnx.merge(graphdef, state)
        hidden, cache = mdl.decode(toks, m, cache=cache)
        return mdl.logits(hidden), cache

    step = jax.jit(step) if jit else step
    cache = model.init_cache(batch_size=3, max_length=12)
    pieces = []
    for lo, hi in ((0, 4), (4, 5), (5, 9)):
        logits, cache = step(state, cache, tokens[:, lo:hi], mask[:, lo:hi])
        pieces.append(logits)
    assert int(cache.index) == 9
    np.testing.assert_array_equal(np.asarray(cache.mask[:, :9]), np.asarray(mask))
    assert not np.asarray(cache.mask[:, 9:]).any()
    incremental = jnp.concatenate(pieces, axis=1)
    valid = np.asarray(mask)[..., None]
    np.testing.assert_allclose(
        np.where(valid, incremental, 0), np.where(valid, full, 0), rtol=1e-5, atol=1e-5
    )


def test_jit_equals_eager_and_remat_equals_plain_with_gradients():
    tokens, mask = tokens_and_mask()
    plain, remat = make("llama"), make("llama", remat=True)

    def loss(model):
        logits = model(tokens, mask).astype(jnp.float32)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

    g_plain = nnx.grad(loss)(plain)
    g_remat = nnx.grad(loss)(remat)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5), g_plain, g_remat
    )
    graphdef, state = nnx.split(plain)
    jitted = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, mask))(state)
    np.testing.assert_allclose(jitted, plain(tokens, mask), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_with_float32_master_weights():
    tokens, mask = tokens_and_mask()
    f32 = make("llama")
    bf16 = make("llama", dtype="bfloat16")
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param))), (
        "master weights stay float32"
    )
    lo = bf16(tokens, mask)
    assert lo.dtype == jnp.bfloat16
    hi = f32(tokens, mask)
    valid = np.asarray(mask)
    err = np.abs(np.asarray(lo, np.float32) - np.asarray(hi))[valid]
    assert err.max() < 0.1 * np.abs(np.asarray(hi))[valid].max()
    bf16_params = make("gpt2", param_dtype="bfloat16", dtype="bfloat16")
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(bf16_params, nnx.Param)))
    assert np.all(np.isfinite(np.asarray(bf16_params(tokens, mask), np.float32)))


def test_value_and_reward_heads():
    tokens, mask = tokens_and_mask()
    critic = make("llama", head="value")
    values = critic.values(tokens, mask)
    assert values.shape == tokens.shape and values.dtype == jnp.float32
    reward_model = make("llama", head="reward", lm_head=False)
    assert reward_model.lm_head is None and reward_model.score_bias is None
    rewards = reward_model.rewards(tokens, mask)
    hidden, _ = reward_model.decode(tokens, mask)
    per_token = np.asarray(reward_model.scores(hidden))
    last = [8, 6, 8]  # row 0 is left-padded (ends at 8), row 1 right-padded (ends at 6)
    np.testing.assert_allclose(rewards, per_token[np.arange(3), last], rtol=1e-6)
    with pytest.raises(ValueError, match="no LM head"):
        reward_model(tokens, mask)
    with pytest.raises(ValueError, match="no scalar head"):
        make("llama").scores(hidden)


def test_positions_and_last_valid_index():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(
        positions_from_mask(mask),
        [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 0, 1, 2, 2], [0, 0, 0, 0, 0]],
    )
    np.testing.assert_array_equal(last_valid_index(mask), [4, 2, 3, 0])


def test_rope_matches_complex_rotation():
    """RoPE rotates each pair (x_i, x_{i+H/2}) by the angle position * inv_freq_i."""
    model = make("llama")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 3, 8))
    positions = rng.integers(0, 100, (2, 5))
    out = np.asarray(model._rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions)))
    inv, _ = rope_inverse_frequencies(model.config)
    z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * positions[..., None, None] * inv)
    np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], -1), rtol=1e-4, atol=1e-4)


def test_rope_scalings():
    base = dict(vocab_size=8, hidden_size=64, num_layers=1, num_heads=2)  # head_dim 32
    default, _ = rope_inverse_frequencies(TransformerConfig.llama(**base))
    np.testing.assert_allclose(default, 10000.0 ** (-np.arange(0, 32, 2) / 32))
    linear, factor = rope_inverse_frequencies(
        TransformerConfig.llama(**base, rope_type="linear", rope_scaling={"factor": 4.0})
    )
    np.testing.assert_allclose(linear, default / 4) and factor == 1.0
    llama3, _ = rope_inverse_frequencies(
        TransformerConfig.llama(
            **base,
            rope_type="llama3",
            rope_scaling={
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    )
    wavelen = 2 * np.pi / default
    np.testing.assert_allclose(llama3[wavelen < 16], default[wavelen < 16])  # high freq kept
    np.testing.assert_allclose(llama3[wavelen > 64], default[wavelen > 64] / 8)  # low freq / 8
    mid = (wavelen >= 16) & (wavelen <= 64)
    assert (
        mid.any()
        and np.all(llama3[mid] <= default[mid])
        and np.all(llama3[mid] >= default[mid] / 8)
    )
    yarn, attention_factor = rope_inverse_frequencies(
        TransformerConfig.llama(
            **base,
            rope_type="yarn",
            rope_scaling={"factor": 4.0, "original_max_position_embeddings": 64},
        )
    )
    assert attention_factor == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert yarn[0] == pytest.approx(default[0]) and yarn[-1] == pytest.approx(default[-1] / 4)
    with pytest.raises(ValueError, match="factor"):
        rope_inverse_frequencies(TransformerConfig.llama(**base, rope_type="linear"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(family="bert"), "family"),
        (dict(hidden_act="swish2"), "hidden_act"),
        (dict(num_heads=5), "num_heads"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(rope_type="dynamic"), "rope_type"),
        (dict(head="policy"), "head"),
        (dict(lm_head=False), "lm_head"),
        (dict(dtype="float33"), "dtype"),
        (dict(num_layers=0), "num_layers"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(sliding_window=4, layer_types=("sliding_attention",)), "layer_types"),
        (dict(sliding_window=4, layer_types=("sliding_attention", "local")), "layer_types"),
        (dict(layer_types=("sliding_attention", "full_attention")), "layer_types"),
        (dict(rope_local_theta=1e4), "rope_local_theta"),
        (dict(attn_logit_softcap=0.0), "attn_logit_softcap"),
        (dict(query_pre_attn_scalar=-1.0), "query_pre_attn_scalar"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        llama_config(**kwargs)


def test_shape_errors():
    model = make("gpt2")
    tokens, mask = tokens_and_mask()
    with pytest.raises(ValueError, match="batch, time"):
        model(tokens[0])
    with pytest.raises(ValueError, match="mask shape"):
        model(tokens, mask[:, :-1])


def test_presets():
    from rljax.models.transformer import preset

    assert preset("1b").num_params == 1_235_814_400  # Llama-3.2-1B's published count
    assert 120e6 < preset("125m").num_params < 130e6
    model = Transformer(preset("tiny", num_layers=1), rngs=nnx.Rngs(0))
    assert model.config.num_layers == 1
    with pytest.raises(ValueError, match="unknown preset"):
        preset("7b")
    gemma2, gemma3 = preset("gemma2-tiny"), preset("gemma3-tiny")
    assert gemma2.family == gemma3.family == "gemma" and gemma3.qk_norm and not gemma2.qk_norm
    assert gemma2.layer_windows == (64, 2**30, 64, 2**30)
    assert gemma3.layer_windows == (64,) * 5 + (2**30,) and gemma3.rope_local_theta == 1e4
    assert preset("gemma3-tiny", num_layers=2).layer_windows == (64, 64)  # the pattern, cut
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (50.0, 30.0)
    assert Transformer(gemma3, rngs=nnx.Rngs(0)).layers["q_norm_scale"][...].shape == (6, 16)
    with pytest.raises(ValueError, match="generation"):
        TransformerConfig.gemma(
            vocab_size=8, hidden_size=8, num_layers=1, num_heads=1, generation=1
        )


def test_with_head_copies_the_backbone():
    from rljax.models.transformer import with_head

    tokens, mask = tokens_and_mask()
    lm = make("llama")
    reward_model = with_head(lm, "reward", rngs=nnx.Rngs(1))
    assert reward_model.lm_head is None and reward_model.config.head == "reward"
    np.testing.assert_allclose(reward_model.decode(tokens, mask)[0], lm.decode(tokens, mask)[0])
    critic = with_head(make("gpt2"), "value", rngs=nnx.Rngs(1))
    assert critic.values(tokens, mask).shape == tokens.shape
    critic.layers["q"][...] = critic.layers["q"][...] + 1.0  # a copy, not shared
    assert not np.allclose(critic.layers["q"][...], make("gpt2").layers["q"][...])


# ---------------------------------------------------------------------------- sliding windows


def _window_model(layer_types=None, window=3, num_layers=1, **kw):
    config = llama_config(
        num_layers=num_layers, sliding_window=window, layer_types=layer_types, **kw
    )
    return Transformer(config, rngs=nnx.Rngs(0))


def _changed_outputs(model, time=10, query=8):
    """For each earlier position j, whether changing token j changes the logits at ``query``."""
    row = np.random.default_rng(3).integers(0, V, time)
    rows = np.repeat(row[None], query + 2, axis=0)  # row 0 as is, row 1 + j with j changed
    rows[1 + np.arange(query + 1), np.arange(query + 1)] += 1
    logits = np.asarray(model(jnp.asarray(rows % V, jnp.int32)))[:, query]
    return [bool(x) for x in np.abs(logits[1:] - logits[0]).max(axis=-1) > 1e-6]


def test_sliding_window_sees_exactly_the_last_window_keys():
    """Hugging Face's sliding_window_causal mask: a query at i sees keys i - W < j <= i. One
    sliding layer, W = 3: the logits at 8 depend on tokens 6, 7, 8 only; two sliding layers
    reach 2 (W - 1) back; a global layer under a sliding one (the per-layer window in the
    layer scan) reaches everything."""
    assert _changed_outputs(_window_model()) == [False] * 6 + [True] * 3
    two = _window_model(num_layers=2)
    assert _changed_outputs(two) == [False] * 4 + [True] * 5
    mixed = _window_model(("full_attention", "sliding_attention"), num_layers=2)
    assert mixed.config.layer_windows == (2**30, 3)
    assert _changed_outputs(mixed) == [True] * 9


def test_window_longer_than_the_sequence_is_plain_causal_attention():
    tokens, mask = tokens_and_mask()
    plain = make("llama")
    state = nnx.state(plain)
    wide = nnx.merge(nnx.graphdef(make("llama", sliding_window=9)), state)
    narrow = nnx.merge(nnx.graphdef(make("llama", sliding_window=2)), state)
    valid = np.asarray(mask)
    want = np.asarray(plain(tokens, mask))[valid]
    np.testing.assert_allclose(np.asarray(wide(tokens, mask))[valid], want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(narrow(tokens, mask))[valid] - want).max() > 1e-3
    # A window takes the explicit-mask XLA path whatever attention_impl says (cuDNN's flash
    # attention, unavailable here, is not called).
    cudnn = nnx.merge(nnx.graphdef(make("llama", sliding_window=2, attention_impl="cudnn")), state)
    xla = nnx.merge(nnx.graphdef(make("llama", sliding_window=2, attention_impl="xla")), state)
    np.testing.assert_array_equal(np.asarray(cudnn(tokens, mask)), np.asarray(xla(tokens, mask)))


@pytest.mark.parametrize("name", ["window", "gemma2", "gemma3"])
def test_packed_rows_with_windows_equal_each_sequence_alone(name):
    """Two sequences (6 and 5 tokens, longer than the window of 3) packed in one row with
    segment ids: each one's logits are those it has alone."""
    model = make(name)
    rng = np.random.default_rng(4)
    first, second = rng.integers(0, V, 6), rng.integers(0, V, 5)
    row = jnp.asarray(np.concatenate([first, second, [0]])[None], jnp.int32)
    segment_ids = jnp.asarray([[1] * 6 + [2] * 5 + [0]], jnp.int32)
    packed = np.asarray(model(row, segment_ids=segment_ids))[0]
    for seq, lo in ((first, 0), (second, 6)):
        alone = np.asarray(model(jnp.asarray(seq[None], jnp.int32)))[0]
        np.testing.assert_allclose(packed[lo : lo + len(seq)], alone, rtol=1e-5, atol=1e-5)


def test_gemma_layers_norms_and_caps():
    """Gemma's four norms per layer (scales stored as w of 1 + w, so they start at 0), the
    soft-capped logits, the sqrt(D)-scaled embedding and Gemma 3's two RoPE tables."""
    model = make("gemma2")
    for name in (
        "attn_norm_scale",
        "post_attn_norm_scale",
        "mlp_norm_scale",
        "post_mlp_norm_scale",
    ):
        assert model.layers[name][...].shape == (2, 32)
        assert not np.asarray(model.layers[name][...]).any()
    assert "gate" in model.layers and "q_norm_scale" not in model.layers
    tokens, mask = tokens_and_mask()
    hidden, _ = model.decode(tokens, mask)
    raw = np.asarray(hidden @ model.unembedding())
    capped = np.asarray(model.logits(hidden))
    assert np.abs(raw).max() > 5.0 and np.abs(capped).max() < 5.0
    np.testing.assert_allclose(capped, 5.0 * np.tanh(raw / 5.0), rtol=1e-5, atol=1e-5)
    gemma3 = make("gemma3")
    statics = gemma3._layer_statics()
    local, global_ = np.asarray(statics.inv_freq)
    np.testing.assert_allclose(local[1], 1e4 ** (-2 / 8), rtol=1e-6)  # head_dim 8
    np.testing.assert_allclose(global_[1], 1e6 ** (-2 / 8), rtol=1e-6)
    assert np.asarray(statics.window).tolist() == [3, 2**30]
