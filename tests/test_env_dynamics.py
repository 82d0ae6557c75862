"""Pendulum, Acrobot and MountainCarContinuous against independent float64 numpy transcriptions
of gymnasium's equations; the probe environments against their specification; the gymnax
adapter against a fake gymnax module (gymnax itself is not needed)."""

import math
import sys
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax import envs

# --------------------------------------------------------------------------------------------
# Independent references (gymnasium's classic-control step functions, float64 numpy/math).
# --------------------------------------------------------------------------------------------


def gymnasium_pendulum_step(state, u):
    """Pendulum-v1: returns (new_state, obs, reward)."""
    th, thdot = state
    max_speed, max_torque, dt, g, m, l = 8.0, 2.0, 0.05, 10.0, 1.0, 1.0  # noqa: E741
    u = min(max(float(u), -max_torque), max_torque)
    angle = ((th + math.pi) % (2 * math.pi)) - math.pi
    costs = angle**2 + 0.1 * thdot**2 + 0.001 * u**2
    newthdot = thdot + (3 * g / (2 * l) * math.sin(th) + 3.0 / (m * l**2) * u) * dt
    newthdot = min(max(newthdot, -max_speed), max_speed)
    newth = th + newthdot * dt
    obs = np.array([math.cos(newth), math.sin(newth), newthdot])
    return (newth, newthdot), obs, -costs


def _acrobot_dsdt(s, a):
    m1, m2, l1, lc1, lc2, i1, i2, g = 1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 9.8
    theta1, theta2, dtheta1, dtheta2 = s
    d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * math.cos(theta2)) + i1 + i2
    d2 = m2 * (lc2**2 + l1 * lc2 * math.cos(theta2)) + i2
    phi2 = m2 * lc2 * g * math.cos(theta1 + theta2 - math.pi / 2.0)
    phi1 = (
        -m2 * l1 * lc2 * dtheta2**2 * math.sin(theta2)
        - 2 * m2 * l1 * lc2 * dtheta2 * dtheta1 * math.sin(theta2)
        + (m1 * lc1 + m2 * l1) * g * math.cos(theta1 - math.pi / 2)
        + phi2
    )
    # "book" dynamics (gymnasium's default)
    ddtheta2 = (a + d2 / d1 * phi1 - m2 * l1 * lc2 * dtheta1**2 * math.sin(theta2) - phi2) / (
        m2 * lc2**2 + i2 - d2**2 / d1
    )
    ddtheta1 = -(d2 * ddtheta2 + phi1) / d1
    return np.array([dtheta1, dtheta2, ddtheta1, ddtheta2])


def _wrap(x, m, big_m):
    diff = big_m - m
    while x > big_m:
        x = x - diff
    while x < m:
        x = x + diff
    return x


def acrobot_height(s):
    return -math.cos(s[0]) - math.cos(s[1] + s[0])


def gymnasium_acrobot_step(state, action):
    """Acrobot-v1: returns (new_state, obs, reward, terminated)."""
    torque = [-1.0, 0.0, 1.0][int(action)]
    dt = 0.2
    y0 = np.asarray(state, np.float64)
    k1 = _acrobot_dsdt(y0, torque)
    k2 = _acrobot_dsdt(y0 + dt / 2 * k1, torque)
    k3 = _acrobot_dsdt(y0 + dt / 2 * k2, torque)
    k4 = _acrobot_dsdt(y0 + dt * k3, torque)
    ns = y0 + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    ns[0] = _wrap(ns[0], -math.pi, math.pi)
    ns[1] = _wrap(ns[1], -math.pi, math.pi)
    ns[2] = min(max(ns[2], -4 * math.pi), 4 * math.pi)
    ns[3] = min(max(ns[3], -9 * math.pi), 9 * math.pi)
    terminated = acrobot_height(ns) > 1.0
    obs = np.array(
        [math.cos(ns[0]), math.sin(ns[0]), math.cos(ns[1]), math.sin(ns[1]), ns[2], ns[3]]
    )
    return ns, obs, (0.0 if terminated else -1.0), terminated


def gymnasium_mountaincar_step(state, action):
    """MountainCarContinuous-v0: returns (new_state, reward, terminated)."""
    position, velocity = state
    action = float(action)
    force = min(max(action, -1.0), 1.0)
    velocity += force * 0.0015 - 0.0025 * math.cos(3 * position)
    velocity = min(max(velocity, -0.07), 0.07)
    position += velocity
    position = min(max(position, -1.2), 0.6)
    if position == -1.2 and velocity < 0:
        velocity = 0.0
    terminated = position >= 0.45 and velocity >= 0.0
    reward = 100.0 if terminated else 0.0
    reward -= action**2 * 0.1
    return (position, velocity), reward, terminated


def f64(x):
    return np.asarray(x, np.float64)


def reset_many(env, n):
    """``(obs, state)`` of ``n`` resets (jitted, vmapped; keys split from key 0) with the
    default parameters."""
    keys = jax.random.split(jax.random.key(0), n)
    return jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, env.default_params())


def start(env, seed):
    """``(params, state)``: the default parameters and a reset from ``key(seed)``."""
    params = env.default_params()
    _, state = env.reset(jax.random.key(seed), params)
    return params, state


# --------------------------------------------------------------------------------------------
# Pendulum
# --------------------------------------------------------------------------------------------


def test_pendulum_reset_distribution():
    obs, state = reset_many(envs.Pendulum(), 2000)
    theta, theta_dot = f64(state.theta), f64(state.theta_dot)
    assert obs.shape == (2000, 3) and obs.dtype == jnp.float32
    assert np.all(np.abs(theta) <= math.pi) and np.all(np.abs(theta_dot) <= 1.0)
    # Roughly uniform over the whole box, not a sliver of it.
    assert theta.min() < -0.95 * math.pi and theta.max() > 0.95 * math.pi
    assert theta_dot.min() < -0.95 and theta_dot.max() > 0.95
    assert abs(theta.mean()) < 0.15 and abs(theta.std() - math.pi / math.sqrt(3)) < 0.1
    np.testing.assert_allclose(
        obs, np.stack([np.cos(theta), np.sin(theta), theta_dot], 1), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(state.time, 0)


def test_pendulum_matches_gymnasium_equations_over_an_episode():
    env = envs.Pendulum()
    params, state = start(env, 7)
    step = jax.jit(env.step_env)
    free_running = (float(state.theta), float(state.theta_dot))
    rng = np.random.default_rng(1)
    actions = rng.uniform(-4.0, 4.0, size=(200, 1)).astype(np.float32)  # half out of range
    actions[:8, 0] = [3.0, -3.0, 2.0, -2.0, 0.0, -10.0, 1.9, -1.9]
    for t in range(200):
        previous = (float(state.theta), float(state.theta_dot))
        obs, state, reward, terminated, truncated, _ = step(
            jax.random.key(t), state, jnp.asarray(actions[t]), params
        )
        assert obs.dtype == jnp.float32 and obs.shape == (3,)
        assert state.theta.dtype == jnp.float32 and reward.dtype == jnp.float32
        # One-step map from the env's own float32 state: only float32 rounding separates them.
        _, ref_obs, ref_reward = gymnasium_pendulum_step(previous, actions[t, 0])
        np.testing.assert_allclose(obs, ref_obs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(reward, ref_reward, rtol=1e-5, atol=1e-5)
        # A free-running float64 reference stays close over the whole episode.
        free_running, ref_obs, ref_reward = gymnasium_pendulum_step(free_running, actions[t, 0])
        np.testing.assert_allclose(obs, ref_obs, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(reward, ref_reward, rtol=1e-3, atol=1e-3)
        assert not bool(terminated)
        assert bool(truncated) == (t == 199)
        assert int(state.time) == t + 1


def test_pendulum_one_step_map_over_the_state_space_vmapped():
    """Random states (theta unnormalised, speeds near the clip) and out-of-range torques."""
    env = envs.Pendulum()
    params = env.default_params()
    rng = np.random.default_rng(2)
    n = 512
    theta = rng.uniform(-3 * math.pi, 3 * math.pi, n).astype(np.float32)
    theta_dot = rng.uniform(-8.0, 8.0, n).astype(np.float32)
    actions = rng.uniform(-5.0, 5.0, (n, 1)).astype(np.float32)
    time = rng.integers(0, 200, n).astype(np.int32)
    state = envs.PendulumState(jnp.asarray(theta), jnp.asarray(theta_dot), jnp.asarray(time))
    keys = jax.random.split(jax.random.key(0), n)
    obs, new, reward, terminated, truncated, _ = jax.jit(
        jax.vmap(env.step_env, in_axes=(0, 0, 0, None))
    )(keys, state, jnp.asarray(actions), params)
    obs, reward, new_theta = np.asarray(obs), np.asarray(reward), np.asarray(new.theta)
    clipped = 0
    for i in range(n):
        (ref_th, ref_thdot), ref_obs, ref_reward = gymnasium_pendulum_step(
            (float(theta[i]), float(theta_dot[i])), actions[i, 0]
        )
        np.testing.assert_allclose(obs[i], ref_obs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new_theta[i], ref_th, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(reward[i], ref_reward, rtol=1e-5, atol=1e-5)
        clipped += abs(ref_thdot) == 8.0
    assert clipped > 5, "the speed clip should be exercised"
    assert not np.any(terminated)
    np.testing.assert_array_equal(truncated, time + 1 >= 200)
    np.testing.assert_array_equal(new.time, time + 1)
    # Eagerly, one state: same answer as the reference.
    one = jax.tree.map(lambda x: x[0], state)
    obs0, _, reward0, _, _, _ = env.step_env(keys[0], one, jnp.asarray(actions[0]), params)
    _, ref_obs, ref_reward = gymnasium_pendulum_step(
        (float(theta[0]), float(theta_dot[0])), actions[0, 0]
    )
    np.testing.assert_allclose(obs0, ref_obs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reward0, ref_reward, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Acrobot
# --------------------------------------------------------------------------------------------


def acrobot_state(s, time):
    s = np.asarray(s, np.float32)
    return envs.AcrobotState(*(jnp.asarray(s[..., i]) for i in range(4)), jnp.asarray(time))


def acrobot_array(state):
    return np.stack(
        [state.joint_angle1, state.joint_angle2, state.velocity_1, state.velocity_2], -1
    ).astype(np.float64)


def test_acrobot_reset_distribution():
    obs, state = reset_many(envs.Acrobot(), 1000)
    s = acrobot_array(state)
    assert np.all(np.abs(s) <= 0.1) and s.min() < -0.095 and s.max() > 0.095
    assert obs.shape == (1000, 6) and obs.dtype == jnp.float32
    expected = np.stack(
        [np.cos(s[:, 0]), np.sin(s[:, 0]), np.cos(s[:, 1]), np.sin(s[:, 1]), s[:, 2], s[:, 3]], 1
    )
    np.testing.assert_allclose(obs, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(state.time, 0)


def test_acrobot_matches_gymnasium_equations_over_an_episode():
    """Chaotic: compare the one-step map from the env's own state at every step."""
    env = envs.Acrobot()
    params, state = start(env, 5)
    step = jax.jit(env.step_env)
    rng = np.random.default_rng(3)
    terminated = False
    for t in range(500):
        action = int(rng.integers(3))
        previous = acrobot_array(state)
        obs, state, reward, terminated, truncated, _ = step(
            jax.random.key(t), state, action, params
        )
        _, ref_obs, ref_reward, ref_terminated = gymnasium_acrobot_step(previous, action)
        assert obs.dtype == jnp.float32 and obs.shape == (6,)
        np.testing.assert_allclose(obs, ref_obs, rtol=1e-4, atol=1e-4)
        assert -math.pi <= float(state.joint_angle1) <= math.pi
        assert -math.pi <= float(state.joint_angle2) <= math.pi
        assert bool(terminated) == ref_terminated
        assert float(reward) == ref_reward
        assert int(state.time) == t + 1
        assert bool(truncated) == (t == 499 and not ref_terminated)
        if ref_terminated:
            break
    assert int(state.time) > 50, "a random policy should not swing up within 50 steps"


def test_acrobot_one_step_map_over_the_state_space_vmapped():
    """Random states over the whole (wrapped, clipped) state space, every torque."""
    env = envs.Acrobot()
    params = env.default_params()
    rng = np.random.default_rng(4)
    n = 600
    s = np.stack(
        [
            rng.uniform(-math.pi, math.pi, n),
            rng.uniform(-math.pi, math.pi, n),
            rng.uniform(-4 * math.pi, 4 * math.pi, n),
            rng.uniform(-9 * math.pi, 9 * math.pi, n),
        ],
        1,
    ).astype(np.float32)
    actions = np.arange(n) % 3
    time = rng.integers(0, 500, n).astype(np.int32)
    time[:50] = 499
    obs, new, reward, terminated, truncated, _ = jax.jit(
        jax.vmap(env.step_env, in_axes=(0, 0, 0, None))
    )(jax.random.split(jax.random.key(0), n), acrobot_state(s, time), jnp.asarray(actions), params)
    obs, new_s = np.asarray(obs), acrobot_array(new)
    reward, terminated, truncated = map(np.asarray, (reward, terminated, truncated))
    n_terminal = n_clipped = 0
    for i in range(n):
        ref_s, ref_obs, ref_reward, ref_terminated = gymnasium_acrobot_step(s[i], actions[i])
        # Velocities reach 9 pi and the dynamics amplify rounding: a float32 RK4 step differs
        # from the float64 reference by up to ~2.5e-4 relative depending on how XLA orders and
        # fuses the float32 operations (measured: 2.4e-4 without backend optimisation), so the
        # tolerance leaves 4x room for another compiler or CPU.
        np.testing.assert_allclose(obs[i], ref_obs, rtol=1e-3, atol=1e-3)
        if abs(acrobot_height(ref_s) - 1.0) > 1e-3:  # not ambiguous in float32
            assert terminated[i] == ref_terminated, i
            assert reward[i] == ref_reward, i
            assert truncated[i] == (time[i] == 499 and not ref_terminated), i
        n_terminal += ref_terminated
        n_clipped += abs(ref_s[2]) == 4 * math.pi or abs(ref_s[3]) == 9 * math.pi
    assert np.all(np.abs(new_s[:, :2]) <= math.pi)
    assert 50 < n_terminal < n - 50, "both terminal and non-terminal states should be tested"
    assert n_clipped > 10, "the velocity clips should be exercised"
    np.testing.assert_array_equal(new.time, time + 1)
    # Eagerly, one state.
    one = acrobot_state(s[1], np.int32(0))
    obs1, _, reward1, terminated1, _, _ = env.step_env(jax.random.key(0), one, 1, params)
    _, ref_obs, ref_reward, ref_terminated = gymnasium_acrobot_step(s[1], 1)
    np.testing.assert_allclose(obs1, ref_obs, rtol=1e-4, atol=1e-4)
    assert float(reward1) == ref_reward and bool(terminated1) == ref_terminated


@pytest.mark.parametrize("time", [0, 499])
def test_acrobot_terminates_near_the_top(time):
    env = envs.Acrobot()
    params = env.default_params()
    step = jax.jit(env.step_env)
    # Link 1 straight up, link 2 in line with it, at rest: the tip is 2 above the base.
    top = np.array([math.pi - 0.05, 0.0, 0.0, 0.0])
    obs, new, reward, terminated, truncated, _ = step(
        jax.random.key(0), acrobot_state(top, np.int32(time)), 1, params
    )
    assert int(new.time) == time + 1
    ref_s, ref_obs, _, ref_terminated = gymnasium_acrobot_step(top.astype(np.float32), 1)
    assert ref_terminated and acrobot_height(ref_s) > 1.5
    assert bool(terminated) and float(reward) == 0.0
    assert not bool(truncated)  # termination wins over the time limit
    np.testing.assert_allclose(obs, ref_obs, rtol=1e-4, atol=1e-4)
    # Hanging down at rest: not terminal; at the time limit, truncated with reward -1.
    bottom = np.zeros(4)
    _, _, reward, terminated, truncated, _ = step(
        jax.random.key(0), acrobot_state(bottom, np.int32(time)), 1, params
    )
    assert not bool(terminated) and float(reward) == -1.0
    assert bool(truncated) == (time == 499)
    # Starting at rest at tip heights 1.1 / 1.2, the chain falls to about 0.99 / 1.10 in one
    # step: both sides of the threshold, decided after the step.
    for target, expected in [(1.1, False), (1.2, True)]:
        # Link 2 in line with link 1 (theta2 = 0): height = -2 cos(theta1).
        theta1 = math.acos(-target / 2)
        s = np.array([theta1, 0.0, 0.0, 0.0])
        _, ref_obs, _, ref_terminated = gymnasium_acrobot_step(s.astype(np.float32), 1)
        assert ref_terminated == expected
        obs, _, reward, terminated, _, _ = step(
            jax.random.key(0), acrobot_state(s, np.int32(0)), 1, params
        )
        assert bool(terminated) == expected and float(reward) == (0.0 if expected else -1.0)
        np.testing.assert_allclose(obs, ref_obs, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# MountainCarContinuous
# --------------------------------------------------------------------------------------------


def test_mountaincar_reset_distribution():
    obs, state = reset_many(envs.MountainCarContinuous(), 1000)
    position = np.asarray(state.position)
    assert np.all((position >= -0.6) & (position <= -0.4))
    assert position.min() < -0.59 and position.max() > -0.41
    np.testing.assert_array_equal(state.velocity, 0.0)
    np.testing.assert_array_equal(obs, np.stack([position, np.zeros_like(position)], 1))
    assert obs.dtype == jnp.float32


def run_mountaincar(env, params, state, policy, num_steps):
    """Step the env with a policy of the reference state; check every step against the
    reference one-step map (from the env's own state) and a free-running reference."""
    step = jax.jit(env.step_env)
    free_running = (float(state.position), float(state.velocity))
    for t in range(num_steps):
        action = np.float32(policy(t, free_running))
        previous = (float(state.position), float(state.velocity))
        obs, state, reward, terminated, truncated, _ = step(
            jax.random.key(t), state, jnp.asarray([action]), params
        )
        assert obs.dtype == jnp.float32 and reward.dtype == jnp.float32
        ref_state, ref_reward, ref_terminated = gymnasium_mountaincar_step(previous, action)
        np.testing.assert_allclose(obs, ref_state, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(reward, ref_reward, rtol=1e-5, atol=1e-6)
        assert bool(terminated) == ref_terminated
        free_running, ref_reward, ref_terminated = gymnasium_mountaincar_step(free_running, action)
        np.testing.assert_allclose(obs, free_running, rtol=1e-3, atol=1e-4)
        assert int(state.time) == t + 1
        assert bool(truncated) == (t == 998 and not ref_terminated)
        if bool(terminated):
            return t, action, float(reward), state
    return None, None, None, state


def test_mountaincar_matches_gymnasium_equations_random_actions():
    env = envs.MountainCarContinuous()
    params, state = start(env, 2)
    rng = np.random.default_rng(5)
    actions = rng.uniform(-3.0, 3.0, 999)  # mostly out of range: penalty on the raw action
    end, _, _, state = run_mountaincar(env, params, state, lambda t, s: actions[t], 999)
    assert end is None and int(state.time) == 999  # a random policy does not reach the flag


def test_mountaincar_scripted_policy_reaches_the_goal():
    env = envs.MountainCarContinuous()
    params, state = start(env, 3)

    def policy(t, s):  # push (beyond the clip) in the direction of motion
        return 1.5 if s[1] >= 0 else -1.5

    end, action, reward, state = run_mountaincar(env, params, state, policy, 999)
    assert end is not None and end < 300, "pumping energy reaches the flag quickly"
    assert float(state.position) >= 0.45 and float(state.velocity) >= 0.0
    assert action == 1.5  # moving right, pushing right (force clipped to 1)
    np.testing.assert_allclose(reward, 100.0 - 0.1 * 1.5**2, rtol=1e-6)  # unclipped action


def test_mountaincar_left_wall_truncation_and_vmap():
    env = envs.MountainCarContinuous()
    params = env.default_params()
    step = jax.jit(env.step_env)
    # Hitting the left wall: position clipped to -1.2 and velocity zeroed.
    state = envs.MountainCarState(jnp.float32(-1.19), jnp.float32(-0.05), jnp.int32(0))
    obs, new, reward, terminated, truncated, _ = step(jax.random.key(0), state, -1.0, params)
    np.testing.assert_allclose(obs, [-1.2, 0.0], atol=1e-7)
    assert float(new.velocity) == 0.0 and not bool(terminated) and not bool(truncated)
    np.testing.assert_allclose(reward, -0.1, rtol=1e-6)
    # Time limit: 999 steps.
    state = envs.MountainCarState(jnp.float32(-0.5), jnp.float32(0.0), jnp.int32(998))
    _, new, _, terminated, truncated, _ = step(jax.random.key(0), state, 0.0, params)
    assert bool(truncated) and not bool(terminated) and int(new.time) == 999
    # Termination wins over the time limit.
    state = envs.MountainCarState(jnp.float32(0.44), jnp.float32(0.05), jnp.int32(998))
    _, _, reward, terminated, truncated, _ = step(jax.random.key(0), state, 0.5, params)
    assert bool(terminated) and not bool(truncated)
    np.testing.assert_allclose(reward, 100.0 - 0.1 * 0.25, rtol=1e-6)
    # vmapped over random states (right wall, speed clip, goal all reachable), and eagerly.
    rng = np.random.default_rng(6)
    n = 512
    position = rng.uniform(-1.2, 0.6, n).astype(np.float32)
    velocity = rng.uniform(-0.07, 0.07, n).astype(np.float32)
    actions = rng.uniform(-2.0, 2.0, (n, 1)).astype(np.float32)
    batch = envs.MountainCarState(
        jnp.asarray(position), jnp.asarray(velocity), jnp.zeros(n, jnp.int32)
    )
    obs, _, reward, terminated, _, _ = jax.jit(jax.vmap(env.step_env, in_axes=(0, 0, 0, None)))(
        jax.random.split(jax.random.key(0), n), batch, jnp.asarray(actions), params
    )
    obs, reward, terminated = np.asarray(obs), np.asarray(reward), np.asarray(terminated)
    n_terminal = 0
    for i in range(n):
        ref_state, ref_reward, ref_terminated = gymnasium_mountaincar_step(
            (float(position[i]), float(velocity[i])), actions[i, 0]
        )
        np.testing.assert_allclose(obs[i], ref_state, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(reward[i], ref_reward, rtol=1e-5, atol=1e-6)
        assert terminated[i] == ref_terminated
        n_terminal += ref_terminated
    assert n_terminal > 10
    one = jax.tree.map(lambda x: x[0], batch)
    obs0, _, reward0, _, _, _ = env.step_env(
        jax.random.key(0), one, jnp.asarray(actions[0]), params
    )
    ref_state, ref_reward, _ = gymnasium_mountaincar_step(
        (float(position[0]), float(velocity[0])), actions[0, 0]
    )
    np.testing.assert_allclose(obs0, ref_state, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reward0, ref_reward, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["Pendulum-v1", "MountainCarContinuous-v0"])
def test_continuous_state_stays_float32_for_float64_actions(name):
    env, params = envs.make(name)
    _, state = env.reset(jax.random.key(0), params)
    _, new, reward, _, _, _ = jax.jit(env.step_env)(
        jax.random.key(0), state, jnp.array([0.5], jnp.float64), params
    )
    assert reward.dtype == jnp.float32
    assert [x.dtype for x in new] == [x.dtype for x in state]


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


def test_make_rejects_unknown_names():
    with pytest.raises(ValueError) as info:
        envs.make("NoSuchEnv-v0")
    message = str(info.value)
    assert "NoSuchEnv-v0" in message
    for name in ["CartPole-v1", "Pendulum-v1", "Acrobot-v1", "MountainCarContinuous-v0"]:
        assert name in message
    for kind in envs.Probe.KINDS:
        assert f"probe-{kind}" in message
    assert "gymnax:<id>" in message
    with pytest.raises(ValueError, match="valid choices") as info:
        envs.make("probe-nonsense")
    assert "'nonsense'" in str(info.value) and "observation_action" in str(info.value)


@pytest.mark.parametrize(
    "name, cls",
    [
        ("CartPole-v1", envs.CartPole),
        ("Pendulum-v1", envs.Pendulum),
        ("Acrobot-v1", envs.Acrobot),
        ("MountainCarContinuous-v0", envs.MountainCarContinuous),
    ],
)
def test_make_builtin(name, cls):
    env, params = envs.make(name)
    assert isinstance(env, cls) and env.name == name
    obs, _ = env.reset(jax.random.key(0), params)
    assert obs.shape == (env.observation_size,)


def expected_probe_reward(kind, obs, action, time):
    if kind == "constant":
        return 1.0
    if kind == "observation":
        return obs
    if kind == "discount":
        return 1.0 if time == 2 else 0.0
    if kind == "action":
        return 1.0 if action == 1 else 0.0
    return 1.0 if action == (1 if obs > 0 else 0) else 0.0  # observation_action


@pytest.mark.parametrize("kind", envs.Probe.KINDS)
def test_probe_semantics(kind):
    env, params = envs.make(f"probe-{kind}")
    assert env.name == f"probe-{kind}" and env.observation_size == 1 and env.num_actions == 2
    horizon = 2 if kind == "discount" else 1
    reset = jax.jit(env.reset)
    step = jax.jit(env.step_env)
    observations = set()
    for seed in range(16):
        obs, state = reset(jax.random.key(seed), params)
        assert obs.shape == (1,) and obs.dtype == jnp.float32
        first = float(obs[0])
        observations.add(first)
        for action in (0, 1):
            o, s = obs, state
            for t in range(1, horizon + 1):
                previous = float(o[0])
                o, s, reward, terminated, truncated, _ = step(jax.random.key(t), s, action, params)
                assert o.shape == (1,) and o.dtype == jnp.float32
                assert reward.dtype == jnp.float32
                assert float(reward) == expected_probe_reward(kind, previous, action, t)
                assert bool(terminated) == (t == horizon)
                assert not bool(truncated)
                # The observation is the step index for "discount", otherwise unchanged.
                assert float(o[0]) == (t if kind == "discount" else first)
    if kind in ("observation", "observation_action"):
        assert observations == {-1.0, 1.0}
    else:
        assert observations == {0.0}
    # Eager and vmapped agree with the specification too.
    obs, state = env.reset(jax.random.key(0), params)
    _, _, reward, terminated, _, _ = env.step_env(jax.random.key(0), state, jnp.int32(1), params)
    assert float(reward) == expected_probe_reward(kind, float(obs[0]), 1, 1)
    assert bool(terminated) == (horizon == 1)
    keys = jax.random.split(jax.random.key(1), 64)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    actions = jnp.arange(64) % 2
    _, _, reward, terminated, _, _ = jax.jit(jax.vmap(env.step_env, in_axes=(0, 0, 0, None)))(
        keys, state, actions, params
    )
    expected = [
        expected_probe_reward(kind, float(o), int(a), 1)
        for o, a in zip(np.asarray(obs[:, 0]), np.asarray(actions), strict=True)
    ]
    np.testing.assert_array_equal(reward, expected)
    np.testing.assert_array_equal(terminated, horizon == 1)


def test_probe_action_accepts_a_python_int_eagerly():
    env, params = envs.make("probe-action")
    _, state = env.reset(jax.random.key(0), params)
    _, _, reward, _, _, _ = env.step_env(jax.random.key(0), state, 1, params)
    assert float(reward) == 1.0


# --------------------------------------------------------------------------------------------
# gymnax adapter, against a fake gymnax module
# --------------------------------------------------------------------------------------------


class FakeParams(NamedTuple):
    max_steps_in_episode: int = 5
    goal: int = 3


class FakeState(NamedTuple):
    x: jax.Array
    time: jax.Array


class FakeDiscrete:
    def __init__(self, n):
        self.n = n
        self.shape = ()


class FakeBox:
    def __init__(self, shape):
        self.shape = shape


class FakeGymnaxEnv:
    """x += action (discrete: action - 1; continuous: sum of the action); terminal at x >= goal.

    Observations are a (2, 2) integer array so the adapter must flatten and cast them."""

    def __init__(self, new_api: bool, continuous: bool):
        self.new_api, self.continuous = new_api, continuous
        self.received_shapes = []

    def action_space(self, params):
        return FakeBox((2, 1)) if self.continuous else FakeDiscrete(3)

    def observation_space(self, params):
        return FakeBox((2, 2))

    def _obs(self, state):
        return jnp.stack([jnp.stack([state.x, state.time]), jnp.stack([-state.x, 7])]).astype(
            jnp.int32
        )

    def reset(self, key, params):
        state = FakeState(jnp.int32(0), jnp.int32(0))
        return self._obs(state), state

    def step_env(self, key, state, action, params):
        self.received_shapes.append(tuple(jnp.shape(action)))
        delta = jnp.sum(action) if self.continuous else action - 1
        new = FakeState((state.x + delta).astype(jnp.int32), state.time + 1)
        reward = new.x  # an integer: the adapter casts it
        at_goal = new.x >= params.goal
        out_of_time = new.time >= params.max_steps_in_episode
        if self.new_api:
            return self._obs(new), new, reward, at_goal, out_of_time & ~at_goal, {"x": new.x}
        return self._obs(new), new, reward, at_goal | out_of_time, {"x": new.x}


@pytest.fixture
def fake_gymnax(monkeypatch):
    made = {}

    def make(env_id):
        new_api, continuous = {
            "Old-v0": (False, False),
            "New-v0": (True, False),
            "OldBox-v0": (False, True),
            "NewBox-v0": (True, True),
        }[env_id]
        made[env_id] = FakeGymnaxEnv(new_api, continuous)
        return made[env_id], FakeParams()

    module = types.ModuleType("gymnax")
    module.make = make
    monkeypatch.setitem(sys.modules, "gymnax", module)
    return made


def run_fake(env, params, actions, use_jit):
    step = jax.jit(env.step_env) if use_jit else env.step_env
    obs, state = env.reset(jax.random.key(0), params)
    assert obs.shape == (4,) and obs.dtype == jnp.float32
    out = []
    for t, action in enumerate(actions):
        obs, state, reward, terminated, truncated, info = step(
            jax.random.key(t), state, action, params
        )
        assert obs.shape == (4,) and obs.dtype == jnp.float32
        assert reward.dtype == jnp.float32
        assert terminated.dtype == jnp.bool_ and truncated.dtype == jnp.bool_
        assert int(info["x"]) == int(state.x)
        x, time = int(state.x), t + 1
        np.testing.assert_array_equal(obs, [x, time, -x, 7])
        assert float(reward) == x
        out.append((bool(terminated), bool(truncated)))
    return out


@pytest.mark.parametrize("version", ["Old", "New"])
@pytest.mark.parametrize("use_jit", [False, True])
def test_gymnax_adapter_discrete(fake_gymnax, version, use_jit):
    env, params = envs.make(f"gymnax:{version}-v0")
    assert isinstance(env, envs.GymnaxEnv) and env.name == f"{version}-v0"
    assert not env.continuous and env.num_actions == 3 and env.observation_size == 4
    assert params == FakeParams()
    # +1 every step: x reaches the goal (3) at step 3, before the time limit (5): terminated.
    ends = run_fake(env, params, [2, 2, 2], use_jit)
    assert ends == [(False, False), (False, False), (True, False)]
    # Standing still: the time limit at step 5 is a truncation.
    ends = run_fake(env, params, [1, 1, 1, 1, 1], use_jit)
    assert ends == [(False, False)] * 4 + [(False, True)]
    # Reaching the goal exactly at the time limit.
    ends = run_fake(env, params, [1, 1, 2, 2, 2], use_jit)
    if version == "New":
        assert ends[-1] == (True, False)  # 1.0.x reports the split itself
    else:
        assert ends[-1] == (False, True)  # 0.0.x: done at the time limit counts as truncated


@pytest.mark.parametrize("version", ["Old", "New"])
def test_gymnax_adapter_continuous(fake_gymnax, version):
    env, params = envs.make(f"gymnax:{version}Box-v0")
    assert env.continuous and env.action_size == 2 and env.observation_size == 4
    fake = fake_gymnax[f"{version}Box-v0"]
    # Flat actions of size 2 are reshaped to the space's (2, 1).
    ends = run_fake(env, params, [jnp.array([0.5, 0.5])] * 3, use_jit=True)
    assert ends == [(False, False), (False, False), (True, False)]
    assert fake.received_shapes and set(fake.received_shapes) == {(2, 1)}
    ends = run_fake(env, params, [jnp.array([1.0, -1.0])] * 5, use_jit=False)
    assert ends == [(False, False)] * 4 + [(False, True)]


def test_gymnax_adapter_vmaps(fake_gymnax):
    env, params = envs.make("gymnax:Old-v0")
    keys = jax.random.split(jax.random.key(0), 4)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    # Before the step: x = 2, 0, 0, 2 at times 0, 3, 4, 4 (the limit is 5).
    state = state._replace(
        x=jnp.array([2, 0, 0, 2], jnp.int32), time=jnp.array([0, 3, 4, 4], jnp.int32)
    )
    actions = jnp.array([2, 1, 1, 2])
    obs, new, reward, terminated, truncated, _ = jax.jit(
        jax.vmap(env.step_env, in_axes=(0, 0, 0, None))
    )(keys, state, actions, params)
    assert obs.shape == (4, 4) and obs.dtype == jnp.float32
    np.testing.assert_array_equal(new.x, [3, 0, 0, 3])
    np.testing.assert_array_equal(new.time, [1, 4, 5, 5])
    np.testing.assert_array_equal(reward, [3, 0, 0, 3])
    np.testing.assert_array_equal(terminated, [True, False, False, False])
    np.testing.assert_array_equal(truncated, [False, False, True, True])


def test_gymnax_adapter_needs_gymnax(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnax", None)  # makes `import gymnax` fail
    with pytest.raises(ImportError, match=r"rljax\[envs\]"):
        envs.GymnaxEnv("x")
    with pytest.raises(ImportError, match="gymnax:CartPole-v1"):
        envs.make("gymnax:CartPole-v1")
