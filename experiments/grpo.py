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

Run: `python experiments/grpo.py [--data FILE --reward MOD:FN] [--model DIR] [--iterations N]`.
Writes DIR/metrics.jsonl, DIR/summary.json, DIR/training.png and DIR/policy (HF checkpoint).
"""

from __future__ import annotations

from rljax import cli, rl


def main(config: rl.grpo.GRPORunConfig) -> dict:
    return rl.grpo.run(config)


if __name__ == "__main__":
    main(cli.parse(rl.grpo.GRPORunConfig))
