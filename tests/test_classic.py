"""Whole-run training on classic control: probe environments whose exact values are known,
a short CartPole run that must learn, evaluation on a hand-made environment, configuration
checks and the experiment driver's outputs."""

import dataclasses
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_experiment

from rljax import classic, cli, envs, updates

ALGOS = {
    "ppo": (classic.PPOClassicConfig, classic.train_ppo),
    "trpo": (classic.TRPOClassicConfig, classic.train_trpo),
}
GAMMA = 0.9


def probe_config(algo: str, kind: str):
    """A small, fast setting under which both algorithms must solve every probe."""
    fast = (
        dict(learning_rate=1e-2, num_minibatches=4)
        if algo == "ppo"
        else dict(value_learning_rate=1e-2, critic_minibatches=4)
    )
    return classic.preset(
        f"probe-{kind}",
        algo,
        total_steps=16 * 8 * 30,
        num_envs=16,
        num_steps=8,
        hidden=16,
        gamma=GAMMA,
        **fast,
    )


def train_probe(algo: str, kind: str):
    config = probe_config(algo, kind)
    env, _ = envs.make(config.env)
    policy_fn, value_fn, _, _ = classic.make_networks(config, env)
    state, history, evaluation = jax.jit(lambda k: ALGOS[algo][1](config, k))(jax.random.key(0))
    if algo == "ppo":
        policy_params, value_params = state.params["policy"], state.params["value"]
    else:
        policy_params, value_params = state.params["policy"], state.params["value"]
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
    config = config_class(total_steps=30_000)  # CartPole-v1's preset, shortened
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


# Every environment's settings as `classic.resolve` filled them in before the presets became
# concrete configs (flat fields; 0.0 meant "off" for value_clip_eps and target_kl), so that the
# figures in benchmarks/RESULTS.md still reproduce. "probe-action" stands for every environment
# without a preset row.
OLD_PPO_FIELDS = (
    "total_steps", "num_envs", "num_steps", "gamma", "gae_lambda", "hidden", "log_std_init",
    "eval_episodes", "learning_rate", "anneal_lr", "max_grad_norm", "num_epochs",
    "num_minibatches", "clip_eps", "value_clip_eps", "value_coef", "entropy_coef", "target_kl",
)  # fmt: skip
OLD_PPO = {
    "CartPole-v1": (100000, 8, 128, 0.99, 0.95, 64, 0.0, 10,
                    0.002, True, 0.5, 8, 4, 0.2, 0.2, 0.5, 0.0, 0.0),
    "Acrobot-v1": (200000, 16, 128, 0.99, 0.95, 64, 0.0, 10,
                   0.0005, True, 0.5, 8, 8, 0.2, 0.2, 0.5, 0.01, 0.0),
    "Pendulum-v1": (400000, 16, 256, 0.95, 0.95, 64, 0.0, 10,
                    0.001, True, 0.5, 10, 16, 0.2, 0.0, 0.5, 0.0, 0.0),
    "MountainCarContinuous-v0": (400000, 16, 256, 0.99, 0.95, 64, 0.0, 10,
                                 0.001, True, 0.5, 10, 16, 0.2, 0.0, 0.5, 0.0, 0.0),
    "probe-action": (100000, 16, 128, 0.99, 0.95, 64, 0.0, 10,
                     0.0005, True, 0.5, 8, 8, 0.2, 0.2, 0.5, 0.01, 0.0),
}  # fmt: skip
OLD_TRPO_FIELDS = (
    "total_steps", "num_envs", "num_steps", "gamma", "gae_lambda", "hidden", "log_std_init",
    "eval_episodes", "max_kl", "cg_iters", "cg_damping", "fvp_subsample", "value_learning_rate",
    "n_critic_updates", "critic_minibatches",
)  # fmt: skip
OLD_TRPO = {
    "CartPole-v1": (100000, 8, 128, 0.99, 0.95, 64, 0.0, 10, 0.02, 10, 0.1, 1, 0.001, 10, 8),
    "Acrobot-v1": (200000, 16, 128, 0.99, 0.95, 64, 0.0, 10, 0.02, 10, 0.1, 1, 0.001, 10, 8),
    "Pendulum-v1": (400000, 16, 256, 0.95, 0.95, 64, 0.0, 10, 0.02, 10, 0.1, 1, 0.001, 10, 16),
    "MountainCarContinuous-v0": (400000, 16, 256, 0.99, 0.95, 64, 0.0, 10,
                                 0.02, 10, 0.1, 1, 0.001, 10, 16),
    "probe-action": (100000, 16, 128, 0.99, 0.95, 64, 0.0, 10, 0.02, 10, 0.1, 1, 0.001, 10, 8),
}  # fmt: skip


def old_run_config(algo: str, env: str):
    """The run the old code made of its flat resolved settings: the same values, and the
    update config train_ppo/train_trpo built from them (0.0 -> None for value_clip_eps and
    target_kl; flat_params on)."""
    run = ("eval_episodes", "hidden", "log_std_init", "num_envs", "num_steps", "total_steps")
    if algo == "ppo":
        old = dict(zip(OLD_PPO_FIELDS, OLD_PPO[env], strict=True))
        update = updates.PPOConfig(
            clip_eps=old["clip_eps"],
            value_clip_eps=old["value_clip_eps"] or None,
            value_coef=old["value_coef"],
            entropy_coef=old["entropy_coef"],
            num_epochs=old["num_epochs"],
            num_minibatches=old["num_minibatches"],
            target_kl=old["target_kl"] or None,
        )
        own = dict(learning_rate=old["learning_rate"], anneal_lr=old["anneal_lr"])
        own |= dict(max_grad_norm=old["max_grad_norm"], ppo=update)
        config_class = classic.PPOClassicConfig
    else:
        old = dict(zip(OLD_TRPO_FIELDS, OLD_TRPO[env], strict=True))
        names = ("max_kl", "cg_iters", "cg_damping", "fvp_subsample", "n_critic_updates")
        update = updates.TRPOConfig(
            **{k: old[k] for k in names},
            critic_minibatches=old["critic_minibatches"],
            flat_params=True,
        )
        own = dict(value_learning_rate=old["value_learning_rate"], trpo=update)
        config_class = classic.TRPOClassicConfig
    return config_class(
        env=env, gamma=old["gamma"], lam=old["gae_lambda"], **{k: old[k] for k in run}, **own
    )


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
@pytest.mark.parametrize("env", list(OLD_PPO))
def test_presets_equal_the_settings_the_results_were_measured_with(algo, env):
    assert set(OLD_PPO) - {"probe-action"} == set(classic.PPO_PRESETS) == set(classic.TRPO_PRESETS)
    expected = old_run_config(algo, env)
    got = classic.preset(env, algo)
    assert type(got) is type(expected)
    for name, value in cli.as_dict(expected).items():  # nested configs as dicts
        assert cli.as_dict(got)[name] == value, (env, name)
    assert got == expected


def test_dataclass_defaults_are_cartpoles_preset():
    assert classic.PPOClassicConfig() == classic.preset("CartPole-v1", "ppo")
    assert classic.TRPOClassicConfig() == classic.preset("CartPole-v1", "trpo")
    assert classic.TRPOClassicConfig().trpo.flat_params  # classic's small MLPs: one flat vector
    assert classic.PPOClassicConfig().lam == 0.95  # one name for GAE's lambda (advantages.gae)


def test_preset_overrides_name_nested_fields_flat_and_steps_round_up():
    config = classic.preset("Acrobot-v1", "ppo", total_steps=3000, clip_eps=0.1, target_kl=0.02)
    assert config.env == "Acrobot-v1" and config.learning_rate == 5e-4  # Acrobot's
    assert config.ppo == updates.PPOConfig(
        clip_eps=0.1, entropy_coef=0.01, num_epochs=8, num_minibatches=8, target_kl=0.02
    )
    assert config.steps_per_iteration == config.num_envs * config.num_steps == 2048
    assert config.num_iterations == -(-3000 // config.steps_per_iteration)
    assert config.env_steps >= 3000 > config.env_steps - config.steps_per_iteration
    trpo_config = classic.preset("Pendulum-v1", "trpo", max_kl=0.05)
    assert trpo_config.gamma == 0.95 and trpo_config.trpo.max_kl == 0.05
    assert trpo_config.trpo.critic_minibatches == 16


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: classic.preset("CartPole-v0"), "valid choices"),
        (lambda: classic.preset("CartPole-v1", "a2c"), r"algorithm 'a2c' unknown"),
        (lambda: classic.preset(learning_rat=1e-3), "PPOClassicConfig has no field 'learning_rat'"),
        (
            lambda: classic.preset(num_minibatches=3),
            r"num_minibatches=3 \(--num-minibatches\) must divide the batch of num_envs \* "
            "num_steps = 1024 rows",
        ),
        (lambda: classic.preset(algorithm="trpo", critic_minibatches=7), "critic_minibatches=7"),
        (lambda: classic.PPOClassicConfig(total_steps=0), "total_steps must be > 0"),
        (lambda: classic.PPOClassicConfig(gamma=1.5), r"gamma must be in \(0, 1\]"),
        (lambda: classic.PPOClassicConfig(lam=-0.1), r"PPOClassicConfig.lam must be in \[0, 1\]"),
        (lambda: classic.preset(algorithm="trpo", max_kl=0.0), "TRPOConfig.max_kl must be > 0"),
        (lambda: classic.preset(target_kl=0.0), "PPOConfig.target_kl must be > 0 or none"),
        (lambda: classic.PPOClassicConfig(eval_episodes=0), "eval_episodes must be > 0"),
    ],
)
def test_bad_settings_raise_naming_the_field(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def with_preset(config, preset, **values):
    """``config`` (a script's Config) with every setting of ``preset``, then ``values``."""
    settings = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)}
    return dataclasses.replace(config, **{**settings, **values})


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_script_flags_default_to_the_envs_preset(algo, tmp_path, capsys):
    script = load_experiment(f"{algo}_classic")
    assert classic.parse(script.Config, []) == script.Config()  # CartPole-v1's preset
    assert script.Config().out == f"runs/{algo}_classic"
    acrobot = classic.parse(script.Config, ["--env", "Acrobot-v1", "--seeds", "2"])
    assert acrobot == with_preset(script.Config(), classic.preset("Acrobot-v1", algo), seeds=2)
    given = ["--env", "Pendulum-v1", "--num-envs", "4", "--gamma", "0.9"]
    pendulum = classic.parse(script.Config, given)
    assert pendulum == with_preset(
        script.Config(), classic.preset("Pendulum-v1", algo), num_envs=4, gamma=0.9
    )  # the flags given win over the preset
    # a file's env picks the preset too, its settings win over the preset, flags over both
    (tmp_path / "run.yaml").write_text("env: Pendulum-v1\nnum_steps: 64\nseeds: 3\n")
    flags = ["--config", str(tmp_path / "run.yaml"), "--seeds", "5"]
    assert classic.parse(script.Config, flags) == with_preset(
        script.Config(), classic.preset("Pendulum-v1", algo), num_steps=64, seeds=5
    )
    with pytest.raises(SystemExit):
        classic.parse(script.Config, ["--env", "Acrobot-v1", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: 200000)" in help_text and "(default: 100000)" not in help_text
    with pytest.raises(SystemExit):
        classic.parse(script.Config, ["--env", "CartPole-v0"])
    assert "unknown environment 'CartPole-v0'" in capsys.readouterr().err


def test_scripts_are_one_driver(monkeypatch, tmp_path):
    """Both scripts hand their config to classic.main, which stores it in out/config.json (it
    parses back to the same config) and runs the algorithm's part of it with the script's
    settings (seeds, out, ...)."""
    calls = []
    monkeypatch.setattr(
        classic, "run_experiment", lambda *args, **kw: calls.append((*args, kw)) or {}
    )
    monkeypatch.setenv("XLA_FLAGS", "")
    for algo in ("ppo", "trpo"):
        script = load_experiment(f"{algo}_classic")
        out = str(tmp_path / algo)
        flags = ["--env", "Acrobot-v1", "--seeds", "3", "--seed", "7", "--out", out,
                 "--progress-every", "2", "--compilation-cache", "none",
                 "--num-steps", "64"]  # fmt: skip
        config = classic.parse(script.Config, flags)
        script.main(config)
        expected = classic.preset("Acrobot-v1", algo, num_steps=64)
        assert calls.pop() == (algo, expected, 3, 7, out, 2, {"log": "jsonl"})
        again = classic.parse(script.Config, ["--config", f"{out}/config.json"])
        assert again == config
    assert "--xla_cpu_multi_thread_eigen=false" in classic.os.environ["XLA_FLAGS"]


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
    config = classic.preset(
        "probe-action", "ppo", total_steps=1000, num_envs=8, num_steps=16, hidden=8
    )
    summary = classic.run_experiment(
        "ppo", config, seeds=2, seed=0, out=str(tmp_path), log="jsonl,tensorboard"
    )
    out = capsys.readouterr().out
    assert config.env_steps == 1024 != config.total_steps
    assert "rounded up to whole iterations" in out
    assert f"iteration {config.num_iterations}/{config.num_iterations}" in out
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
    assert [r["step"] for r in rows] == [r["iteration"] for r in rows]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # --log tensorboard


def test_run_experiment_rejects_zero_seeds_and_another_algorithms_config(tmp_path):
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        classic.run_experiment("ppo", classic.PPOClassicConfig(), 0, 0, str(tmp_path))
    with pytest.raises(ValueError, match=r"run_experiment\('trpo', ...\) got a PPOClassicConfig"):
        classic.run_experiment("trpo", classic.PPOClassicConfig(), 1, 0, str(tmp_path))


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
    config = classic.preset(env_name, "ppo")
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
    config = classic.preset(env_name, "ppo")
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
    config = classic.preset(
        "probe-action", "ppo", total_steps=256, num_envs=8, num_steps=16, hidden=8
    )
    classic.run_experiment("ppo", config, seeds=1, seed=0, out=str(tmp_path), progress_every=0)
    out = capsys.readouterr().out
    assert "iteration " not in out and "greedy return" in out
    assert "callback" not in lowered[0]
    classic.run_experiment("ppo", config, seeds=1, seed=0, out=str(tmp_path), progress_every=1)
    assert "callback" in lowered[1]
