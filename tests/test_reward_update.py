"""Tests of the reward-model step :func:`rljax.updates.make_reward_update`.

The independent reference runs the chosen and rejected sequences separately through
``model.decode``, reads the head at the last real token found with numpy, and writes the
Bradley-Terry loss (margin, centring) out in ``jnp``; its gradient is ``jax.grad`` of that.
The update uses ``optax.sgd(1.0)``, so its gradient is ``params - new_params``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import TINY, count_traces, preference_batch, tiny_llama

from rljax.models.transformer import Transformer
from rljax.updates import RewardConfig, init_reward_state, make_reward_eval, make_reward_update

VOCAB = TINY["vocab_size"]
TIME = 10


def reward_model(seed, dtype="float32"):
    config = tiny_llama(head="reward", lm_head=False, param_dtype=dtype, dtype=dtype)
    return nnx.split(Transformer(config, rngs=nnx.Rngs(seed)))


def make_batch(seed, pairs, learnable=False):
    """Right-padded pairs; with ``learnable`` the chosen completions use tokens < 32 and the
    rejected ones tokens >= 32."""
    rng = np.random.default_rng(seed)
    ranges = {"chosen": (0, 32), "rejected": (32, 64)} if learnable else None
    batch = preference_batch(rng, pairs, TIME, VOCAB, ranges)
    batch["margin"] = rng.uniform(0.0, 1.0, pairs)
    return batch


def independent_loss(graphdef, params, batch, coef, use_margin):
    model = nnx.merge(graphdef, params, copy=True)
    rewards = []
    for side in ("chosen", "rejected"):
        hidden, _ = model.decode(batch[f"{side}_tokens"], batch[f"{side}_mask"])
        last = np.array([np.nonzero(row)[0][-1] for row in batch[f"{side}_mask"]])
        h_last = hidden[np.arange(len(last)), last]  # [B, D]
        rewards.append(h_last @ params["score"][...])
    chosen, rejected = rewards
    gap = chosen - rejected - (batch["margin"] if use_margin else 0.0)
    loss = -jnp.mean(jax.nn.log_sigmoid(gap))
    if coef is not None:
        loss = loss + coef * jnp.mean((chosen + rejected) ** 2)
    return loss, (chosen, rejected)


@pytest.mark.parametrize(
    "config", [RewardConfig(center_rewards_coefficient=0.05), RewardConfig(use_margin=False)]
)
def test_update_matches_independent_bradley_terry(config):
    graphdef, params = reward_model(0, "float64")
    batch = make_batch(0, pairs=4)
    loss_fn = functools.partial(
        independent_loss,
        graphdef,
        batch=batch,
        coef=config.center_rewards_coefficient,
        use_margin=config.use_margin,
    )
    (loss, (chosen, rejected)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    state = init_reward_state(params, optax.sgd(1.0))
    new_state, metrics = jax.jit(make_reward_update(graphdef, optax.sgd(1.0), config))(state, batch)
    # A float64 model is float64 throughout (norms, softmax and the reward head), so values
    # agree to ~1e-14; the tolerance leaves room for another machine's summation order.
    tol = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(metrics["loss"], loss, **tol)
    np.testing.assert_allclose(metrics["rewards/chosen"], jnp.mean(chosen), **tol)
    np.testing.assert_allclose(metrics["rewards/rejected"], jnp.mean(rejected), **tol)
    np.testing.assert_allclose(metrics["accuracy"], jnp.mean(chosen > rejected), rtol=1e-12)
    np.testing.assert_allclose(metrics["margin"], jnp.mean(chosen - rejected), **tol)
    np.testing.assert_allclose(
        metrics["max_reward"], jnp.max(jnp.concatenate([chosen, rejected])), **tol
    )
    update_grads = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
    # ``params - new_params`` cancels the digits parameters and gradient do not share
    for g, e in zip(jax.tree.leaves(update_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-8 * float(np.max(np.abs(e))))
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-10)
    assert int(new_state.step) == 1


def test_accuracy_rises_on_a_learnable_task():
    graphdef, params = reward_model(1)
    optimizer = optax.adam(1e-2)
    update = make_reward_update(graphdef, optimizer, RewardConfig(use_margin=False))
    counted, traces = count_traces(update)
    step = jax.jit(counted, donate_argnums=0)
    evaluate = jax.jit(make_reward_eval(graphdef, RewardConfig(use_margin=False)))
    train = make_batch(1, pairs=16, learnable=True)
    held_out = make_batch(2, pairs=16, learnable=True)
    state = init_reward_state(params, optimizer)
    before = evaluate(state, held_out)
    losses = []
    for _ in range(25):
        state, metrics = step(state, train)
        losses.append(float(metrics["loss"]))
    after = evaluate(state, held_out)
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(after["accuracy"]) >= 0.9 > float(before["accuracy"])
    assert float(after["loss"]) < float(before["loss"])
    assert "grad_norm" not in after
    assert len(traces) == 1


def test_missing_keys_are_named():
    graphdef, params = reward_model(0)
    update = make_reward_update(graphdef, optax.sgd(1.0))
    batch = make_batch(0, pairs=2)
    del batch["rejected_mask"]
    with pytest.raises(KeyError, match="rejected_mask"):
        jax.eval_shape(update, init_reward_state(params, optax.sgd(1.0)), batch)
