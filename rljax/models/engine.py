"""Continuous batching: a fixed number of decode slots, each refilled with the next waiting
prompt as soon as its row finishes, so a batch with long-tailed completion lengths does not
wait for its longest row.

:func:`rljax.models.generate.generate` decodes a batch in lockstep: every row occupies its
cache row until the *last* row of the batch has finished, so with completion lengths of 10, 10,
10 and 500 tokens about three quarters of the rows' decode work is padding. :class:`Engine` keeps
``slots`` rows busy instead (the design of vLLM's and JetStream's engines, the latter's
``prefill`` / ``insert`` / ``generate`` split in particular):

* **prefill** one prompt (left-padded to a length bucket) into a one-row KV cache: the prompt's
  keys and values and the logits of its first completion token (:func:`prefill`);
* **insert** that prefix into a free slot: its cache row, mask and write position are replaced,
  the first token is sampled (:func:`insert`). With ``group_size=G`` a prompt is prefilled once
  and inserted ``G`` times (prefix sharing);
* **decode** up to ``steps_per_call`` steps of all slots in one compiled ``lax.while_loop``
  (:func:`decode`). Each slot writes its keys and values at its *own* cache position (a
  :class:`~rljax.models.transformer.KVCache` whose ``index`` is ``[slots]``), so slots at
  different stages of different prompts decode together in one batched
  :meth:`~rljax.models.transformer.Transformer.decode`. A row stops at its first EOS, at
  ``max_new_tokens`` or at its prompt's own limit.
  The loop returns to the host early once a slot has freed while prompts wait (and once no slot
  is busy); the host then retires finished rows and inserts waiting prompts.

Every compiled piece has a fixed shape: the decode step is traced once per engine (slots,
cache width), prefill and insert once per prompt-length bucket; refilling slots compiles
nothing (``Engine.traces`` counts the traces; tested).

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

from rljax.models.generate import GenerationOutput, SamplingConfig, _is_int, _sample
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
    """One prefilled prompt (:func:`prefill`): what :func:`insert` copies into a slot.

    Attributes:
      k, v: ``[layers, P, kv_heads, head_dim]``, the prompt's keys and values (``P`` = its
        bucket, left-padded).
      mask: ``bool [P]``, True at the prompt's tokens.
      logits: ``float32 [V]``, the logits of the first completion token.
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
    """One prompt, ``tokens`` and ``mask`` ``[P]`` left-padded, through the model into a
    one-row cache: its :class:`Prefix`."""
    p = tokens.shape[0]
    cache = model.init_cache(1, p, dtype=config.cache_dtype)
    hidden, cache = model.decode(
        tokens[None].astype(jnp.int32), mask[None].astype(bool), cache=cache
    )
    logits = model.logits(hidden[0, -1]).astype(jnp.float32)
    return Prefix(cache.k[:, 0], cache.v[:, 0], cache.mask[0], logits)


def _is_eos(token, config: SamplingConfig):
    eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)
    return jnp.any(token[..., None] == eos, axis=-1)


def _sample_rows(logits, keys, steps, temperature, top_p, config):
    """One token per row of ``logits [S, V]``, row ``s`` with ``fold_in(keys[s], steps[s])``."""
    if temperature is None:  # greedy only: no random numbers
        return _sample(logits, None, None, None, config)

    def one(row_logits, key, step):
        token, logp, policy_logp = _sample(
            row_logits[None], jax.random.fold_in(key, step), temperature, top_p, config
        )
        return token[0], logp[0], policy_logp[0]

    return jax.vmap(one)(logits, keys, steps)


def insert(
    state: EngineState,
    slot,
    prefix: Prefix,
    key,
    limit,
    config: SamplingConfig,
    temperature,
    top_p,
) -> tuple[EngineState, tuple[jax.Array, ...]]:
    """Put a prefilled prompt into ``slot`` (traced) with request key ``key`` and token limit
    ``limit`` (traced, ``<= max_new_tokens``): its keys, values and mask replace the slot's
    cache row (write position: the prompt's bucket), its first token is sampled. Returns the new state and the slot's previous outputs ``(tokens
    [N], logprobs [N], policy_logprobs [N], steps [])``, the request it retires."""
    n = config.max_new_tokens
    cache = state.cache
    p = prefix.mask.shape[0]
    zero = jnp.zeros((), jnp.int32)
    slot = jnp.asarray(slot, jnp.int32)
    start = (zero, slot, zero, zero, zero)
    k = jax.lax.dynamic_update_slice(cache.k, prefix.k[:, None].astype(cache.k.dtype), start)
    v = jax.lax.dynamic_update_slice(cache.v, prefix.v[:, None].astype(cache.v.dtype), start)
    row_mask = jnp.zeros((cache.mask.shape[1],), bool).at[:p].set(prefix.mask)
    mask = jax.lax.dynamic_update_slice(cache.mask, row_mask[None], (slot, zero))
    index = cache.index.at[slot].set(p)

    token, logp, policy_logp = _sample_rows(
        prefix.logits[None], key[None], zero[None], temperature, top_p, config
    )
    token, logp, policy_logp = token[0], logp[0], policy_logp[0]
    pad = jnp.int32(config.pad_token_id)
    retired = (state.tokens[slot], state.logprobs[slot], state.policy_logprobs[slot])
    retired += (state.steps[slot],)
    state = EngineState(
        cache=KVCache(k, v, mask, index),
        token=state.token.at[slot].set(token),
        active=state.active.at[slot].set(~_is_eos(token, config) & (limit > 1)),
        steps=state.steps.at[slot].set(1),
        limit=state.limit.at[slot].set(limit),
        keys=state.keys.at[slot].set(key),
        tokens=state.tokens.at[slot].set(jnp.full((n,), pad).at[0].set(token)),
        logprobs=state.logprobs.at[slot].set(jnp.zeros((n,), jnp.float32).at[0].set(logp)),
        policy_logprobs=state.policy_logprobs.at[slot].set(
            jnp.zeros((n,), jnp.float32).at[0].set(policy_logp)
        ),
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

        def run_insert(state, slot, prefix, key, request, limit, temperature, top_p):
            traces["insert"] += 1
            request_key = jax.random.fold_in(key, request)
            return insert(state, slot, prefix, request_key, limit, config, temperature, top_p)

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
        if not jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey)
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
        retired: dict[int, tuple] = {}
        stats = EngineStats(requests=total)
        next_request, prefix, prefix_of = 0, None, -1
        while True:
            while free and next_request < total:
                slot, prompt = free.pop(), next_request // g
                if prompt != prefix_of:
                    bucket = prompt_bucket(len(rows[prompt]), max_len)
                    tokens, mask = _left_pad_one(rows[prompt], bucket, pad)
                    prefix, prefix_of = self._prefill(params, tokens, mask), prompt
                    stats.prefills += 1
                state, old = self._insert(
                    state, np.int32(slot), prefix, key, np.int32(next_request),
                    np.int32(limits[prompt]), temperature, top_p,
                )  # fmt: skip
                stats.inserts += 1
                if slot_request[slot] >= 0:
                    retired[slot_request[slot]] = old
                slot_request[slot] = next_request
                next_request += 1
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

        last = jax.device_get((state.tokens, state.logprobs, state.policy_logprobs, state.steps))
        for slot, request in enumerate(slot_request):
            if request >= 0:
                retired[request] = tuple(x[slot] for x in last)
        retired = jax.device_get(retired)
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


def _left_pad_one(row: np.ndarray, length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((length,), pad, np.int32)
    mask = np.zeros((length,), bool)
    tokens[length - len(row) :] = row
    mask[length - len(row) :] = True
    return tokens, mask


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
