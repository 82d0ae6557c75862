"""Supervised fine-tuning (TRL's SFTTrainer) with sequence packing.

With no flags: the built-in arithmetic task. Its shipped base model was warmed up on
demonstrations with format noise (it often ends with "The answer is N." instead of "#### N");
here it is fine-tuned on clean demonstrations (prompt/completion, loss on the completion only),
packed several per row (rljax.data.pack: segment ids, attention within each demonstration,
positions restarting), and the held-out loss falls while the greedy strict accuracy on held-out
problems rises. --model takes a Hugging Face causal-LM folder, --data a file in one of TRL's SFT
formats (text, prompt/completion, messages), --no-packing pads one demonstration per row,
--mesh a device mesh, --log tensorboard,wandb more metrics sinks; the same --out resumes from
the last checkpoint.

Run: `python experiments/sft.py [--model DIR] [--data FILE] [--no-packing] [--out DIR]`.
Writes DIR/metrics.jsonl, DIR/summary.json, DIR/training.png and DIR/model (a Hugging Face
checkpoint). The driver is rljax.experiment.train_sft.
"""

from __future__ import annotations

from rljax import cli, experiment

# The settings (flags: python experiments/sft.py --help).
Config = experiment.SFTRunConfig
main = experiment.train_sft  # main(config) -> the summary


if __name__ == "__main__":
    main(cli.parse(Config))
