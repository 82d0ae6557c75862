"""CartPole dynamics against an independent numpy transcription of gymnasium's equations, and
the rollout/bootstrap logic on a hand-made environment with known returns."""

import functools
import inspect
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax import advantages, envs


def gymnasium_cartpole_step(state, action):
    """CartPole-v1 (gymnasium, euler integrator), written out in float64 numpy."""
    x, x_dot, theta, theta_dot = state
    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    total_mass = masspole + masscart
    polemass_length = masspole * length
    force = force_mag if action == 1 else -force_mag
    costheta, sintheta = math.cos(theta), math.sin(theta)
    temp = (force + polemass_length * theta_dot**2 * sintheta) / total_mass
    thetaacc = (gravity * sintheta - costheta * temp) / (
        length * (4.0 / 3.0 - masspole * costheta**2 / total_mass)
    )
    xacc = temp - polemass_length * thetaacc * costheta / total_mass
    x, x_dot = x + tau * x_dot, x_dot + tau * xacc
    theta, theta_dot = theta + tau * theta_dot, theta_dot + tau * thetaacc
    terminated = (
        x < -2.4 or x > 2.4 or theta < -12 * 2 * math.pi / 360 or theta > 12 * 2 * math.pi / 360
    )
    return np.array([x, x_dot, theta, theta_dot]), terminated


def test_cartpole_matches_gymnasium_equations():
    env = envs.CartPole()
    params = env.default_params()
    obs, state = env.reset(jax.random.key(3), params)
    assert np.all(np.abs(np.asarray(obs)) <= 0.05)
    reference = np.asarray(obs, np.float64)
    step = jax.jit(env.step_env)  # the transition itself, without the automatic reset
    rng = np.random.default_rng(0)
    for t in range(200):
        action = int(rng.integers(2))
        obs, state, reward, terminated, truncated, _ = step(
            jax.random.key(t), state, action, params
        )
        reference, ref_terminated = gymnasium_cartpole_step(reference, action)
        np.testing.assert_allclose(np.asarray(obs), reference, rtol=1e-4, atol=1e-5)
        assert bool(terminated) == ref_terminated
        assert float(reward) == 1.0
        assert not bool(truncated)
        if ref_terminated:
            break
    assert ref_terminated, "a random policy should drop the pole within 200 steps"


def test_cartpole_truncates_at_500_steps():
    env = envs.CartPole()
    params = env.default_params()
    _, state = env.reset(jax.random.key(0), params)
    state = state._replace(
        time=jnp.int32(499),
        x=jnp.float32(0),
        theta=jnp.float32(0),
        x_dot=jnp.float32(0),
        theta_dot=jnp.float32(0),
    )
    _, new_state, _, terminated, truncated, _ = env.step_env(jax.random.key(1), state, 1, params)
    assert bool(truncated) and not bool(terminated)
    assert int(new_state.time) == 500
    # step resets: a new episode starts at time 0, and the cut-off observation is in info
    obs, new_state, _, terminated, truncated, info = env.step(jax.random.key(1), state, 1, params)
    assert bool(truncated) and not bool(terminated)
    assert int(new_state.time) == 0 and np.all(np.abs(np.asarray(obs)) <= 0.05)
    np.testing.assert_allclose(info["final_obs"], [0.0, 0.19512194, 0.0, -0.29268292], rtol=1e-6)


class CounterState(NamedTuple):
    time: jax.Array


class CountdownEnv:
    """Hand-made env: reward = the step index (1, 2, 3, ...); the observation is the time.

    Terminates after ``terminate_at`` steps when ``terminate`` is true, else truncates there.
    """

    observation_size = 1
    num_actions = 2

    def __init__(self, horizon: int, terminate: bool):
        self.horizon, self.terminate = horizon, terminate

    def reset(self, key, params):
        state = CounterState(jnp.int32(0))
        return jnp.zeros((1,), jnp.float32), state

    def step(self, key, state, action, params):
        time = state.time + 1
        end = time >= self.horizon
        obs = time.astype(jnp.float32)[None]
        reward = time.astype(jnp.float32)
        terminated = end & self.terminate
        truncated = end & (not self.terminate)
        return obs, CounterState(time), reward, terminated, truncated, {}


def uniform_policy(params, obs):
    return jnp.zeros((*obs.shape[:-1], 2))


def value_of_obs(params, obs):
    """A known value function: V(s) = 100 + s (distinguishable from anything else)."""
    return 100.0 + obs[..., 0]


@pytest.mark.parametrize("terminate", [True, False])
def test_collect_resets_and_bootstraps_correctly(terminate):
    env = CountdownEnv(horizon=3, terminate=terminate)
    carry = envs.init_carry(env, None, jax.random.key(0), num_envs=2)
    collect = jax.jit(lambda c, k: envs.collect(env, None, uniform_policy, None, c, k, 7))
    carry, traj = collect(carry, jax.random.key(1))
    # Episodes: steps 1, 2, 3 | 1, 2, 3 | 1 ; observations before each step: 0, 1, 2 | 0, 1, 2 | 0.
    np.testing.assert_array_equal(traj["rewards"][0], [1, 2, 3, 1, 2, 3, 1])
    np.testing.assert_array_equal(traj["obs"][0, :, 0], [0, 1, 2, 0, 1, 2, 0])
    ends = np.array([0, 0, 1, 0, 0, 1, 0], bool)
    np.testing.assert_array_equal(traj["terminated"][0], ends & terminate)
    np.testing.assert_array_equal(traj["truncated"][0], ends & (not terminate))
    # next_obs is the state the step reached, before the automatic reset.
    np.testing.assert_array_equal(traj["next_obs"][0, :, 0], [1, 2, 3, 1, 2, 3, 1])
    np.testing.assert_array_equal(traj["episode_return"][0][ends], [6, 6])
    np.testing.assert_array_equal(traj["episode_length"][0][ends], [3, 3])
    np.testing.assert_allclose(traj["logps"], np.log(0.5), rtol=1e-6)
    assert float(carry.obs[0, 0]) == 1.0  # mid-episode after the 7th step

    gamma = 0.5
    rewards, dones = envs.bootstrapped_rewards(traj, value_of_obs, None, gamma)
    expected_rewards = np.array([1, 2, 3, 1, 2, 3, 1], float)
    if not terminate:  # truncation: bootstrap from V(cut-off state) = 100 + 3
        expected_rewards[ends] += gamma * 103.0
    np.testing.assert_allclose(rewards[0], expected_rewards)
    np.testing.assert_array_equal(dones[0], ends.astype(float))

    # Returns with lam = 1 are discounted sums within each episode, plus the bootstrap.
    values = value_of_obs(None, jnp.concatenate([traj["obs"], carry.obs[:, None]], axis=1))
    _, returns = advantages.gae(rewards, values, dones, gamma, 1.0)
    tail = 0.0 if terminate else 103.0
    first_episode = [
        1 + gamma * 2 + gamma**2 * (3 + gamma * tail),
        2 + gamma * (3 + gamma * tail),
        3 + gamma * tail,
    ]
    np.testing.assert_allclose(returns[0, :3], first_episode, rtol=1e-6)
    # The last step bootstraps from V(carry.obs) = 101: the episode is still running.
    np.testing.assert_allclose(returns[0, 6], 1 + gamma * 101.0, rtol=1e-6)


def test_sample_action_families():
    key = jax.random.key(0)
    logits = jnp.log(jnp.array([[0.9, 0.1]]))
    samples = jax.vmap(lambda k: envs.sample_action(k, logits))(jax.random.split(key, 4000))
    assert abs(float(jnp.mean(samples)) - 0.1) < 0.02
    mean, log_std = jnp.array([[1.0, -2.0]]), jnp.log(jnp.array([0.5, 2.0]))
    samples = jax.vmap(lambda k: envs.sample_action(k, (mean, log_std)))(
        jax.random.split(key, 4000)
    )
    np.testing.assert_allclose(jnp.mean(samples, axis=(0, 1)), [1.0, -2.0], atol=0.1)
    np.testing.assert_allclose(jnp.std(samples, axis=(0, 1)), [0.5, 2.0], rtol=0.05)


# ------------------------------------------------------------------------------------------
# env.step resets automatically, as gymnax's Environment.step does
# ------------------------------------------------------------------------------------------


def gymnax_step(env, key, state, action, params):
    """gymnax's auto-reset (``gymnax/environments/environment.py``, ``Environment.step``),
    written out: split the key, step with the first half, reset with the second, and keep the
    reset observation and state where the episode ended."""
    key, key_reset = jax.random.split(key)
    obs, new_state, reward, terminated, truncated, _ = env.step_env(key, state, action, params)
    reset_obs, reset_state = env.reset(key_reset, params)
    done = bool(terminated) or bool(truncated)
    return (reset_obs if done else obs), (reset_state if done else new_state), reward, obs, done


def near_the_end(params, state):
    """A state whose next step ends the episode (the time limit, or a probe's last step)."""
    return state._replace(time=jnp.int32(envs.time_limit(params) - 1))


BUILT_IN = [*envs.ENVIRONMENTS, *(f"probe-{kind}" for kind in envs.Probe.KINDS)]


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("name", BUILT_IN)
def test_step_auto_resets_like_gymnax(name, use_jit):
    env, params = envs.make(name)
    step = jax.jit(env.step) if use_jit else env.step
    _, state = env.reset(jax.random.key(0), params)
    action = jnp.zeros((env.action_size,)) if env.continuous else jnp.int32(1)
    one_step = name.startswith("probe-") and envs.time_limit(params) == 1
    cases = [(state, one_step), (near_the_end(params, state), True)]
    for i, (start, ends) in enumerate(cases):
        key = jax.random.key(10 + i)
        obs, new_state, reward, terminated, truncated, info = step(key, start, action, params)
        want_obs, want_state, want_reward, final_obs, done = gymnax_step(
            env, key, start, action, params
        )
        assert done == ends and bool(terminated | truncated) == ends
        # float32 dynamics (Acrobot's RK4): jit may fuse and round differently from the eager
        # reference, by ~1e-8 absolute; a reset-vs-step mix-up differs by far more
        close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
        close(obs, want_obs)
        close(info["final_obs"], final_obs)
        close(reward, want_reward)
        for got, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(want_state), strict=True):
            close(got, want)
            assert got.dtype == want.dtype
        if ends:
            assert int(new_state.time) == 0
            reset_obs, _ = env.reset(jax.random.split(key)[1], params)
            np.testing.assert_array_equal(obs, reset_obs)


def test_every_environment_documents_reset_and_step():
    for name in BUILT_IN:
        env, _ = envs.make(name)
        for method in ("reset", "step", "step_env"):
            doc = inspect.getdoc(getattr(env, method)) or ""
            assert len(doc) > 80, (name, method)
    assert "automatic reset" in inspect.getdoc(envs.Environment.step)
    assert "final_obs" in inspect.getdoc(envs.Environment.step)


def test_raw_step_of_an_environment_without_step_env_is_its_step():
    env = CountdownEnv(horizon=3, terminate=True)
    assert envs.raw_step(env) == env.step
    cartpole = envs.CartPole()
    assert envs.raw_step(cartpole) == cartpole.step_env


def test_collect_with_built_in_env_records_the_state_before_the_reset():
    """collect steps with step_env and resets itself: next_obs is the cut-off state."""
    env, params = envs.make("probe-discount")
    carry = envs.init_carry(env, params, jax.random.key(0), num_envs=2)
    _, traj = envs.collect(env, params, uniform_policy, None, carry, jax.random.key(1), 4)
    np.testing.assert_array_equal(traj["obs"][0, :, 0], [0, 1, 0, 1])
    np.testing.assert_array_equal(traj["next_obs"][0, :, 0], [1, 2, 1, 2])
    np.testing.assert_array_equal(traj["terminated"][0], [False, True, False, True])
