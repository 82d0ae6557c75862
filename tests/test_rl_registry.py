"""The algorithm registry (:mod:`rljax.rl`): each name builds its run configuration with the
settings that make it that algorithm, overrides win over the preset, bad names fail with the
valid ones listed, and ``train`` hands a configuration to the driver of its class."""

from __future__ import annotations

import dataclasses

import pytest

from rljax import rl, updates

# What each name must mean, read from the built configuration (not from the preset table).
EXPECTED = {
    "ppo": lambda c: isinstance(c.ppo, updates.PPOConfig) and c.critic == "head",
    "ppo_critic": lambda c: isinstance(c.ppo, updates.PPOConfig) and c.critic == "separate",
    "trpo": lambda c: isinstance(c.trpo, updates.TRPOConfig) and c.critic == "separate",
    "grpo": lambda c: c.estimator == "grpo" and c.grpo.importance_sampling_level == "token",
    "dr_grpo": lambda c: c.estimator == "dr_grpo" and c.grpo.loss_type == "dr_grpo",
    "dapo": lambda c: (
        c.grpo.loss_type == "dapo"
        and c.grpo.clip_eps_high > c.grpo.clip_eps
        and c.dynamic_sampling
        and c.overlong == "soft"
    ),
    "gspo": lambda c: c.grpo.importance_sampling_level == "sequence",
    "cispo": lambda c: c.grpo.loss_type == "cispo" and c.grpo.clip_eps_high is not None,
    "rloo": lambda c: c.estimator == "rloo",
    "reinforce_pp": lambda c: c.estimator == "reinforce_pp",
    "online_dpo": lambda c: c.dpo_config().reference == "precomputed" and c.group_size >= 2,
}


def test_every_algorithm_is_named_once_and_builds_its_configuration():
    assert set(rl.ALGORITHMS) == set(EXPECTED)
    for name, entry in rl.ALGORITHMS.items():
        config = rl.config(name)
        assert type(config) is entry.config_class, name
        assert EXPECTED[name](config), (name, config)
        assert entry.description


def test_overrides_win_over_the_preset_and_reach_nested_configs():
    config = rl.config("dapo", clip_eps_high=0.3, iterations=3, beta=0.02)
    assert config.grpo.clip_eps_high == 0.3 and config.grpo.beta == 0.02
    assert config.iterations == 3 and config.dynamic_sampling  # the rest of the preset stays
    ppo_config = rl.config("ppo", clip_eps=0.1, kl_coef=0.2)
    assert ppo_config.ppo.clip_eps == 0.1 and ppo_config.kl_coef == 0.2
    # untouched nested fields keep the run configuration's defaults
    assert ppo_config.ppo.num_minibatches == rl.rlhf.PPORunConfig.ppo.num_minibatches
    assert rl.config("trpo", max_kl=0.01).trpo.max_kl == 0.01


def test_bad_names_and_values_fail_clearly():
    with pytest.raises(ValueError, match=r"unknown algorithm 'a2c'; valid: \['cispo'"):
        rl.config("a2c")
    with pytest.raises(ValueError, match=r"\['learning_rte'\] are not fields of GRPORunConfig"):
        rl.config("grpo", learning_rte=1e-3)
    with pytest.raises(ValueError, match=r"PPOConfig.clip_eps must be >= 0"):
        rl.config("ppo", clip_eps=-1.0)
    with pytest.raises(ValueError, match="--clip-eps-high"):  # cispo needs its cap
        rl.config("cispo", clip_eps_high=None)


def test_train_hands_the_configuration_to_its_driver(monkeypatch):
    calls = []
    for name in ("grpo", "ppo", "trpo"):
        entry = rl.ALGORITHMS[name]
        fake = lambda config, _name=name, **kw: calls.append((_name, type(config), kw)) or {}
        monkeypatch.setitem(rl.ALGORITHMS, name, dataclasses.replace(entry, run=fake))
    rl.train(rl.config("ppo"), label="x")
    rl.train(rl.config("trpo"))
    rl.train(rl.config("rloo"))  # a preset of the grpo driver's configuration
    assert [(n, t.__name__) for n, t, _ in calls] == [
        ("ppo", "PPORunConfig"),
        ("trpo", "TRPORunConfig"),
        ("grpo", "GRPORunConfig"),
    ]
    assert calls[0][2] == {"label": "x"}
    with pytest.raises(TypeError, match="no registered algorithm trains a GRPOConfig"):
        rl.train(updates.GRPOConfig())


def test_grpo_script_takes_an_algorithm_preset_that_flags_override(capsys):
    import importlib.util
    import pathlib
    import sys

    from rljax import cli

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "grpo.py"
    spec = importlib.util.spec_from_file_location("grpo_script", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules["grpo_script"] = script
    spec.loader.exec_module(script)
    parse = lambda *argv: cli.parse(script.Config, list(argv), defaults=script.preset)
    plain = parse()
    assert plain.algorithm == "grpo" and plain.estimator == "grpo" and not plain.dynamic_sampling
    dapo = parse("--algorithm", "dapo", "--clip-eps-high", "0.3")
    assert dapo.dynamic_sampling and dapo.overlong == "soft" and dapo.grpo.clip_eps_high == 0.3
    assert parse("--algorithm", "rloo").estimator == "rloo"
    with pytest.raises(SystemExit):
        parse("--algorithm", "ppo")  # the RLHF drivers' algorithm: not a preset of this script
    assert "--algorithm: must be one of" in capsys.readouterr().err


def test_readme_registry_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text[text.index("<!-- rl-registry-quickstart -->") :]
    code = after.split("```", 2)[1].split("\n", 1)[1]
    monkeypatch.chdir(tmp_path)  # the snippet writes runs/dapo
    exec(compile(code, "README.md", "exec"), {})
    summary = (tmp_path / "runs" / "dapo" / "summary.json").read_text()
    assert '"heldout_accuracy_after"' in summary
    assert "DAPO" in summary or "dapo" in summary
