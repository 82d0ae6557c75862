"""PPO on classic control, the whole run compiled as one function and vmapped over seeds.

Defaults solve CartPole-v1 in 100k environment steps per seed, 10 seeds at once. Other
environments: `--env Acrobot-v1 | Pendulum-v1 | MountainCarContinuous-v0` (pure-JAX
implementations in rljax.envs, gymnasium's constants; each gets its preset from
rljax.classic.PPO_PRESETS), `probe-*` for debugging, or `gymnax:<id>` with
`pip install 'rljax[envs]'`. Settings may come from a file: `--config FILE` (YAML or JSON).

Run: `python experiments/ppo_classic.py [--env ENV] [--total-steps N] [--seeds N] [--out DIR]`.
Writes DIR/metrics.jsonl, DIR/summary.json and DIR/learning_curve.png.
"""

from __future__ import annotations

from rljax import classic

# The settings: PPOClassicConfig with the ExperimentSettings, out runs/ppo_classic.
Config = classic.script_config("ppo")
main = classic.main  # main(config) -> the summary


if __name__ == "__main__":
    main(classic.parse(Config))
