"""Iterative (online) Direct Preference Optimization: the loop of the seed's Figure 2.

Each round samples ``--samples-per-prompt`` completions per training prompt from the current
policy, lets the judge label the best and the worst one as a pair (the built-in task's
programmatic oracle, or a reward model folder given with --judge), and trains DPO on those
pairs, with the policy at the start of the round as the reference (--reference-policy initial
keeps the base model). After each round the policy's samples on held-out prompts are compared
with the base model's (the oracle's win-rate). With no flags: the built-in "sort the letters"
task and its tiny base model. --data takes a prompt file of your own (rows with a prompt field;
JSONL, JSON, parquet or a datasets folder) with --judge DIR, which then also rates the
win-rate. The same --out resumes: finished rounds are loaded from their saved policy, an
unfinished round continues from its last checkpoint.

Run: `python experiments/iterative_dpo.py [--rounds N] [--model DIR] [--judge DIR] [--out DIR]`.
Writes DIR/rounds.jsonl, DIR/summary.json, DIR/win_rate.png, and per round DIR/round_R/
(metrics.jsonl, samples.jsonl, pairs.jsonl, policy/). The driver is
rljax.experiment.train_iterative_dpo.
"""

from __future__ import annotations

from rljax import cli, experiment

# The settings (flags: python experiments/iterative_dpo.py --help).
Config = experiment.IterativeDPORunConfig
main = experiment.train_iterative_dpo  # main(config) -> the summary


if __name__ == "__main__":
    main(cli.parse(Config))
