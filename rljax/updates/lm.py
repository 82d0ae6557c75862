"""Glue between Flax NNX language models and the objectives: sequence log-probs, reference
log-probs over a data set, and a helper that places a train state and jits an update step.

Models enter as ``graphdef, params = nnx.split(model)`` (``params`` may also be the tuple of
states ``nnx.split(model, nnx.Param, ...)[1:]``); the functions here merge them inside, so
they are pure functions of arrays that the caller jits. The model is a
:class:`rljax.models.transformer.Transformer` (anything with ``decode(tokens, mask) ->
(hidden, cache)`` and ``unembedding() -> [D, V]``).

Token ``t`` is predicted by the model's output at position ``t - 1``: the log-prob of
``tokens[:, t]`` comes from ``hidden[:, t - 1]``, so per-token log-probs are ``[B, T - 1]``,
aligned with ``tokens[:, 1:]``. Log-probs are computed with
:func:`rljax.logprobs.chunked_token_logprobs`, so no ``[B, T, V]`` float32 logits are built.

With a mixture-of-experts model, :func:`pair_sequence_logps` (and the two functions it picks
from) also returns the load-balancing loss of the forward pass
(``return_router_aux_loss=True``; :func:`rljax.models.moe.load_balancing_loss` over every real
token, prompt and completion), which the DPO step adds to its loss with
``DPOConfig.router_aux_loss_coef``.

Preference batches come in two layouts: the standard one (``chosen_*`` / ``rejected_*``
``[B, T]`` prompt + completion rows, :func:`concatenated_sequence_logps`) and the shared-prompt
one of :func:`rljax.data.share_prompts` (each prompt stored and run once,
:func:`shared_prompt_sequence_logps`); :func:`pair_sequence_logps` and
:func:`reference_logps` take either.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rljax import sharding
from rljax.data.prefix import SHARED_PROMPT_KEYS
from rljax.logprobs import chunked_token_logprobs, masked_sum_and_count
from rljax.models.moe import load_balancing_loss
from rljax.models.transformer import KVCache, last_valid_index
from rljax.sharding import DEFAULT_RULES, ShardingRules, batch_sharding, replicated
from rljax.sharding import train_state_shardings as _train_state_shardings
from rljax.updates.common import require_keys

__all__ = [
    "PAIR_KEYS",
    "compile_update",
    "concatenated_sequence_logps",
    "merge",
    "pair_rewards",
    "pair_sequence_logps",
    "reference_logps",
    "sequence_logps",
    "shared_prompt_sequence_logps",
    "token_logps",
]


def merge(graphdef: Any, params: Any) -> nnx.Module:
    """``nnx.merge(graphdef, params)``, or ``nnx.merge(graphdef, *params)`` for a tuple of
    states (as ``nnx.split(model, nnx.Param, ...)[1:]`` returns)."""
    states = params if isinstance(params, tuple) else (params,)
    return nnx.merge(graphdef, *states, copy=True)


def token_logps(
    graphdef: Any,
    params: Any,
    tokens: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int = 1024,
) -> jax.Array:
    r"""Per-token log-probs :math:`\log\pi(y_t \mid y_{<t})` for ``t = 1 .. T - 1``.

    Args:
      graphdef, params: the model, from ``nnx.split``.
      tokens: ``int [B, T]`` token ids (prompt + completion, padded anywhere).
      mask: ``[B, T]``, 1 at real tokens.
      chunk_size: rows per chunk of :func:`rljax.logprobs.chunked_token_logprobs`.

    Returns:
      ``[B, T - 1]`` float32 (float64 for a float64 model), entry ``t - 1`` being the log-prob
      of ``tokens[:, t]``; 0 where ``tokens[:, t]`` is padding.
    """
    return _token_logps(graphdef, params, tokens, mask, chunk_size, router_aux_loss=False)[0]


def _router_aux_loss(model, router_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """The load-balancing loss of one forward pass's router logits over its real tokens."""
    return load_balancing_loss(router_logits, model.config.num_experts_per_tok, mask)


def _token_logps(
    graphdef, params, tokens, mask, chunk_size: int, *, router_aux_loss: bool
) -> tuple[jax.Array, jax.Array | None]:
    """:func:`token_logps` and, with ``router_aux_loss``, the load-balancing loss of the same
    forward pass over the real tokens (else ``None``)."""
    chex.assert_rank([tokens, mask], 2)
    chex.assert_equal_shape([tokens, mask])
    model = merge(graphdef, params)
    decoded = model.decode(tokens, mask, return_router_logits=router_aux_loss)
    hidden = decoded[0]
    logps = chunked_token_logprobs(
        hidden[:, :-1],
        model.unembedding(),
        tokens[:, 1:],
        chunk_size=chunk_size,
        softcap=model.config.final_logit_softcap,
    )
    aux = _router_aux_loss(model, decoded[2], mask) if router_aux_loss else None
    return jnp.where(mask[:, 1:].astype(bool), logps, 0.0), aux


def _sequence_sums(logps, mask, loss_mask) -> tuple[jax.Array, jax.Array]:
    """The sums and counts of :func:`sequence_logps` from its per-token log-probs."""
    counted = loss_mask[:, 1:].astype(bool) & mask[:, 1:].astype(bool)
    return masked_sum_and_count(logps, counted, axis=-1)


def sequence_logps(
    graphdef: Any,
    params: Any,
    tokens: jax.Array,
    mask: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    r"""Sequence log-probs :math:`\sum_{t \in \text{completion}} \log\pi(y_t \mid y_{<t})`.

    Args:
      graphdef, params: the model, from ``nnx.split``.
      tokens: ``int [B, T]`` prompt + completion token ids.
      mask: ``[B, T]``, 1 at real tokens (prompt and completion).
      loss_mask: ``[B, T]``, 1 at the tokens whose log-probs count (the completion, EOS
        included). ``loss_mask[:, 0]`` is ignored: the first token has no prediction.
      chunk_size: rows per chunk of :func:`rljax.logprobs.chunked_token_logprobs`.

    Returns:
      ``(logps_sum [B], num_tokens [B])``: the sum over counted tokens and their number (both
      float32; sums and counts add exactly across micro-batches and shards).
    """
    chex.assert_equal_shape([tokens, loss_mask])
    logps = token_logps(graphdef, params, tokens, mask, chunk_size=chunk_size)
    return _sequence_sums(logps, mask, loss_mask)


def _both(batch: Mapping[str, Any], name: str) -> jax.Array:
    """``chosen_<name>`` then ``rejected_<name>`` concatenated on the batch axis: ``[2B, ...]``."""
    return jnp.concatenate(
        [jnp.asarray(batch[f"chosen_{name}"]), jnp.asarray(batch[f"rejected_{name}"])], axis=0
    )


def concatenated_sequence_logps(
    graphdef: Any,
    params: Any,
    batch: Mapping[str, Any],
    *,
    chunk_size: int = 1024,
    return_router_aux_loss: bool = False,
) -> tuple[jax.Array, ...]:
    """Chosen and rejected sequence log-probs from ONE forward pass on the ``[2B, T]``
    concatenation of a preference batch (the batch contract of :mod:`rljax.data`).

    Returns ``(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)``, each ``[B]``;
    with ``return_router_aux_loss=True`` (a mixture-of-experts model) a fifth entry, the
    scalar load-balancing loss of the pass over every real token of the ``2B`` rows
    (:func:`rljax.models.moe.load_balancing_loss`, as transformers computes it for the
    concatenated batch).
    """
    _check_pair_batch(batch)
    cat = functools.partial(_both, batch)
    tokens, mask, loss_mask = cat("tokens"), cat("mask"), cat("loss_mask")
    chex.assert_equal_shape([tokens, loss_mask])
    logps, aux = _token_logps(
        graphdef, params, tokens, mask, chunk_size, router_aux_loss=return_router_aux_loss
    )
    logps, lengths = _sequence_sums(logps, mask, loss_mask)
    b = batch["chosen_tokens"].shape[0]
    out = (logps[:b], logps[b:], lengths[:b], lengths[b:])
    return (*out, aux) if return_router_aux_loss else out


PAIR_KEYS = (
    "chosen_tokens",
    "chosen_mask",
    "chosen_loss_mask",
    "rejected_tokens",
    "rejected_mask",
    "rejected_loss_mask",
)


def _check_pair_batch(batch: Mapping[str, Any], keys=PAIR_KEYS) -> None:
    hint = (
        "see rljax.data: chosen_/rejected_ tokens, mask, loss_mask, padded to the same length; "
        "or the shared-prompt layout of rljax.data.share_prompts"
    )
    require_keys(batch, keys, "preference", hint)
    if keys == SHARED_PROMPT_KEYS:
        shapes = {k: np.shape(batch[k]) for k in keys}
        rows = {s[0] if len(s) == 2 else None for s in shapes.values()}
        pair = {s for k, s in shapes.items() if k.startswith(("chosen", "rejected"))}
        prompt = {shapes["prompt_tokens"], shapes["prompt_mask"]}
        if len(rows) != 1 or None in rows or len(pair) != 1 or len(prompt) != 1:
            raise ValueError(
                "shared-prompt batch arrays must be [B, P] (prompt_tokens, prompt_mask) and "
                f"[B, C] (the four completion arrays), got {shapes}"
            )
        return
    shape = np.shape(batch["chosen_tokens"])
    bad = {k: np.shape(batch[k]) for k in keys if np.shape(batch[k]) != shape}
    if bad or len(shape) != 2:
        raise ValueError(
            f"preference batch arrays must all be [B, T] like chosen_tokens {shape} (chosen and "
            f"rejected padded to the same T); mismatched: {bad}"
        )


def _shared_prompt_decode(model, batch: Mapping[str, Any], router_aux_loss: bool = False):
    """The shared-prompt forward: ``(predictors [2B, C, D], completion [2B, C],
    completion_mask [2B, C], hidden [2B, C, D], aux)`` where ``predictors[:, j]`` is the hidden
    state that predicts completion token ``j`` (the prompt's last one for ``j = 0``) and
    ``aux`` the load-balancing loss with ``router_aux_loss`` (else ``None``): over the real
    tokens of the ``2B`` completions and of each prompt counted twice, the tokens the standard
    layout's ``[2B, T]`` pass routes, so it equals that layout's loss."""
    prompt = jnp.asarray(batch["prompt_tokens"])
    prompt_mask = jnp.asarray(batch["prompt_mask"]).astype(bool)
    completion = _both(batch, "completion_tokens")
    completion_mask = _both(batch, "completion_mask").astype(bool)
    b, p = prompt.shape
    cache = model.init_cache(b, p + completion.shape[1])
    router = dict(return_router_logits=router_aux_loss)
    prompt_out = model.decode(prompt, prompt_mask, cache=cache, **router)
    prompt_hidden, cache = prompt_out[:2]
    twice = lambda x, axis: jnp.concatenate([x, x], axis=axis)
    cache = KVCache(twice(cache.k, 1), twice(cache.v, 1), twice(cache.mask, 0), cache.index)
    completion_out = model.decode(completion, completion_mask, cache=cache, **router)
    hidden = completion_out[0]
    last = last_valid_index(prompt_mask)  # P - 1 for left padding; any padding works
    last_prompt = twice(jnp.take_along_axis(prompt_hidden, last[:, None, None], axis=1), 0)
    predictors = jnp.concatenate([last_prompt, hidden[:, :-1]], axis=1)
    aux = None
    if router_aux_loss:  # router logits [L, rows, length, E] -> [L, tokens, E]
        flat = lambda x: x.reshape(x.shape[0], -1, x.shape[-1])
        prompt_logits = flat(prompt_out[2])
        logits = jnp.concatenate([prompt_logits, prompt_logits, flat(completion_out[2])], axis=1)
        prompt_mask = prompt_mask.reshape(-1)
        mask = jnp.concatenate([prompt_mask, prompt_mask, completion_mask.reshape(-1)])
        aux = _router_aux_loss(model, logits, mask)
    return predictors, completion, completion_mask, hidden, aux


def shared_prompt_sequence_logps(
    graphdef: Any,
    params: Any,
    batch: Mapping[str, Any],
    *,
    chunk_size: int = 1024,
    return_router_aux_loss: bool = False,
) -> tuple[jax.Array, ...]:
    """:func:`concatenated_sequence_logps` on the shared-prompt layout
    (:func:`rljax.data.share_prompts`): each pair's prompt runs once.

    The ``[B, P]`` prompts run first and fill a key/value cache of ``P + C`` slots; the cache
    is repeated for the chosen and the rejected half, and the ``[2B, C]`` completions run
    against it (positions continue from each prompt's length, so RoPE / learned positions are
    those of the standard layout). Token ``j`` of a completion is predicted from the
    completion's hidden state ``j - 1``, token 0 from the prompt's last one; log-probs are
    computed (chunked) only at these ``2B x C`` positions. Prompts may be padded on either side
    (masked cache slots are skipped; positions count real tokens only).

    Returns ``(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)``, each ``[B]``,
    equal to the standard layout's to float tolerance; with ``return_router_aux_loss=True`` a
    fifth entry, the load-balancing loss (each prompt's tokens counted twice, so it equals the
    standard layout's too).
    """
    _check_pair_batch(batch, SHARED_PROMPT_KEYS)
    model = merge(graphdef, params)
    predictors, completion, completion_mask, _, aux = _shared_prompt_decode(
        model, batch, return_router_aux_loss
    )
    logps = chunked_token_logprobs(
        predictors,
        model.unembedding(),
        completion,
        chunk_size=chunk_size,
        softcap=model.config.final_logit_softcap,
    )
    total, lengths = masked_sum_and_count(logps, completion_mask, axis=-1)
    b = total.shape[0] // 2
    out = (total[:b], total[b:], lengths[:b], lengths[b:])
    return (*out, aux) if return_router_aux_loss else out


def pair_rewards(graphdef: Any, params: Any, batch: Mapping[str, Any]) -> tuple[jax.Array, ...]:
    """``(chosen_rewards, rejected_rewards)`` ``[B]``: a reward-head model's score at the last
    real token of each chosen and rejected sequence, in either layout (one ``[2B, T]`` pass, or
    the shared-prompt forward of :func:`shared_prompt_sequence_logps`)."""
    shared = "prompt_tokens" in batch
    keys = SHARED_PROMPT_KEYS if shared else tuple(k for k in PAIR_KEYS if "loss_mask" not in k)
    _check_pair_batch(batch, keys)
    model = merge(graphdef, params)
    if shared:
        _, _, completion_mask, hidden, _ = _shared_prompt_decode(model, batch)
        last = last_valid_index(completion_mask)
        rewards = model.scores(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
    else:
        rewards = model.rewards(_both(batch, "tokens"), _both(batch, "mask"))
    b = rewards.shape[0] // 2
    return rewards[:b], rewards[b:]


def pair_sequence_logps(
    graphdef: Any,
    params: Any,
    batch: Mapping[str, Any],
    *,
    chunk_size: int = 1024,
    return_router_aux_loss: bool = False,
) -> tuple[jax.Array, ...]:
    """Chosen and rejected sequence log-probs of a preference batch in either layout:
    :func:`shared_prompt_sequence_logps` if it has ``prompt_tokens`` (the layout of
    :func:`rljax.data.share_prompts`), else :func:`concatenated_sequence_logps` (with
    ``return_router_aux_loss=True``, the load-balancing loss as a fifth entry)."""
    settings = dict(chunk_size=chunk_size, return_router_aux_loss=return_router_aux_loss)
    if "prompt_tokens" in batch:
        return shared_prompt_sequence_logps(graphdef, params, batch, **settings)
    return concatenated_sequence_logps(graphdef, params, batch, **settings)


@functools.lru_cache(maxsize=8)
def _reference_forward(graphdef: Any, chunk_size: int) -> Callable:
    """The jitted ``(params, rows) -> (chosen_logps, rejected_logps)`` of
    :func:`reference_logps`, cached so that repeated calls reuse the compiled function."""

    @jax.jit
    def forward(params, rows):
        chosen, rejected, _, _ = pair_sequence_logps(graphdef, params, rows, chunk_size=chunk_size)
        return chosen.astype(jnp.float32), rejected.astype(jnp.float32)

    return forward


def reference_logps(
    graphdef: Any,
    ref_params: Any,
    batch: Mapping[str, Any],
    *,
    chunk_size: int = 1024,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Precompute the reference policy's sequence log-probs over a whole preference data set.

    One jitted forward per ``batch_size`` pairs (chosen and rejected concatenated); the last
    slice is padded with repeated rows to ``batch_size`` so that it reuses the compiled
    function. ``ref_params`` may be sharded (placed with ``jax.device_put``); the function
    follows their shardings.

    Args:
      graphdef, ref_params: the frozen reference model, from ``nnx.split``.
      batch: the data set as a dict of ``[N, T]`` arrays (the :mod:`rljax.data` contract, or
        the shared-prompt layout of :func:`rljax.data.share_prompts`; extra keys are ignored).
      chunk_size: rows per chunk of the log-prob computation.
      batch_size: pairs per forward pass.

    Returns:
      ``{"ref_chosen_logps": float32 [N], "ref_rejected_logps": float32 [N]}`` as numpy arrays,
      to add to the data set (``{**data, **reference_logps(...)}``) for
      ``DPOConfig(reference="precomputed")``.
    """
    keys = SHARED_PROMPT_KEYS if "prompt_tokens" in batch else PAIR_KEYS
    _check_pair_batch(batch, keys)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = int(np.shape(batch[keys[0]])[0])
    data = {k: np.asarray(batch[k]) for k in keys}

    forward = _reference_forward(graphdef, chunk_size)
    chosen_out, rejected_out = [], []
    for start in range(0, n, batch_size):
        index = np.arange(start, start + batch_size)
        index = np.minimum(index, n - 1)  # pad the last slice by repeating its last row
        chosen, rejected = forward(ref_params, {k: v[index] for k, v in data.items()})
        keep = min(batch_size, n - start)
        chosen_out.append(np.asarray(chosen)[:keep])
        rejected_out.append(np.asarray(rejected)[:keep])
    empty = np.zeros((0,), np.float32)
    return {
        "ref_chosen_logps": np.concatenate(chosen_out) if chosen_out else empty,
        "ref_rejected_logps": np.concatenate(rejected_out) if rejected_out else empty,
    }


def _leaf_batch_shardings(batch_example: Any, mesh: Mesh, rules: ShardingRules) -> Any:
    axes = rules.mesh_axes("batch")
    shards = int(np.prod([mesh.shape[a] for a in axes]))

    def one(path, leaf):
        shape = np.shape(leaf)
        if not shape:
            return replicated(mesh)
        if shape[0] % shards:
            name = jax.tree_util.keystr(path)
            raise ValueError(
                f"batch leaf {name!r} has leading size {shape[0]}, not divisible by "
                f"{' x '.join(axes)} = {shards} devices; make the batch a multiple of {shards}"
            )
        return batch_sharding(mesh, rules)

    return jax.tree_util.tree_map_with_path(one, batch_example)


def compile_update(
    update: Callable,
    state: Any,
    batch_example: Any,
    mesh: Mesh,
    rules: ShardingRules = DEFAULT_RULES,
    *,
    donate: bool = True,
) -> tuple[Any, Callable, Any]:
    """Place a train state on ``mesh`` and jit ``update(state, batch) -> (state, metrics)``.

    Equivalent to::

        state_shardings = rljax.sharding.train_state_shardings(state, mesh, rules)
        state = jax.device_put(state, state_shardings)
        step = jax.jit(update, in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)

    Parameters (and every subtree shaped like them: Adam's moments, a DPO reference model)
    get the parameter shardings of ``rules``; the rest of the state is replicated. Batch
    arrays are split along their leading axis over ``data`` x ``fsdp``, scalars replicated.
    Metrics come back replicated. Because the batch is one global array, means inside the
    update are exact global-batch means.

    Args:
      update: the pure step, e.g. from :func:`rljax.dpo.make_dpo_update`.
      state: the unplaced train state (its ``.params`` give the parameter shardings).
      batch_example: a batch with the structure and shapes of every batch to come (only
        shapes are read; it is used to build the batch shardings and check divisibility).
      mesh: the device mesh (:func:`rljax.sharding.make_mesh`).
      rules: logical-axis sharding rules.
      donate: donate the state argument (its buffers are reused for the new state).

    Returns:
      ``(placed_state, step, batch_shardings)``: place each batch with
      ``jax.device_put(batch, batch_shardings)`` (or :func:`rljax.sharding.shard_batch`)
      before calling ``step(state, batch)``: jit does not reshard arguments already committed
      to another sharding. With ``donate=True`` do not reuse ``state`` (the unplaced one)
      afterwards: ``device_put`` may share buffers with it, which the first step deletes.
    """
    state_shardings = _train_state_shardings(state, mesh, rules)
    batch_shardings = _leaf_batch_shardings(batch_example, mesh, rules)
    placed = jax.device_put(state, state_shardings)
    step = jax.jit(
        sharding.on_mesh(update, mesh, rules),  # the model's activations split by batch
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0 if donate else (),
    )
    return placed, step, batch_shardings
