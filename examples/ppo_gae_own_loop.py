"""PPO with GAE in a rollout loop of your own, on rljax's pure-JAX CartPole-v1.

``env.step`` resets automatically (gymnax's interface) and returns the cut-off observation as
``info["final_obs"]``, so a time-limit truncation bootstraps from it. GAE takes time on the
LAST axis (``[envs, time]``): the scan's time-first arrays are transposed before the call.
Run: ``python examples/ppo_gae_own_loop.py`` (seconds; the last line is a JSON summary).
"""

import json

import jax
import jax.numpy as jnp
import optax

from rljax import advantages, distributions, envs, ppo

ENVS, STEPS, ITERS, GAMMA, LAM = 16, 64, 25, 0.99, 0.95
env, env_params = envs.make("CartPole-v1")
k_pi, k_v, k_env, k_run = jax.random.split(jax.random.key(0), 4)
pi, v1 = jax.random.normal(k_pi, (4, 2)) * 0.01, jax.random.normal(k_v, (4, 32)) * 0.5
params = {"pi": pi, "v1": v1, "v2": jnp.zeros(32)}  # linear policy, tanh-layer critic


def policy(p, obs):
    return obs @ p["pi"]


def value(p, obs):
    return jnp.tanh(obs @ p["v1"]) @ p["v2"]


v_step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
optimizer = optax.adam(2e-2)


def transition(params, carry, key):
    state, obs = carry
    k_act, k_env = jax.random.split(key)
    action = jax.random.categorical(k_act, logits := policy(params, obs))
    next_obs, state, reward, term, trunc, info = v_step(
        jax.random.split(k_env, ENVS), state, action, env_params
    )
    reward = reward + GAMMA * trunc * value(params, info["final_obs"])  # bootstrap a cut-off
    record = dict(obs=obs, action=action, logp=distributions.log_prob(logits, action))
    record.update(value=value(params, obs), reward=reward, done=(term | trunc).astype(float))
    return (state, next_obs), record


@jax.jit
def iteration(params, opt_state, carry, key):
    carry, traj = jax.lax.scan(
        lambda c, k: transition(params, c, k), carry, jax.random.split(key, STEPS)
    )
    traj = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), traj)  # [ENVS, STEPS, ...]: time last
    values = jnp.concatenate([traj["value"], value(params, carry[1])[:, None]], axis=1)
    adv, returns = advantages.gae(traj["reward"], values, traj["done"], GAMMA, LAM)

    def loss_fn(p):
        logps = distributions.log_prob(policy(p, traj["obs"]), traj["action"])
        pg, m = ppo.clipped_surrogate_loss(logps, traj["logp"], advantages.whiten(adv))
        return pg + 0.5 * jnp.mean((value(p, traj["obs"]) - returns) ** 2), m

    for _ in range(8):  # PPO epochs on the whole batch
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
    length = ENVS * STEPS / jnp.maximum(traj["done"].sum(), 1.0)  # mean episode length = return
    return params, opt_state, carry, length, metrics["policy/clipfrac"]


obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_env, ENVS), env_params)
carry, opt_state, lengths = (state, obs), optimizer.init(params), []
for i, key in enumerate(jax.random.split(k_run, ITERS)):
    params, opt_state, carry, length, clipfrac = iteration(params, opt_state, carry, key)
    lengths.append(float(length))
    if i % 5 == 0 or i == ITERS - 1:
        print(f"iter {i:2d}  mean episode length {lengths[-1]:6.1f}  ", end="")
        print(f"clip fraction {float(clipfrac):.3f}")
print(json.dumps({"length_first": lengths[0], "length_last": max(lengths[-3:])}))
