"""TRPO on classic control, the whole run compiled as one function and vmapped over seeds.

Defaults solve CartPole-v1 in 100k environment steps per seed, 10 seeds at once. Other
environments: `--env Acrobot-v1 | Pendulum-v1 | MountainCarContinuous-v0` (pure-JAX
implementations in rljax.envs, gymnasium's constants), `probe-*` for debugging, or
`gymnax:<id>` with `pip install 'rljax[envs]'`. Hyperparameters left at `none` come from
the environment's preset in rljax.classic.

Run: `python experiments/trpo_classic.py [--env ENV] [--total-steps N] [--seeds N] [--out DIR]`.
Writes DIR/metrics.jsonl, DIR/summary.json and DIR/learning_curve.png.
"""

from __future__ import annotations

import dataclasses
import os

# Eigen's intra-op threads for dots: these small MLPs gain nothing from them (measured: same
# step time). The 0% CPU hangs once blamed on them were batched LAPACK QRs in the seeds'
# network initialisation waiting on each other (fixed in rljax.classic.make_networks). Set
# before jax starts its backend.
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()

from rljax import classic, cli, runs


@dataclasses.dataclass(frozen=True)
class Config(classic.TRPOClassicConfig):
    """TRPO on a classic-control environment.

    Attributes:
      seeds: seeds trained at once with vmap.
      seed: base random seed.
      out: output folder.
      progress_every: print a progress line every this many iterations (0 = none, which also
        lets the compilation cache keep the program: JAX does not cache host callbacks).
      compilation_cache: folder of JAX's persistent compilation cache (a second run with the
        same settings loads the compiled program instead of compiling it); none = off.
    """

    seeds: int = 10
    seed: int = 0
    out: str = "runs/trpo_classic"
    progress_every: int = 10
    compilation_cache: str | None = runs.DEFAULT_COMPILATION_CACHE


def main(config: Config) -> dict:
    runs.use_compilation_cache(config.compilation_cache)
    algo_fields = {f.name for f in dataclasses.fields(classic.TRPOClassicConfig)}
    algo_config = classic.TRPOClassicConfig(
        **{k: v for k, v in dataclasses.asdict(config).items() if k in algo_fields}
    )
    return classic.run_experiment(
        "trpo", algo_config, config.seeds, config.seed, config.out, config.progress_every
    )


if __name__ == "__main__":
    main(cli.parse(Config))
