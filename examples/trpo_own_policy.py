"""A TRPO step on a policy of your own: a linear softmax policy on a contextual bandit.

Each iteration samples actions, whitens the rewards into advantages, and takes one trust-region
step from rljax.trpo's pieces: the surrogate and its gradient, Fisher-vector products through
the policy function, the natural step scaled to ``MAX_KL`` and the KL line search.
Run: ``python examples/trpo_own_policy.py`` (seconds). The last line is a JSON summary.
"""

import json

import jax
import jax.numpy as jnp

from rljax import advantages, distributions, trpo

FEATURES, ACTIONS, ROWS, MAX_KL = 4, 3, 512, 0.02
true_w = jax.random.normal(jax.random.key(1), (FEATURES, ACTIONS))  # the best arm is argmax


def policy_fn(params, x):
    """Logits of a linear softmax policy; ``params`` is any pytree you like."""
    return x @ params["w"] + params["b"]


@jax.jit
def iteration(params, key):
    k_x, k_a = jax.random.split(key)
    x = jax.random.normal(k_x, (ROWS, FEATURES))
    old_logits = policy_fn(params, x)
    actions = jax.random.categorical(k_a, old_logits)
    rewards = (actions == jnp.argmax(x @ true_w, -1)).astype(jnp.float32)
    adv = advantages.whiten(rewards)
    old_logps = distributions.log_prob(old_logits, actions)

    def surrogate_and_kl(p):  # the objective to MAXIMISE, and the mean KL from the old policy
        logits = policy_fn(p, x)
        logps = distributions.log_prob(logits, actions)
        surrogate = trpo.surrogate_objective(logps, old_logps, adv)[0]
        return surrogate, trpo.mean_kl(old_logits, logits)

    surrogate_before, grad = jax.value_and_grad(lambda p: surrogate_and_kl(p)[0])(params)
    fvp = trpo.make_fisher_vector_product(policy_fn, params, x)
    full_step, step_info = trpo.natural_step(grad, fvp, MAX_KL, gradient_of="objective")
    new_params, ls = trpo.kl_line_search(
        surrogate_and_kl, params, full_step, surrogate_before, MAX_KL
    )
    return new_params, {
        "reward": rewards.mean(),
        "improvement": ls.surrogate - surrogate_before,
        "predicted": step_info.expected_improvement,
        "kl": ls.kl,
        "accepted": ls.accepted,
    }


params = {"w": jnp.zeros((FEATURES, ACTIONS)), "b": jnp.zeros(ACTIONS)}
history = []
for i, key in enumerate(jax.random.split(jax.random.key(0), 30)):
    params, info = iteration(params, key)
    history.append({k: float(v) for k, v in info.items()})
    if i % 5 == 0 or i == 29:
        h = history[-1]
        print(
            f"iter {i:2d}  reward {h['reward']:.3f}  surrogate gain {h['improvement']:.4f} "
            f"(linear model {h['predicted']:.4f})  KL {h['kl']:.4f} <= {MAX_KL}"
        )
summary = {
    "reward_first": history[0]["reward"],
    "reward_last": sum(h["reward"] for h in history[-5:]) / 5,
    "max_kl_seen": max(h["kl"] for h in history),
    "max_kl": MAX_KL,
    "accepted": sum(h["accepted"] for h in history) / len(history),
}
print(json.dumps(summary))
