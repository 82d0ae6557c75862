"""Flags from config dataclasses (:mod:`rljax.cli`): plain fields, ``X | None``, booleans,
nested algorithm configs (flat and dotted flags, defaults from the run config's default),
repeatable ``tuple[str, ...]`` fields, configuration files (YAML/JSON, a run folder's
config.json) and defaults computed from the values given."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import pathlib
import re
import sys

import pytest

from rljax import classic, cli, runs

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Algo:
    """Algorithm.

    Attributes:
      clip_eps: clip range.
      loss_type: which loss.
    """

    clip_eps: float = 0.2
    loss_type: str = "dapo"

    def __post_init__(self):
        if self.clip_eps <= 0:
            raise ValueError(f"--clip-eps: must be > 0, got {self.clip_eps}")


@dataclasses.dataclass(frozen=True)
class Run:
    """Run.

    Attributes:
      steps: how many.
      seed: none = random.
      reward: reward specs.
      verbose: chatty.
      algo: the algorithm.
    """

    steps: int = 3
    seed: int | None = None
    reward: tuple[str, ...] = ("a:b",)
    verbose: bool = False
    algo: Algo = dataclasses.field(default_factory=lambda: Algo(loss_type="grpo"))


def test_defaults_come_from_the_dataclasses():
    assert cli.parse(Run, []) == Run()
    assert cli.parse(Run, []).algo.loss_type == "grpo"  # the run config's default, not Algo's


def test_nested_and_repeatable_flags():
    config = cli.parse(
        Run,
        ["--steps", "5", "--seed", "none", "--reward", "m:f=2", "--reward", "x.py:g",
         "--verbose", "--clip-eps", "0.3", "--loss-type", "bnpo"],
    )  # fmt: skip
    assert config == Run(
        steps=5, seed=None, reward=("m:f=2", "x.py:g"), verbose=True, algo=Algo(0.3, "bnpo")
    )


def test_nested_validation_error_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.parse(Run, ["--clip-eps", "-1"])
    assert "--clip-eps: must be > 0" in capsys.readouterr().err


def test_a_flag_declared_twice_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Clash:
        clip_eps: float = 0.1
        algo: Algo = dataclasses.field(default_factory=Algo)

    with pytest.raises(TypeError, match="--clip-eps"):
        cli.parse(Clash, [])


# ---------------------------------------------------------------- dotted flags and --help


def test_dotted_flags_name_nested_fields():
    assert cli.parse(Run, ["--algo.clip-eps", "0.3", "--algo.loss-type", "bnpo"]) == cli.parse(
        Run, ["--clip-eps", "0.3", "--loss-type", "bnpo"]
    )
    assert cli.parse(Run, ["--algo.clip-eps", "0.3"]).algo == Algo(0.3, "grpo")


def test_help_lists_every_field_with_its_default_and_doc(capsys):
    with pytest.raises(SystemExit):
        cli.parse(Run, ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--config FILE" in out
    assert "--steps STEPS how many. (default: 3)" in out
    assert "--clip-eps CLIP_EPS, --algo.clip-eps CLIP_EPS clip range. (default: 0.2)" in out
    assert "--loss-type LOSS_TYPE, --algo.loss-type LOSS_TYPE which loss. (default: grpo)" in out
    assert "--verbose, --no-verbose chatty. (default: False)" in out
    assert "(repeatable; default: ['a:b'])" in out


# ---------------------------------------------------------------- configuration files


def test_a_yaml_file_gives_defaults_and_flags_override_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "steps: 7\n"
        "seed: 4\n"
        "reward: [m:f, g:h=2]\n"
        "verbose: true\n"
        "algo:\n"
        "  clip_eps: 1e-1   # PyYAML reads this as a string; it is a float field\n"
    )
    config = cli.parse(Run, ["--config", str(path)])
    assert config == Run(7, 4, ("m:f", "g:h=2"), True, Algo(0.1, "grpo"))
    config = cli.parse(Run, ["--steps", "9", "--config", str(path), "--no-verbose"])
    assert config == Run(9, 4, ("m:f", "g:h=2"), False, Algo(0.1, "grpo"))
    assert cli.parse(Run, ["--config", str(path), "--reward", "x:y"]).reward == ("x:y",)


def test_a_json_file_takes_flat_and_dotted_keys(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"clip_eps": 0.5, "algo.loss_type": "bnpo", "seed": None}))
    assert cli.parse(Run, ["--config", str(path)]) == Run(seed=None, algo=Algo(0.5, "bnpo"))
    path.write_text(json.dumps({"seed": "none", "steps": 4.0}))  # integral float: an int
    assert cli.parse(Run, ["--config", str(path)]) == Run(steps=4, seed=None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stepz: 3\n", "unknown key 'stepz' (not a setting of Run; did you mean 'steps'?"),
        ("algo:\n  clip_epz: 0.1\n", "unknown key 'algo.clip_epz' (not a setting of Algo"),
        ("algo: 3\n", "key 'algo' must be a section of settings"),
        ("steps: many\n", "key 'steps' must be an integer, got 'many'"),
        ("steps: 2.5\n", "key 'steps' must be an integer, got 2.5"),
        ("verbose: 1\n", "key 'verbose' must be true or false, got 1"),
        ("algo: {clip_eps: [1]}\n", "key 'algo.clip_eps' must be a number, got [1]"),
        ("algo: {loss_type: 3}\n", "key 'algo.loss_type' must be a string, got 3"),
        ("reward: [1, 2]\n", "key 'reward' must be a list of str, got [1, 2]"),
        ("- steps\n", "expected a mapping of settings, got a list"),
        ("steps: [\n", "not valid YAML"),
    ],
)
def test_file_errors_name_the_key_and_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        cli.parse(Run, ["--config", str(path)])
    err = capsys.readouterr().err
    assert f"--config {path}" in err
    assert message in err


def test_a_missing_file_and_a_failed_check_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.parse(Run, ["--config", str(tmp_path / "nowhere.yaml")])
    assert f"--config {tmp_path / 'nowhere.yaml'}: no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"clip_eps": -1')
    with pytest.raises(SystemExit):
        cli.parse(Run, ["--config", str(tmp_path / "bad.json")])
    assert "bad.json: not valid JSON: Expecting" in capsys.readouterr().err
    (tmp_path / "negative.yaml").write_text("algo: {clip_eps: -1}\n")
    with pytest.raises(SystemExit):
        cli.parse(Run, ["--config", str(tmp_path / "negative.yaml")])
    assert "--clip-eps: must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_a_saved_config_parses_back_equal(tmp_path, suffix):
    config = Run(5, None, ("m:f=2", "x.py:g"), True, Algo(0.25, "bnpo"))
    path = cli.save_config(config, tmp_path / f"config{suffix}")
    assert cli.as_dict(config) == {
        "steps": 5,
        "seed": None,
        "reward": ["m:f=2", "x.py:g"],
        "verbose": True,
        "algo": {"clip_eps": 0.25, "loss_type": "bnpo"},
    }
    assert cli.parse(Run, ["--config", str(path)]) == config
    assert path.read_text().startswith("{" if suffix == ".json" else "steps: 5")


def test_a_run_folders_config_json_reads_back(tmp_path):
    """rljax.runs.RunFolder stores ``{"config": asdict(config), ...}`` in ``out/config.json``
    (experiment.in_run_folder passes dataclasses.asdict); ``--config`` of it gives the config
    back, also after a resume with --allow-config-change added its history."""
    config = Run(6, 2, ("m:f",), True, Algo(0.3, "bnpo"))
    with runs.RunFolder(tmp_path, dataclasses.asdict(config)):
        pass
    stored = tmp_path / runs.CONFIG_FILE
    assert cli.parse(Run, ["--config", str(stored)]) == config
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)  # saved progress: a resume
    changed = dataclasses.replace(config, steps=8)
    with pytest.warns(UserWarning, match="changed settings"):
        with runs.RunFolder(tmp_path, dataclasses.asdict(changed), allow_change=True):
            pass
    assert {"config", "original_config", "changes"} == set(json.loads(stored.read_text()))
    assert cli.parse(Run, ["--config", str(stored)]) == changed


# ---------------------------------------------------------------- defaults from a callable


def test_defaults_callable_sees_the_given_values_and_loses_to_file_and_flags(tmp_path, capsys):
    seen = []

    def by_seed(given):
        seen.append(dict(given))
        return Run(steps=10 * (given["seed"] or 0), algo=Algo(0.5, "preset"))

    assert cli.parse(Run, ["--seed", "3"], defaults=by_seed) == Run(30, 3, algo=Algo(0.5, "preset"))
    assert seen[-1]["seed"] == 3 and seen[-1]["clip_eps"] == 0.2  # flat names
    flags = ["--seed", "2", "--clip-eps", "0.4"]
    assert cli.parse(Run, flags, defaults=by_seed) == Run(20, 2, algo=Algo(0.4, "preset"))
    (tmp_path / "seed.yaml").write_text("seed: 5\nalgo: {loss_type: file}\n")
    flags = ["--config", str(tmp_path / "seed.yaml")]
    assert cli.parse(Run, flags, defaults=by_seed) == Run(50, 5, algo=Algo(0.5, "file"))
    with pytest.raises(SystemExit):
        cli.parse(Run, ["--seed", "4", "--help"], defaults=by_seed)
    out = " ".join(capsys.readouterr().out.split())
    assert "how many. (default: 40)" in out and "clip range. (default: 0.5)" in out


def test_defaults_may_be_a_part_of_the_config_and_their_errors_are_usage_errors(capsys):
    def algo_only(given):
        if given["loss_type"] == "bad":
            raise ValueError("no preset for loss_type 'bad'")
        return Algo(clip_eps=0.7)

    assert cli.parse(Run, [], defaults=algo_only) == Run(algo=Algo(0.7, "dapo"))
    with pytest.raises(SystemExit):
        cli.parse(Run, ["--loss-type", "bad"], defaults=algo_only)
    assert "no preset for loss_type 'bad'" in capsys.readouterr().err

    @dataclasses.dataclass(frozen=True)
    class Other:
        unknown: int = 1

    with pytest.raises(TypeError, match=r"Other has fields \['unknown'\] that Run lacks"):
        cli.parse(Run, [], defaults=lambda given: Other())


def test_replace_reaches_nested_fields_by_flat_name():
    assert cli.replace(Run(), clip_eps=0.3, steps=1) == Run(steps=1, algo=Algo(0.3, "grpo"))
    with pytest.raises(TypeError, match="Run has no field 'clip'"):
        cli.replace(Run(), clip=0.3)
    with pytest.raises(ValueError, match="--clip-eps: must be > 0"):
        cli.replace(Run(), clip_eps=-1.0)


def test_a_field_named_config_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Clash:
        config: str = "x"

    with pytest.raises(TypeError, match="--config is also the config-file flag"):
        cli.parse(Clash, [])


def test_a_field_without_default_is_a_required_flag_a_file_may_supply(tmp_path, capsys):
    @dataclasses.dataclass(frozen=True)
    class Needs:
        name: str
        steps: int = 1

    with pytest.raises(SystemExit):
        cli.parse(Needs, [])
    assert "the following arguments are required: --name" in capsys.readouterr().err
    assert cli.parse(Needs, ["--name", "a"]) == Needs("a")
    (tmp_path / "needs.yaml").write_text("name: b\n")
    assert cli.parse(Needs, ["--conf", str(tmp_path / "needs.yaml")]) == Needs("b")  # abbreviated


def script_config(path: pathlib.Path):
    """The config class a script parses (``cli.parse(X)``/``classic.parse(X)`` in it) and the
    parse function it uses."""
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    found = re.search(r"\b(cli|classic)\.parse\(([\w.]+)", path.read_text())
    assert found, f"{path} does not parse its config with rljax.cli"
    config_class = functools.reduce(getattr, found.group(2).split("."), module)
    return config_class, {"cli": cli.parse, "classic": classic.parse}[found.group(1)]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "experiments").glob("*.py")))
def test_every_scripts_config_saves_and_parses_back(script, tmp_path, capsys):
    config_class, parse = script_config(ROOT / "experiments" / script)
    config = parse(config_class, [])
    for suffix in (".yaml", ".json"):
        path = cli.save_config(config, tmp_path / f"config{suffix}")
        assert parse(config_class, ["--config", str(path)]) == config
    with pytest.raises(SystemExit):
        parse(config_class, ["--help"])
    assert "--config FILE" in capsys.readouterr().out
