"""Quickstart: the pure objectives of rljax on a toy problem, start to finish in seconds.

A linear softmax "policy" over a 6-token vocabulary scores completions; we

1. compute sequence log-probs with masks (``rljax.logprobs``),
2. fit the policy to preference pairs with the DPO loss (``rljax.dpo``), sigmoid and IPO,
3. fit a linear Bradley-Terry reward model on the same pairs (``rljax.reward``),
4. run GAE over a padded batch of rewards (``rljax.advantages``) and take PPO and TRPO
   objective values and gradients (``rljax.ppo``, ``rljax.trpo``).

Run: ``python examples/quickstart.py``. Prints progress and a summary; writes nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

import rljax

VOCAB, LENGTH, PAIRS = 6, 5, 64
key = jax.random.key(0)
k_data, k_w, k_r = jax.random.split(key, 3)

# Preference data: completions of random tokens; the "true" preference favours token 0.
tokens = jax.random.randint(k_data, (2, PAIRS, LENGTH), 0, VOCAB)
score = jnp.sum(tokens == 0, axis=-1)
chosen = jnp.where((score[0] >= score[1])[:, None], tokens[0], tokens[1])
rejected = jnp.where((score[0] >= score[1])[:, None], tokens[1], tokens[0])
lengths = jnp.full((PAIRS,), LENGTH)
mask = jnp.ones((PAIRS, LENGTH))


def sequence_logps(logits_per_token, completions):
    """Sum of token log-probs; a context-free policy has the same logits at every position."""
    logits = jnp.broadcast_to(logits_per_token, (*completions.shape, VOCAB))
    return rljax.logprobs.masked_sum(
        rljax.logprobs.token_logprobs(logits, completions), mask, axis=-1
    )


reference = jnp.zeros((VOCAB,))


def train_dpo(loss_type, beta):
    # IPO averages the log-ratios per token, so it reads the completion lengths; passing them
    # to a loss type that does not read them (sigmoid) is an error.
    per_token = {"chosen_lengths": lengths, "rejected_lengths": lengths}

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            return rljax.dpo.dpo_loss(
                sequence_logps(p, chosen),
                sequence_logps(p, rejected),
                sequence_logps(reference, chosen),
                sequence_logps(reference, rejected),
                beta=beta,
                loss_type=loss_type,
                **(per_token if loss_type == "ipo" else {}),
            )

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    optimizer = optax.adam(0.05)
    params = reference
    opt_state = optimizer.init(params)
    for i in range(201):
        params, opt_state, loss, metrics = step(params, opt_state)
        if i % 50 == 0:
            print(
                f"  [{loss_type}] step {i:3d}  loss {float(loss):.4f}  "
                f"reward accuracy {float(metrics['rewards/accuracies']):.2f}  "
                f"margin {float(metrics['rewards/margins']):.3f}"
            )
    return jax.nn.softmax(params)


print("1. Direct Preference Optimization on 64 pairs (true preference: more token 0)")
for loss_type in ("sigmoid", "ipo"):
    probs = train_dpo(loss_type, beta=0.1)
    print(
        f"  [{loss_type}] P(token 0) under the trained policy: {float(probs[0]):.3f} "
        f"(reference {1 / VOCAB:.3f})"
    )

print("2. Bradley-Terry reward model r(y) = w . counts(y)")
counts = functools.partial(jax.nn.one_hot, num_classes=VOCAB)
features_c, features_r = counts(chosen).sum(1), counts(rejected).sum(1)
w = jnp.zeros((VOCAB,))
grad_fn = jax.jit(
    jax.value_and_grad(
        lambda w: rljax.reward.bradley_terry_loss(features_c @ w, features_r @ w), has_aux=True
    )
)
for i in range(101):
    (loss, metrics), g = grad_fn(w)
    w = w - 0.5 * g
    if i % 50 == 0:
        print(f"  step {i:3d}  loss {float(loss):.4f}  accuracy {float(metrics['accuracy']):.2f}")
print(f"  learned weight of token 0: {float(w[0]):.2f} (others mean {float(w[1:].mean()):.2f})")

print("3. GAE over a right-padded batch, then PPO and TRPO objectives")
rewards = jax.random.normal(k_r, (4, 8))
values = jax.random.normal(k_w, (4, 9))
valid = jnp.arange(8)[None, :] < jnp.array([8, 6, 5, 3])[:, None]
dones = (jnp.arange(8)[None, :] == jnp.array([7, 5, 4, 2])[:, None]).astype(jnp.float32)
adv, returns = rljax.advantages.gae(rewards, values, dones, gamma=0.99, lam=0.95, mask=valid)
adv = rljax.advantages.whiten(adv, valid)
old_logps = jnp.log(jnp.full((4, 8), 0.25))
ppo = jax.grad(lambda lp: rljax.ppo.clipped_surrogate_loss(lp, old_logps, adv, valid)[0])
trpo = jax.grad(lambda lp: rljax.trpo.surrogate_objective(lp, old_logps, adv, valid)[0])
print(
    f"  valid steps {int(valid.sum())}, whitened advantage mean "
    f"{float(rljax.logprobs.masked_mean(adv, valid)):.2e}"
)
print(
    f"  PPO loss gradient equals minus the TRPO surrogate gradient at the old policy: "
    f"{bool(jnp.allclose(ppo(old_logps), -trpo(old_logps), atol=1e-6))}"
)
print("done.")
