"""GRPO-family RL with verifiable rewards: sample a group of completions per prompt, score them
with Python reward functions, and update the policy on group-relative advantages.

With no flags: the built-in arithmetic word problems (rljax.tasks.arithmetic, GSM8K's format:
an answer ending in "#### N") and their small shipped base model; the rewards are exact-match
accuracy of the final answer (weight 1) and a format reward (weight 0.1). The loss is DAPO's
token-level aggregation (rljax.rlhf.policy_loss; --loss-type grpo|bnpo|dr_grpo|dapo|cispo,
--importance-sampling-level sequence for GSPO, --clip-eps-high for clip-higher, --beta for a KL
term), advantages GRPO's group mean/std (--estimator). Held-out greedy accuracy and the KL to
the reference are measured before and after.

Your own data and rewards: --data FILE (a prompt field, text or chat messages, plus the fields
your functions read) and --reward MODULE:FUNCTION[=WEIGHT] (repeatable; MODULE on PYTHONPATH
or a path to a .py file), each function called as fn(prompts, completions, **columns) and
returning one float (or None) per completion. --model DIR takes a Hugging Face checkpoint
folder. Running again with the same --out resumes.

`--algorithm dr_grpo|dapo|gspo|cispo|rloo|reinforce_pp` starts from that algorithm's preset in
the registry (rljax.rl.ALGORITHMS) instead of GRPO's; any flag still overrides it.

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
