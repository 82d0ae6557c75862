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

import dataclasses

from rljax import classic


@dataclasses.dataclass(frozen=True)
class Config(classic.ExperimentSettings, classic.PPOClassicConfig):
    """PPO on a classic-control environment (defaults: the --env's preset)."""

    out: str = "runs/ppo_classic"


def main(config: Config) -> dict:
    return classic.main(config)


if __name__ == "__main__":
    main(classic.parse(Config))
