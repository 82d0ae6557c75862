"""KTO (Kahneman-Tversky Optimization) of a language model on unpaired completions.

With no flags: the built-in "sort the letters" task (rljax.tasks.sorting). Its oracle-labelled
pairs are split into unpaired rows (chosen -> label true, rejected -> label false), its tiny
base model is trained with KTO (each batch's KL reference point from its prompts paired with
the batch's other completions, as TRL's KTOTrainer builds them), and the held-out evaluation
reports TRL's KTO metrics and the oracle's win-rate of the policy's samples over the
reference's. --data takes TRL's unpaired format (prompt, completion, label).

Run: `python experiments/kto.py [--model DIR] [--data FILE] [--mesh SPEC] [--out DIR]`; it
writes what experiments/dpo.py writes (metrics, summary, plot, policy/ and, for the built-in
task, samples). The driver is rljax.experiment.train_kto.
"""

from __future__ import annotations

from rljax import cli, experiment

# The settings (flags: python experiments/kto.py --help).
Config = experiment.KTORunConfig
main = experiment.train_kto  # main(config) -> the summary


if __name__ == "__main__":
    main(cli.parse(Config))
