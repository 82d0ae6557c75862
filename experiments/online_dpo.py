"""Online DPO: sample completions from the current policy, let reward functions pick the better
and the worse of each prompt's samples, take a DPO step on those pairs, repeat.

With no flags: the built-in arithmetic word problems and their shipped base model (as
experiments/grpo.py), judged by the exact-match accuracy (1) and format (0.1) rewards; each
prompt's best and worst of 4 samples make a pair (prompts whose samples all score the same are
replaced by new ones), the reference is the initial model (--ref-update-every N copies the
policy into it every N iterations); held-out greedy accuracy and the KL to the reference before
and after. Your own prompts, judge and model: --data FILE --reward MODULE:FUNCTION[=WEIGHT]
--model DIR, as for experiments/grpo.py. The same --out resumes.

Run: `python experiments/online_dpo.py [--data FILE --reward MOD:FN] [--model DIR] [--out DIR]`.
Writes DIR/metrics.jsonl, DIR/summary.json, DIR/training.png and DIR/policy (HF checkpoint).
The driver is rljax.rl.online_dpo.run.
"""

from __future__ import annotations

from rljax import cli, rl

# The settings (flags: python experiments/online_dpo.py --help).
Config = rl.online_dpo.OnlineDPORunConfig
main = rl.online_dpo.run  # main(config) -> the summary


if __name__ == "__main__":
    main(cli.parse(Config))
