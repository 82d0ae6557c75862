"""Flags from config dataclasses (:mod:`rljax.cli`): plain fields, ``X | None``, booleans,
nested algorithm configs (flags of their own, defaults from the run config's default) and
repeatable ``tuple[str, ...]`` fields."""

from __future__ import annotations

import dataclasses

import pytest

from rljax import cli


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
      seed: none = preset.
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
