"""Mixture-of-experts models (Qwen3-MoE, Mixtral) against transformers' PyTorch models: tiny
random checkpoints with odd sizes give the same logits (left padding) and router logits, the
same load-balancing loss; KV-cache decoding equals the full forward; save_model loads back into
transformers; the dense and ragged expert paths agree (values and gradients); the expert
weights shard along ``experts``; unsupported options are refused naming the config field."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import HF_TINY_LLAMA, assert_greedy_matches_transformers  # noqa: E402

from rljax import sharding  # noqa: E402
from rljax.models import hf, moe  # noqa: E402
from rljax.models.transformer import Transformer, TransformerConfig  # noqa: E402
from rljax.updates import (  # noqa: E402
    SFTConfig,
    SFTState,
    init_sft_state,
    make_sft_eval,
    make_sft_update,
)

VOCAB, BATCH, TIME = 97, 3, 11
# Odd sizes: width 48, 3 heads of 24 (one key/value head for Qwen3-MoE, GQA 3/1), 5 experts
# of width 40, top-2, two layers.
SHAPE = dict(  # two layers, 64 positions, eager attention; each family sets its MLP widths
    {k: v for k, v in HF_TINY_LLAMA.items() if k != "intermediate_size"},
    vocab_size=VOCAB, hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=24,
    num_experts_per_tok=2,
)  # fmt: skip


def _qwen3_moe(**settings):
    config = transformers.Qwen3MoeConfig(
        **SHAPE,
        intermediate_size=80,  # the dense layers' width: unused, every layer is sparse
        moe_intermediate_size=40,
        num_experts=5,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
        **settings,
    )
    return transformers.Qwen3MoeForCausalLM(config)


def _mixtral(**settings):
    config = transformers.MixtralConfig(
        **SHAPE,
        intermediate_size=40,
        num_local_experts=5,
        rope_parameters=dict(rope_type="default", rope_theta=1e4),
        **settings,
    )
    return transformers.MixtralForCausalLM(config)


FAMILIES = {
    # Un-normalised top-k probabilities, biases on q/k/v/o, tied embeddings.
    "qwen3_moe": lambda: _qwen3_moe(norm_topk_prob=False, attention_bias=True),
    # Renormalised top-k (always, in Mixtral), untied embeddings.
    "mixtral": lambda: _mixtral(tie_word_embeddings=False),
}


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (HF model, its save_pretrained folder, the rljax model loaded from it)."""
    out = {}
    for k, (family, build) in enumerate(FAMILIES.items()):
        torch.manual_seed(k)
        model = _randomize(build(), seed=20 + k)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (model, folder, hf.load_model(folder))
    return out


def _batch(seed=0):
    """Left-padded rows of unequal lengths (id 0 is padding)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((BATCH, TIME), bool)
    for row, n in enumerate((TIME, TIME - 4, TIME - 7)):
        mask[row, : TIME - n] = False
    return np.where(mask, rng.integers(1, VOCAB, (BATCH, TIME)), 0), mask


def _hf_forward(model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        return model(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
            output_router_logits=True,
        )


def _relative(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_router_logits_and_aux_loss_match_transformers(checkpoints, family):
    hf_model, _, ours = checkpoints[family]
    c = ours.config
    assert (c.num_experts, c.num_experts_per_tok, c.intermediate_size) == (5, 2, 40)
    assert c.norm_topk_prob == (family == "mixtral") and c.qk_norm == (family == "qwen3_moe")
    assert ours.layers["expert_gate"][...].shape == (2, 5, 48, 40)
    assert ours.layers["expert_down"][...].shape == (2, 5, 40, 48)
    assert ours.layers["router"][...].shape == (2, 48, 5)
    assert c.num_params == sum(p.numel() for p in hf_model.parameters())
    tokens, mask = _batch()
    want = _hf_forward(hf_model, tokens, mask)
    logits, router_logits = ours(
        jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), return_router_logits=True
    )
    want_logits = want.logits.numpy()
    assert np.abs(want_logits).max() > 0.5
    assert _relative(np.asarray(logits)[mask], want_logits[mask]) < 1e-4
    # Router logits per layer: transformers' are [B * T, E], ours [L, B, T, E].
    want_router = np.stack([r.numpy() for r in want.router_logits]).reshape(2, BATCH, TIME, 5)
    assert _relative(np.asarray(router_logits)[:, mask], want_router[:, mask]) < 1e-4
    aux = moe.load_balancing_loss(router_logits, c.num_experts_per_tok, jnp.asarray(mask))
    np.testing.assert_allclose(float(aux), float(want.aux_loss), rtol=1e-5)
    assert float(aux) > c.num_experts_per_tok  # random routing is not perfectly balanced
    # Without a mask: every position counts (transformers' attention_mask=None branch).
    unmasked = transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func(
        tuple(torch.tensor(r) for r in want_router.reshape(2, BATCH * TIME, 5)), 5, 2
    )
    np.testing.assert_allclose(
        float(moe.load_balancing_loss(router_logits, 2)), float(unmasked), rtol=1e-5
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decoding_equals_the_full_forward(checkpoints, family):
    _, _, ours = checkpoints[family]
    graphdef, params = nnx.split(ours)
    tokens, mask = _batch(seed=3)
    full = np.asarray(ours(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)))

    @jax.jit
    def decode(params, tokens, mask, cache):
        model = nnx.merge(graphdef, params)
        hidden, cache = model.decode(jnp.asarray(tokens, jnp.int32), mask, cache=cache)
        return model.logits(hidden), cache

    prompt = 6
    cache = ours.init_cache(batch_size=BATCH, max_length=TIME)
    logits, cache = decode(params, tokens[:, :prompt], mask[:, :prompt], cache)
    pieces = [np.asarray(logits)]
    for j in range(prompt, TIME):
        logits, cache = decode(params, tokens[:, j : j + 1], mask[:, j : j + 1], cache)
        pieces.append(np.asarray(logits))
    cached = np.concatenate(pieces, axis=1)
    assert _relative(cached[mask], full[mask]) < 2e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers(checkpoints, family):

    hf_model, _, ours = checkpoints[family]
    tokens, mask = _batch(seed=6)
    assert_greedy_matches_transformers(ours, hf_model, tokens, mask, 5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_model_round_trips_into_transformers(checkpoints, family, tmp_path):
    hf_model, _, ours = checkpoints[family]
    hf.save_model(ours, tmp_path)  # the default model_type follows qk_norm
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == family
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert type(back) is type(hf_model)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens, mask = _batch(seed=1)
    want = _hf_forward(hf_model, tokens, mask).logits.numpy()[mask]
    assert _relative(_hf_forward(back.eval(), tokens, mask).logits.numpy()[mask], want) < 1e-6
    assert hf.load_model(tmp_path).config == ours.config


def _tiny_moe(**overrides):
    """Our MoE config in float64: width 24, 3 heads of 8 (one key/value head), 5 experts of
    width 20, top-2, two layers."""
    settings = dict(
        vocab_size=61, hidden_size=24, num_layers=2, num_heads=3, num_kv_heads=1, head_dim=8,
        intermediate_size=20, num_experts=5, num_experts_per_tok=2, dtype="float64",
        param_dtype="float64",
    )  # fmt: skip
    return TransformerConfig.llama(**{**settings, **overrides})


def test_dense_and_ragged_expert_paths_agree_with_gradients():
    config = _tiny_moe(norm_topk_prob=False)
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    tokens, mask = _batch(seed=2)
    tokens, mask = jnp.asarray(tokens % 61, jnp.int32), jnp.asarray(mask)

    def loss(params, impl):
        model = nnx.merge(graphdef, params)
        model.config = dataclasses.replace(config, moe_impl=impl)
        logits, router_logits = model(tokens, mask, return_router_logits=True)
        aux = moe.load_balancing_loss(router_logits, 2, mask)
        return jnp.sum(jnp.where(mask[..., None], jnp.tanh(logits), 0.0)) + 0.3 * aux

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    dense, dense_grad = value_and_grad(params, "dense")
    ragged, ragged_grad = value_and_grad(params, "ragged")
    np.testing.assert_allclose(float(ragged), float(dense), rtol=1e-12)
    chex.assert_trees_all_close(ragged_grad, dense_grad, rtol=1e-9, atol=1e-12)
    g = dense_grad["layers"]
    for name in ("router", "expert_gate", "expert_up", "expert_down"):
        assert np.abs(np.asarray(g[name][...])).max() > 0  # every expert weight is trained


def test_routing_matches_a_numpy_loop():
    rng = np.random.default_rng(0)
    n, d, e, f, k = 7, 6, 5, 4, 3
    x = rng.normal(size=(n, d))
    router, gate, up = (
        rng.normal(size=(d, e)),
        rng.normal(size=(e, d, f)),
        rng.normal(size=(e, d, f)),
    )
    down = rng.normal(size=(e, f, d))
    for normalize in (True, False):
        want = np.zeros((n, d))
        for t in range(n):
            logits = x[t] @ router
            p = np.exp(logits - logits.max())
            p /= p.sum()
            top = np.argsort(-p)[:k]
            w = p[top] / (p[top].sum() if normalize else 1.0)
            for weight, j in zip(w, top, strict=True):
                h = x[t] @ gate[j]
                want[t] += weight * ((h / (1 + np.exp(-h))) * (x[t] @ up[j])) @ down[j]
        for impl in ("dense", "ragged"):
            got, _ = moe.moe_mlp(
                jnp.asarray(x),
                *map(jnp.asarray, (router, gate, up, down)),
                act=jax.nn.silu,
                top_k=k,
                norm_topk_prob=normalize,
                impl=impl,
            )
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


def _expert_specs(num_experts, rules=sharding.DEFAULT_RULES):
    config = _tiny_moe(num_experts=num_experts, dtype="float32", param_dtype="float32")
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    params = nnx.split(abstract, nnx.Param, ...)[1]
    specs = sharding.param_specs(params, rules, sharding.make_mesh("fsdp=4,tensor=2"))
    return {name: specs["layers"][name] for name in ("router", "expert_gate", "expert_down")}


def test_expert_weights_shard_along_experts():
    P = jax.sharding.PartitionSpec
    specs = _expert_specs(4)  # whole experts per fsdp device, their width over tensor
    assert specs["expert_gate"] == P(None, "fsdp", None, "tensor")
    assert specs["expert_down"] == P(None, "fsdp", "tensor", None)
    assert specs["router"] == P(None, "fsdp", None)  # [L, D, E]: D claims fsdp first
    # Five experts do not divide fsdp=4: the model width takes the axis instead.
    assert _expert_specs(5)["expert_gate"] == P(None, None, "fsdp", "tensor")
    assert _expert_specs(4, sharding.TENSOR_RULES)["expert_gate"] == P(None, None, None, "tensor")


def test_unsupported_options_are_refused_naming_the_field():
    qwen = dict(SHAPE, moe_intermediate_size=40, num_experts=5)
    qwen.pop("attn_implementation")
    for field, value in (("decoder_sparse_step", 2), ("mlp_only_layers", [1])):
        with pytest.raises(ValueError, match=rf"{field}=.* is not supported"):
            hf.config_from_hf(transformers.Qwen3MoeConfig(**qwen, **{field: value}))
    mixtral = dict(SHAPE, intermediate_size=40, num_local_experts=5)
    mixtral.pop("attn_implementation")
    with pytest.raises(ValueError, match=r"router_jitter_noise=0\.1 is not supported"):
        hf.config_from_hf(transformers.MixtralConfig(**mixtral, router_jitter_noise=0.1))
    # A Qwen3-MoE config without experts is a dense Qwen3 (every layer's MLP is dense).
    dense = hf.config_from_hf(transformers.Qwen3MoeConfig(**dict(qwen, num_experts=0)))
    assert dense.num_experts == 0 and dense.qk_norm
    with pytest.raises(ValueError, match=r"TransformerConfig\.num_experts_per_tok"):
        _tiny_moe(num_experts_per_tok=6)
    with pytest.raises(ValueError, match=r"TransformerConfig\.num_experts: .*mlp_bias"):
        _tiny_moe(mlp_bias=True)
    with pytest.raises(ValueError, match=r"cannot save a mixture-of-experts model as 'llama'"):
        hf.hf_config_from(_tiny_moe(), model_type="llama")
    with pytest.raises(ValueError, match=r"as 'mixtral'.*norm_topk_prob=False"):
        hf.hf_config_from(_tiny_moe(norm_topk_prob=False), model_type="mixtral")
    dense_model = Transformer(_tiny_moe(num_experts=0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"return_router_logits.*num_experts=0"):
        dense_model(jnp.ones((1, 3), jnp.int32), return_router_logits=True)


def _padded_batch(seed=4):
    tokens, mask = _batch(seed)
    loss_mask = mask & (np.arange(TIME) >= 5)  # the completion: the last 6 positions
    return {"tokens": jnp.asarray(tokens % 61, jnp.int32), "mask": mask, "loss_mask": loss_mask}


def test_sft_update_adds_the_load_balancing_loss():
    config = _tiny_moe()
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(1)))
    batch, coef = _padded_batch(), 0.5

    def parts(params):  # the plain SFT loss and the load-balancing loss
        plain = make_sft_eval(graphdef)(SFTState(params, None, jnp.zeros((), jnp.int32)), batch)
        model = nnx.merge(graphdef, params, copy=True)
        _, router_logits = model(batch["tokens"], batch["mask"], return_router_logits=True)
        return jnp.stack([plain["loss"], moe.load_balancing_loss(router_logits, 2, mask)])

    mask = batch["mask"]

    def values_and_grads(params):
        jacobian = jax.jacrev(parts)(params)
        return parts(params), *(jax.tree.map(lambda g, i=i: g[i], jacobian) for i in (0, 1))

    (plain, aux), plain_grads, aux_grads = jax.jit(values_and_grads)(params)
    optimizer = optax.sgd(1.0)
    update = make_sft_update(graphdef, optimizer, SFTConfig(router_aux_loss_coef=coef))
    state = init_sft_state(params, optimizer)
    new_state, metrics = jax.jit(update)(state, batch)
    np.testing.assert_allclose(metrics["loss"], plain + coef * aux, rtol=1e-12)
    np.testing.assert_allclose(metrics["router_aux_loss"], aux, rtol=1e-12)
    assert float(aux) > 2.0  # above its balanced value k = 2: the term is not negligible
    stepped = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
    want = jax.tree.map(lambda a, b: a + coef * b, plain_grads, aux_grads)
    chex.assert_trees_all_close(stepped, want, rtol=1e-8, atol=1e-12)
    assert np.abs(np.asarray(aux_grads["layers"]["router"][...])).max() > 1e-4
    with pytest.raises(ValueError, match=r"SFTConfig\.router_aux_loss_coef"):
        SFTConfig(router_aux_loss_coef=-1.0)


def test_sharded_forward_equals_one_device():
    config = _tiny_moe(num_experts=4, dtype="float32", param_dtype="float32")
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(2)))
    tokens, mask = _batch(seed=5)
    tokens, mask = jnp.asarray(np.tile(tokens % 61, (2, 1))[:4]), np.tile(mask, (2, 1))[:4]

    def forward(params, tokens, mask):
        return nnx.merge(graphdef, params)(tokens, mask, return_router_logits=True)

    want = jax.jit(forward)(params, tokens, mask)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    placed = jax.device_put(params, sharding.param_shardings(params, mesh))
    assert placed["layers"]["expert_up"][...].sharding.spec[1] == "fsdp"
    got = jax.jit(forward)(placed, *sharding.shard_batch((tokens, mask), mesh))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
