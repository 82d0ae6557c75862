"""Reward-model objective: the Bradley-Terry pairwise preference loss.

Under the Bradley-Terry model (Bradley & Terry, 1952) a reward model :math:`r` prefers the
chosen completion with probability :math:`\\sigma(r_w - r_l)`; RLHF fits :math:`r` by maximum
likelihood on human preference pairs (Ouyang et al., 2022, arXiv:2203.02155, Eq. 1). Formula,
margin and reward-centring term match TRL 1.16's ``RewardTrainer``.

:func:`make_reward_update` builds the pure training step of a reward-head language model
(``update(state, batch) -> (state, metrics)``, :class:`RewardConfig`, :class:`RewardState`);
:func:`make_reward_eval` the metrics-only step for held-out pairs.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "bradley_terry_loss",
]


def bradley_terry_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    margin: jax.Array | None = None,
    center_rewards_coefficient: float | jax.Array | None = None,
    normalizer: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Bradley-Terry negative log-likelihood of the preferences.

    .. math::
        \mathcal L = -\mathrm{mean}_i \log\sigma(r_{w,i} - r_{l,i} - m_i)
                     + c\,\mathrm{mean}_i (r_{w,i} + r_{l,i})^2

    The optional margin :math:`m_i` (Llama 2, Touvron et al., 2023, arXiv:2307.09288, Eq. 2)
    demands a larger gap for more clearly preferred pairs; the centring term with coefficient
    :math:`c` (Eisenstein et al., 2023, arXiv:2312.09244) keeps rewards near zero.

    Args:
      chosen_rewards: ``[batch]`` scalar rewards of the chosen completions.
      rejected_rewards: ``[batch]``, rejected completions.
      margin: optional ``[batch]`` margins.
      center_rewards_coefficient: optional :math:`c`.
      normalizer: divide per-pair sums by this instead of the local batch size.

    Returns:
      ``(loss, metrics)`` with TRL's metric names ``accuracy`` (fraction with
      :math:`r_w > r_l`), ``margin`` (mean :math:`r_w - r_l`), ``mean_reward``,
      ``min_reward`` and ``max_reward`` (over both completions).
    """
    chex.assert_rank(chosen_rewards, 1)
    chex.assert_equal_shape([chosen_rewards, rejected_rewards])
    dtype = jnp.promote_types(chosen_rewards.dtype, jnp.float32)
    chosen_rewards = chosen_rewards.astype(dtype)
    rejected_rewards = rejected_rewards.astype(dtype)
    if normalizer is None:
        normalizer = chosen_rewards.shape[0]
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        chex.assert_equal_shape([chosen_rewards, margin])
        logits = logits - jax.lax.stop_gradient(margin.astype(dtype))
    loss = -jnp.sum(jax.nn.log_sigmoid(logits)) / normalizer
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (
            jnp.sum(jnp.square(chosen_rewards + rejected_rewards)) / normalizer
        )
    chosen = jax.lax.stop_gradient(chosen_rewards)
    rejected = jax.lax.stop_gradient(rejected_rewards)
    both = jnp.concatenate([chosen, rejected])
    metrics = {
        "accuracy": jnp.mean((chosen > rejected).astype(dtype)),
        "margin": jnp.mean(chosen - rejected),
        "mean_reward": jnp.mean(both),
        "min_reward": jnp.min(both),
        "max_reward": jnp.max(both),
    }
    return loss, metrics


# ---------------------------------------------------------------------------- update step
