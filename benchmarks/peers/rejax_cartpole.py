"""Peer timing: rejax PPO on gymnax CartPole-v1 with rejax's tuned configs/gymnax/cartpole.yaml.

Runs in a throwaway venv, never as an rljax dependency (rejax needs gymnax 0.0.x)::

    python3 -m venv /tmp/rejax && /tmp/rejax/bin/pip install rejax "gymnax<0.1"
    /tmp/rejax/bin/python benchmarks/peers/rejax_cartpole.py --eval-freq 1000 --seeds 1

Prints one JSON line: compile and run seconds (the whole run is one jitted, vmapped call) and
the final evaluation return per seed (rejax's own evaluation, mean over its episodes).
"""

import argparse
import json
import time

import jax
import numpy as np
from rejax import get_algo

CONFIG = dict(  # rejax configs/gymnax/cartpole.yaml, ppo section
    env="CartPole-v1",
    agent_kwargs=dict(activation="tanh"),
    num_envs=5,
    num_steps=100,
    num_epochs=5,
    num_minibatches=5,
    learning_rate=0.00075,
    max_grad_norm=0.5,
    total_timesteps=100_000,
    gamma=0.99,
    gae_lambda=0.95,
    clip_eps=0.2,
    ent_coef=0.01,
    vf_coef=0.5,
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-freq", type=int, default=1000, help="the yaml's value is 1000")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    cls = get_algo("ppo")
    start = time.perf_counter()
    algo = cls.create(**CONFIG, eval_freq=args.eval_freq)
    keys = jax.random.split(jax.random.PRNGKey(0), args.seeds)
    compiled = jax.jit(jax.vmap(cls.train, in_axes=(None, 0))).lower(algo, keys).compile()
    compiled_at = time.perf_counter()
    _, (_, returns) = jax.block_until_ready(compiled(algo, keys))
    end = time.perf_counter()
    print(
        json.dumps(
            dict(
                peer="rejax ppo",
                eval_freq=args.eval_freq,
                seeds=args.seeds,
                compile_seconds=round(compiled_at - start, 2),
                run_seconds=round(end - compiled_at, 2),
                wall_seconds=round(end - start, 2),
                final_return_per_seed=np.asarray(returns)[:, -1].mean(-1).round(1).tolist(),
            )
        )
    )


if __name__ == "__main__":
    main()
