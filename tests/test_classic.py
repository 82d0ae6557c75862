"""Whole-run training on classic control: probe environments whose exact values are known,
a short CartPole run that must learn, evaluation on a hand-made environment, configuration
checks and the experiment driver's outputs."""

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax import classic, envs

ALGOS = {
    "ppo": (classic.PPOClassicConfig, classic.train_ppo),
    "trpo": (classic.TRPOClassicConfig, classic.train_trpo),
}
GAMMA = 0.9


def probe_config(algo: str, kind: str):
    """A small, fast setting under which both algorithms must solve every probe."""
    config_class, _ = ALGOS[algo]
    fast = (
        dict(learning_rate=1e-2, num_minibatches=4)
        if algo == "ppo"
        else dict(value_learning_rate=1e-2, critic_minibatches=4)
    )
    return classic.resolve(
        config_class(
            env=f"probe-{kind}",
            total_steps=16 * 8 * 30,
            num_envs=16,
            num_steps=8,
            hidden=16,
            gamma=GAMMA,
            **fast,
        )
    )


def train_probe(algo: str, kind: str):
    config = probe_config(algo, kind)
    env, _ = envs.make(config.env)
    policy_fn, value_fn, _, _ = classic.make_networks(config, env)
    state, history, evaluation = jax.jit(lambda k: ALGOS[algo][1](config, k))(jax.random.key(0))
    if algo == "ppo":
        policy_params, value_params = state.params["policy"], state.params["value"]
    else:
        policy_params, value_params = state.policy_params, state.value_params
    obs = jnp.array([[-1.0], [0.0], [1.0]])
    values = np.asarray(value_fn(value_params, obs))
    p_action_1 = np.asarray(jax.nn.softmax(policy_fn(policy_params, obs), axis=-1)[:, 1])
    return values, p_action_1, history, evaluation


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
@pytest.mark.parametrize("kind", envs.Probe.KINDS)
def test_probe_environments_are_solved(algo, kind):
    """rejax-style probes: each isolates one part of the pipeline (value regression, the
    discount in GAE/returns, the policy gradient, observation-conditioned credit)."""
    values, p_action_1, history, evaluation = train_probe(algo, kind)
    v_minus, v_zero, v_plus = values
    if kind == "constant":  # V = 1 at the only observation, 0
        assert abs(v_zero - 1.0) < 0.05
    elif kind == "observation":  # V(s) = s
        assert abs(v_minus + 1.0) < 0.05 and abs(v_plus - 1.0) < 0.05
    elif kind == "discount":  # V(s0) = gamma, V(s1) = 1: reward 1 one step later
        assert abs(v_zero - GAMMA) < 0.05 and abs(v_plus - 1.0) < 0.05
    elif kind == "action":  # action 1 pays 1, action 0 pays 0
        assert p_action_1[1] > 0.95
        assert float(evaluation["mean_return"]) == 1.0
    else:  # the right action depends on the observation
        assert p_action_1[0] < 0.05 and p_action_1[2] > 0.95
        assert float(evaluation["mean_return"]) == 1.0
    # Every iteration ends episodes (1 or 2 steps long), so training returns are all finite.
    assert np.all(np.isfinite(history["episode_return"]))
    assert np.all(history["episodes"] > 0)


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_short_cartpole_run_learns(algo):
    """CI-sized run on a fixed seed: a random policy scores about 22; training must get far
    beyond it (a loose threshold, not a timing)."""
    config_class, train = ALGOS[algo]
    config = classic.resolve(config_class(total_steps=30_000))
    _, history, evaluation = jax.jit(lambda k: train(config, k))(jax.random.key(0))
    returns = np.asarray(history["episode_return"])
    assert returns.shape == (config.num_iterations,)
    np.testing.assert_array_equal(
        history["env_steps"], np.arange(1, config.num_iterations + 1) * config.steps_per_iteration
    )
    assert np.mean(returns[:3]) < 60
    assert float(evaluation["mean_return"]) > 150, evaluation["returns"]
    assert np.mean(returns[-3:]) > 100


def test_train_vmaps_over_seeds_like_separate_runs():
    config = probe_config("ppo", "observation_action")
    keys = jax.random.split(jax.random.key(1), 2)
    train = lambda k: classic.train_ppo(config, k)
    _, together, _ = jax.jit(jax.vmap(train))(keys)
    _, alone, _ = jax.jit(train)(keys[1])
    # vmap batches the matmuls, so XLA reduces in a different order; float32 rounding then
    # grows over the iterations (seen: 1e-4 relative after 5). A seed mix-up differs by far more.
    for name in ("episode_return", "policy/approxkl", "val/error", "env_steps"):
        np.testing.assert_allclose(together[name][1], alone[name], rtol=1e-3, atol=1e-6)
    assert not np.allclose(together["val/error"][0], alone["val/error"], rtol=1e-2)


class RampState(NamedTuple):
    time: jax.Array


class RampParams(NamedTuple):
    max_steps: int


class RampEnv:
    """Reward = step index (1, 2, ...) when action 1 is taken, 0 otherwise; terminates after
    ``horizon`` steps, and the time limit ``params.max_steps`` truncates before that."""

    observation_size = 1
    num_actions = 2
    continuous = False

    def __init__(self, horizon):
        self.horizon = horizon

    def reset(self, key, params):
        return jnp.zeros((1,), jnp.float32), RampState(jnp.int32(0))

    def step(self, key, state, action, params):
        time = state.time + 1
        reward = jnp.where(action == 1, time, 0).astype(jnp.float32)
        terminated = time >= self.horizon
        truncated = (time >= envs.time_limit(params)) & ~terminated
        return time.astype(jnp.float32)[None], RampState(time), reward, terminated, truncated, {}


def prefer_action_1(params, obs):
    return jnp.broadcast_to(jnp.array([0.0, 2.0]), (*obs.shape[:-1], 2))


@pytest.mark.parametrize(("horizon", "max_steps", "expected"), [(4, 10, 10.0), (10, 3, 6.0)])
def test_evaluate_counts_whole_episodes_only(horizon, max_steps, expected):
    """Greedy evaluation sums rewards until termination or the time limit, and nothing after
    (the scan runs max_steps steps; a terminated episode must stop counting)."""
    env, params = RampEnv(horizon), RampParams(max_steps)
    result = jax.jit(
        lambda k: classic.evaluate(env, params, prefer_action_1, None, k, num_episodes=5)
    )(jax.random.key(0))
    np.testing.assert_array_equal(result["returns"], expected)
    np.testing.assert_array_equal(result["lengths"], min(horizon, max_steps))
    assert float(result["mean_return"]) == expected


def test_sampled_evaluation_follows_the_policy():
    """p(action 1) = sigmoid(2) ~ 0.881 per step; over 2000 one-step episodes the mean return
    of sampled evaluation must match it, while greedy always takes action 1."""
    env, params = RampEnv(1), RampParams(1)
    sampled = classic.evaluate(
        env, params, prefer_action_1, None, jax.random.key(3), num_episodes=2000, greedy=False
    )
    p = 1.0 / (1.0 + np.exp(-2.0))
    assert abs(float(sampled["mean_return"]) - p) < 4 * np.sqrt(p * (1 - p) / 2000)
    greedy = classic.evaluate(env, params, prefer_action_1, None, jax.random.key(3), 20)
    assert float(greedy["mean_return"]) == 1.0


def test_resolve_fills_presets_and_rounds_steps_up():
    config = classic.resolve(classic.PPOClassicConfig(total_steps=3000, learning_rate=1e-3))
    preset = {**classic.PPO_PRESETS["CartPole-v1"]}
    assert config.learning_rate == 1e-3  # an explicit value wins over the preset
    assert config.num_envs == preset["num_envs"] and config.num_epochs == preset["num_epochs"]
    assert config.steps_per_iteration == config.num_envs * config.num_steps
    assert config.num_iterations == -(-3000 // config.steps_per_iteration)
    assert config.env_steps >= 3000 > config.env_steps - config.steps_per_iteration
    trpo_config = classic.resolve(classic.TRPOClassicConfig(env="Pendulum-v1"))
    assert trpo_config.gamma == 0.95 and trpo_config.max_kl > 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (classic.PPOClassicConfig(env="CartPole-v0"), "valid choices"),
        (classic.PPOClassicConfig(num_minibatches=3), "num_minibatches=3 must divide"),
        (classic.TRPOClassicConfig(critic_minibatches=7), "critic_minibatches=7 must divide"),
        (classic.PPOClassicConfig(total_steps=0), "total_steps must be > 0"),
        (classic.PPOClassicConfig(gamma=1.5), r"gamma must be in \(0, 1\]"),
        (classic.TRPOClassicConfig(max_kl=0.0), "max_kl must be > 0"),
        (classic.PPOClassicConfig(eval_episodes=0), "eval_episodes must be > 0"),
    ],
)
def test_resolve_rejects_bad_configs(config, message):
    with pytest.raises(ValueError, match=message):
        classic.resolve(config)


def test_progress_prints_once_per_iteration_when_all_seeds_reported(capsys):
    progress = classic.Progress("PPO probe", num_seeds=2, num_iterations=4, every=2)
    for iteration in range(4):
        progress(iteration, (iteration + 1) * 10, float(iteration))
        assert capsys.readouterr().out == ""  # waits for the second seed
        progress(iteration, (iteration + 1) * 10, float("nan") if iteration == 0 else 2.0)
        out = capsys.readouterr().out
        if iteration in (1, 3):
            assert f"iteration {iteration + 1}/4" in out
            assert f"env steps {(iteration + 1) * 10}/seed" in out
            assert f"training return mean {(iteration + 2.0) / 2:.1f}" in out
        else:
            assert out == ""


def test_run_experiment_writes_metrics_summary_and_figure(tmp_path, capsys):
    config = classic.PPOClassicConfig(
        env="probe-action", total_steps=1000, num_envs=8, num_steps=16, hidden=8
    )
    summary = classic.run_experiment("ppo", config, seeds=2, seed=0, out=str(tmp_path))
    out = capsys.readouterr().out
    resolved = classic.resolve(config)
    assert resolved.env_steps == 1024 != config.total_steps
    assert "rounded up to whole iterations" in out
    assert f"iteration {resolved.num_iterations}/{resolved.num_iterations}" in out
    assert "greedy return over 10 episodes per seed" in out
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    for field in ("final_return_mean", "final_return_per_seed", "total_steps"):
        assert field in on_disk
    assert on_disk["wall_seconds"] >= on_disk["compile_seconds"] > 0
    assert on_disk["total_steps"] == 1024 and on_disk["requested_total_steps"] == 1000
    assert len(on_disk["final_return_per_seed"]) == 2
    assert on_disk["final_return_mean"] == pytest.approx(np.mean(on_disk["final_return_per_seed"]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == [128 * (i + 1) for i in range(8)]
    assert all(len(r["episode_return_per_seed"]) == 2 for r in rows)
    assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_run_experiment_rejects_zero_seeds(tmp_path):
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        classic.run_experiment("ppo", classic.PPOClassicConfig(), 0, 0, str(tmp_path))


class GymnaxStyleParams(NamedTuple):
    max_steps_in_episode: int


def test_time_limit_reads_rljax_and_gymnax_params():
    assert envs.time_limit(RampParams(7)) == 7
    assert envs.time_limit(GymnaxStyleParams(9)) == 9
    result = classic.evaluate(
        RampEnv(100), GymnaxStyleParams(4), prefer_action_1, None, jax.random.key(0), 3
    )
    np.testing.assert_array_equal(result["returns"], 1 + 2 + 3 + 4)
    with pytest.raises(ValueError, match="max_steps_in_episode"):
        envs.time_limit(object())


def _primitive_inputs(jaxpr, name):
    """Input avals of every ``name`` equation in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            found.append([v.aval for v in eqn.invars])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _primitive_inputs(inner, name)
    return found


@pytest.mark.parametrize("env_name", ["CartPole-v1", "Pendulum-v1"])
def test_network_init_under_vmap_takes_one_key_at_a_time(env_name):
    # Batched over seeds, the orthogonal initialisation's QRs went to jaxlib's batched LAPACK
    # kernels, and several of them at once could wait forever on XLA:CPU's thread pool.
    config = classic.resolve(classic.PPOClassicConfig(env=env_name))
    env, _ = envs.make(env_name)
    _, _, init_policy, init_value = classic.make_networks(config, env)
    keys = jax.random.split(jax.random.key(0), 3)
    for init in (init_policy, init_value):
        qr_inputs = _primitive_inputs(jax.make_jaxpr(jax.vmap(init))(keys).jaxpr, "qr")
        assert qr_inputs and all(aval.ndim == 2 for (aval,) in qr_inputs)
        batched = jax.jit(jax.vmap(init))(keys)
        for i, key in enumerate(keys):
            jax.tree.map(
                lambda b, s, i=i: np.testing.assert_array_equal(b[i], s), batched, init(key)
            )
    nested = jax.vmap(jax.vmap(init_value))(keys.reshape(1, 3))
    assert jax.tree.leaves(nested)[0].shape[:2] == (1, 3)


@pytest.mark.parametrize("env_name", ["CartPole-v1", "Pendulum-v1"])
def test_collect_samples_as_step_by_step_sampling(env_name):
    # collect() draws all per-step noise before its scan; the actions must be those of
    # sample_action (i.e. jax.random.categorical / mean + std * normal) with the same keys.
    config = classic.resolve(classic.PPOClassicConfig(env=env_name))
    env, params = envs.make(env_name)
    policy_fn, _, init_policy, _ = classic.make_networks(config, env)
    policy_params = init_policy(jax.random.key(1))
    carry = envs.init_carry(env, params, jax.random.key(2), 4)
    key = jax.random.key(3)
    _, traj = envs.collect(env, params, policy_fn, policy_params, carry, key, 5)
    obs = traj["obs"]  # [envs, steps, ...]
    for t, step_key in enumerate(jax.random.split(key, 5)):
        k_act = jax.random.split(step_key, 3)[0]
        expected = envs.sample_action(k_act, policy_fn(policy_params, obs[:, t]))
        np.testing.assert_allclose(traj["actions"][:, t], expected, rtol=1e-6, atol=1e-6)
    logits = jnp.log(jnp.array([[0.2, 0.5, 0.3]] * 6))
    for k in jax.random.split(key, 20):
        assert np.array_equal(envs.sample_action(k, logits), jax.random.categorical(k, logits))


def test_run_experiment_without_progress_has_no_host_callback(tmp_path, capsys, monkeypatch):
    # progress_every=0: no progress lines and no callback in the compiled program (which is
    # what lets JAX's persistent compilation cache keep it).
    lowered = []
    original = classic.compile_lowered

    def spy(low, env_steps=None):
        lowered.append(low.as_text())
        return original(low, env_steps)

    monkeypatch.setattr(classic, "compile_lowered", spy)
    config = classic.PPOClassicConfig(
        env="probe-action", total_steps=256, num_envs=8, num_steps=16, hidden=8
    )
    classic.run_experiment("ppo", config, seeds=1, seed=0, out=str(tmp_path), progress_every=0)
    out = capsys.readouterr().out
    assert "iteration " not in out and "greedy return" in out
    assert "callback" not in lowered[0]
    classic.run_experiment("ppo", config, seeds=1, seed=0, out=str(tmp_path), progress_every=1)
    assert "callback" in lowered[1]
