"""Peer timing: Stable-Baselines3 PPO and sb3-contrib TRPO on gymnasium classic control.

Runs in a throwaway venv, never as an rljax dependency (see benchmarks/RESULTS.md)::

    python3 -m venv /tmp/sb3 && /tmp/sb3/bin/pip install torch==2.13.0 \
        stable-baselines3 sb3-contrib gymnasium
    /tmp/sb3/bin/python benchmarks/peers/sb3_classic.py ppo CartPole-v1 100000 --seed 0

Hyperparameters are rl-baselines3-zoo's tuned ones (hyperparams/ppo.yml, trpo.yml). Prints
one JSON line: wall seconds of model construction + learn(), and the greedy return over 10
evaluation episodes.
"""

import argparse
import json
import time

import torch

torch.set_num_threads(2)

import gymnasium as gym  # noqa: E402
from sb3_contrib import TRPO  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402

ZOO = {
    ("ppo", "CartPole-v1"): dict(
        n_envs=8,
        kwargs=dict(
            n_steps=32,
            batch_size=256,
            gae_lambda=0.8,
            gamma=0.98,
            n_epochs=20,
            ent_coef=0.0,
            learning_rate=lambda f: 1e-3 * f,
            clip_range=lambda f: 0.2 * f,
        ),
    ),
    ("trpo", "CartPole-v1"): dict(
        n_envs=2,
        kwargs=dict(
            n_steps=512,
            batch_size=512,
            cg_damping=1e-3,
            gae_lambda=0.98,
            gamma=0.99,
            learning_rate=1e-3,
            n_critic_updates=20,
        ),
    ),
    ("trpo", "Pendulum-v1"): dict(
        n_envs=2,
        kwargs=dict(n_steps=1024, gamma=0.9, n_critic_updates=15, use_sde=True, sde_sample_freq=4),
    ),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("algo", choices=["ppo", "trpo"])
    parser.add_argument("env")
    parser.add_argument("steps", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setting = ZOO[(args.algo, args.env)]
    start = time.perf_counter()
    env = make_vec_env(args.env, n_envs=setting["n_envs"], seed=args.seed)
    cls = PPO if args.algo == "ppo" else TRPO
    model = cls("MlpPolicy", env, seed=args.seed, device="cpu", **setting["kwargs"])
    model.learn(total_timesteps=args.steps)
    wall = time.perf_counter() - start
    eval_env = gym.make(args.env)
    mean, _ = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    print(
        json.dumps(
            dict(
                peer=f"sb3 {args.algo}",
                env=args.env,
                steps=args.steps,
                seed=args.seed,
                wall_seconds=round(wall, 2),
                greedy_return=round(float(mean), 1),
            )
        )
    )


if __name__ == "__main__":
    main()
