"""TRPO's trust region, drawn on a real policy and batch (the seed paper's Figure 1).

An MLP policy learns CartPole-v1 with TRPO for a few iterations; on the next on-policy batch
we walk along two directions from the current parameters and record the surrogate
improvement L(theta + t * step) - L(theta) and the exact mean KL(pi_old || pi_new):

* the TRPO (natural-gradient) step, sqrt(2 delta / s^T F s) s with s = F^-1 g from conjugate
  gradient, the step whose quadratic KL model equals delta at t = 1;
* the plain gradient g, scaled the same way (its quadratic KL also equals delta at t = 1).

The figure shows both curves, the KL bound delta, the shaded trust region {KL <= delta} along
the natural direction, and the point the backtracking line search accepted.

Run: ``python experiments/trust_region.py`` (about a minute on a laptop CPU). Writes
``OUT/trust_region.png``, ``OUT/curves.json`` and ``OUT/summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rljax import classic, cli, envs, runs, trpo, updates
from rljax.models.mlp import Actor, Critic, pure


@dataclasses.dataclass(frozen=True)
class Config:
    """TRPO trust-region figure on CartPole-v1.

    Attributes:
      num_envs: environments stepped in parallel.
      num_steps: steps per environment per batch.
      warmup_iterations: TRPO iterations before the batch that is drawn.
      trpo: the TRPO update's settings (rljax.updates.TRPOConfig: max_kl, the trust-region
        radius delta; cg_iters and cg_damping of the conjugate gradient; fvp_method,
        gauss_newton or hessian; the critic fit: 5 updates of 4 minibatches).
      gamma: discount.
      lam: GAE lambda.
      max_scale: right end of the x axis, in units of the full TRPO step.
      num_points: points per curve.
      seed: random seed.
      out: output folder.
      log: metrics sinks of the warm-up iterations, comma-separated: jsonl
        (out/metrics.jsonl, always written), tensorboard, wandb (see rljax.runs).
    """

    num_envs: int = 16
    num_steps: int = 128
    warmup_iterations: int = 8
    trpo: updates.TRPOConfig = dataclasses.field(
        default_factory=lambda: updates.TRPOConfig(critic_minibatches=4, n_critic_updates=5)
    )
    gamma: float = 0.99
    lam: float = 0.97
    max_scale: float = 3.0
    num_points: int = 61
    seed: int = 0
    out: str = "runs/trust_region"
    log: str = "jsonl"

    def __post_init__(self):
        runs.parse_sinks(self.log)  # an unknown sink fails here, before the run


def main(config: Config) -> dict:
    start = time.perf_counter()
    env = envs.CartPole()
    env_params = env.default_params()
    key = jax.random.key(config.seed)
    k_actor, k_critic, k_env, k_state, key = jax.random.split(key, 5)
    policy_fn, policy_params = pure(
        Actor(env.observation_size, env.num_actions, rngs=nnx.Rngs(k_actor))
    )
    value_fn, value_params = pure(Critic(env.observation_size, rngs=nnx.Rngs(k_critic)))
    trpo_config = config.trpo
    value_optimizer = optax.adam(1e-3)
    update = jax.jit(updates.make_trpo_update(policy_fn, value_fn, value_optimizer, trpo_config))
    state = updates.init_trpo_state(policy_params, value_params, value_optimizer, k_state)

    @jax.jit
    def rollout(state, carry, key):
        policy_params, value_params = state.params["policy"], state.params["value"]
        carry, batch, stats = classic.rollout_batch(
            config, env, env_params, policy_fn, value_fn, policy_params, value_params, carry,
            key, flatten=False,
        )  # fmt: skip
        return carry, batch, stats["episode_return"], stats["episodes"]

    carry = envs.init_carry(env, env_params, k_env, config.num_envs)
    print(f"TRPO on {env.name}: {config.num_envs} envs x {config.num_steps} steps per batch")
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log = runs.MetricsLog(
        out / "metrics.jsonl", "TRPO", config.warmup_iterations, sinks=config.log,
        config=dataclasses.asdict(config),
    )  # fmt: skip
    for iteration in range(config.warmup_iterations):
        key, k_roll = jax.random.split(key)
        carry, batch, mean_return, finished = rollout(state, carry, k_roll)
        state, metrics = update(state, batch)
        row = {"episode_return": float(mean_return), **jax.device_get(metrics)}
        log.log(iteration + 1, row, print_line=False)
        print(
            f"  iteration {iteration + 1}/{config.warmup_iterations}: "
            f"return {float(mean_return):6.1f} over {int(finished)} episodes, "
            f"kl {float(metrics['kl']):.4f}, step fraction {float(metrics['step_fraction']):.3f}, "
            f"accepted {bool(metrics['accepted'])}"
        )

    key, k_roll = jax.random.split(key)
    carry, batch, mean_return, _ = rollout(state, carry, k_roll)
    curves = jax.jit(lambda p, b: trust_region_curves(policy_fn, p, b, config, trpo_config))(
        state.params["policy"], batch
    )
    log.close()
    curves = jax.tree.map(np.asarray, curves)
    plot(curves, config, out / "trust_region.png")
    (out / "curves.json").write_text(json.dumps(jax.tree.map(lambda x: x.tolist(), curves)))
    summary = summarise(curves, config, time.perf_counter() - start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'trust_region.png'}, {out / 'curves.json'}, {out / 'summary.json'}")
    return summary


def trust_region_curves(policy_fn, params, batch, config: Config, trpo_config: updates.TRPOConfig):
    """Surrogate improvement and mean KL along the natural and the plain gradient step."""
    surrogate_fn, surrogate_and_kl = trpo.trpo_objectives(policy_fn, params, batch)
    surrogate, grad = jax.value_and_grad(surrogate_fn)(params)
    fvp = trpo.make_fisher_vector_product(
        policy_fn, params, batch["inputs"], method=config.trpo.fvp_method
    )
    natural, info = trpo.natural_step(
        grad, fvp, config.trpo.max_kl, config.trpo.cg_iters, config.trpo.cg_damping
    )
    grad_curvature = trpo.tree_vdot(grad, fvp(grad)) + config.trpo.cg_damping * trpo.tree_vdot(
        grad, grad
    )
    plain_scale = jnp.sqrt(2.0 * config.trpo.max_kl / grad_curvature)
    plain = jax.tree.map(lambda g: plain_scale * g, grad)
    scales = jnp.linspace(0.0, config.max_scale, config.num_points)

    def along(step):
        def at(t):
            s, kl = surrogate_and_kl(jax.tree.map(lambda p, d: p + t * d, params, step))
            return s - surrogate, kl

        return jax.lax.map(at, scales)

    natural_gain, natural_kl = along(natural)
    plain_gain, plain_kl = along(plain)
    _, ls = trpo.kl_line_search(
        surrogate_and_kl,
        params,
        natural,
        surrogate,
        config.trpo.max_kl,
        trpo_config.backtrack_coeff,
        trpo_config.max_backtracks,
    )
    # Undamped quadratic model of the KL: 0.5 t^2 step^T F step (the damped one equals delta at 1).
    natural_quadratic = 0.5 * scales**2 * trpo.tree_vdot(natural, fvp(natural))
    return {
        "scale": scales,
        "natural_gain": natural_gain,
        "natural_kl": natural_kl,
        "natural_kl_quadratic": natural_quadratic,
        "plain_gain": plain_gain,
        "plain_kl": plain_kl,
        "accepted": ls.accepted,
        "accepted_scale": ls.step_fraction,
        "accepted_gain": ls.surrogate - surrogate,
        "accepted_kl": ls.kl,
        "line_search_steps": ls.steps,
        "cg_iterations": info.cg_iterations,
        "cg_residual": info.cg_residual,
    }


def plot(curves: dict, config: Config, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = curves["scale"]
    inside = x[curves["natural_kl"] <= config.trpo.max_kl]
    edge = float(inside.max()) if inside.size else 0.0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7.5), sharex=True)
    for ax in (top, bottom):
        ax.axvspan(
            0.0,
            edge,
            color="tab:green",
            alpha=0.12,
            label="trust region (KL <= delta, natural step)",
        )
    top.plot(x, curves["natural_gain"], color="tab:blue", label="natural gradient (TRPO step)")
    top.plot(x, curves["plain_gain"], color="tab:orange", label="plain gradient")
    top.axhline(0.0, color="0.5", lw=0.8)
    top.set_ylabel("surrogate improvement  L(θ + t·Δ) − L(θ)")
    bottom.plot(x, curves["natural_kl"], color="tab:blue", label="KL, natural gradient")
    bottom.plot(
        x,
        curves["natural_kl_quadratic"],
        color="tab:blue",
        ls="--",
        lw=1,
        label="quadratic model ½ t² ΔᵀFΔ",
    )
    bottom.plot(x, curves["plain_kl"], color="tab:orange", label="KL, plain gradient")
    bottom.axhline(
        config.trpo.max_kl, color="tab:red", ls=":", label=f"KL bound δ = {config.trpo.max_kl}"
    )
    bottom.set_ylabel("mean KL(π_old ‖ π_new)")
    bottom.set_xlabel(
        "t (multiples of the full TRPO step: its damped quadratic KL model equals δ at t = 1)"
    )
    bottom.set_ylim(0, 4 * config.trpo.max_kl)
    if bool(curves["accepted"]):
        t = float(curves["accepted_scale"])
        top.plot([t], [float(curves["accepted_gain"])], "k*", ms=14, label="line search accepted")
        bottom.plot([t], [float(curves["accepted_kl"])], "k*", ms=14, label="line search accepted")
    top.legend(fontsize=8, loc="best")
    bottom.legend(fontsize=8, loc="upper left")
    fig.suptitle("Trust region of TRPO: surrogate and KL divergence along the update")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(curves: dict, config: Config, seconds: float) -> dict:
    kl_inside = curves["natural_kl"] <= config.trpo.max_kl
    natural_best = float(np.max(np.where(kl_inside, curves["natural_gain"], -np.inf)))
    plain_inside = curves["plain_kl"] <= config.trpo.max_kl
    plain_best = float(np.max(np.where(plain_inside, curves["plain_gain"], -np.inf)))
    return {
        "max_kl": config.trpo.max_kl,
        "line_search_accepted": bool(curves["accepted"]),
        "accepted_step_fraction": float(curves["accepted_scale"]),
        "accepted_kl": float(curves["accepted_kl"]),
        "accepted_surrogate_gain": float(curves["accepted_gain"]),
        "best_gain_inside_region_natural": natural_best,
        "best_gain_inside_region_plain": plain_best,
        "cg_iterations": int(curves["cg_iterations"]),
        "cg_residual": float(curves["cg_residual"]),
        "wall_seconds": round(seconds, 2),
    }


if __name__ == "__main__":
    main(cli.parse(Config))
