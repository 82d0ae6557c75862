"""The rollout stage of RL on language models: sample completions, then read the trainer's view
of them (one compiled program for every algorithm and for evaluation).

:func:`make_rollout_fn` samples with the KV-cache sampler (:mod:`rljax.models.generate`) and
then runs one forward pass each of the policy, the frozen reference and (with a critic) the
value model over prompt + completion, reading every per-token quantity at the completion
columns (the logits at position ``t`` predict token ``t + 1``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rljax import rlhf, updates
from rljax.models import generate, lora
from rljax.updates import lm

__all__ = ["CRITICS", "decode_completions", "example_batch", "make_rollout_fn", "sampling_config"]

CRITICS = rlhf.CRITICS  # "head", "separate", "none"


def make_rollout_fn(
    graphdef,
    sampling: generate.SamplingConfig,
    *,
    ref_graphdef=None,
    critic: str = "none",
    value_graphdef=None,
    chunk_size: int = 1024,
) -> Callable:
    """The jitted rollout ``(policy_params, ref_params, value_params, prompt_tokens,
    prompt_mask, key, temperature, group_size=1) -> dict``.

    ``group_size`` (static) samples ``G`` completions per prompt with the prompt prefilled
    once (:func:`rljax.models.generate.generate`): ``B`` prompts give ``B * G`` rows, each
    prompt's group contiguous.

    ``temperature`` is traced: one compiled program serves training, greedy evaluation at 0
    and sampled evaluation at 1. ``ref_graphdef`` defaults to ``graphdef`` (the reference is
    the initial policy); ``ref_params=None`` with LoRA policy parameters is the policy with its
    adapters switched off (:func:`rljax.models.lora.disabled`: the base, no second copy).
    ``critic``: ``"head"`` (``graphdef`` carries a value head; its values
    come from the policy's forward pass), ``"separate"`` (a value model ``value_graphdef``
    with ``value_params``) or ``"none"`` (``value_params`` is ignored; pass ``None``).

    Returns ``tokens``, ``mask`` ``[B, P + N]``, ``completion_mask`` ``[B, N]``, ``finished``
    ``[B]`` and per token ``[B, N]`` (0 at padding): ``old_logps`` (the trainer's
    log-probs), ``ref_logps``, ``sampler_logps`` (the sampler's own log-probs at
    temperature 1: their gap to ``old_logps`` is the sampler/trainer mismatch), ``entropy``
    (the policy's), and with a critic ``old_values``.
    """
    if critic not in CRITICS:
        raise ValueError(f"make_rollout_fn: critic must be one of {CRITICS}, got {critic!r}")
    if (critic == "separate") != (value_graphdef is not None):
        raise ValueError(
            f"make_rollout_fn: critic={critic!r}: pass value_graphdef exactly when "
            "critic='separate'"
        )
    ref_graphdef = graphdef if ref_graphdef is None else ref_graphdef

    @functools.partial(jax.jit, static_argnames="group_size")
    def rollout(
        policy_params, ref_params, value_params, prompt_tokens, prompt_mask, key, temp,
        group_size=1,
    ):  # fmt: skip
        gen = generate.generate(
            (graphdef, policy_params), prompt_tokens, prompt_mask, key, sampling,
            temperature=temp, group_size=group_size,
        )  # fmt: skip
        n = gen.completion_mask.shape[1]
        cmask = gen.completion_mask
        zero = lambda x: jnp.where(cmask, x, 0.0)
        policy = updates.completion_outputs(
            graphdef, policy_params, gen.tokens, gen.mask, n, chunk_size=chunk_size,
            values=critic == "head",
        )  # fmt: skip
        if ref_params is None and lora.has_lora(policy_params):  # the adapters switched off
            ref_params = lora.disabled(policy_params)
        ref = updates.completion_outputs(
            ref_graphdef, ref_params, gen.tokens, gen.mask, n, chunk_size=chunk_size
        )
        out = {
            "tokens": gen.tokens,
            "mask": gen.mask,
            "completion_mask": cmask,
            "finished": gen.finished,
            "old_logps": zero(policy["logps"]),
            "ref_logps": zero(ref["logps"]),
            "sampler_logps": zero(gen.policy_logprobs),
            "entropy": zero(policy["entropy"]),
        }
        if critic == "head":
            out["old_values"] = zero(policy["values"])
        elif critic == "separate":
            model = lm.merge(value_graphdef, value_params)
            hidden, _ = model.decode(gen.tokens, gen.mask)
            out["old_values"] = zero(model.scores(hidden[:, -n - 1 : -1]))
        return out

    return rollout


def decode_completions(tokenizer, rollout: dict) -> list[str]:
    """The completion texts of a rollout (its valid completion tokens, special tokens
    skipped)."""
    cmask = np.asarray(rollout["completion_mask"])
    tokens = np.asarray(rollout["tokens"])[:, -cmask.shape[1] :]
    return [
        tokenizer.decode([int(t) for t in row[m]], skip_special_tokens=True)
        for row, m in zip(tokens, cmask, strict=True)
    ]


def sampling_config(tokenizer, max_new_tokens: int, temperature: float) -> generate.SamplingConfig:
    """The sampler's settings for ``tokenizer``'s EOS and padding ids."""
    return generate.SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def example_batch(
    rows: int, prompt_width: int, max_new: int, *, token_advantages: bool, per_token=()
) -> dict[str, np.ndarray]:
    """Zeros shaped as an update's batch of ``rows`` rollout rows (for
    :func:`rljax.updates.lm.compile_update`'s batch shardings): ``tokens`` and ``mask`` of
    prompt + completion, ``completion_mask``, ``old_logps``, ``advantages`` (per token with
    ``token_advantages``, else per row) and the per-token float arrays named in
    ``per_token``."""
    width = prompt_width + max_new
    token_floats = np.zeros((rows, max_new), np.float32)
    batch = {
        "tokens": np.zeros((rows, width), np.int32),
        "mask": np.zeros((rows, width), bool),
        "completion_mask": np.zeros((rows, max_new), bool),
        "old_logps": token_floats,
        "advantages": token_floats if token_advantages else np.zeros((rows,), np.float32),
    }
    return batch | {name: token_floats for name in per_token}
