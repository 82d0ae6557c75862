"""Functional classic-control environments and jit-compiled rollouts.

Environments follow gymnax's functional interface (1.0.x, terminated and truncated split)::

    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

so gymnax environments plug in unchanged, but rljax does not need gymnax: :class:`CartPole`
is written here from the published dynamics (Barto, Sutton & Anderson, 1983, with the
constants of gymnasium's ``CartPole-v1``).

:func:`collect` runs a policy for a fixed number of steps in a batch of environments
(``lax.scan`` over time, ``vmap`` over environments) with automatic resets, and records what
GAE needs to bootstrap correctly: terminations stop bootstrapping, time-limit truncations
bootstrap from the value of the state that was cut off (:func:`bootstrapped_rewards`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from rljax.distributions import is_gaussian, log_prob

__all__ = [
    "CartPole",
    "CartPoleParams",
    "CartPoleState",
    "RolloutCarry",
    "bootstrapped_rewards",
    "collect",
    "init_carry",
    "sample_action",
]


@struct.dataclass
class CartPoleParams:
    """Constants of gymnasium's CartPole-v1 (a pytree, so it can be traced, vmapped, swept)."""

    gravity: float = 9.8
    masscart: float = 1.0
    masspole: float = 0.1
    length: float = 0.5  # half the pole's length
    force_mag: float = 10.0
    tau: float = 0.02  # seconds between state updates (Euler integration)
    theta_threshold: float = 12 * 2 * math.pi / 360
    x_threshold: float = 2.4
    max_steps: int = 500


class CartPoleState(NamedTuple):
    x: jax.Array
    x_dot: jax.Array
    theta: jax.Array
    theta_dot: jax.Array
    time: jax.Array


class CartPole:
    """CartPole-v1: push a cart left or right to keep a pole upright; reward 1 per step.

    Observation ``[x, x_dot, theta, theta_dot]``; actions 0 (push left) and 1 (push right).
    Terminates when ``|theta| > 12 degrees`` or ``|x| > 2.4``; truncated after 500 steps.
    """

    name = "CartPole-v1"
    observation_size = 4
    num_actions = 2
    continuous = False

    def default_params(self) -> CartPoleParams:
        return CartPoleParams()

    def reset(self, key: jax.Array, params: CartPoleParams):
        x, x_dot, theta, theta_dot = jax.random.uniform(key, (4,), minval=-0.05, maxval=0.05)
        state = CartPoleState(x, x_dot, theta, theta_dot, jnp.int32(0))
        return self._obs(state), state

    def step(self, key: jax.Array, state: CartPoleState, action: jax.Array, params: CartPoleParams):
        del key  # deterministic dynamics
        p = params
        total_mass = p.masspole + p.masscart
        polemass_length = p.masspole * p.length
        force = jnp.where(action == 1, p.force_mag, -p.force_mag)
        cos, sin = jnp.cos(state.theta), jnp.sin(state.theta)
        temp = (force + polemass_length * state.theta_dot**2 * sin) / total_mass
        theta_acc = (p.gravity * sin - cos * temp) / (
            p.length * (4.0 / 3.0 - p.masspole * cos**2 / total_mass)
        )
        x_acc = temp - polemass_length * theta_acc * cos / total_mass
        new = CartPoleState(
            x=state.x + p.tau * state.x_dot,
            x_dot=state.x_dot + p.tau * x_acc,
            theta=state.theta + p.tau * state.theta_dot,
            theta_dot=state.theta_dot + p.tau * theta_acc,
            time=state.time + 1,
        )
        terminated = (jnp.abs(new.x) > p.x_threshold) | (jnp.abs(new.theta) > p.theta_threshold)
        truncated = (new.time >= p.max_steps) & ~terminated
        reward = jnp.float32(1.0)
        return self._obs(new), new, reward, terminated, truncated, {}

    @staticmethod
    def _obs(state: CartPoleState) -> jax.Array:
        return jnp.stack([state.x, state.x_dot, state.theta, state.theta_dot]).astype(jnp.float32)


def sample_action(key: jax.Array, outputs) -> jax.Array:
    """Sample from policy outputs (categorical logits or ``(mean, log_std)``)."""
    if is_gaussian(outputs):
        mean, log_std = outputs
        return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)
    return jax.random.categorical(key, outputs, axis=-1)


class RolloutCarry(NamedTuple):
    """What carries over between calls of :func:`collect` (per environment)."""

    obs: jax.Array
    env_state: Any
    episode_return: jax.Array
    episode_length: jax.Array


def init_carry(env, env_params, key: jax.Array, num_envs: int) -> RolloutCarry:
    """Reset ``num_envs`` environments."""
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, num_envs), env_params)
    zeros = jnp.zeros((num_envs,), jnp.float32)
    return RolloutCarry(obs, state, zeros, jnp.zeros((num_envs,), jnp.int32))


def collect(
    env,
    env_params,
    policy_fn: Callable,
    policy_params,
    carry: RolloutCarry,
    key: jax.Array,
    num_steps: int,
) -> tuple[RolloutCarry, dict[str, jax.Array]]:
    """Run the policy for ``num_steps`` in every environment of ``carry``; jit-able.

    Returns the new carry and a trajectory dict of ``[num_envs, num_steps, ...]`` arrays:
    ``obs``, ``actions``, ``logps`` (behaviour log-probs), ``rewards``, ``terminated``,
    ``truncated``, ``next_obs`` (the observation after the step, *before* any automatic
    reset: the state a truncation cut off), ``episode_return`` and ``episode_length`` (of the
    episode that ended at this step; valid where ``terminated | truncated``).
    """
    num_envs = carry.obs.shape[0]
    v_step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
    v_reset = jax.vmap(env.reset, in_axes=(0, None))

    def step(carry: RolloutCarry, step_key):
        k_act, k_step, k_reset = jax.random.split(step_key, 3)
        outputs = policy_fn(policy_params, carry.obs)
        action = sample_action(k_act, outputs)
        logp = log_prob(outputs, action)
        next_obs, next_state, reward, terminated, truncated, _ = v_step(
            jax.random.split(k_step, num_envs), carry.env_state, action, env_params
        )
        done = terminated | truncated
        reset_obs, reset_state = v_reset(jax.random.split(k_reset, num_envs), env_params)

        def pick(reset_value, value):
            shape = (num_envs,) + (1,) * (value.ndim - 1)
            return jnp.where(done.reshape(shape), reset_value, value)

        episode_return = carry.episode_return + reward
        episode_length = carry.episode_length + 1
        new_carry = RolloutCarry(
            obs=pick(reset_obs, next_obs),
            env_state=jax.tree.map(pick, reset_state, next_state),
            episode_return=jnp.where(done, 0.0, episode_return),
            episode_length=jnp.where(done, 0, episode_length),
        )
        record = {
            "obs": carry.obs,
            "actions": action,
            "logps": logp,
            "rewards": reward,
            "terminated": terminated,
            "truncated": truncated,
            "next_obs": next_obs,
            "episode_return": episode_return,
            "episode_length": episode_length,
        }
        return new_carry, record

    carry, traj = jax.lax.scan(step, carry, jax.random.split(key, num_steps))
    return carry, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), traj)


def bootstrapped_rewards(
    traj: dict[str, jax.Array], value_fn: Callable, value_params, gamma: float | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Rewards and episode ends for :func:`rljax.advantages.gae` from a :func:`collect` trajectory.

    A truncated step gets :math:`r_t + \\gamma V(s_{t+1})` with :math:`s_{t+1}` the state the
    time limit cut off, and every episode end (terminated or truncated) gets ``done = 1``, so
    nothing is bootstrapped across a reset and nothing is bootstrapped from a terminal state.

    Returns:
      ``(rewards, dones)``, both ``[num_envs, num_steps]`` float32.
    """
    truncated = traj["truncated"].astype(jnp.float32)
    next_values = value_fn(value_params, traj["next_obs"])
    rewards = traj["rewards"] + gamma * truncated * jax.lax.stop_gradient(next_values)
    dones = (traj["terminated"] | traj["truncated"]).astype(jnp.float32)
    return rewards, dones
