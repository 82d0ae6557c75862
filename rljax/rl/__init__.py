"""RL on language models: the drivers, and one registry of the algorithms they run.

* :mod:`rljax.rl.rollout`: the rollout stage (sampling plus the trainer's forward passes),
  shared by every algorithm and by evaluation.
* :mod:`rljax.rl.loop`: the iteration loop every driver shares (resume, logging, evaluation,
  checkpoints, the non-finite stop).
* :mod:`rljax.rl.grpo`: the GRPO family on reward functions (verifiable rewards): collect
  (with DAPO dynamic sampling), shape (group advantages, overlong handling, truncated
  importance sampling), the GRPO-family update.
* :mod:`rljax.rl.online_dpo`: online DPO on the same collect stage: each group's best and
  worst completion by reward make a DPO pair.
* :mod:`rljax.rl.rlhf`: PPO and TRPO with KL-penalised rewards from the built-in oracle or a
  reward model, with a value head, a separate critic or group baselines.

:data:`ALGORITHMS` names each algorithm once, with the run configuration it is trained by and
the settings that make it that algorithm (a preset over the configuration's defaults)::

    config = rljax.rl.config("dr_grpo", iterations=10, out="runs/x")  # preset + overrides
    summary = rljax.rl.train(config)

Overrides name fields by their flag names (the fields of a nested update config too:
``config("ppo", clip_eps=0.1)`` sets ``PPORunConfig.ppo.clip_eps``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from rljax import cli
from rljax.rl import grpo, online_dpo, rlhf

__all__ = ["ALGORITHMS", "Algorithm", "config", "train"]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One registry entry: the run configuration class, the preset (flat field names ->
    values) that makes the configuration this algorithm, the driver that trains it, and a
    one-line description with its reference."""

    config_class: type
    preset: Mapping[str, Any]
    run: Callable[..., dict[str, Any]]
    description: str


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(
        rlhf.PPORunConfig,
        {"critic": "head"},
        rlhf.run,
        "PPO with a value head on the policy and KL-penalised rewards (Ouyang et al., 2022)",
    ),
    "ppo_critic": Algorithm(
        rlhf.PPORunConfig,
        {"critic": "separate"},
        rlhf.run,
        "PPO with a separate critic model (TRL's PPOTrainer layout)",
    ),
    "trpo": Algorithm(
        rlhf.TRPORunConfig,
        {"critic": "separate"},
        rlhf.run,
        "TRPO natural step in a KL trust region, separate critic (Schulman et al., 2015)",
    ),
    "grpo": Algorithm(
        grpo.GRPORunConfig,
        {"estimator": "grpo"},
        grpo.run,
        "GRPO: group mean/std advantages (Shao et al., 2024), TRL's default dapo aggregation",
    ),
    "dr_grpo": Algorithm(
        grpo.GRPORunConfig,
        {"estimator": "dr_grpo", "loss_type": "dr_grpo"},
        grpo.run,
        "Dr. GRPO: no std scaling, constant length normaliser (Liu et al., 2025)",
    ),
    "dapo": Algorithm(
        grpo.GRPORunConfig,
        {
            "loss_type": "dapo",
            "clip_eps_high": 0.28,
            "dynamic_sampling": True,
            "overlong": "soft",
        },
        grpo.run,
        "DAPO: clip-higher, dynamic sampling, token-level loss, soft overlong penalty "
        "(Yu et al., 2025)",
    ),
    "gspo": Algorithm(
        grpo.GRPORunConfig,
        {
            "importance_sampling_level": "sequence",
            "loss_type": "grpo",
            "clip_eps": 3e-4,
            "clip_eps_high": 4e-4,
        },
        grpo.run,
        "GSPO: sequence-level importance ratios and clipping (Zheng et al., 2025)",
    ),
    "cispo": Algorithm(
        grpo.GRPORunConfig,
        {"loss_type": "cispo", "clip_eps_high": 5.0},
        grpo.run,
        "CISPO: clipped importance-sampling weights, stop-gradient (MiniMax-M1, 2025)",
    ),
    "rloo": Algorithm(
        grpo.GRPORunConfig,
        {"estimator": "rloo"},
        grpo.run,
        "RLOO: leave-one-out group baseline (Ahmadian et al., 2024)",
    ),
    "reinforce_pp": Algorithm(
        grpo.GRPORunConfig,
        {"estimator": "reinforce_pp"},
        grpo.run,
        "REINFORCE++: batch-normalised advantages (Hu, 2025)",
    ),
    "online_dpo": Algorithm(
        online_dpo.OnlineDPORunConfig,
        {},
        online_dpo.run,
        "Online DPO: best vs worst of the policy's samples ranked by the reward functions, one "
        "DPO step per batch (Guo et al., 2024)",
    ),
}


def config(name: str, **overrides):
    """The run configuration of algorithm ``name``: its config class's defaults, then the
    algorithm's preset, then ``overrides`` (flag names; a nested update config's fields by
    their own names). Unknown names raise, listing the valid ones.

    Example::

        >>> import rljax.rl
        >>> c = rljax.rl.config("dapo", iterations=5, clip_eps_high=0.3)
        >>> c.iterations, c.dynamic_sampling, c.overlong, c.grpo.loss_type, c.grpo.clip_eps_high
        (5, True, 'soft', 'dapo', 0.3)
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {sorted(ALGORITHMS)}")
    entry = ALGORITHMS[name]
    names = cli.flat_names(entry.config_class)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(
            f"rljax.rl.config({name!r}): {unknown} are not fields of "
            f"{entry.config_class.__name__}; valid: {sorted(names)}"
        )
    return cli.replace(entry.config_class(), **{**entry.preset, **overrides})


def train(run_config, **kwargs) -> dict[str, Any]:
    """Train ``run_config`` (from :func:`config`, or any run configuration of a registered
    algorithm) with its driver; returns the run's summary."""
    for entry in ALGORITHMS.values():
        if isinstance(run_config, entry.config_class):  # a script's subclass too
            return entry.run(run_config, **kwargs)
    classes = sorted({e.config_class.__name__ for e in ALGORITHMS.values()})
    raise TypeError(
        f"rljax.rl.train: no registered algorithm trains a {type(run_config).__name__}; "
        f"run configurations: {classes}"
    )
