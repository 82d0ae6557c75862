"""TRPO on classic control, the whole run compiled as one function and vmapped over seeds.

The TRPO twin of experiments/ppo_classic.py: the same environments, flags (--config FILE, --log)
and outputs, each environment's TRPO preset (rljax.classic.TRPO_PRESETS) as the defaults; with
no flags it solves CartPole-v1 in 100k environment steps per seed, 10 seeds at once.

Run: `python experiments/trpo_classic.py [--env ENV] [--max-kl X] [--seeds N] [--out DIR]`.
"""

from __future__ import annotations

from rljax import classic

# The settings: TRPOClassicConfig with the ExperimentSettings, out runs/trpo_classic.
Config = classic.script_config("trpo")
main = classic.main  # main(config) -> the summary


if __name__ == "__main__":
    main(classic.parse(Config))
