"""Train a Bradley-Terry reward model on preference pairs (the first stage of classic RLHF).

With no flags: the built-in "sort the letters" task. The reward model is the tiny base model's
backbone with a fresh scalar head read at the last token (rljax.models.transformer.with_head),
trained on generated pairs labelled by the programmatic oracle; the held-out evaluation reports
the pairwise accuracy and margin, and, for the built-in task, the rank correlation between the
reward model's scores and the oracle's on held-out completions. --model takes a Hugging Face
causal-LM folder (or a one-label *ForSequenceClassification reward model to fine-tune), --data a
preference file, --mesh a device mesh, --log tensorboard,wandb more metrics sinks; the same
--out resumes from the last checkpoint. Runs over several processes like experiments/dpo.py
(python -m rljax.launch; process 0 writes).

Run: `python experiments/reward_model.py [--model DIR] [--data FILE] [--mesh SPEC] [--out DIR]`.
Writes DIR/metrics.jsonl, DIR/summary.json, DIR/training.png and DIR/reward_model (an HF
*ForSequenceClassification checkpoint that rljax.models.hf.load_model(..., head="reward") and
transformers' AutoModelForSequenceClassification load); for the built-in task DIR/samples.jsonl
(held-out completions with both scores). The driver is rljax.experiment.train_reward_model.
"""

from __future__ import annotations

from rljax import cli, experiment

# The settings (flags: python experiments/reward_model.py --help).
Config = experiment.RewardModelRunConfig
main = experiment.train_reward_model  # main(config) -> the summary


if __name__ == "__main__":
    main(cli.parse(Config))
