"""Continuous batching: a fixed number of decode slots, each refilled with the next waiting
prompt as soon as its row finishes, so a batch with long-tailed completion lengths does not
wait for its longest row.

:func:`rljax.models.generate.generate` decodes a batch in lockstep: every row occupies its
cache row until the *last* row of the batch has finished, so with completion lengths of 10, 10,
10 and 500 tokens about three quarters of the rows' decode work is padding. :class:`Engine` keeps
``slots`` rows busy instead (the design of vLLM's and JetStream's engines, the latter's
``prefill`` / ``insert`` / ``generate`` split in particular):

* **prefill** the prompts that enter slots together (each left-padded to the bucket of the
  longest) in one batched forward pass: their keys and values and the logits of their first
  completion tokens (:func:`prefill`);
* **insert** those prefixes into the free slots, all in one call: each slot's cache row, mask
  and write position are replaced, its first token is sampled (:func:`insert`). With
  ``group_size=G`` a prompt is prefilled once and inserted ``G`` times (prefix sharing; a
  group split between two refills reuses the earlier prefill);
* **decode** up to ``steps_per_call`` steps of all slots in one compiled ``lax.while_loop``
  (:func:`decode`). Each slot writes its keys and values at its *own* cache position (a
  :class:`~rljax.models.transformer.KVCache` whose ``index`` is ``[slots]``), so slots at
  different stages of different prompts decode together in one batched
  :meth:`~rljax.models.transformer.Transformer.decode`. A row stops at its first EOS, at
  ``max_new_tokens`` or at its prompt's own limit.
  The loop returns to the host early once a slot has freed while prompts wait (and once no slot
  is busy); the host then retires finished rows and inserts waiting prompts.

Every compiled piece has a fixed shape: the decode step is traced once per engine (slots,
cache width); prefill and insert once per prompt-length bucket and power-of-two count of
prompts and of requests (padding rows are copies, padding requests write nothing), so the
first call meets a handful of shapes and later calls, refills included, compile nothing
(``Engine.traces`` counts the traces; tested).

**Randomness** is per request, not per slot: request ``r`` (prompt ``r // G``, sample
``r % G``, the output row) draws its ``j``-th token with ``fold_in(fold_in(key, r), j)``, so a
sampled completion does not depend on the slot it ran in, on the number of slots or on the
other prompts (tested). The stream differs from :func:`~rljax.models.generate.generate`'s
(``fold_in(key, step)`` over the whole batch), the distribution does not: the same sampler
(temperature, top-k, top-p, as :mod:`rljax.models.generate` applies them) runs on each row. Greedy
decoding gives :func:`~rljax.models.generate.generate`'s tokens for every prompt (tested).

Usage::

    config = SamplingConfig(max_new_tokens=256, temperature=1.0, eos_token_id=2)
    graphdef, params = nnx.split(model)
    engine = Engine(graphdef, config, slots=16, max_prompt_len=128)
    out = engine.generate(params, [[5, 6, 7], [8, 9], ...], jax.random.key(0), group_size=8)
    out.completions, out.completion_mask, out.logprobs, out.policy_logprobs, out.lengths
    engine.stats  # decode steps, device calls, slot utilisation of the last call

The outputs are a :class:`~rljax.models.generate.GenerationOutput` of numpy arrays in the
input order (prompts left-padded to the longest), what ``generate`` returns for the same
prompts. Sliding-window layers count padding slots, as Hugging Face's cache positions (and
``generate``) do, so on such models a completion depends on its prompt's bucket padding.

The engine is a host loop around compiled pieces: unlike :func:`~rljax.models.generate.generate`
it cannot run inside a caller's ``jax.jit``. The slots are one device's batch (no mesh
sharding of the slot axis is set up here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.models.generate import (
    GenerationOutput,
    SamplingConfig,
    _is_int,
    _sample,
    _typed_key,
)
from rljax.models.transformer import KVCache, Transformer

__all__ = [
    "DEFAULT_STEPS_PER_CALL",
    "Engine",
    "EngineState",
    "EngineStats",
    "Prefix",
    "decode",
    "init_state",
    "insert",
    "prefill",
    "prompt_bucket",
]

#: Default of ``Engine(steps_per_call=...)``, the most decode steps between two host checks
#: (benchmarks/RESULTS.md, continuous batching: with the early return on a freed slot the
#: cap matters only while nothing waits).
DEFAULT_STEPS_PER_CALL = 64
#: The smallest prompt-length bucket: prompts are left-padded to a power of two at least this
#: long (capped at the engine's ``max_prompt_len``), so prefill compiles once per bucket.
MIN_BUCKET = 16


class Prefix(NamedTuple):
    """Prefilled prompts (:func:`prefill`): what :func:`insert` copies into slots.

    Attributes:
      k, v: ``[layers, K, P, kv_heads, head_dim]``, the ``K`` prompts' keys and values (``P``
        = their bucket, each prompt left-padded to it).
      mask: ``bool [K, P]``, True at the prompts' tokens.
      logits: ``float32 [K, V]``, the logits of each prompt's first completion token.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    logits: jax.Array


class EngineState(NamedTuple):
    """The decode slots (a pytree of fixed shape: ``S`` slots, cache width ``C``, ``N`` =
    ``max_new_tokens``).

    Attributes:
      cache: the slots' :class:`~rljax.models.transformer.KVCache`: ``k, v [layers, S, C,
        kv_heads, head_dim]``, ``mask [S, C]`` and ``index int32 [S]``, each slot's next write
        position.
      token: ``int32 [S]``, each slot's last emitted token (the next step's input).
      active: ``bool [S]``, the slot holds a request that has not finished.
      steps: ``int32 [S]``, tokens emitted for the slot's request.
      limit: ``int32 [S]``, the request's token limit (``max_new_tokens``, or its own).
      keys: ``[S]`` PRNG keys, the slot's request key (``fold_in(key, request)``).
      tokens: ``int32 [S, N]``, the slot's completion so far (``pad_token_id`` after it).
      logprobs, policy_logprobs: ``float32 [S, N]``, as in
        :class:`~rljax.models.generate.GenerationOutput` (0 after the completion).
    """

    cache: KVCache
    token: jax.Array
    active: jax.Array
    steps: jax.Array
    limit: jax.Array
    keys: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    policy_logprobs: jax.Array


@dataclasses.dataclass
class EngineStats:
    """What the last :meth:`Engine.generate` call did.

    Attributes:
      requests: completions produced (prompts x ``group_size``).
      tokens: generated tokens (EOS included), the useful work.
      decode_steps: decode steps of the slot batch (each computes every slot).
      decode_calls: compiled decode calls, each followed by a host check (a device sync).
      prefills, inserts: prompts prefilled, requests inserted into slots.
      slot_utilisation: decode-step tokens over ``decode_steps * slots`` (the first token of
        each request comes from its prefill, not a decode step).
    """

    requests: int = 0
    tokens: int = 0
    decode_steps: int = 0
    decode_calls: int = 0
    prefills: int = 0
    inserts: int = 0
    slot_utilisation: float = 0.0


def prompt_bucket(length: int, max_prompt_len: int) -> int:
    """The padded length a prompt of ``length`` tokens is prefilled at: the smallest power of
    two ``>= length`` and ``>= MIN_BUCKET``, capped at ``max_prompt_len``."""
    if length > max_prompt_len:
        raise ValueError(f"a prompt of {length} tokens exceeds max_prompt_len={max_prompt_len}")
    return min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), max_prompt_len)


def init_state(model: Transformer, config: SamplingConfig, slots: int, width: int) -> EngineState:
    """Empty slots: ``slots`` rows of a KV cache ``width`` wide (``max_prompt_len +
    max_new_tokens - 1``), none active."""
    c, n = model.config, config.max_new_tokens
    for field, ids in (("eos_token_id", config.eos_ids), ("pad_token_id", (config.pad_token_id,))):
        if any(i >= c.vocab_size for i in ids):
            raise ValueError(
                f"SamplingConfig.{field} {ids} is outside the vocabulary ({c.vocab_size})"
            )
    if c.family == "gpt2" and width + 1 > c.max_position_embeddings:
        raise ValueError(
            f"max_prompt_len + max_new_tokens = {width + 1} exceeds GPT-2's position table "
            f"({c.max_position_embeddings})"
        )
    cache = model.init_cache(slots, width, dtype=config.cache_dtype)
    return EngineState(
        cache=cache._replace(index=jnp.zeros((slots,), jnp.int32)),
        token=jnp.zeros((slots,), jnp.int32),
        active=jnp.zeros((slots,), bool),
        steps=jnp.zeros((slots,), jnp.int32),
        limit=jnp.full((slots,), n, jnp.int32),
        keys=jax.random.split(jax.random.key(0), slots),
        tokens=jnp.full((slots, n), config.pad_token_id, jnp.int32),
        logprobs=jnp.zeros((slots, n), jnp.float32),
        policy_logprobs=jnp.zeros((slots, n), jnp.float32),
    )


def prefill(model: Transformer, config: SamplingConfig, tokens: jax.Array, mask: jax.Array):
    """Prompts ``tokens`` and ``mask`` ``[K, P]`` (each left-padded) through the model into a
    ``K``-row cache, in one batched forward pass: their :class:`Prefix`."""
    k, p = tokens.shape
    cache = model.init_cache(k, p, dtype=config.cache_dtype)
    hidden, cache = model.decode(tokens.astype(jnp.int32), mask.astype(bool), cache=cache)
    logits = model.logits(hidden[:, -1]).astype(jnp.float32)
    return Prefix(cache.k, cache.v, cache.mask, logits)


def _is_eos(token, config: SamplingConfig):
    eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)
    return jnp.any(token[..., None] == eos, axis=-1)


def _sample_rows(logits, keys, steps, temperature, top_p, config):
    """One token per row of ``logits [S, V]``, row ``s`` with ``fold_in(keys[s], steps[s])``."""
    if temperature is None:  # greedy only: no random numbers
        return _sample(logits, None, None, None, config)
    return _sample(logits, jax.vmap(jax.random.fold_in)(keys, steps), temperature, top_p, config)


def insert(
    state: EngineState,
    slots,
    which,
    prefix: Prefix,
    keys,
    limits,
    config: SamplingConfig,
    temperature,
    top_p,
) -> tuple[EngineState, tuple[jax.Array, ...]]:
    """Put prefilled prompts into slots, ``M`` requests at once: request ``j`` goes to slot
    ``slots[j]`` (``int32 [M]``; a slot out of range, ``>= S``, is padding and writes nothing)
    with prompt ``prefix[which[j]]``, request key ``keys[j]`` and token limit ``limits[j]``
    (``<= max_new_tokens``). Its keys, values and mask replace the slot's cache row (write
    position: the prompts' bucket), its first token is sampled with ``fold_in(keys[j], 0)``.
    Returns the new state and the slots' previous outputs ``(tokens [M, N], logprobs [M, N],
    policy_logprobs [M, N], steps [M])``, the requests they retire."""
    n, m = config.max_new_tokens, slots.shape[0]
    cache = state.cache
    p = prefix.mask.shape[1]
    slots = slots.astype(jnp.int32)
    k = cache.k.at[:, slots, :p].set(prefix.k[:, which].astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, slots, :p].set(prefix.v[:, which].astype(cache.v.dtype), mode="drop")
    row_mask = jnp.zeros((m, cache.mask.shape[1]), bool).at[:, :p].set(prefix.mask[which])
    mask = cache.mask.at[slots].set(row_mask, mode="drop")
    index = cache.index.at[slots].set(p, mode="drop")

    zero = jnp.zeros((m,), jnp.int32)
    token, logp, policy_logp = _sample_rows(
        prefix.logits[which], keys, zero, temperature, top_p, config
    )
    retired = tuple(
        jnp.take(x, slots, axis=0, mode="clip")
        for x in (state.tokens, state.logprobs, state.policy_logprobs, state.steps)
    )

    def put(buffer, value):
        return buffer.at[slots].set(value, mode="drop")

    def first(value, fill):
        return jnp.full((m, n), fill, value.dtype).at[:, 0].set(value)

    state = EngineState(
        cache=KVCache(k, v, mask, index),
        token=put(state.token, token),
        active=put(state.active, ~_is_eos(token, config) & (limits > 1)),
        steps=put(state.steps, zero + 1),
        limit=put(state.limit, limits.astype(jnp.int32)),
        keys=put(state.keys, keys),
        tokens=put(state.tokens, first(token, config.pad_token_id)),
        logprobs=put(state.logprobs, first(logp, 0.0)),
        policy_logprobs=put(state.policy_logprobs, first(policy_logp, 0.0)),
    )
    return state, retired


def _decode_step(model: Transformer, state: EngineState, config, temperature, top_p):
    """One token for every active slot, each at its own cache position."""
    cache, active = state.cache, state.active
    # cache.index is [S]: each slot writes at its own position (an inactive slot writes a
    # masked entry there and does not advance)
    hidden, new = model.decode(state.token[:, None], active[:, None], cache=cache)
    logits = model.logits(hidden[:, 0])
    token, logp, policy_logp = _sample_rows(
        logits, state.keys, state.steps, temperature, top_p, config
    )
    token = jnp.where(active, token, jnp.int32(config.pad_token_id))
    rows = jnp.arange(token.shape[0])
    at = jnp.where(active, state.steps, config.max_new_tokens)  # out of range: dropped

    def write(buffer, value):
        return buffer.at[rows, at].set(value, mode="drop")

    steps = state.steps + active
    done = _is_eos(token, config) | (steps >= state.limit)
    return EngineState(
        cache=new._replace(index=cache.index + active),
        token=token,
        active=active & ~done,
        steps=steps,
        limit=state.limit,
        keys=state.keys,
        tokens=write(state.tokens, token),
        logprobs=write(state.logprobs, logp),
        policy_logprobs=write(state.policy_logprobs, policy_logp),
    )


def decode(
    model: Transformer,
    state: EngineState,
    config: SamplingConfig,
    max_steps,
    waiting,
    temperature,
    top_p,
) -> tuple[EngineState, jax.Array]:
    """Decode all slots for up to ``max_steps`` steps (a ``lax.while_loop``); stop early when
    no slot is active, or when ``waiting`` (traced bool: prompts wait for a slot) and a slot
    has freed. Returns the state and the number of steps run."""

    def cond(carry):
        i, st = carry
        free = jnp.any(~st.active)
        return (i < max_steps) & jnp.any(st.active) & ~(waiting & free)

    def body(carry):
        i, st = carry
        return i + 1, _decode_step(model, st, config, temperature, top_p)

    steps, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state, steps


class Engine:
    """Continuous batching over ``slots`` decode rows (see the module docstring).

    Args:
      graphdef: from ``nnx.split(model)`` (a :class:`~rljax.models.transformer.Transformer`
        with an LM head).
      config: a :class:`~rljax.models.generate.SamplingConfig`, as for
        :func:`~rljax.models.generate.make_generate_fn` (what it compiles in and what a call
        may override is the same: ``temperature`` and ``top_p`` are traced).
      slots: decode rows, ``S >= 1``: the batch of every decode step.
      max_prompt_len: the longest prompt the engine takes; the cache is ``max_prompt_len +
        max_new_tokens - 1`` wide. ``None``: the longest prompt of each call rounded up to a
        power of two (a call with longer prompts than the last then compiles a wider step).
      steps_per_call: the most decode steps between two host checks (each check is a device
        sync). A call also returns as soon as a slot frees while prompts wait, so this cap
        matters only while nothing waits; see :data:`DEFAULT_STEPS_PER_CALL`.

    ``traces`` counts the traces of each compiled piece (``"prefill"``, ``"insert"``,
    ``"decode"``); ``stats`` describes the last call (:class:`EngineStats`).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        config: SamplingConfig,
        *,
        slots: int,
        max_prompt_len: int | None = None,
        steps_per_call: int = DEFAULT_STEPS_PER_CALL,
    ):
        if not isinstance(config, SamplingConfig):
            raise TypeError(f"Engine: config must be a SamplingConfig, got {type(config).__name__}")
        if not _is_int(slots) or slots < 1:
            raise ValueError(f"Engine: slots must be an int >= 1, got {slots!r}")
        if max_prompt_len is not None and (not _is_int(max_prompt_len) or max_prompt_len < 1):
            raise ValueError(
                f"Engine: max_prompt_len must be None or an int >= 1, got {max_prompt_len!r}"
            )
        if not _is_int(steps_per_call) or steps_per_call < 1:
            raise ValueError(f"Engine: steps_per_call must be an int >= 1, got {steps_per_call!r}")
        self.graphdef = graphdef
        self.config = config
        self.slots = int(slots)
        self.max_prompt_len = None if max_prompt_len is None else int(max_prompt_len)
        self.steps_per_call = int(steps_per_call)
        self.sampling = config.temperature > 0
        self.nucleus = self.sampling and config.top_p < 1
        self.traces = {"prefill": 0, "insert": 0, "decode": 0}
        self.stats = EngineStats()

        def merged(params):
            return nnx.merge(graphdef, *(params if isinstance(params, tuple) else (params,)))

        traces = self.traces

        def run_prefill(params, tokens, mask):
            traces["prefill"] += 1
            return prefill(merged(params), config, tokens, mask)

        def run_insert(state, slots, which, prefix, key, requests, limits, temperature, top_p):
            traces["insert"] += 1
            request_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(requests)
            return insert(
                state, slots, which, prefix, request_keys, limits, config, temperature, top_p
            )

        def run_decode(params, state, max_steps, waiting, temperature, top_p):
            traces["decode"] += 1
            model = merged(params)
            return decode(model, state, config, max_steps, waiting, temperature, top_p)

        # The slots' state is donated: each call updates the cache in place, no copy.
        self._prefill = jax.jit(run_prefill)
        self._insert = jax.jit(run_insert, donate_argnums=0)
        self._decode = jax.jit(run_decode, donate_argnums=1)
        self._init = jax.jit(
            lambda params, width: init_state(merged(params), config, self.slots, width),
            static_argnums=1,
        )

    # ------------------------------------------------------------------ host loop

    def _prefill_rows(self, params, rows, prompts, max_len) -> tuple[Prefix, dict[int, int]]:
        """Prefill ``prompts`` (indices into ``rows``) in one call: left-padded to the bucket of
        the longest, the count rounded up to a power of two with copies of the first (so the
        calls compile once per bucket pair). Returns the prefix and each prompt's row."""
        bucket = prompt_bucket(max(len(rows[i]) for i in prompts), max_len)
        count = _bucket(len(prompts))
        padded = [*prompts, *[prompts[0]] * (count - len(prompts))]
        tokens = np.full((count, bucket), self.config.pad_token_id, np.int32)
        mask = np.zeros((count, bucket), bool)
        for j, i in enumerate(padded):
            tokens[j, bucket - len(rows[i]) :] = rows[i]
            mask[j, bucket - len(rows[i]) :] = True
        prefix = self._prefill(params, tokens, mask)
        return prefix, {i: j for j, i in enumerate(prompts)}

    def _insert_rows(self, state, prefix, prefix_rows, entries, g, limits, key, temperature, top_p):
        """Insert ``entries`` (``(slot, request)`` pairs, their prompts in ``prefix``) in one
        call, padded to a power of two with requests for slot ``slots`` (written nowhere)."""
        m = _bucket(len(entries))
        at = np.full((m,), self.slots, np.int32)
        which, requests = np.zeros((m,), np.int32), np.zeros((m,), np.int32)
        limit = np.ones((m,), np.int32)
        for j, (slot, request) in enumerate(entries):
            at[j], requests[j] = slot, request
            which[j], limit[j] = prefix_rows[request // g], limits[request // g]
        return self._insert(state, at, which, prefix, key, requests, limit, temperature, top_p)

    def _overrides(self, temperature, top_p):
        """The traced ``(temperature, top_p)`` of a call, checked as make_generate_fn does."""
        config = self.config
        if temperature is not None and not self.sampling:
            raise ValueError(
                "Engine: a temperature override needs SamplingConfig.temperature > 0 (which "
                "compiles the sampler in); this engine was built for greedy decoding"
            )
        if top_p is not None and not self.nucleus:
            raise ValueError(
                "Engine: a top_p override needs SamplingConfig.temperature > 0 and top_p < 1 "
                "(which compile the nucleus filter in)"
            )
        if self.sampling:
            temperature = config.temperature if temperature is None else temperature
            temperature = jnp.asarray(temperature, jnp.float32)
        if self.nucleus:
            top_p = jnp.asarray(config.top_p if top_p is None else top_p, jnp.float32)
        return temperature, top_p

    def generate(
        self,
        params: Any,
        prompts: Sequence[Sequence[int]] | np.ndarray,
        key: jax.Array,
        *,
        prompt_mask: np.ndarray | None = None,
        group_size: int = 1,
        max_new_tokens: int | Sequence[int] | None = None,
        temperature: float | jax.Array | None = None,
        top_p: float | jax.Array | None = None,
    ) -> GenerationOutput:
        """Complete every prompt ``group_size`` times through the slots.

        Args:
          params: the model's parameters (``nnx.split(model)[1]``, or a tuple of states).
          prompts: token lists of any lengths (each at least one token), or an ``int [B, P]``
            array with ``prompt_mask`` (any padding; the masked tokens are the prompt).
          key: a PRNG key; request ``r`` samples with ``fold_in(key, r)``.
          group_size: completions per prompt, ``G``: each prompt is prefilled once and
            inserted ``G`` times; prompt ``i``'s samples are rows ``i * G .. i * G + G - 1``.
          max_new_tokens: optional per-prompt token limits (``[B]`` ints, or one int) in ``[1,
            config.max_new_tokens]``: a row stops after its limit as if it had emitted an EOS
            there (``finished`` stays False), as in :func:`~rljax.models.generate.generate`.
          temperature, top_p: per-call overrides, as for
            :func:`~rljax.models.generate.make_generate_fn`.

        Returns:
          A :class:`~rljax.models.generate.GenerationOutput` of numpy arrays, ``B * G`` rows
          in the input order: ``tokens``/``mask`` are the prompt left-padded to the longest
          (the array's width for array input), then the completion.
        """
        rows, width_out = _prompt_rows(prompts, prompt_mask)
        if not _is_int(group_size) or group_size < 1:
            raise ValueError(f"Engine.generate: group_size must be an int >= 1, got {group_size!r}")
        temperature, top_p = self._overrides(temperature, top_p)
        key = _typed_key(key)  # a raw uint32 key (jax.random.PRNGKey) is wrapped
        config, slots, g = self.config, self.slots, int(group_size)
        n, pad = config.max_new_tokens, config.pad_token_id
        limits = np.full((len(rows),), n, np.int64)
        if max_new_tokens is not None:
            limits = np.broadcast_to(np.asarray(max_new_tokens), limits.shape).copy()
            if not np.issubdtype(limits.dtype, np.integer) or not (
                1 <= limits.min() and limits.max() <= n
            ):
                raise ValueError(
                    f"Engine.generate: max_new_tokens must be ints in [1, {n}] (one per prompt), "
                    f"got {max_new_tokens!r}"
                )
        longest = max(len(r) for r in rows)
        max_len = self.max_prompt_len
        if max_len is None:
            max_len = max(MIN_BUCKET, 1 << (longest - 1).bit_length())
        elif longest > max_len:
            raise ValueError(
                f"Engine.generate: a prompt has {longest} tokens, more than max_prompt_len="
                f"{max_len}"
            )
        state = self._init(params, max_len + n - 1)
        total = len(rows) * g

        slot_request = [-1] * slots
        free = list(reversed(range(slots)))  # pop() takes the lowest slot first
        retired: dict[int, tuple] = {}  # request -> (its batch of outputs, its row there)
        stats = EngineStats(requests=total)
        next_request = 0
        prefix, prefix_rows = None, {}  # the last prefill, and its row of each prompt
        while True:
            fill = []
            while free and next_request < total:
                fill.append((free.pop(), next_request))
                next_request += 1
            if fill:
                # the group of the last prefill may continue here (its prefix is reused); the
                # other prompts are prefilled together, once each
                cached = [(slot, r) for slot, r in fill if r // g in prefix_rows]
                parts = [(prefix, prefix_rows, cached)] if cached else []
                if len(cached) < len(fill):
                    prompts = sorted({r // g for _, r in fill[len(cached) :]})
                    prefix, prefix_rows = self._prefill_rows(params, rows, prompts, max_len)
                    stats.prefills += len(prompts)
                    parts.append((prefix, prefix_rows, fill[len(cached) :]))
                for source, source_rows, entries in parts:
                    state, old = self._insert_rows(
                        state, source, source_rows, entries, g, limits, key, temperature, top_p
                    )
                    for j, (slot, request) in enumerate(entries):
                        if slot_request[slot] >= 0:
                            retired[slot_request[slot]] = (old, j)
                        slot_request[slot] = request
                stats.inserts += len(fill)
            waiting = next_request < total
            state, ran = self._decode(
                params, state, np.int32(self.steps_per_call), np.bool_(waiting), temperature,
                top_p,
            )  # fmt: skip
            active, ran = jax.device_get((state.active, ran))
            stats.decode_calls += 1
            stats.decode_steps += int(ran)
            if not waiting and not active.any():
                break
            free = [s for s in reversed(range(slots)) if not active[s]]

        last = (state.tokens, state.logprobs, state.policy_logprobs, state.steps)
        for slot, request in enumerate(slot_request):
            if request >= 0:
                retired[request] = (last, slot)
        batches = {id(b): b for b, _ in retired.values()}
        host = dict(zip(batches, jax.device_get(list(batches.values())), strict=True))
        retired = {r: tuple(x[j] for x in host[id(b)]) for r, (b, j) in retired.items()}
        completions = np.stack([retired[r][0] for r in range(total)]).astype(np.int32)
        logprobs = np.stack([retired[r][1] for r in range(total)]).astype(np.float32)
        policy_logprobs = np.stack([retired[r][2] for r in range(total)]).astype(np.float32)
        lengths = np.asarray([retired[r][3] for r in range(total)], np.int32)
        completion_mask = np.arange(n)[None, :] < lengths[:, None]
        last_token = completions[np.arange(total), np.maximum(lengths - 1, 0)]
        finished = np.isin(last_token, config.eos_ids) & (lengths > 0)

        prompt_tokens = np.full((len(rows), width_out), pad, np.int32)
        prompt_mask_out = np.zeros((len(rows), width_out), bool)
        for i, row in enumerate(rows):
            prompt_tokens[i, width_out - len(row) :] = row
            prompt_mask_out[i, width_out - len(row) :] = True
        prompt_tokens = np.repeat(prompt_tokens, g, axis=0)
        prompt_mask_out = np.repeat(prompt_mask_out, g, axis=0)

        stats.tokens = int(lengths.sum())
        stats.slot_utilisation = (stats.tokens - total) / max(stats.decode_steps * slots, 1)
        self.stats = stats
        return GenerationOutput(
            tokens=np.concatenate([prompt_tokens, completions], axis=1),
            mask=np.concatenate([prompt_mask_out, completion_mask], axis=1),
            completion_mask=completion_mask,
            logprobs=logprobs,
            policy_logprobs=policy_logprobs,
            lengths=lengths,
            finished=finished,
        )


def _bucket(count: int) -> int:
    """The smallest power of two ``>= count``: batched prefills and inserts are padded to it,
    so their programs compile once per size class."""
    return 1 << max(count - 1, 0).bit_length()


def _prompt_rows(prompts, prompt_mask) -> tuple[list[np.ndarray], int]:
    """The prompts as a list of ``int32`` token arrays, and the width of the output's prompt
    columns."""
    if prompt_mask is not None:
        tokens = np.asarray(prompts)
        mask = np.asarray(prompt_mask).astype(bool)
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(
                f"Engine.generate: prompts {tokens.shape} and prompt_mask {mask.shape} must both "
                "be [B, P]"
            )
        rows = [row[m].astype(np.int32) for row, m in zip(tokens, mask, strict=True)]
        width = tokens.shape[1]
    else:
        if isinstance(prompts, np.ndarray | jax.Array) and np.ndim(prompts) != 2:
            raise ValueError(
                f"Engine.generate: a prompt array must be [B, P], got {np.shape(prompts)}"
            )
        rows = [np.asarray(row, np.int32).reshape(-1) for row in prompts]
        width = max((len(r) for r in rows), default=0)
    if not rows:
        raise ValueError("Engine.generate: no prompts")
    empty = [i for i, row in enumerate(rows) if len(row) == 0]
    if empty:
        raise ValueError(f"Engine.generate: prompts {empty[:5]} have no tokens (each needs one)")
    return rows, width
