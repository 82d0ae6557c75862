"""Mixture-of-experts MLP blocks (Qwen3-MoE, Mixtral) and the router's load-balancing loss.

A sparsely-gated mixture of experts (Shazeer et al., 2017) replaces a layer's MLP with ``E``
gated (SwiGLU) expert MLPs and a linear router. For each token the router's logits
``x @ W_router`` go through a softmax (in float32), the ``k`` most probable experts are chosen,
their probabilities are optionally renormalised to sum to 1 (Mixtral, Jiang et al., 2024,
always; Qwen3-MoE where ``norm_topk_prob`` says so), and the block's output is the
probability-weighted sum of the chosen experts' outputs. These are the definitions of
transformers' ``Qwen3MoeSparseMoeBlock`` and ``MixtralSparseMoeBlock``.

Expert weights are stacked, ``gate``/``up [E, D, F]`` and ``down [E, F, D]`` (a leading
``layers`` axis in the model), with the logical axis ``"experts"`` so that a sharding rule can
split the experts over a mesh axis (:mod:`rljax.sharding`).

Two exact compute paths (:func:`moe_mlp`'s ``impl``):

- ``"dense"``: every expert on every token, the unchosen ones weighted 0, as two 2-D matmuls
  ``[N, D] @ [D, E F]`` and one ``[N, E F] @ [E F, D]`` (the routing weights folded in before
  the down projection, so the combination is part of that matmul). Cost: ``E / k`` times the
  FLOPs of the sparse model's MLP and an ``[N, E F]`` activation; the fastest on CPU for the
  small expert counts of tests and tiny models.
- ``"ragged"``: the ``N k`` (token, expert) assignments sorted by expert and run as grouped
  matmuls (:func:`jax.lax.ragged_dot`, group sizes = tokens per expert), then scattered back
  and summed with their weights. On GPU and TPU ragged_dot is a native grouped matmul, so the
  cost is the sparse model's ``k / E`` of the dense FLOPs (plus a gather/scatter of ``N k``
  rows); XLA:CPU lowers it to a masked dense product (``E`` times the work of ``N k`` rows),
  which is why ``"dense"`` is the CPU default.

The load-balancing loss (:func:`load_balancing_loss`) is the Switch Transformer's auxiliary loss
(Fedus et al., 2021, eqs. 4-6) as transformers' ``load_balancing_loss_func`` computes it.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

__all__ = ["MOE_IMPLS", "load_balancing_loss", "moe_mlp", "resolve_impl", "route"]

MOE_IMPLS = (None, "dense", "ragged")


def resolve_impl(impl: str | None) -> str:
    """``impl``, with ``None`` resolved to ``"dense"`` on CPU and ``"ragged"`` elsewhere."""
    if impl is None:
        return "dense" if jax.default_backend() == "cpu" else "ragged"
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl {impl!r} is not one of {MOE_IMPLS}")
    return impl


def _wide(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def route(
    x: jax.Array, router: jax.Array, *, top_k: int, norm_topk_prob: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-``k`` routing of tokens ``x [N, D]`` with the router ``[D, E]``.

    Returns ``(logits [N, E]`` in ``x``'s dtype, ``weights [N, k]`` float32 (float64 for a
    float64 model), ``experts [N, k]`` int32): ``weights`` are the softmax probabilities of
    the chosen experts, divided by their sum when ``norm_topk_prob``.
    """
    chex.assert_rank([x, router], 2)
    logits = x @ router.astype(x.dtype)
    probs = jax.nn.softmax(logits.astype(_wide(x.dtype)), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return logits, weights, experts.astype(jnp.int32)


def _dense_experts(x, weights, experts, gate, up, down, act):
    """Every expert on every token, combined with the routing weights (0 off the top-k)."""
    n, d = x.shape
    e, _, f = gate.shape
    gate_w = jnp.transpose(gate, (1, 0, 2)).reshape(d, e * f)
    up_w = jnp.transpose(up, (1, 0, 2)).reshape(d, e * f)
    hidden = act(x @ gate_w) * (x @ up_w)  # [N, E F]
    combine = jnp.sum(jax.nn.one_hot(experts, e, dtype=weights.dtype) * weights[..., None], -2)
    hidden = hidden.reshape(n, e, f) * combine.astype(x.dtype)[:, :, None]
    return hidden.reshape(n, e * f) @ down.reshape(e * f, d)


def _ragged_experts(x, weights, experts, gate, up, down, act):
    """The ``N k`` assignments sorted by expert, grouped matmuls, weighted scatter-add back."""
    n, d = x.shape
    e, k = gate.shape[0], experts.shape[-1]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = order // k  # the token of each sorted assignment
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = jnp.take(x, rows, axis=0)
    hidden = act(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    out = jax.lax.ragged_dot(hidden, down, sizes)  # [N k, D]
    out = out * jnp.take(weights.reshape(-1), order).astype(x.dtype)[:, None]
    return jnp.zeros((n, d), x.dtype).at[rows].add(out)


_IMPLS = {"dense": _dense_experts, "ragged": _ragged_experts}


def moe_mlp(
    x: jax.Array,
    router: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    act: Callable[[jax.Array], jax.Array],
    top_k: int,
    norm_topk_prob: bool,
    impl: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """A sparse mixture-of-experts SwiGLU MLP on ``x [..., D]``.

    Args:
      x: the normed residual stream ``[..., D]``.
      router: ``[D, E]``; gate, up: ``[E, D, F]``; down: ``[E, F, D]`` (one layer's).
      act: the gate's activation (SiLU for Qwen3-MoE and Mixtral).
      top_k: experts per token (``num_experts_per_tok``).
      norm_topk_prob: renormalise the chosen probabilities to sum to 1.
      impl: ``"dense"``, ``"ragged"`` or ``None`` (:func:`resolve_impl`); both are exact.

    Returns:
      ``(out [..., D]`` in ``x``'s dtype, ``router_logits [..., E])``.
    """
    lead, d = x.shape[:-1], x.shape[-1]
    e = router.shape[-1]
    if gate.shape[0] != e or not 1 <= top_k <= e:
        raise ValueError(f"router {router.shape}, experts {gate.shape}: top_k={top_k} of {e}")
    flat = x.reshape(-1, d)
    logits, weights, experts = route(flat, router, top_k=top_k, norm_topk_prob=norm_topk_prob)
    out = _IMPLS[resolve_impl(impl)](flat, weights, experts, gate, up, down, act)
    return out.reshape(*lead, d), logits.reshape(*lead, e)


def load_balancing_loss(
    router_logits: jax.Array, top_k: int, mask: jax.Array | None = None
) -> jax.Array:
    r"""The Switch Transformer load-balancing loss (Fedus et al., 2021, eqs. 4-6).

    .. math:: \mathcal{L} = E \sum_{e=1}^{E} f_e \, P_e

    where, over every layer and every real token, :math:`f_e` is the fraction of the ``k``
    routing choices that went to expert ``e`` times ``k`` (the mean number of times a token
    chose ``e``) and :math:`P_e` the mean router probability of ``e``. It is ``k`` when routing
    is uniform and grows as it concentrates; only :math:`P_e` carries a gradient. Equals
    transformers' ``load_balancing_loss_func(router_logits, E, k, attention_mask)`` (which
    pools the layers before the product, as here); its ``*ForCausalLM`` adds
    ``router_aux_loss_coef`` times it to the loss when ``output_router_logits`` is set.

    Args:
      router_logits: ``[L, B, T, E]`` (``Transformer.decode(..., return_router_logits=True)``)
        or ``[L, N, E]``.
      top_k: experts per token.
      mask: ``[B, T]`` (or ``[N]``), 1 at real tokens; padding is left out. Default: all real.

    Returns:
      A float32 scalar (float64 for float64 logits); 0 if no token is real.
    """
    e = router_logits.shape[-1]
    num_layers = router_logits.shape[0]
    logits = router_logits.reshape(num_layers, -1, e)
    probs = jax.nn.softmax(logits.astype(_wide(logits.dtype)), axis=-1)  # [L, N, E]
    _, chosen = jax.lax.top_k(probs, top_k)
    counts = jnp.sum(jax.nn.one_hot(chosen, e, dtype=probs.dtype), axis=-2)  # [L, N, E]
    if mask is None:
        w = jnp.ones(logits.shape[1], probs.dtype)
    else:
        w = jnp.asarray(mask).reshape(-1).astype(probs.dtype)
        chex.assert_shape(w, (logits.shape[1],))
    total = num_layers * jnp.sum(w)
    safe = jnp.where(total > 0, total, 1.0)
    tokens_per_expert = jnp.einsum("lne,n->e", counts, w) / safe
    prob_per_expert = jnp.einsum("lne,n->e", probs, w) / safe
    return jnp.where(total > 0, e * jnp.sum(tokens_per_expert * prob_per_expert), 0.0)
