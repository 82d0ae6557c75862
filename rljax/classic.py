"""Whole training runs on classic-control environments, each one compiled function.

``train_ppo(config, key)`` and ``train_trpo(config, key)`` run rollouts (``lax.scan`` over
time, ``vmap`` over environments), GAE and the update step for every iteration inside a single
``lax.scan``, so the whole run is one XLA program: jit it once, and ``jax.vmap`` it over keys to
train many seeds at once (as purejaxrl does), built from rljax's pure pieces:
:func:`rljax.envs.collect`, :func:`rljax.advantages.gae`, :func:`rljax.updates.make_ppo_update`,
:func:`rljax.updates.make_trpo_update`.

A run configuration nests the algorithm's own config (``PPOClassicConfig.ppo:
rljax.updates.PPOConfig``, ``TRPOClassicConfig.trpo: rljax.updates.TRPOConfig``), so the update's
settings are declared once. The dataclass defaults are CartPole-v1's tuned settings;
:func:`preset` gives each environment's (``PPO_PRESETS``/``TRPO_PRESETS``), and the experiment
scripts take them as the defaults of their flags (:func:`parse`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rljax import advantages, checks, cli, envs, finite, runs, updates
from rljax.models.mlp import Actor, Critic, pure

__all__ = [
    "CPU_COMPILER_OPTIONS",
    "OTHER_ENV_PRESETS",
    "PPO_PRESETS",
    "SHORT_RUN_COMPILER_OPTIONS",
    "SHORT_RUN_ENV_STEPS",
    "TRPO_PRESETS",
    "ClassicConfig",
    "ExperimentSettings",
    "PPOClassicConfig",
    "Progress",
    "TRPOClassicConfig",
    "compile_lowered",
    "compiler_options",
    "evaluate",
    "main",
    "make_networks",
    "parse",
    "preset",
    "rollout_batch",
    "run_experiment",
    "script_config",
    "train_ppo",
    "train_trpo",
]


@dataclasses.dataclass(frozen=True)
class ClassicConfig:
    """Settings shared by PPO and TRPO runs (defaults: CartPole-v1's preset).

    Attributes:
      env: environment name (see rljax.envs.make).
      total_steps: environment steps per seed.
      num_envs: environments stepped in parallel per seed.
      num_steps: steps per environment per iteration.
      gamma: discount.
      lam: GAE lambda (rljax.advantages.gae).
      hidden: width of the two hidden layers of actor and critic.
      log_std_init: initial log standard deviation of a Gaussian policy.
      eval_episodes: greedy evaluation episodes per seed at the end.
    """

    env: str = "CartPole-v1"
    total_steps: int = 100_000
    num_envs: int = 8
    num_steps: int = 128
    gamma: float = 0.99
    lam: float = 0.95
    hidden: int = 64
    log_std_init: float = 0.0
    eval_episodes: int = 10

    def __post_init__(self):
        rules = {"gamma": "in (0, 1]", "lam": "in [0, 1]"}
        positive = ["total_steps", "num_envs", "num_steps", "hidden", "eval_episodes"]
        checks.check(self, rules | {name: "> 0" for name in positive}, library=True)

    @property
    def steps_per_iteration(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_iterations(self) -> int:
        """Iterations needed for at least ``total_steps`` env steps (rounded up)."""
        return -(-self.total_steps // self.steps_per_iteration)

    @property
    def env_steps(self) -> int:
        """Environment steps per seed actually run: ``num_iterations`` whole iterations."""
        return self.num_iterations * self.steps_per_iteration

    def _check_divides(self, name: str, value: int) -> None:
        if self.steps_per_iteration % value:
            raise ValueError(
                f"{type(self).__name__}: {name}={value} ({checks.flag(name)}) must divide the "
                f"batch of num_envs * num_steps = {self.steps_per_iteration} rows"
            )


@dataclasses.dataclass(frozen=True)
class PPOClassicConfig(ClassicConfig):
    """PPO on a classic-control environment (defaults: CartPole-v1's preset).

    Attributes:
      learning_rate: Adam step size (annealed linearly to 0 when anneal_lr).
      anneal_lr: linear learning-rate decay over the run.
      max_grad_norm: global gradient-norm clip.
      ppo: the PPO update's settings (rljax.updates.PPOConfig: clip_eps, value_clip_eps, value_coef,
        entropy_coef, num_epochs, num_minibatches, target_kl, ...).
    """

    learning_rate: float = 2e-3
    anneal_lr: bool = True
    max_grad_norm: float = 0.5
    ppo: updates.PPOConfig = dataclasses.field(
        default_factory=lambda: updates.PPOConfig(num_epochs=8)
    )

    def __post_init__(self):
        super().__post_init__()
        checks.check(self, {"learning_rate": "> 0", "max_grad_norm": "> 0"}, library=True)
        self._check_divides("num_minibatches", self.ppo.num_minibatches)


@dataclasses.dataclass(frozen=True)
class TRPOClassicConfig(ClassicConfig):
    """TRPO on a classic-control environment (defaults: CartPole-v1's preset).

    Attributes:
      value_learning_rate: Adam step size of the value function.
      trpo: the TRPO update's settings (rljax.updates.TRPOConfig: max_kl, cg_iters, cg_damping,
        fvp_subsample, n_critic_updates, critic_minibatches, ...); flat_params is on (these
        small networks compile faster on one flat vector).
    """

    value_learning_rate: float = 1e-3
    trpo: updates.TRPOConfig = dataclasses.field(
        default_factory=lambda: updates.TRPOConfig(
            max_kl=0.02, critic_minibatches=8, flat_params=True
        )
    )

    def __post_init__(self):
        super().__post_init__()
        checks.check(self, {"value_learning_rate": "> 0"}, library=True)
        self._check_divides("critic_minibatches", self.trpo.critic_minibatches)


# Per-environment settings, by flat field name (a nested config's fields too); the settings not
# listed keep the dataclass defaults. Every row names the same settings, so a row reads whole.
PPO_PRESETS = {
    "CartPole-v1": dict(
        total_steps=100_000, num_envs=8, num_steps=128, gamma=0.99, learning_rate=2e-3,
        num_epochs=8, num_minibatches=4, entropy_coef=0.0, value_clip_eps=0.2,
    ),
    "Acrobot-v1": dict(
        total_steps=200_000, num_envs=16, num_steps=128, gamma=0.99, learning_rate=5e-4,
        num_epochs=8, num_minibatches=8, entropy_coef=0.01, value_clip_eps=0.2,
    ),
    "Pendulum-v1": dict(
        total_steps=400_000, num_envs=16, num_steps=256, gamma=0.95, learning_rate=1e-3,
        num_epochs=10, num_minibatches=16, entropy_coef=0.0, value_clip_eps=None,
    ),
    "MountainCarContinuous-v0": dict(
        total_steps=400_000, num_envs=16, num_steps=256, gamma=0.99, learning_rate=1e-3,
        num_epochs=10, num_minibatches=16, entropy_coef=0.0, value_clip_eps=None,
    ),
}  # fmt: skip
TRPO_PRESETS = {
    # num_envs=8 (98 iterations of 1024 steps rather than 49 of 2048): a greedy return >= 475
    # on 29 of 30 seeds (three 10-seed sets) against 26 of 30 with 16 envs.
    "CartPole-v1": dict(
        total_steps=100_000, num_envs=8, num_steps=128, gamma=0.99, max_kl=0.02,
        value_learning_rate=1e-3, n_critic_updates=10, critic_minibatches=8,
    ),
    "Acrobot-v1": dict(
        total_steps=200_000, num_envs=16, num_steps=128, gamma=0.99, max_kl=0.02,
        value_learning_rate=1e-3, n_critic_updates=10, critic_minibatches=8,
    ),
    "Pendulum-v1": dict(
        total_steps=400_000, num_envs=16, num_steps=256, gamma=0.95, max_kl=0.02,
        value_learning_rate=1e-3, n_critic_updates=10, critic_minibatches=16,
    ),
    "MountainCarContinuous-v0": dict(
        total_steps=400_000, num_envs=16, num_steps=256, gamma=0.99, max_kl=0.02,
        value_learning_rate=1e-3, n_critic_updates=10, critic_minibatches=16,
    ),
}  # fmt: skip
#: The settings of any other environment (the probes, ``gymnax:<id>``), per algorithm.
OTHER_ENV_PRESETS = {
    "ppo": dict(
        total_steps=100_000, num_envs=16, num_steps=128, gamma=0.99, learning_rate=5e-4,
        num_epochs=8, num_minibatches=8, entropy_coef=0.01, value_clip_eps=0.2,
    ),
    "trpo": dict(
        total_steps=100_000, num_envs=16, num_steps=128, gamma=0.99, max_kl=0.02,
        value_learning_rate=1e-3, n_critic_updates=10, critic_minibatches=8,
    ),
}  # fmt: skip
_ALGORITHMS = {"ppo": (PPOClassicConfig, PPO_PRESETS), "trpo": (TRPOClassicConfig, TRPO_PRESETS)}


def preset(env: str = "CartPole-v1", algorithm: str = "ppo", **overrides):
    """The complete configuration of ``algorithm`` (``"ppo"`` or ``"trpo"``) on ``env``: the
    environment's row of ``PPO_PRESETS``/``TRPO_PRESETS`` (``OTHER_ENV_PRESETS`` for an
    environment without one) over the dataclass defaults, then ``overrides``, which name fields
    by their flat name, nested ones included (``preset("Acrobot-v1", "ppo", clip_eps=0.1)``).

    Returns a :class:`PPOClassicConfig` or :class:`TRPOClassicConfig`; an unknown environment,
    algorithm or field, or a value out of range, raises naming it.
    """
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} unknown; valid choices: {list(_ALGORITHMS)}")
    envs.make(env)  # an unknown name raises here, listing the valid ones
    config_class, presets = _ALGORITHMS[algorithm]
    settings = presets.get(env, OTHER_ENV_PRESETS[algorithm])
    return cli.replace(config_class(), env=env, **{**settings, **overrides})


def _algorithm(config_class) -> str:
    for name, (base, _) in _ALGORITHMS.items():
        if issubclass(config_class, base):
            return name
    raise TypeError(
        f"{config_class.__name__} is neither a PPOClassicConfig nor a TRPOClassicConfig"
    )


def make_networks(config: ClassicConfig, env):
    """The actor-critic of a run: ``(policy_fn, value_fn, init_policy, init_value)``.

    ``policy_fn(params, obs)``/``value_fn(params, obs)`` are pure functions (see
    :func:`rljax.models.mlp.pure`); ``init_policy(key)``/``init_value(key)`` build parameters.
    """
    action_dim = env.action_size if env.continuous else env.num_actions
    hidden = (config.hidden, config.hidden)

    def actor(key):
        return Actor(
            env.observation_size,
            action_dim,
            hidden=hidden,
            continuous=env.continuous,
            log_std_init=config.log_std_init,
            rngs=nnx.Rngs(key),
        )

    def critic(key):
        return Critic(env.observation_size, hidden=hidden, rngs=nnx.Rngs(key))

    policy_fn, value_fn = _apply_fns(
        env.observation_size, action_dim, config.hidden, env.continuous, config.log_std_init
    )
    init_policy = _one_key_at_a_time(lambda k: pure(actor(k))[1])
    init_value = _one_key_at_a_time(lambda k: pure(critic(k))[1])
    return policy_fn, value_fn, init_policy, init_value


def _one_key_at_a_time(init: Callable) -> Callable:
    """``init(key)``, but under ``jax.vmap`` the keys are taken one at a time (``lax.map``).

    The orthogonal initialisation runs a QR factorisation per layer. Batched over seeds, the
    QRs go to jaxlib's batched LAPACK kernels, which split the batch over XLA:CPU's intra-op
    thread pool and block until the pieces are done; several such kernels running at once can
    take every thread of the pool and wait forever (seen with jax 0.10.2 on 2 cores: a 10-seed
    run hangs at 0% CPU). Unbatched QRs do not wait on the pool. Same values either way.
    """
    init = jax.custom_batching.custom_vmap(init)

    @init.def_vmap
    def _rule(axis_size, in_batched, key):
        (batched,) = in_batched
        keys = key if batched else jnp.broadcast_to(key, (axis_size, *key.shape))
        out = jax.lax.map(init, keys)
        return out, jax.tree.map(lambda _: True, out)

    return init


@functools.lru_cache(maxsize=64)
def _apply_fns(obs_dim, action_dim, hidden, continuous, log_std_init):
    """``(policy_fn, value_fn)`` of :func:`make_networks`, built once per architecture.

    They need only the module structure, so the modules are built abstractly
    (``nnx.eval_shape``): no initialisation is traced, and nothing into a caller's program.
    """
    hidden = (hidden, hidden)
    actor = nnx.eval_shape(
        lambda: Actor(
            obs_dim,
            action_dim,
            hidden=hidden,
            continuous=continuous,
            log_std_init=log_std_init,
            rngs=nnx.Rngs(0),
        )
    )
    critic = nnx.eval_shape(lambda: Critic(obs_dim, hidden=hidden, rngs=nnx.Rngs(0)))
    return pure(actor)[0], pure(critic)[0]


def rollout_batch(
    config, env, env_params, policy_fn, value_fn, policy_params, value_params, carry, key,
    *, flatten: bool = True,
):  # fmt: skip
    """One iteration's on-policy batch: ``config.num_steps`` steps of each environment of
    ``carry`` (:func:`rljax.envs.collect`), GAE advantages and returns (``config.gamma``,
    ``config.lam``). Returns ``(carry, batch, stats)``: the batch's rows are the env steps
    (``[envs * steps, ...]``; ``flatten=False`` keeps ``[envs, steps, ...]``), and ``stats``
    the ``episodes`` that ended and their mean ``episode_return`` and ``episode_length``."""
    carry, traj = envs.collect(
        env, env_params, policy_fn, policy_params, carry, key, config.num_steps
    )
    rewards, dones = envs.bootstrapped_rewards(traj, value_fn, value_params, config.gamma)
    values = value_fn(value_params, traj["obs"])
    all_values = jnp.concatenate([values, value_fn(value_params, carry.obs)[:, None]], axis=1)
    adv, returns = advantages.gae(rewards, all_values, dones, config.gamma, config.lam)
    batch = {
        "inputs": traj["obs"],
        "actions": traj["actions"],
        "old_logps": traj["logps"],
        "advantages": adv,
        "returns": returns,
        "old_values": values,
    }
    if flatten:
        batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)  # [envs * steps, ...]
    ended = traj["terminated"] | traj["truncated"]
    episodes = jnp.sum(ended)
    stats = {
        "episodes": episodes,
        "episode_return": jnp.sum(jnp.where(ended, traj["episode_return"], 0.0))
        / jnp.maximum(episodes, 1),
        "episode_length": jnp.sum(jnp.where(ended, traj["episode_length"], 0))
        / jnp.maximum(episodes, 1),
    }
    return carry, batch, stats


def _run(config, env, env_params, init_state, update, fns, key, progress=None):
    """Scan the iterations: rollout, update; returns the final state and per-iteration metrics."""
    policy_fn, value_fn = fns
    key, k_env = jax.random.split(key)
    carry = envs.init_carry(env, env_params, k_env, config.num_envs)

    def iteration(loop, index):
        state, carry, key, last_return = loop
        key, k_roll = jax.random.split(key)
        policy_params, value_params = _policy_and_value(state)
        carry, batch, stats = rollout_batch(
            config, env, env_params, policy_fn, value_fn, policy_params, value_params, carry, k_roll
        )
        state, metrics = update(state, batch)
        # An iteration in which no episode ended repeats the last known return (its
        # ``episodes`` is 0), so learning curves do not dip to 0 between long episodes.
        last_return = jnp.where(stats["episodes"] > 0, stats["episode_return"], last_return)
        stats = {**stats, "episode_return": last_return}
        metrics = {
            **metrics,
            **stats,
            "env_steps": (index + 1) * config.num_envs * config.num_steps,
        }
        if progress is not None:
            # Under vmap over seeds the callback fires once per seed (Progress gathers them).
            jax.debug.callback(progress, index, metrics["env_steps"], stats["episode_return"])
        return (state, carry, key, last_return), metrics

    (state, *_), history = jax.lax.scan(
        iteration,
        (init_state, carry, key, jnp.float32(jnp.nan)),
        jnp.arange(config.num_iterations),
    )
    return state, history


def _policy_and_value(state):
    if isinstance(state, updates.PPOState):
        return state.params["policy"], state.params["value"]
    return state.params["policy"], state.params["value"]


def train_ppo(config: PPOClassicConfig, key: jax.Array, progress: Callable | None = None):
    """Train PPO for ``config.env_steps`` (``total_steps`` rounded up to whole iterations) env
    steps; jit-able as a whole and vmappable over ``key``.

    Returns ``(state, history, evaluation)``: the final :class:`rljax.updates.PPOState`, a dict of
    per-iteration metric arrays (``episode_return``, ``env_steps``, losses, ...) and the greedy
    evaluation of :func:`evaluate`. ``progress(iteration, env_steps, episode_return)`` is
    called from inside the compiled run once per iteration (e.g. a :class:`Progress`).
    """
    env, env_params = envs.make(config.env)
    policy_fn, value_fn, init_policy, init_value = make_networks(config, env)
    k_policy, k_value, k_state, k_run, k_eval = jax.random.split(key, 5)
    schedule = config.learning_rate
    if config.anneal_lr:
        n_updates = config.num_iterations * config.ppo.num_epochs * config.ppo.num_minibatches
        schedule = optax.linear_schedule(config.learning_rate, 0.0, n_updates)
    # optax.flatten: the optimizer works on one vector rather than on every parameter array
    # (the same arithmetic in a fraction of the kernels, so the run compiles faster).
    optimizer = optax.flatten(
        optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(schedule, eps=1e-5))
    )
    update = updates.make_ppo_update(policy_fn, value_fn, optimizer, config.ppo)
    state = updates.init_ppo_state(init_policy(k_policy), init_value(k_value), optimizer, k_state)
    state, history = _run(
        config, env, env_params, state, update, (policy_fn, value_fn), k_run, progress
    )
    evaluation = evaluate(
        env, env_params, policy_fn, state.params["policy"], k_eval, config.eval_episodes
    )
    return state, history, evaluation


def train_trpo(config: TRPOClassicConfig, key: jax.Array, progress: Callable | None = None):
    """Train TRPO for ``config.env_steps`` (``total_steps`` rounded up to whole iterations) env
    steps; jit-able as a whole and vmappable over ``key``.

    Returns ``(state, history, evaluation)`` as :func:`train_ppo` does, with a
    :class:`rljax.updates.PPOState` (TRPO's: ``opt_state`` is the value optimizer's).
    """
    env, env_params = envs.make(config.env)
    policy_fn, value_fn, init_policy, init_value = make_networks(config, env)
    k_policy, k_value, k_state, k_run, k_eval = jax.random.split(key, 5)
    value_optimizer = optax.flatten(optax.adam(config.value_learning_rate))
    update = updates.make_trpo_update(policy_fn, value_fn, value_optimizer, config.trpo)
    state = updates.init_trpo_state(
        init_policy(k_policy), init_value(k_value), value_optimizer, k_state
    )
    state, history = _run(
        config, env, env_params, state, update, (policy_fn, value_fn), k_run, progress
    )
    evaluation = evaluate(
        env, env_params, policy_fn, state.params["policy"], k_eval, config.eval_episodes
    )
    return state, history, evaluation


def greedy_action(outputs) -> jax.Array:
    """The mode of the policy: argmax of the logits, or the Gaussian mean."""
    from rljax.distributions import is_gaussian

    if is_gaussian(outputs):
        return outputs[0]
    return jnp.argmax(outputs, axis=-1)


def evaluate(
    env,
    env_params,
    policy_fn: Callable,
    policy_params,
    key: jax.Array,
    num_episodes: int = 10,
    greedy: bool = True,
) -> dict[str, jax.Array]:
    """Undiscounted return of ``num_episodes`` full episodes (run in parallel), jit-able.

    ``greedy`` takes the policy's mode; otherwise actions are sampled. Each episode runs until
    it terminates or the environment's time limit (:func:`rljax.envs.time_limit`) truncates it.

    Returns ``{"returns": [num_episodes], "lengths": [num_episodes], "mean_return": ...}``.
    """
    k_reset, k_steps = jax.random.split(key)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(
        jax.random.split(k_reset, num_episodes), env_params
    )
    v_step = jax.vmap(envs.raw_step(env), in_axes=(0, 0, 0, None))  # no auto-reset

    def step(loop, step_key):
        obs, state, total, length, done = loop
        k_act, k_env = jax.random.split(step_key)
        outputs = policy_fn(policy_params, obs)
        action = greedy_action(outputs) if greedy else envs.sample_action(k_act, outputs)
        obs, state, reward, terminated, truncated, _ = v_step(
            jax.random.split(k_env, num_episodes), state, action, env_params
        )
        total = total + jnp.where(done, 0.0, reward)
        length = length + jnp.where(done, 0, 1)
        return (obs, state, total, length, done | terminated | truncated), None

    zeros = jnp.zeros((num_episodes,), jnp.float32)
    init = (
        obs,
        state,
        zeros,
        jnp.zeros((num_episodes,), jnp.int32),
        jnp.zeros((num_episodes,), bool),
    )
    (_, _, total, length, _), _ = jax.lax.scan(
        step, init, jax.random.split(k_steps, envs.time_limit(env_params))
    )
    return {"returns": total, "lengths": length, "mean_return": jnp.mean(total)}


# ---------------------------------------------------------------------------------------------
# Experiment driver shared by experiments/ppo_classic.py and experiments/trpo_classic.py.
# ---------------------------------------------------------------------------------------------


class Progress:
    """Host callback that prints one line per ``every`` iterations once all seeds reported,
    with elapsed time, rate and ETA (:class:`rljax.runs.Progress`).

    Passed to :func:`train_ppo`/:func:`train_trpo` as ``progress``; under ``vmap`` over seeds
    the callback fires once per seed per iteration, so values are gathered per iteration.
    """

    def __init__(self, label: str, num_seeds: int, num_iterations: int, every: int = 10):
        self.label, self.num_seeds, self.num_iterations = label, num_seeds, num_iterations
        self.every, self.pending, self.start = max(1, every), {}, None

    def __call__(self, iteration, env_steps, episode_return):
        import numpy as np

        if self.start is None:  # the first callback: the compiled run has started
            self.start = runs.Progress(self.num_iterations, unit="iteration")
        iteration = int(iteration)
        values = self.pending.setdefault(iteration, [])
        values.append(float(episode_return))
        if len(values) < self.num_seeds:
            return
        del self.pending[iteration]
        if (iteration + 1) % self.every == 0 or iteration + 1 == self.num_iterations:
            finite = [v for v in values if np.isfinite(v)]
            returns = (
                f"training return mean {np.mean(finite):.1f} (min {np.min(finite):.1f}, "
                f"max {np.max(finite):.1f}) over {len(finite)} seeds"
                if finite
                else "no episode finished yet"
            )
            print(
                f"[{self.label}] iteration {iteration + 1}/{self.num_iterations}  "
                f"env steps {int(env_steps):,}/seed  {returns}  "
                f"[{self.start.update(iteration + 1)}]",
                flush=True,
            )


# XLA:CPU compile options for these programs (hundreds of small kernels, where compilation is
# a large part of a short run). LLVM optimisation level 1 instead of the default compiles
# faster at the same step time. For short runs (at most SHORT_RUN_ENV_STEPS environment steps,
# all seeds together) XLA's classic LLVM IR emitters replace the MLIR fusion emitters: they
# compile a CartPole run ~2 s faster, but their elementwise loops (tanh) are not vectorised at
# this level, which costs ~0.7 s per seed per 100k CartPole steps, so longer runs keep the
# fusion emitters (benchmarks/RESULTS.md#classic-control-training).
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
SHORT_RUN_COMPILER_OPTIONS = {**CPU_COMPILER_OPTIONS, "xla_cpu_use_fusion_emitters": False}
SHORT_RUN_ENV_STEPS = 200_000


def compiler_options(env_steps: int | None = None) -> dict:
    """XLA compile options for a run of ``env_steps`` environment steps (all seeds together).

    :data:`SHORT_RUN_COMPILER_OPTIONS` up to :data:`SHORT_RUN_ENV_STEPS` steps, otherwise
    :data:`CPU_COMPILER_OPTIONS`; none off CPU. Pass the result to ``.compile(
    compiler_options=...)`` when jitting train_ppo/train_trpo yourself, or use
    :func:`compile_lowered`.
    """
    if jax.default_backend() != "cpu":
        return {}
    if env_steps is not None and env_steps <= SHORT_RUN_ENV_STEPS:
        return dict(SHORT_RUN_COMPILER_OPTIONS)
    return dict(CPU_COMPILER_OPTIONS)


def compile_lowered(lowered, env_steps: int | None = None):
    """Compile a lowered program with :func:`compiler_options` for ``env_steps``.

    An XLA build that does not know one of the options gets the defaults instead (same
    results, slower compilation).
    """
    options = compiler_options(env_steps)
    try:
        return lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as error:
        if not options or "No such compile option" not in str(error):
            raise
        return lowered.compile()


def run_experiment(
    algo: str,
    config: ClassicConfig,
    seeds: int,
    seed: int,
    out: str,
    progress_every: int = 10,
    *,
    log: str = "jsonl",
) -> dict:
    """Train ``seeds`` seeds at once (``vmap``), time compilation and run separately, evaluate
    greedily, and write ``metrics.jsonl``, ``summary.json`` and ``learning_curve.png`` to ``out``
    (and the metrics to the sinks of ``log``, e.g. ``"jsonl,tensorboard"``).

    Updates with a NaN or inf are skipped inside the compiled run (:mod:`rljax.finite`; the
    metric ``nonfinite`` per iteration); the summary counts them per seed
    (``nonfinite_updates_per_seed``), and final parameters with a non-finite value raise
    ``FloatingPointError`` after the outputs are written.
    """
    import json
    import pathlib
    import time

    import numpy as np

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if _algorithm(type(config)) != algo:
        raise ValueError(f"run_experiment({algo!r}, ...) got a {type(config).__name__}")
    train = {"ppo": train_ppo, "trpo": train_trpo}[algo]
    label = f"{algo.upper()} {config.env}"
    # progress_every <= 0: no progress lines, and no host callback in the program, which lets
    # JAX's persistent compilation cache store it (programs with host callbacks are not cached).
    progress = (
        Progress(label, seeds, config.num_iterations, progress_every)
        if progress_every > 0
        else None
    )
    keys = jax.random.split(jax.random.key(seed), seeds)
    print(
        f"{label}: {seeds} seed(s) x {config.env_steps:,} env steps, "
        f"{config.num_iterations} iterations of {config.num_envs} envs x {config.num_steps} steps"
        + (
            f" (total_steps={config.total_steps:,} rounded up to whole iterations)"
            if config.env_steps != config.total_steps
            else ""
        )
    )
    start = time.perf_counter()
    lowered = jax.jit(jax.vmap(lambda k: train(config, k, progress))).lower(keys)
    compiled = compile_lowered(lowered, seeds * config.env_steps)
    compile_seconds = time.perf_counter() - start
    print(f"[{label}] compiled in {compile_seconds:.1f}s", flush=True)
    run_start = time.perf_counter()
    state, history, evaluation = jax.block_until_ready(compiled(keys))
    run_seconds = time.perf_counter() - run_start
    wall_seconds = time.perf_counter() - start
    history = jax.tree.map(np.asarray, history)
    per_seed = np.asarray(evaluation["mean_return"])
    # Non-finite updates were skipped inside the compiled run; count them per seed and check
    # that the final parameters are finite.
    skipped = np.asarray(state.nonfinite_updates).tolist()
    params_finite = np.asarray(jax.vmap(finite.all_finite)(_policy_and_value(state))).tolist()

    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_metrics(history, config, label, out_dir / "metrics.jsonl", log)
    summary = {
        "algorithm": algo,
        "env": config.env,
        "seeds": seeds,
        "total_steps": config.env_steps,
        "requested_total_steps": config.total_steps,
        "final_return_mean": float(np.mean(per_seed)),
        "final_return_median": float(np.median(per_seed)),
        "final_return_per_seed": per_seed.round(2).tolist(),
        "eval_episodes_per_seed": config.eval_episodes,
        "wall_seconds": round(wall_seconds, 2),
        "compile_seconds": round(compile_seconds, 2),
        "run_seconds": round(run_seconds, 2),
        "device": jax.devices()[0].device_kind,
        "compiler_options": compiler_options(seeds * config.env_steps),
        "nonfinite_updates_per_seed": skipped,
        "final_params_finite_per_seed": params_finite,
        "config": dataclasses.asdict(config),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot_curve(history, label, out_dir / "learning_curve.png")
    _report(label, summary, out_dir)
    return summary


def _write_metrics(history, config: ClassicConfig, label: str, path, log: str) -> None:
    """``metrics.jsonl`` (and the sinks of ``log``): per iteration the env steps, each seed's
    training return and the seeds' mean of every other metric."""
    import numpy as np

    metrics_log = runs.MetricsLog(
        path, label, config.num_iterations, sinks=log, config=dataclasses.asdict(config)
    )
    try:
        for i in range(config.num_iterations):
            row = {
                "iteration": i + 1,
                "env_steps": int(history["env_steps"][0, i]),
                "episode_return_per_seed": [
                    _json_float(v) for v in history["episode_return"][:, i]
                ],
            }
            row.update(
                {k: _json_float(np.mean(v[:, i])) for k, v in history.items() if k != "env_steps"}
            )
            metrics_log.log(i + 1, row, print_line=False)
    finally:
        metrics_log.close()


def _report(label: str, summary: dict, out_dir) -> None:
    """The closing lines of a run; raise ``FloatingPointError`` when a seed's final parameters
    are non-finite (after the outputs are written)."""
    print(
        f"[{label}] greedy return over {summary['eval_episodes_per_seed']} episodes per seed: "
        f"mean {summary['final_return_mean']:.1f}, median {summary['final_return_median']:.1f}, "
        f"per seed {summary['final_return_per_seed']}"
    )
    print(
        f"[{label}] wall {summary['wall_seconds']:.1f}s = compile "
        f"{summary['compile_seconds']:.1f}s + run {summary['run_seconds']:.1f}s; wrote "
        f"{out_dir}/metrics.jsonl, summary.json, learning_curve.png"
    )
    skipped, params_finite = (
        summary["nonfinite_updates_per_seed"],
        summary["final_params_finite_per_seed"],
    )
    if any(skipped):
        print(
            f"[{label}] skipped non-finite updates per seed (parameters kept): {skipped}",
            flush=True,
        )
    if not all(params_finite):
        bad = [i for i, ok in enumerate(params_finite) if not ok]
        raise FloatingPointError(
            f"[{label}] the final parameters of seed(s) {bad} (of {summary['seeds']}) have "
            f"non-finite values; see {out_dir}/summary.json and metrics.jsonl (nonfinite per "
            "iteration)"
        )


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    """Settings of an experiment script's run (experiments/ppo_classic.py, trpo_classic.py).

    Attributes:
      seeds: seeds trained at once with vmap.
      seed: base random seed.
      out: output folder.
      progress_every: print a progress line every this many iterations (0 = none, which also
        lets the compilation cache keep the program: JAX does not cache host callbacks).
      compilation_cache: folder of JAX's persistent compilation cache (a second run with the
        same settings loads the compiled program instead of compiling it); none = off.
      log: metrics sinks, comma-separated: jsonl (out/metrics.jsonl, always written),
        tensorboard (out/tensorboard; pip install 'rljax[tensorboard]'), wandb (Weights &
        Biases; pip install 'rljax[wandb]'). The whole run is one compiled program, so the
        sinks receive every iteration's metrics (seed means) when it ends.
    """

    seeds: int = 10
    seed: int = 0
    out: str = "runs/classic"
    progress_every: int = 10
    compilation_cache: str | None = runs.DEFAULT_COMPILATION_CACHE
    log: str = "jsonl"

    def __post_init__(self):
        runs.parse_sinks(self.log)  # an unknown sink fails here, before the run
        validate = getattr(super(), "__post_init__", None)
        if validate is not None:  # a script's Config also inherits the algorithm's config
            validate()


def script_config(algorithm: str) -> type:
    """The settings of ``experiments/<algorithm>_classic.py`` (``"ppo"`` or ``"trpo"``): a
    frozen dataclass ``Config`` of the algorithm's run configuration
    (:class:`PPOClassicConfig` or :class:`TRPOClassicConfig`) and the
    :class:`ExperimentSettings`, whose output folder is ``runs/<algorithm>_classic``."""
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} unknown; valid choices: {list(_ALGORITHMS)}")
    doc = f"{algorithm.upper()} on a classic-control environment (defaults: the --env's preset)."
    return dataclasses.make_dataclass(
        "Config",
        [("out", str, dataclasses.field(default=f"runs/{algorithm}_classic"))],
        bases=(ExperimentSettings, _ALGORITHMS[algorithm][0]),
        frozen=True,
        namespace={"__doc__": doc, "__module__": __name__},
    )


def parse(config_class, argv: list[str] | None = None):
    """An experiment script's config from the command line (:func:`rljax.cli.parse`), with the
    preset of the environment given (``--env``, or ``env`` in ``--config FILE``) as the
    defaults: ``--env Acrobot-v1`` alone runs Acrobot's preset, and any setting given wins."""
    algorithm = _algorithm(config_class)
    return cli.parse(config_class, argv, defaults=lambda given: preset(given["env"], algorithm))


def main(config) -> dict:
    """The experiment scripts' driver: ``config`` is a :class:`PPOClassicConfig` or
    :class:`TRPOClassicConfig` with the :class:`ExperimentSettings`; writes it to
    ``out/config.json`` (``--config`` of that file runs the same experiment again), trains its
    seeds at once with :func:`run_experiment` and returns the summary."""
    # Eigen's intra-op threads for dots: these small MLPs gain nothing from them (measured: same
    # step time). The 0% CPU hangs once blamed on them were batched LAPACK QRs in the seeds'
    # network initialisation waiting on each other (fixed in make_networks). Takes effect when
    # JAX has not started its backend yet (a script's first computation is the run's).
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    runs.use_compilation_cache(config.compilation_cache)
    os.makedirs(config.out, exist_ok=True)
    cli.save_config(config, os.path.join(config.out, "config.json"))
    algorithm = _algorithm(type(config))
    config_class = _ALGORITHMS[algorithm][0]
    run_config = config_class(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(config_class)}
    )
    return run_experiment(
        algorithm,
        run_config,
        config.seeds,
        config.seed,
        config.out,
        config.progress_every,
        log=config.log,
    )


def _json_float(value) -> float | None:
    """A float for JSON; NaN (no episode finished yet) becomes null."""
    value = float(value)
    return value if value == value else None


def _plot_curve(history, label, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = history["env_steps"][0]
    returns = history["episode_return"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, curve in enumerate(returns):
        ax.plot(steps, curve, lw=0.8, alpha=0.5, label="seeds" if i == 0 else None)
    ax.plot(steps, np.mean(returns, axis=0), color="k", lw=2, label="mean over seeds")
    ax.set_xlabel("environment steps (per seed)")
    ax.set_ylabel("training episode return")
    ax.set_title(f"{label}: {returns.shape[0]} seed(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
