"""A Direct Preference Optimization variant of your own, trained with optax on toy arrays.

Conservative DPO (cDPO, Mitchell 2023: labels flipped with probability eps) is not a TRL 1.16
loss type, so ``dpo_loss(..., label_smoothing=0.1)`` with ``sigmoid`` is refused. Written as a
function of ``rljax.dpo.PairTerms`` it gets rljax's weighting, normalisation and metrics.
Run: ``python examples/custom_dpo_variant.py`` (seconds). The last line is a JSON summary.
"""

import json

import jax
import jax.numpy as jnp
import optax

from rljax import dpo

EPS = 0.1  # probability that a preference label is flipped


def conservative_dpo(t: dpo.PairTerms) -> jax.Array:
    """Per-pair cDPO loss: the DPO logistic loss against labels smoothed by EPS."""
    logits = t.beta * t.delta_score
    return -(1 - EPS) * jax.nn.log_sigmoid(logits) - EPS * jax.nn.log_sigmoid(-logits)


# 256 pairs of 8-token completions over 5 tokens; more of token 0 is preferred.
VOCAB, PAIRS, LENGTH = 5, 256, 8
k_a, k_b = jax.random.split(jax.random.key(0))
a = jax.random.randint(k_a, (PAIRS, LENGTH), 0, VOCAB)
b = jax.random.randint(k_b, (PAIRS, LENGTH), 0, VOCAB)
a_wins = ((a == 0).sum(1) >= (b == 0).sum(1))[:, None]
chosen, rejected = jnp.where(a_wins, a, b), jnp.where(a_wins, b, a)


def sequence_logps(logits, tokens):
    """A context-free policy: one logit per token, the same at every position."""
    return jax.nn.log_softmax(logits)[tokens].sum(-1)


reference = jnp.zeros(VOCAB)
ref_logps = (sequence_logps(reference, chosen), sequence_logps(reference, rejected))


def loss_fn(params, reduction="mean"):
    logps = (sequence_logps(params, chosen), sequence_logps(params, rejected))
    return dpo.dpo_loss(
        *logps, *ref_logps, beta=0.5, loss_type=conservative_dpo, reduction=reduction
    )


optimizer = optax.adam(0.05)


@jax.jit
def step(params, opt_state):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics


params, losses = reference, []
opt_state = optimizer.init(params)
for i in range(101):
    params, opt_state, loss, metrics = step(params, opt_state)
    losses.append(float(loss))
    if i % 25 == 0:
        print(f"step {i:3d}  cDPO loss {losses[-1]:.4f}  ", end="")
        print(f"reward accuracy {float(metrics['rewards/accuracies']):.2f}")

# reduction="none": the per-pair losses, e.g. to look at the pairs the policy gets most wrong.
per_pair, _ = loss_fn(params, reduction="none")
worst = jnp.argsort(per_pair)[-3:]
print("hardest pairs (chosen / rejected count of token 0):")
for i in worst.tolist():
    print(f"  pair {i}: {int((chosen[i] == 0).sum())} / {int((rejected[i] == 0).sum())}")
p0 = float(jax.nn.softmax(params)[0])
summary = {"loss_first": losses[0], "loss_last": losses[-1], "p_token0": p0}
summary["accuracy"] = float(metrics["rewards/accuracies"])
print(json.dumps(summary))
