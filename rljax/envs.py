"""Functional classic-control environments and jit-compiled rollouts.

Environments follow gymnax's functional interface (1.0.x, terminated and truncated split)::

    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

``step`` resets automatically as gymnax's does: when the episode ends (``terminated |
truncated``) it returns the first observation and state of a new episode, and the observation
the step reached, before the reset, as ``info["final_obs"]`` (what a time-limit truncation
bootstraps from). ``step_env`` is the same transition without the reset (gymnax's name). So
gymnax environments plug in unchanged, but rljax does not need gymnax: :class:`CartPole` is
written here from the published dynamics (Barto, Sutton & Anderson, 1983, with the constants
of gymnasium's ``CartPole-v1``).

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
    "ENVIRONMENTS",
    "Acrobot",
    "CartPole",
    "CartPoleParams",
    "CartPoleState",
    "Environment",
    "GymnaxEnv",
    "MountainCarContinuous",
    "Pendulum",
    "Probe",
    "RolloutCarry",
    "bootstrapped_rewards",
    "collect",
    "init_carry",
    "make",
    "raw_step",
    "sample_action",
    "time_limit",
]


class Environment:
    """gymnax's functional environment interface; every environment here derives from it.

    Subclasses define ``default_params``, :meth:`reset` and :meth:`step_env` (the transition
    without reset); :meth:`step` adds the automatic reset. All are pure functions of their
    arguments (the environment object holds only static settings), so they ``jit`` and
    ``vmap`` (``jax.vmap(env.step, in_axes=(0, 0, 0, None))`` steps a batch of environments).
    Class attributes: ``name``, ``observation_size``, ``continuous``, and ``num_actions``
    (discrete) or ``action_size`` (continuous).
    """

    def default_params(self):
        """The environment's constants (a pytree: it can be traced, vmapped, swept)."""
        raise NotImplementedError(f"{type(self).__name__} must define default_params()")

    def reset(self, key: jax.Array, params) -> tuple[jax.Array, Any]:
        """Start an episode: ``(obs, state)``.

        Args:
          key: the randomness of the initial state.
          params: the environment's constants (``default_params()`` or a variant).

        Returns:
          ``obs`` (float32 ``[observation_size]``) and the environment state (a pytree whose
          ``time`` counts the steps taken in the episode).
        """
        raise NotImplementedError(f"{type(self).__name__} must define reset()")

    def step_env(self, key: jax.Array, state, action: jax.Array, params):
        """One transition *without* automatic reset (gymnax's ``step_env``).

        Returns ``(obs, state, reward, terminated, truncated, info)`` of the state reached,
        also when the episode ends there: stepping on from a finished episode is undefined.
        ``terminated``: the task ended (no bootstrapping from ``obs``); ``truncated``: the time
        limit cut the episode (``params`` ``max_steps``; bootstrap from ``obs``); never both.
        """
        raise NotImplementedError(f"{type(self).__name__} must define step_env()")

    def step(self, key: jax.Array, state, action: jax.Array, params):
        """One transition with automatic reset, as gymnax's ``Environment.step``.

        ``key`` is split in two as gymnax does: the first half drives :meth:`step_env`, the
        second :meth:`reset`. When the episode ends (``terminated | truncated``) the returned
        ``obs`` and ``state`` are those of a new episode; ``reward``, ``terminated`` and
        ``truncated`` are the finished step's.

        Args:
          key: randomness of the transition and of the reset.
          state: the current state (from :meth:`reset` or a previous ``step``).
          action: an int (discrete, in ``[0, num_actions)``) or float ``[action_size]``
            (continuous; clipped to the valid range by the environment).
          params: the environment's constants.

        Returns:
          ``(obs, state, reward, terminated, truncated, info)``: float32 ``obs``, the next
          state, float32 ``reward``, bool ``terminated`` and ``truncated``, and ``info`` with
          ``"final_obs"``: the observation the step reached before any reset (equal to
          ``obs`` when the episode goes on; bootstrap a truncated episode from it).
        """
        key_step, key_reset = jax.random.split(key)
        obs, new_state, reward, terminated, truncated, info = self.step_env(
            key_step, state, action, params
        )
        reset_obs, reset_state = self.reset(key_reset, params)
        done = terminated | truncated

        def pick(reset_value, value):
            return jnp.where(done, reset_value, value).astype(jnp.result_type(value))

        return (
            pick(reset_obs, obs),
            jax.tree.map(pick, reset_state, new_state),
            reward,
            terminated,
            truncated,
            {**info, "final_obs": obs},
        )


def raw_step(env) -> Callable:
    """The transition of ``env`` without automatic reset: ``env.step_env`` when it has one
    (every :class:`Environment`, and gymnax's environments), else ``env.step`` (an
    environment of your own whose ``step`` does not reset). :func:`collect` steps with it."""
    return getattr(env, "step_env", env.step)


class _BuiltIn(Environment):
    """The built-in environments' common frame: each defines ``params_type`` (its constants,
    with a ``max_steps`` time limit), :meth:`_initial_state`, :meth:`_dynamics` and
    :meth:`_obs`; ``reset`` and ``step_env`` are assembled here once, with the time limit:
    truncated at ``max_steps`` unless terminated there (never both)."""

    params_type: type

    def default_params(self):
        return self.params_type()

    def _initial_state(self, key: jax.Array, params):
        """The state an episode starts in (its ``time`` 0)."""
        raise NotImplementedError(f"{type(self).__name__} must define _initial_state()")

    def _dynamics(self, state, action: jax.Array, params):
        """One deterministic transition: ``(new_state, reward, terminated)``, ``new_state.time``
        one more than ``state.time``."""
        raise NotImplementedError(f"{type(self).__name__} must define _dynamics()")

    @staticmethod
    def _obs(state) -> jax.Array:
        """The float32 observation of a state."""
        raise NotImplementedError("a built-in environment must define _obs()")

    def reset(self, key: jax.Array, params):
        state = self._initial_state(key, params)
        return self._obs(state), state

    def step_env(self, key: jax.Array, state, action: jax.Array, params):
        del key  # deterministic dynamics
        new, reward, terminated = self._dynamics(state, action, params)
        truncated = (new.time >= params.max_steps) & ~terminated
        return self._obs(new), new, reward.astype(jnp.float32), terminated, truncated, {}


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


class CartPole(_BuiltIn):
    """CartPole-v1: push a cart left or right to keep a pole upright; reward 1 per step.

    Observation ``[x, x_dot, theta, theta_dot]``; actions 0 (push left) and 1 (push right).
    Terminates when ``|theta| > 12 degrees`` or ``|x| > 2.4``; truncated after 500 steps.
    """

    name = "CartPole-v1"
    observation_size = 4
    num_actions = 2
    continuous = False
    params_type = CartPoleParams

    def _initial_state(self, key: jax.Array, params: CartPoleParams) -> CartPoleState:
        x, x_dot, theta, theta_dot = jax.random.uniform(key, (4,), jnp.float32, -0.05, 0.05)
        return CartPoleState(x, x_dot, theta, theta_dot, jnp.int32(0))

    def _dynamics(self, state: CartPoleState, action: jax.Array, p: CartPoleParams):
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
        return new, jnp.float32(1.0), terminated

    @staticmethod
    def _obs(state: CartPoleState) -> jax.Array:
        return jnp.stack([state.x, state.x_dot, state.theta, state.theta_dot]).astype(jnp.float32)


@struct.dataclass
class PendulumParams:
    """Constants of gymnasium's Pendulum-v1."""

    max_speed: float = 8.0
    max_torque: float = 2.0
    dt: float = 0.05
    g: float = 10.0
    m: float = 1.0
    l: float = 1.0  # noqa: E741 (the paper's symbol)
    max_steps: int = 200


class PendulumState(NamedTuple):
    theta: jax.Array
    theta_dot: jax.Array
    time: jax.Array


def _angle_normalize(x):
    return ((x + jnp.pi) % (2 * jnp.pi)) - jnp.pi


class Pendulum(_BuiltIn):
    """Pendulum-v1: swing a pendulum up and hold it; torque in [-2, 2]; never terminates.

    Observation ``[cos theta, sin theta, theta_dot]``; reward
    ``-(theta^2 + 0.1 theta_dot^2 + 0.001 u^2)`` with theta normalised to [-pi, pi);
    truncated after 200 steps. Semi-implicit Euler as in gymnasium.
    """

    name = "Pendulum-v1"
    observation_size = 3
    action_size = 1
    continuous = True
    params_type = PendulumParams

    def _initial_state(self, key: jax.Array, params: PendulumParams) -> PendulumState:
        high = jnp.array([jnp.pi, 1.0], jnp.float32)
        theta, theta_dot = jax.random.uniform(key, (2,), jnp.float32, -high, high)
        return PendulumState(theta, theta_dot, jnp.int32(0))

    def _dynamics(self, state: PendulumState, action: jax.Array, p: PendulumParams):
        u = jnp.clip(jnp.reshape(action, ()).astype(jnp.float32), -p.max_torque, p.max_torque)
        costs = _angle_normalize(state.theta) ** 2 + 0.1 * state.theta_dot**2 + 0.001 * u**2
        theta_dot = (
            state.theta_dot
            + (3 * p.g / (2 * p.l) * jnp.sin(state.theta) + 3.0 / (p.m * p.l**2) * u) * p.dt
        )
        theta_dot = jnp.clip(theta_dot, -p.max_speed, p.max_speed)
        new = PendulumState(state.theta + theta_dot * p.dt, theta_dot, state.time + 1)
        return new, -costs, jnp.bool_(False)  # never terminates

    @staticmethod
    def _obs(state: PendulumState) -> jax.Array:
        return jnp.stack([jnp.cos(state.theta), jnp.sin(state.theta), state.theta_dot]).astype(
            jnp.float32
        )


@struct.dataclass
class AcrobotParams:
    """Constants of gymnasium's Acrobot-v1 ("book" dynamics, one RK4 step per dt)."""

    dt: float = 0.2
    link_length_1: float = 1.0
    link_mass_1: float = 1.0
    link_mass_2: float = 1.0
    link_com_pos_1: float = 0.5
    link_com_pos_2: float = 0.5
    link_moi: float = 1.0
    max_vel_1: float = 4 * math.pi
    max_vel_2: float = 9 * math.pi
    max_steps: int = 500


class AcrobotState(NamedTuple):
    joint_angle1: jax.Array
    joint_angle2: jax.Array
    velocity_1: jax.Array
    velocity_2: jax.Array
    time: jax.Array


class Acrobot(_BuiltIn):
    """Acrobot-v1: swing the tip of a two-link chain above a line; torque in {-1, 0, +1}.

    Reward -1 per step until the tip is one link length above the base (terminated, reward
    0 there); truncated after 500 steps.
    """

    name = "Acrobot-v1"
    observation_size = 6
    num_actions = 3
    continuous = False
    params_type = AcrobotParams

    def _initial_state(self, key: jax.Array, params: AcrobotParams) -> AcrobotState:
        s = jax.random.uniform(key, (4,), jnp.float32, -0.1, 0.1)
        return AcrobotState(s[0], s[1], s[2], s[3], jnp.int32(0))

    def _dsdt(self, s, torque, p: AcrobotParams):
        m1, m2, l1 = p.link_mass_1, p.link_mass_2, p.link_length_1
        lc1, lc2, i1, i2, g = p.link_com_pos_1, p.link_com_pos_2, p.link_moi, p.link_moi, 9.8
        theta1, theta2, dtheta1, dtheta2 = s
        d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * jnp.cos(theta2)) + i1 + i2
        d2 = m2 * (lc2**2 + l1 * lc2 * jnp.cos(theta2)) + i2
        phi2 = m2 * lc2 * g * jnp.cos(theta1 + theta2 - jnp.pi / 2.0)
        phi1 = (
            -m2 * l1 * lc2 * dtheta2**2 * jnp.sin(theta2)
            - 2 * m2 * l1 * lc2 * dtheta2 * dtheta1 * jnp.sin(theta2)
            + (m1 * lc1 + m2 * l1) * g * jnp.cos(theta1 - jnp.pi / 2)
            + phi2
        )
        ddtheta2 = (
            torque + d2 / d1 * phi1 - m2 * l1 * lc2 * dtheta1**2 * jnp.sin(theta2) - phi2
        ) / (m2 * lc2**2 + i2 - d2**2 / d1)
        ddtheta1 = -(d2 * ddtheta2 + phi1) / d1
        return jnp.stack([dtheta1, dtheta2, ddtheta1, ddtheta2])

    def _dynamics(self, state: AcrobotState, action: jax.Array, p: AcrobotParams):
        torque = jnp.asarray(action, jnp.float32) - 1.0
        s = jnp.stack([state.joint_angle1, state.joint_angle2, state.velocity_1, state.velocity_2])
        k1 = self._dsdt(s, torque, p)
        k2 = self._dsdt(s + p.dt / 2 * k1, torque, p)
        k3 = self._dsdt(s + p.dt / 2 * k2, torque, p)
        k4 = self._dsdt(s + p.dt * k3, torque, p)
        s = s + p.dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        new = AcrobotState(
            _angle_normalize(s[0]),
            _angle_normalize(s[1]),
            jnp.clip(s[2], -p.max_vel_1, p.max_vel_1),
            jnp.clip(s[3], -p.max_vel_2, p.max_vel_2),
            state.time + 1,
        )
        terminated = -jnp.cos(new.joint_angle1) - jnp.cos(new.joint_angle2 + new.joint_angle1) > 1.0
        return new, jnp.where(terminated, 0.0, -1.0), terminated

    @staticmethod
    def _obs(state: AcrobotState) -> jax.Array:
        return jnp.stack(
            [
                jnp.cos(state.joint_angle1),
                jnp.sin(state.joint_angle1),
                jnp.cos(state.joint_angle2),
                jnp.sin(state.joint_angle2),
                state.velocity_1,
                state.velocity_2,
            ]
        ).astype(jnp.float32)


@struct.dataclass
class MountainCarContinuousParams:
    """Constants of gymnasium's MountainCarContinuous-v0."""

    min_action: float = -1.0
    max_action: float = 1.0
    min_position: float = -1.2
    max_position: float = 0.6
    max_speed: float = 0.07
    goal_position: float = 0.45
    goal_velocity: float = 0.0
    power: float = 0.0015
    max_steps: int = 999


class MountainCarState(NamedTuple):
    position: jax.Array
    velocity: jax.Array
    time: jax.Array


class MountainCarContinuous(_BuiltIn):
    """MountainCarContinuous-v0: drive an underpowered car up a hill; force in [-1, 1].

    Reward ``-0.1 a^2`` per step and +100 on reaching the flag (terminated); truncated after
    999 steps.
    """

    name = "MountainCarContinuous-v0"
    observation_size = 2
    action_size = 1
    continuous = True
    params_type = MountainCarContinuousParams

    def _initial_state(self, key: jax.Array, params) -> MountainCarState:
        position = jax.random.uniform(key, (), jnp.float32, -0.6, -0.4)
        return MountainCarState(position, jnp.float32(0.0), jnp.int32(0))

    def _dynamics(self, state: MountainCarState, action, p: MountainCarContinuousParams):
        action = jnp.reshape(action, ()).astype(jnp.float32)
        force = jnp.clip(action, p.min_action, p.max_action)
        velocity = state.velocity + force * p.power - 0.0025 * jnp.cos(3 * state.position)
        velocity = jnp.clip(velocity, -p.max_speed, p.max_speed)
        position = jnp.clip(state.position + velocity, p.min_position, p.max_position)
        velocity = jnp.where((position == p.min_position) & (velocity < 0), 0.0, velocity)
        terminated = (position >= p.goal_position) & (velocity >= p.goal_velocity)
        reward = jnp.where(terminated, 100.0, 0.0) - 0.1 * action**2
        return MountainCarState(position, velocity, state.time + 1), reward, terminated

    @staticmethod
    def _obs(state: MountainCarState) -> jax.Array:
        return jnp.stack([state.position, state.velocity]).astype(jnp.float32)


class ProbeState(NamedTuple):
    obs: jax.Array
    time: jax.Array


@struct.dataclass
class ProbeParams:
    """Probe environments have no parameters; a placeholder pytree for the interface."""

    max_steps: int = 1


class Probe(_BuiltIn):
    """rejax-style probe environments: tiny tasks whose exact values are known, so a
    value-function, advantage or policy-gradient bug shows up in seconds.

    ``kind``:

    * ``"constant"``: one step, observation 0, reward 1. The value must learn ``V = 1``.
    * ``"observation"``: one step, observation ``+-1`` at random, reward = observation. The value
      must learn ``V(s) = s``.
    * ``"discount"``: two steps, reward 1 only at the end. The value must learn
      ``V(s_0) = gamma``, ``V(s_1) = 1`` (observation is the step index).
    * ``"action"``: one step, observation 0, reward 1 for action 1, 0 for action 0. The policy
      must learn to pick action 1.
    * ``"observation_action"``: one step, observation ``+-1``; reward 1 when the action equals
      ``(obs + 1) / 2``. The policy must learn to condition on the observation.
    """

    observation_size = 1
    num_actions = 2
    continuous = False
    KINDS = ("constant", "observation", "discount", "action", "observation_action")

    def __init__(self, kind: str):
        if kind not in self.KINDS:
            raise ValueError(f"unknown probe {kind!r}; valid choices: {list(self.KINDS)}")
        self.kind = kind
        self.name = f"probe-{kind}"

    def default_params(self) -> ProbeParams:
        return ProbeParams(max_steps=2 if self.kind == "discount" else 1)

    def _initial_state(self, key: jax.Array, params: ProbeParams) -> ProbeState:
        if self.kind in ("observation", "observation_action"):
            obs = jnp.where(jax.random.bernoulli(key), 1.0, -1.0).astype(jnp.float32)[None]
        else:
            obs = jnp.zeros((1,), jnp.float32)
        return ProbeState(obs, jnp.int32(0))

    def _dynamics(self, state: ProbeState, action: jax.Array, params: ProbeParams):
        time = state.time + 1
        obs = state.obs[0]
        if self.kind == "constant":
            reward = jnp.float32(1.0)
        elif self.kind == "observation":
            reward = obs
        elif self.kind == "discount":
            reward = jnp.where(time >= 2, 1.0, 0.0)
        elif self.kind == "action":
            reward = (jnp.asarray(action) == 1).astype(jnp.float32)
        else:
            reward = (action == ((obs + 1) / 2).astype(jnp.int32)).astype(jnp.float32)
        next_obs = time.astype(jnp.float32)[None] if self.kind == "discount" else state.obs
        return ProbeState(next_obs, time), reward, time >= params.max_steps

    @staticmethod
    def _obs(state: ProbeState) -> jax.Array:
        return state.obs


ENVIRONMENTS = {
    "CartPole-v1": CartPole,
    "Pendulum-v1": Pendulum,
    "Acrobot-v1": Acrobot,
    "MountainCarContinuous-v0": MountainCarContinuous,
}


def make(name: str):
    """An environment and its default parameters by name.

    Built in (pure JAX, no extra dependency): ``CartPole-v1``, ``Pendulum-v1``, ``Acrobot-v1``,
    ``MountainCarContinuous-v0`` and the probes ``probe-constant``, ``probe-observation``,
    ``probe-discount``, ``probe-action``, ``probe-observation_action``. ``gymnax:<id>`` wraps any
    gymnax environment (``pip install 'rljax[envs]'``).
    """
    if name in ENVIRONMENTS:
        env = ENVIRONMENTS[name]()
    elif name.startswith("probe-"):
        env = Probe(name.removeprefix("probe-"))
    elif name.startswith("gymnax:"):
        env = GymnaxEnv(name.removeprefix("gymnax:"))
    else:
        choices = [*ENVIRONMENTS, *(f"probe-{k}" for k in Probe.KINDS), "gymnax:<id>"]
        raise ValueError(f"unknown environment {name!r}; valid choices: {choices}")
    return env, env.default_params()


class GymnaxEnv(Environment):
    """Adapter for a gymnax environment (0.0.x returns one ``done``; 1.0.x splits
    terminated and truncated). With 0.0.x, a ``done`` at the time limit counts as truncated."""

    def __init__(self, env_id: str):
        try:
            import gymnax
        except ImportError as err:  # pragma: no cover - depends on the optional extra
            raise ImportError(
                f"environment 'gymnax:{env_id}' needs gymnax: pip install 'rljax[envs]'"
            ) from err
        self._env, self._params = gymnax.make(env_id)
        self.name = env_id
        space = self._env.action_space(self._params)
        self.continuous = not hasattr(space, "n")
        if self.continuous:
            self.action_size = int(math.prod(space.shape))
        else:
            self.num_actions = int(space.n)
        self.observation_size = int(math.prod(self._env.observation_space(self._params).shape))

    def default_params(self):
        return self._params

    def reset(self, key, params):
        obs, state = self._env.reset(key, params)
        return obs.reshape(-1).astype(jnp.float32), state

    def step_env(self, key, state, action, params):
        if self.continuous:
            action = action.reshape(self._env.action_space(params).shape)
        out = self._env.step_env(key, state, action, params)  # gymnax's step without reset
        if len(out) == 6:
            obs, new_state, reward, terminated, truncated, info = out
        else:
            obs, new_state, reward, done, info = out
            truncated = done & (new_state.time >= params.max_steps_in_episode)
            terminated = done & ~truncated
        return (
            obs.reshape(-1).astype(jnp.float32),
            new_state,
            reward.astype(jnp.float32),
            terminated.astype(bool),
            truncated.astype(bool),
            info,
        )


def time_limit(env_params) -> int:
    """The episode time limit of an environment's params, as a Python int.

    rljax's environments call it ``max_steps``, gymnax ``max_steps_in_episode``.
    """
    for name in ("max_steps", "max_steps_in_episode"):
        if hasattr(env_params, name):
            return int(getattr(env_params, name))
    raise ValueError(
        f"{type(env_params).__name__} has no time limit: expected a `max_steps` or "
        "`max_steps_in_episode` field"
    )


def sample_action(key: jax.Array, outputs) -> jax.Array:
    """Sample from policy outputs (categorical logits or ``(mean, log_std)``)."""
    return _noisy_action(outputs, _action_noise(key, outputs))


def _action_noise(key: jax.Array, outputs) -> jax.Array:
    """The random part of :func:`sample_action`; ``outputs`` may be shape/dtype structs.

    Gumbel noise of the logits' shape (``jax.random.categorical`` is the argmax of logits plus
    exactly this noise), or standard normal noise of the Gaussian mean's shape.
    """
    if is_gaussian(outputs):
        mean = outputs[0]
        return jax.random.normal(key, mean.shape, mean.dtype)
    return jax.random.gumbel(key, outputs.shape, outputs.dtype)


def _noisy_action(outputs, noise: jax.Array) -> jax.Array:
    if is_gaussian(outputs):
        mean, log_std = outputs
        return mean + jnp.exp(log_std) * noise
    return jnp.argmax(noise + outputs, axis=-1)


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
    v_step = jax.vmap(raw_step(env), in_axes=(0, 0, 0, None))
    v_reset = jax.vmap(env.reset, in_axes=(0, None))

    # Everything random that does not depend on the state is drawn for all steps at once,
    # before the scan: the same keys and values as drawing it step by step, but a few batched
    # calls instead of a few per step (each is a small loop of kernels on CPU).
    def step_randomness(step_key):
        k_act, k_step, k_reset = jax.random.split(step_key, 3)
        reset_obs, reset_state = v_reset(jax.random.split(k_reset, num_envs), env_params)
        return (
            _action_noise(k_act, outputs_shape),
            jax.random.split(k_step, num_envs),
            (
                reset_obs,
                reset_state,
            ),
        )

    outputs_shape = jax.eval_shape(policy_fn, policy_params, carry.obs)
    randomness = jax.vmap(step_randomness)(jax.random.split(key, num_steps))

    def step(carry: RolloutCarry, step_randomness):
        noise, step_keys, (reset_obs, reset_state) = step_randomness
        outputs = policy_fn(policy_params, carry.obs)
        action = _noisy_action(outputs, noise)
        logp = log_prob(outputs, action)
        next_obs, next_state, reward, terminated, truncated, _ = v_step(
            step_keys, carry.env_state, action, env_params
        )
        done = terminated | truncated

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

    carry, traj = jax.lax.scan(step, carry, randomness)
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
