"""GRPO-family RL with verifiable rewards: sample a group of completions per prompt, score them
with Python reward functions, update the policy on group-relative advantages.

With no flags: the built-in arithmetic word problems (rljax.tasks.arithmetic, GSM8K's format)
and their shipped base model, rewarded for exact-match accuracy (1) and format (0.1); DAPO's
token-level loss, GRPO's group mean/std advantages; held-out greedy accuracy and the KL to the
reference before and after. Your own data and rewards: --data FILE (a prompt field plus the
fields your functions read) and --reward MODULE:FUNCTION[=WEIGHT] (repeatable), each called as
fn(prompts, completions, **columns) -> one float (or None) per completion; --model DIR any
supported Hugging Face folder. --algorithm dr_grpo|dapo|gspo|cispo|rloo|reinforce_pp starts
from that registry preset (rljax.rl.ALGORITHMS); flags override it. The same --out resumes.

Run: `python experiments/grpo.py [--algorithm NAME] [--data FILE --reward MOD:FN] [--model DIR]`.
Writes DIR/metrics.jsonl, DIR/summary.json, DIR/training.png and DIR/policy (HF checkpoint).
"""

from __future__ import annotations

import dataclasses

from rljax import cli, rl

FAMILY = sorted(n for n, a in rl.ALGORITHMS.items() if a.config_class is rl.grpo.GRPORunConfig)


@dataclasses.dataclass(frozen=True)
class Config(rl.grpo.GRPORunConfig):
    """GRPO-family RL with reward functions.

    Attributes:
      algorithm: the registry preset (rljax.rl.ALGORITHMS) whose settings are the defaults:
        grpo, dr_grpo, dapo, gspo, cispo, rloo or reinforce_pp; flags and --config override it.
    """

    algorithm: str = "grpo"

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm not in FAMILY:
            raise ValueError(f"--algorithm: must be one of {FAMILY}, got {self.algorithm!r}")


def preset(given: dict) -> rl.grpo.GRPORunConfig:
    """The flag defaults of ``--algorithm`` (its registry preset)."""
    name = given.get("algorithm", "grpo")
    if name not in FAMILY:
        raise ValueError(f"--algorithm: must be one of {FAMILY}, got {name!r}")
    return rl.config(name)


def main(config: Config) -> dict:
    return rl.grpo.run(config)


if __name__ == "__main__":
    main(cli.parse(Config, defaults=preset))
