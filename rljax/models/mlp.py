"""Actor and critic MLPs for classic control, as Flax NNX modules.

Orthogonal initialisation with the scales of the PPO implementation-details study (Huang et
al., 2022, "The 37 Implementation Details of PPO"): sqrt(2) for hidden layers, 0.01 for the
policy head, 1 for the value head; biases zero; tanh activations.

To use a module in a pure update step, split it once and merge inside the function::

    actor = Actor(obs_dim, num_actions, rngs=nnx.Rngs(0))
    policy_fn, policy_params = pure(actor)
    logits = policy_fn(policy_params, obs)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Actor", "Critic", "pure"]


def _linear(in_features: int, out_features: int, scale: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=nnx.initializers.orthogonal(scale),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


class _Torso(nnx.Module):
    def __init__(self, in_features: int, hidden: Sequence[int], rngs: nnx.Rngs):
        sizes = [in_features, *hidden]
        self.layers = nnx.List(
            [_linear(a, b, math.sqrt(2.0), rngs) for a, b in itertools.pairwise(sizes)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x


class Actor(nnx.Module):
    """Policy MLP: categorical logits, or a diagonal Gaussian ``(mean, log_std)``.

    Args:
      obs_dim: observation size.
      action_dim: number of discrete actions, or the continuous action size.
      hidden: hidden layer widths.
      continuous: Gaussian head with a state-independent ``log_std`` parameter (initialised to
        ``log_std_init``) when True; categorical logits otherwise.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        *,
        hidden: Sequence[int] = (64, 64),
        continuous: bool = False,
        log_std_init: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.continuous = continuous
        self.torso = _Torso(obs_dim, hidden, rngs)
        self.head = _linear(hidden[-1] if hidden else obs_dim, action_dim, 0.01, rngs)
        if continuous:
            self.log_std = nnx.Param(jnp.full((action_dim,), log_std_init, jnp.float32))

    def __call__(self, obs: jax.Array):
        out = self.head(self.torso(obs))
        if self.continuous:
            return out, self.log_std[...]
        return out


class Critic(nnx.Module):
    """Value MLP: ``obs [..., obs_dim] -> values [...]``."""

    def __init__(self, obs_dim: int, *, hidden: Sequence[int] = (64, 64), rngs: nnx.Rngs):
        self.torso = _Torso(obs_dim, hidden, rngs)
        self.head = _linear(hidden[-1] if hidden else obs_dim, 1, 1.0, rngs)

    def __call__(self, obs: jax.Array) -> jax.Array:
        return self.head(self.torso(obs))[..., 0]


def pure(module: nnx.Module) -> tuple[Callable, nnx.State]:
    """Split a module into ``(apply_fn, params)`` with ``apply_fn(params, x) == module(x)``.

    Only ``nnx.Param`` state is returned (what gradients and optimisers see); any other state
    is closed over as constants.
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p, rest, copy=True)(x)

    return apply_fn, params
