"""ORPO, CPO or SimPO of a language model on preference pairs: preference optimization with no
reference model (--method orpo, cpo or simpo).

With no flags: ORPO on the built-in "sort the letters" task (rljax.tasks.sorting), the same
oracle-labelled pairs and tiny base model as experiments/dpo.py; the held-out evaluation reports
TRL's metrics (reward accuracy and margin, the chosen NLL, ORPO's log odds) and the oracle's
win-rate of the policy's samples over the initial model's. --data takes TRL's preference
formats, --model a Hugging Face checkpoint folder.

Run: `python experiments/orpo.py [--method orpo|cpo|simpo] [--model DIR] [--data FILE]
[--out DIR]`; it writes what experiments/dpo.py writes. The driver is
rljax.experiment.train_reference_free.
"""

from __future__ import annotations

from rljax import cli, experiment

# The settings (flags: python experiments/orpo.py --help).
Config = experiment.ReferenceFreeRunConfig
main = experiment.train_reference_free  # main(config) -> the summary


if __name__ == "__main__":
    main(cli.parse(Config))
