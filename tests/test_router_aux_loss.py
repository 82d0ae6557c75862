"""The mixture-of-experts load-balancing loss in the DPO, GRPO and RLHF-PPO updates
(``DPOConfig.router_aux_loss_coef``, ``GRPOConfig.router_aux_loss_coef``,
``make_rlhf_ppo_update(..., router_aux_loss_coef=)``): on a tiny float64 MoE policy, the
reported ``router_aux_loss`` equals :func:`rljax.models.moe.load_balancing_loss` of the
policy's router logits over every real token (computed here independently, from the model's
full forward), the loss is the plain loss plus ``coef`` times it, and one SGD step of rate 1
moves the parameters by the plain step plus ``coef`` times that loss's gradient; the
shared-prompt DPO layout gives the same loss; a bad coefficient and a dense model are refused.
Jitted steps only (the eager runs of the steps take several times as long; the term is one
line of each loss, the same traced or not).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import preference_batch, rl_update_batch

from rljax import data
from rljax.models import moe
from rljax.models.transformer import Transformer, TransformerConfig
from rljax.updates import (
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    init_dpo_state,
    init_grpo_state,
    init_rlhf_ppo_state,
    make_dpo_update,
    make_grpo_update,
    make_rlhf_ppo_update,
)

VOCAB, TOP_K, COEF = 37, 2, 0.7


def tiny_moe(**overrides) -> TransformerConfig:
    """Two float64 layers of 5 experts (top-2) of width 12, width 16, 2 heads sharing 1."""
    settings = dict(
        vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
        intermediate_size=12, num_experts=5, num_experts_per_tok=TOP_K, dtype="float64",
        param_dtype="float64", max_position_embeddings=32,
    )  # fmt: skip
    return TransformerConfig.llama(**{**settings, **overrides})


@pytest.fixture(scope="module")
def policy():
    return nnx.split(Transformer(tiny_moe(), rngs=nnx.Rngs(3)))


def aux_and_grad(graphdef, params, tokens, mask):
    """The load-balancing loss of the model's own forward over ``tokens`` and its gradient."""

    def aux(params):
        model = nnx.merge(graphdef, params, copy=True)
        _, router_logits = model(tokens, mask, return_router_logits=True)
        return moe.load_balancing_loss(router_logits, TOP_K, mask)

    return jax.jit(jax.value_and_grad(aux))(params)


def assert_step_adds_aux(before, plain_after, after, aux_grad):
    """SGD(1): ``before - after == (before - plain_after) + COEF * aux_grad``."""
    delta = jax.tree.map(lambda b, a, p: (b - a) - (b - p), before, after, plain_after)
    chex.assert_trees_all_close(delta, jax.tree.map(lambda g: COEF * g, aux_grad), atol=1e-12)
    router = np.asarray(aux_grad["layers"]["router"][...])
    assert np.abs(router).max() > 1e-4  # the term reaches the router


def test_dpo_adds_the_load_balancing_loss(policy):
    transform = jax.jit
    graphdef, params = policy
    batch = preference_batch(np.random.default_rng(0), pairs=3, time=10, vocab_size=VOCAB)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["ref_chosen_logps"] = jnp.asarray([-20.0, -25.0, -18.0])
    batch["ref_rejected_logps"] = jnp.asarray([-22.0, -19.0, -24.0])
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    aux, aux_grad = aux_and_grad(graphdef, params, tokens, mask)

    optimizer = optax.sgd(1.0)
    state = init_dpo_state(params, optimizer)
    step = lambda config: transform(make_dpo_update(graphdef, optimizer, config))(state, batch)
    plain_state, plain = step(DPOConfig(chunk_size=7))
    assert "router_aux_loss" not in plain
    new_state, metrics = step(DPOConfig(chunk_size=7, router_aux_loss_coef=COEF))
    np.testing.assert_allclose(metrics["router_aux_loss"], aux, rtol=1e-12)
    np.testing.assert_allclose(metrics["loss"], plain["loss"] + COEF * aux, rtol=1e-12)
    assert float(aux) > TOP_K  # above its balanced value: the term is not negligible
    assert_step_adds_aux(params, plain_state.params, new_state.params, aux_grad)

    # The shared-prompt layout routes the same tokens: each prompt counted twice.
    shared = data.share_prompts({**batch, "prompt_lengths": prompt_lengths(batch)})
    _, shared_metrics = transform(
        make_dpo_update(graphdef, optimizer, DPOConfig(router_aux_loss_coef=COEF))
    )(state, {k: jnp.asarray(v) for k, v in shared.items()})
    np.testing.assert_allclose(shared_metrics["router_aux_loss"], aux, rtol=1e-10)
    np.testing.assert_allclose(shared_metrics["loss"], metrics["loss"], rtol=1e-10)


def prompt_lengths(batch) -> np.ndarray:
    """The shared prompt of each pair of :func:`helpers.preference_batch`: the positions
    before the first completion token."""
    return np.argmax(np.asarray(batch["chosen_loss_mask"]), axis=1).astype(np.int32)


def rollout(seed, *, critic=False):
    rng = np.random.default_rng(seed)
    prompt_mask = np.ones((4, 3), bool)
    prompt_mask[1, 0] = False  # left padding
    completion_mask = np.arange(5)[None] < np.array([[5], [3], [4], [1]])
    batch = rl_update_batch(
        rng, prompt_mask, completion_mask, VOCAB, critic=critic, old_logp_mean=-3.0
    )
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_updates_add_the_load_balancing_loss(policy, algo):
    transform = jax.jit
    graphdef, params = policy
    batch = rollout(1)
    aux, aux_grad = aux_and_grad(graphdef, params, batch["tokens"], batch["mask"])
    optimizer = optax.sgd(1.0)
    state = (init_grpo_state if algo == "grpo" else init_rlhf_ppo_state)(
        params, optimizer, jax.random.key(0)
    )
    if algo == "grpo":
        batch["advantages"] = batch["advantages"][:, 0]  # one advantage per sequence

    def step(coef):
        if algo == "grpo":
            config = GRPOConfig(chunk_size=3, router_aux_loss_coef=coef)
            update = make_grpo_update(graphdef, optimizer, config)
        else:
            config = PPOConfig(num_epochs=1, num_minibatches=1)
            update = make_rlhf_ppo_update(
                graphdef, optimizer, config, critic="none", chunk_size=3, router_aux_loss_coef=coef
            )
        return transform(update)(state, batch)

    plain_state, plain = step(0.0)
    new_state, metrics = step(COEF)
    assert "router_aux_loss" not in plain
    np.testing.assert_allclose(metrics["router_aux_loss"], aux, rtol=1e-12)
    total, plain_total = ("loss", "loss/policy") if algo == "grpo" else ("loss/total",) * 2
    np.testing.assert_allclose(metrics[total], plain[plain_total] + COEF * aux, rtol=1e-12)
    before, after = state.params["policy"], new_state.params["policy"]
    assert_step_adds_aux(before, plain_state.params["policy"], after, aux_grad)


def test_bad_coefficients_and_dense_models_are_refused():
    for bad in (-0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"DPOConfig\.router_aux_loss_coef"):
            DPOConfig(router_aux_loss_coef=bad)
        with pytest.raises(ValueError, match=r"--router-aux-loss-coef"):
            GRPOConfig(router_aux_loss_coef=bad)
        with pytest.raises(ValueError, match=r"make_rlhf_ppo_update: router_aux_loss_coef"):
            make_rlhf_ppo_update(None, optax.sgd(1.0), critic="none", router_aux_loss_coef=bad)
    graphdef, params = nnx.split(Transformer(tiny_moe(num_experts=0), rngs=nnx.Rngs(0)))
    update = make_grpo_update(graphdef, optax.sgd(1.0), GRPOConfig(router_aux_loss_coef=0.1))
    state = init_grpo_state(params, optax.sgd(1.0), jax.random.key(0))
    batch = rollout(2)
    batch["advantages"] = batch["advantages"][:, 0]
    with pytest.raises(ValueError, match=r"return_router_logits.*num_experts=0"):
        update(state, batch)
