"""Tests of :mod:`rljax.rlhf`: reward shaping, the KL controller, token GAE, group-relative
advantages (against float64 numpy loops) and the PPO/TRPO update steps on a tiny LM.

The update references compute per-token log-probs from the model's full ``[B, N, V]`` logits
(``jax.nn.log_softmax``, no chunking) and the PPO loss from its textbook formula; with
``optax.sgd(1.0)`` and one minibatch step the update's parameter change is minus the gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import one_layer_llama, rl_update_batch

from rljax import rlhf, updates
from rljax.models.transformer import Transformer, with_head

B, P, N, V = 6, 5, 7, 24


def random_mask(rng, rows=B, n=N, allow_empty=True):
    lengths = rng.integers(0 if allow_empty else 1, n + 1, rows)
    lengths[0] = n  # one full row
    return np.arange(n)[None, :] < lengths[:, None]


# ------------------------------------------------------------------------------ shaping


def ref_shaping(scores, logps, ref_logps, mask, coef, estimator):
    rewards = np.zeros_like(logps, np.float64)
    kl = np.zeros_like(logps, np.float64)
    for b in range(logps.shape[0]):
        idx = np.flatnonzero(mask[b])
        for t in idx:
            d = float(logps[b, t]) - float(ref_logps[b, t])
            kl[b, t] = {"k1": d, "k2": 0.5 * d * d, "k3": np.expm1(-d) + d}[estimator]
            rewards[b, t] = -coef * kl[b, t]
        if len(idx):
            rewards[b, idx[-1]] += scores[b]
    return rewards, kl


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("jit", [False, True])
def test_kl_penalty_rewards_matches_loop(estimator, jit):
    rng = np.random.default_rng(0)
    mask = random_mask(rng)
    logps = rng.normal(-2, 1, (B, N))
    ref_logps = rng.normal(-2, 1, (B, N))
    scores = rng.normal(0, 1, B)
    fn = functools.partial(rlhf.kl_penalty_rewards, kl_coef=0.3, estimator=estimator)
    fn = jax.jit(fn) if jit else fn
    rewards, kl = fn(jnp.asarray(scores), jnp.asarray(logps), jnp.asarray(ref_logps), mask)
    want_r, want_kl = ref_shaping(scores, logps, ref_logps, mask, 0.3, estimator)
    np.testing.assert_allclose(rewards, want_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(rewards)[~mask] == 0)


def test_shaping_errors_and_eos_penalty():
    with pytest.raises(ValueError, match="estimator"):
        rlhf.kl_penalty_rewards(
            jnp.zeros(2), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), kl_coef=0.1,
            estimator="k9",
        )  # fmt: skip
    scores = jnp.array([1.0, 2.0, 3.0])
    out = rlhf.penalize_missing_eos(scores, jnp.array([True, False, True]), 0.5)
    np.testing.assert_allclose(out, [1.0, 1.5, 3.0])
    assert rlhf.penalize_missing_eos(scores, jnp.array([False] * 3), None) is scores


def test_last_token_mask():
    mask = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]], bool)
    np.testing.assert_array_equal(
        rlhf.last_token_mask(mask),
        [[0, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]],
    )


def test_adaptive_kl_controller():
    # Ziegler et al.: beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)
    for kl, expected_error in [(12.0, 0.2), (6.6, 0.1), (4.0, -0.2), (5.4, -0.1), (6.0, 0.0)]:
        got = rlhf.adaptive_kl_coef(jnp.float32(0.1), kl, 256, target=6.0, horizon=10_000)
        assert float(got) == pytest.approx(0.1 * (1 + expected_error * 256 / 10_000), rel=1e-6)
    fixed = rlhf.KLController(0.2)
    assert float(fixed.update(fixed.init(), 100.0, 64)) == pytest.approx(0.2)
    adaptive = rlhf.KLController(0.2, target=1.0, horizon=100.0)
    coef = adaptive.init()
    for _ in range(5):  # KL above target: the coefficient grows, by at most 20% * n / horizon
        new = adaptive.update(coef, 10.0, 50)
        assert float(new) == pytest.approx(float(coef) * 1.1, rel=1e-6)
        coef = new
    coef = jax.jit(adaptive.update)(coef, 0.0, 50)  # far below: shrinks, jit-able
    assert float(coef) == pytest.approx(0.2 * 1.1**5 * 0.9, rel=1e-5)
    for bad in (dict(init_coef=-1.0), dict(target=0.0), dict(horizon=0.0)):
        with pytest.raises(ValueError, match="KLController"):
            rlhf.KLController(**bad)


# ------------------------------------------------------------------------------ advantages


def ref_token_gae(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards, np.float64)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        next_value, next_adv = 0.0, 0.0  # the episode ends at the last valid token
        for t in idx[::-1]:
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t] = next_adv
    return adv, np.where(mask, adv + values, 0.0)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
@pytest.mark.parametrize("jit", [False, True])
def test_token_gae_matches_loop(gamma, lam, jit):
    rng = np.random.default_rng(1)
    mask = random_mask(rng)
    rewards = np.where(mask, rng.normal(size=(B, N)), 0.0)
    values = rng.normal(size=(B, N))
    fn = functools.partial(rlhf.token_gae, gamma=gamma, lam=lam)
    fn = jax.jit(fn) if jit else fn
    adv, ret = fn(jnp.asarray(rewards), jnp.asarray(values), mask)
    want_adv, want_ret = ref_token_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


def ref_group(scores, k, baseline, scale, eps):
    out = np.zeros(len(scores))
    for g in range(len(scores) // k):
        r = scores[g * k : (g + 1) * k].astype(np.float64)
        for i in range(k):
            others = np.delete(r, i)
            base = r.mean() if baseline == "mean" else others.mean()
            a = r[i] - base
            if scale == "std":
                a /= np.std(r, ddof=1) + eps
            out[g * k + i] = a
    return out


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("k", [2, 4])
def test_group_advantages_match_loop(baseline, scale, k):
    rng = np.random.default_rng(k)
    scores = rng.normal(size=3 * k)
    for fn in (rlhf.group_advantages, jax.jit(rlhf.group_advantages, static_argnums=(1,),
                                                static_argnames=("baseline", "scale"))):  # fmt: skip
        got = fn(jnp.asarray(scores), k, baseline=baseline, scale=scale)
        np.testing.assert_allclose(got, ref_group(scores, k, baseline, scale, 1e-4), rtol=1e-5)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size"):
        rlhf.group_advantages(jnp.zeros(4), 1)
    with pytest.raises(ValueError, match="groups of group_size=3"):
        rlhf.group_advantages(jnp.zeros(4), 3)
    with pytest.raises(ValueError, match="baseline"):
        rlhf.group_advantages(jnp.zeros(4), 2, baseline="median")
    with pytest.raises(ValueError, match="scale"):
        rlhf.group_advantages(jnp.zeros(4), 2, scale="max")


# ------------------------------------------------------------------------------ updates


def tiny_lm(seed):
    return Transformer(one_layer_llama(V), rngs=nnx.Rngs(seed))


def rollout_batch(seed, critic=True):
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, P + 1, B)
    prompt_mask = np.arange(P)[None, :] >= (P - prompt_len)[:, None]  # left-padded
    cmask = random_mask(rng, allow_empty=False)
    return rl_update_batch(rng, prompt_mask, cmask, V, critic=critic, old_logp_mean=-3)


def full_logits_outputs(model, batch):
    """Reference log-probs, entropies and values from the full logits."""
    hidden, _ = model.decode(jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))
    h = hidden[:, P - 1 : P + N - 1]
    logp_all = jax.nn.log_softmax(model.logits(h).astype(jnp.float32), axis=-1)
    targets = jnp.asarray(batch["tokens"][:, P:])
    logps = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    values = model.scores(h) if model.score is not None else None
    return logps, entropy, values


def ref_ppo_loss(logps, entropy, values, batch, c, with_critic):
    m = jnp.asarray(batch["completion_mask"], jnp.float32)
    mean = lambda x: jnp.sum(x * m) / jnp.sum(m)
    adv = jnp.asarray(batch["advantages"])
    mu = mean(adv)
    adv = (adv - mu) / jnp.sqrt(mean((adv - mu) ** 2) + 1e-8)
    ratio = jnp.exp(logps - batch["old_logps"])
    policy = mean(-jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - c.clip_eps, 1 + c.clip_eps) * adv))
    loss = policy - c.entropy_coef * mean(entropy)
    if with_critic:
        old, ret = jnp.asarray(batch["old_values"]), jnp.asarray(batch["returns"])
        clipped = old + jnp.clip(values - old, -c.value_clip_eps, c.value_clip_eps)
        value = 0.5 * mean(jnp.maximum((values - ret) ** 2, (clipped - ret) ** 2))
        loss = loss + c.value_coef * value
    return loss


@pytest.mark.parametrize("critic", ["head", "separate", "none"])
def test_ppo_update_is_a_gradient_step_on_the_reference_loss(critic):
    base = tiny_lm(0)
    policy = with_head(base, "value", rngs=nnx.Rngs(1), lm_head=True) if critic == "head" else base
    critic_model = with_head(base, "value", rngs=nnx.Rngs(2)) if critic == "separate" else None
    pg, pp = nnx.split(policy)
    vg, vp = nnx.split(critic_model) if critic_model is not None else (None, None)
    config = updates.PPOConfig(value_coef=0.1, num_epochs=1, num_minibatches=1, entropy_coef=0.05)
    optimizer = optax.sgd(1.0)
    update = jax.jit(
        updates.make_rlhf_ppo_update(pg, optimizer, config, vg, critic=critic, chunk_size=5)
    )
    batch = rollout_batch(3, critic != "none")
    state = updates.init_rlhf_ppo_state(pp, optimizer, jax.random.key(0), vp)
    new_state, metrics = update(state, batch)

    def ref_loss(params):
        model = nnx.merge(pg, params["policy"])
        logps, entropy, values = full_logits_outputs(model, batch)
        if critic == "separate":
            values = full_logits_outputs(nnx.merge(vg, params["value"]), batch)[2]
        return ref_ppo_loss(logps, entropy, values, batch, config, critic != "none")

    params = state.params
    loss, grads = jax.value_and_grad(ref_loss)(params)
    assert float(metrics["loss/total"]) == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
    delta = jax.tree.map(lambda a, b: a - b, params, new_state.params)
    for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(delta), strict=True):
        np.testing.assert_allclose(d, g, rtol=2e-3, atol=2e-6)
    assert int(new_state.step) == 1
    expected = {"policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg",
                "loss/policy_avg", "val/ratio", "updates"}  # fmt: skip
    assert expected <= set(metrics)
    assert ("loss/value_avg" in metrics) == (critic != "none")


def test_ppo_update_checks_batch_and_config():
    pg, pp = nnx.split(with_head(tiny_lm(0), "value", rngs=nnx.Rngs(1), lm_head=True))
    update = updates.make_rlhf_ppo_update(pg, optax.sgd(0.1))
    state = updates.init_rlhf_ppo_state(pp, optax.sgd(0.1), jax.random.key(0))
    batch = rollout_batch(0)
    with pytest.raises(KeyError, match="returns"):
        update(state, {k: v for k, v in batch.items() if k != "returns"})
    with pytest.raises(ValueError, match="old_values"):
        update(state, {**batch, "old_values": batch["old_values"][:, :-1]})
    with pytest.raises(ValueError, match="value_graphdef"):
        updates.make_rlhf_ppo_update(pg, optax.sgd(0.1), critic="separate")
    with pytest.raises(ValueError, match="critic must be one of"):
        updates.make_rlhf_ppo_update(pg, optax.sgd(0.1), critic="both")
    with pytest.raises(TypeError, match="PPOConfig"):
        updates.make_rlhf_ppo_update(pg, optax.sgd(0.1), updates.TRPOConfig())


@pytest.mark.parametrize("with_critic", [True, False])
def test_trpo_update_takes_a_trust_region_step(with_critic):
    base = tiny_lm(4)
    pg, pp = nnx.split(base)
    vg, vp = nnx.split(with_head(base, "value", rngs=nnx.Rngs(5))) if with_critic else (None, {})
    value_opt = optax.adam(1e-3)
    config = updates.TRPOConfig(max_kl=0.01, cg_iters=20, n_critic_updates=2, critic_minibatches=2)
    update = jax.jit(updates.make_rlhf_trpo_update(pg, value_opt, config, vg))
    batch = rollout_batch(5, critic=with_critic)
    model = nnx.merge(pg, pp)
    logps, _, _ = full_logits_outputs(model, batch)
    batch["old_logps"] = np.where(batch["completion_mask"], np.asarray(logps), 0.0)  # on-policy
    state = updates.init_trpo_state(pp, vp, value_opt, jax.random.key(0))
    new_state, metrics = update(state, batch)
    assert bool(metrics["accepted"])
    assert 0 < float(metrics["kl"]) <= config.max_kl * (1 + 1e-5)
    assert float(metrics["surrogate_after"]) > float(metrics["surrogate_before"])
    # The reported surrogate is the advantage-weighted ratio of the new policy on the tokens.
    m = batch["completion_mask"].astype(np.float64)
    adv = batch["advantages"]
    mu = (adv * m).sum() / m.sum()
    adv = (adv - mu) / np.sqrt((((adv - mu) ** 2) * m).sum() / m.sum() + 1e-8)
    new_logps, _, _ = full_logits_outputs(nnx.merge(pg, new_state.params["policy"]), batch)
    ratio = np.exp(np.asarray(new_logps, np.float64) - batch["old_logps"])
    surrogate = (ratio * adv * m).sum() / m.sum()
    assert float(metrics["surrogate_after"]) == pytest.approx(surrogate, rel=1e-4, abs=1e-6)
    if with_critic:
        assert float(metrics["value_loss"]) > 0
        moved = jax.tree.map(
            lambda a, b: float(jnp.max(jnp.abs(a - b))), vp, new_state.params["value"]
        )
        assert max(jax.tree.leaves(moved)) > 0
