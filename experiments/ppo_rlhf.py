"""RLHF with PPO: a policy LM, a reward (model or oracle), a KL penalty to the reference and a
value head.

With no flags: the built-in "sort the letters" task (rljax.tasks.sorting). Its tiny base model is
the reference and the starting policy; the programmatic oracle scores the samples (0 for a
non-permutation, else the fraction of ordered letter pairs). Each iteration samples 64
completions, scores them, shapes the rewards with a per-token KL penalty to the reference and
runs PPO epochs with a value head on the policy. Held-out evaluations report the mean score and
the sequence KL to the reference. Flags: --model (a Hugging Face checkpoint folder),
--reward-model (a reward-model folder, e.g. from experiments/reward_model.py), --prompts,
--critic head|separate|none (none: group-relative advantages over --samples-per-prompt),
--kl-target (adaptive KL controller), --mesh, --out. Running again with the same --out resumes.

Run: `python experiments/ppo_rlhf.py [--model DIR] [--reward-model DIR] [--mesh SPEC] [--out DIR]`.
Writes DIR/metrics.jsonl, DIR/summary.json, DIR/training.png and DIR/policy (HF checkpoint).
"""

from __future__ import annotations

from rljax import cli, rl

# The settings (flags: python experiments/ppo_rlhf.py --help).
Config = rl.rlhf.PPORunConfig
main = rl.rlhf.run  # main(config) -> the summary

if __name__ == "__main__":
    main(cli.parse(Config))
