"""Direct Preference Optimization of a language model on preference pairs.

With no flags: the built-in "sort the letters" task (rljax.tasks.sorting). Its tiny base model,
warmed up on random permutations (a valid but unsorted reference policy), is trained with DPO on
generated pairs labelled by the programmatic oracle; the held-out evaluation reports TRL's
reward metrics and the oracle's win-rate of the policy's samples over the reference's. Flags
take a Hugging Face checkpoint folder (--model), a data file (--data) and a mesh (--mesh
data=2,fsdp=2,tensor=2); --log tensorboard,wandb adds metrics sinks. Running again with the
same --out resumes from the last checkpoint. Several processes (`python -m rljax.launch
--processes 2 -- python experiments/dpo.py --mesh ...`, or one process per host of a cluster)
train one model over all their devices; process 0 writes the outputs.

Run: `python experiments/dpo.py [--model DIR] [--data FILE] [--mesh SPEC] [--out DIR]`.
Writes DIR/metrics.jsonl, DIR/summary.json, DIR/training.png, DIR/policy (HF checkpoint) and,
for the built-in task, DIR/samples.jsonl. The driver is rljax.experiment.train_dpo.
"""

from __future__ import annotations

from rljax import cli, experiment

# The settings (flags: python experiments/dpo.py --help).
Config = experiment.DPORunConfig
main = experiment.train_dpo  # main(config) -> the summary


if __name__ == "__main__":
    main(cli.parse(Config))
