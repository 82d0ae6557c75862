"""RLHF with TRPO: a natural-gradient step in a KL trust region on a policy LM, with jvp-based
Gauss-Newton Fisher-vector products, conjugate gradient and a KL line search.

With no flags: the built-in "sort the letters" task (rljax.tasks.sorting), as in
experiments/ppo_rlhf.py: the same rollouts, reward shaping (per-token KL penalty to the
reference) and token GAE, with a separate critic model fitted after each policy step
(--critic none: group-relative advantages over --samples-per-prompt, no critic). Flags:
--model, --reward-model, --prompts, --max-kl, --kl-target, --mesh, --out. Running again with
the same --out resumes.

Run: `python experiments/trpo_rlhf.py [--model DIR] [--reward-model DIR] [--mesh SPEC] [--out DIR]`;
it writes what experiments/ppo_rlhf.py writes (metrics, summary, plot and policy/).
"""

from __future__ import annotations

from rljax import cli, rl

# The settings (flags: python experiments/trpo_rlhf.py --help).
Config = rl.rlhf.TRPORunConfig
main = rl.rlhf.run  # main(config) -> the summary

if __name__ == "__main__":
    main(cli.parse(Config))
