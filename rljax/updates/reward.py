"""The reward-model update: :func:`make_reward_update` and :func:`make_reward_eval` bind
:func:`rljax.reward.bradley_terry_loss` to a language model with a scalar head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rljax import checks
from rljax.reward import (
    bradley_terry_loss,
)
from rljax.updates.common import (
    OptaxState,
    check_config,
    init_optax_state,
    make_objective_eval,
    make_optax_update,
)
from rljax.updates.lm import pair_rewards

__all__ = [
    "RewardConfig",
    "RewardState",
    "init_reward_state",
    "make_reward_eval",
    "make_reward_update",
]


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Static settings of :func:`make_reward_update` and :func:`make_reward_eval`.

    Attributes:
      center_rewards_coefficient: :math:`c` of :func:`bradley_terry_loss` (TRL's
        ``center_rewards_coefficient``; Eisenstein et al. use 0.01); ``None`` = off.
      use_margin: subtract the batch's ``margin`` ``[B]`` from the reward gap when the batch
        has one (TRL uses a ``margin`` column whenever the data set has it).
    """

    center_rewards_coefficient: float | None = None
    use_margin: bool = True

    def __post_init__(self):
        checks.check(self, {"center_rewards_coefficient": ">= 0"}, library=True)


class RewardState(OptaxState):
    """Train state of :func:`make_reward_update`: a :class:`rljax.updates.common.OptaxState`
    (``params``, ``opt_state``, ``step``, ``nonfinite_updates``; a pytree)."""

    __slots__ = ()


def init_reward_state(params, optimizer) -> RewardState:
    """Initial :class:`RewardState`."""
    return init_optax_state(RewardState, params, optimizer)


def _reward_objective(graphdef, config: RewardConfig) -> Callable:
    def objective(params, _, batch):
        chosen, rejected = pair_rewards(graphdef, params, batch)  # [B] each
        margin = batch.get("margin") if config.use_margin else None
        loss, metrics = bradley_terry_loss(
            chosen,
            rejected,
            margin=None if margin is None else jnp.asarray(margin),
            center_rewards_coefficient=config.center_rewards_coefficient,
        )
        chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
        metrics = {
            "loss": loss,
            **metrics,
            "rewards/chosen": jnp.mean(chosen),
            "rewards/rejected": jnp.mean(rejected),
        }
        return loss, metrics

    return objective


def make_reward_update(
    graphdef, optimizer, config: RewardConfig = RewardConfig()
) -> Callable[[RewardState, dict], tuple[RewardState, dict[str, jax.Array]]]:
    """Build the pure reward-model step ``update(state, batch) -> (state, metrics)``.

    One optax step on :func:`bradley_terry_loss` of the rewards of a scalar-head model
    (``TransformerConfig(head="reward", lm_head=False)``): ``model.rewards`` reads the head at
    the last real token of each row, in ONE forward pass over the ``[2B, T]`` concatenation of
    the chosen and rejected sequences.

    Args:
      graphdef: ``nnx.split(model)[0]`` of a reward-head
        :class:`rljax.models.transformer.Transformer`.
      optimizer: optax ``GradientTransformation`` over ``state.params``.
      config: :class:`RewardConfig`.

    The ``batch`` follows the :mod:`rljax.data` contract (``chosen_tokens``, ``chosen_mask``,
    ``rejected_tokens``, ``rejected_mask``, ``[B, T]``; loss masks are not used), or the
    shared-prompt layout of :func:`rljax.data.share_prompts` (each prompt run once:
    :func:`rljax.lm.pair_rewards`), optionally with a float ``margin [B]``.

    Metrics: ``loss``, ``accuracy``, ``margin`` (mean reward gap), ``mean_reward``,
    ``min_reward``, ``max_reward``, ``rewards/chosen``, ``rewards/rejected``, ``grad_norm``,
    ``nonfinite`` and ``nonfinite_updates`` (a non-finite update is skipped, as in
    :func:`rljax.dpo.make_dpo_update`). Not jitted; jit it as :func:`rljax.dpo.make_dpo_update`'s step (or with
    :func:`rljax.lm.compile_update`); means are over the global batch.
    """
    check_config(config, RewardConfig, "make_reward_update")
    return make_optax_update(_reward_objective(graphdef, config), optimizer)


def make_reward_eval(
    graphdef, config: RewardConfig = RewardConfig()
) -> Callable[[RewardState, dict], dict[str, jax.Array]]:
    """The metrics of :func:`make_reward_update` on held-out pairs, without an update:
    ``evaluate(state, batch) -> metrics`` (no ``grad_norm``)."""
    check_config(config, RewardConfig, "make_reward_eval")
    return make_objective_eval(_reward_objective(graphdef, config))
