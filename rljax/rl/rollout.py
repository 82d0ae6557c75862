"""The rollout stage of RL on language models: sample completions, then read the trainer's view
of them (one rollout function for every algorithm and for evaluation).

:func:`make_rollout_fn` samples through the continuous-batching engine
(:class:`rljax.models.engine.Engine`: decode slots refilled as rows finish, each prompt prefilled
once for its group) or, with ``sampler="static"``, with the lockstep KV-cache sampler
(:func:`rljax.models.generate.generate`, one compiled program with the scoring below). Then one
forward pass each of the policy, the frozen reference and (with a critic) the value model over
prompt + completion reads every per-token quantity at the completion columns (the logits at
position ``t`` predict token ``t + 1``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rljax import checks, experiment, rlhf, updates
from rljax.models import engine as engines
from rljax.models import generate, lora
from rljax.updates import lm

__all__ = [
    "CRITICS",
    "SAMPLERS",
    "RolloutRunSettings",
    "decode_completions",
    "example_batch",
    "make_rollout_fn",
    "sampling_config",
]

CRITICS = rlhf.CRITICS  # "head", "separate", "none"
#: ``make_rollout_fn(sampler=...)``: the continuous-batching engine, or lockstep decoding.
SAMPLERS = ("engine", "static")


@dataclasses.dataclass(frozen=True)
class RolloutRunSettings(experiment.LoRARunSettings):
    """The run settings of every RL run on language models, how its rollouts sample among them
    (:func:`make_rollout_fn`).

    Attributes:
      sampler: engine (continuous batching, rljax.models.engine: decode slots refilled as rows
        finish, each prompt prefilled once for its group) or static (the batch decoded in
        lockstep, one compiled program with the scoring passes). Same distribution, different
        random streams.
      rollout_slots: the engine's decode rows; none = one per row of a rollout (every sample
        starts at once). Fewer cap the KV cache's rows and refill slots as rows finish.
    """

    sampler: str = "engine"
    rollout_slots: int | None = None

    def __post_init__(self):
        super().__post_init__()
        checks.check_choice(self, "sampler", SAMPLERS)
        checks.check(self, {"rollout_slots": ">= 1"})
        if self.rollout_slots is not None and self.sampler != "engine":
            raise ValueError(
                f"--rollout-slots: set to {self.rollout_slots}, but --sampler {self.sampler} does "
                "not read it (only the engine has slots); drop it or use --sampler engine"
            )


def make_rollout_fn(
    graphdef,
    sampling: generate.SamplingConfig,
    *,
    ref_graphdef=None,
    critic: str = "none",
    value_graphdef=None,
    chunk_size: int = 1024,
    sampler: str = "engine",
    slots: int | None = None,
) -> Callable:
    """The rollout ``(policy_params, ref_params, value_params, prompt_tokens, prompt_mask, key,
    temperature, group_size=1) -> dict``.

    ``group_size`` samples ``G`` completions per prompt with the prompt prefilled once:
    ``B`` prompts give ``B * G`` rows, each prompt's group contiguous.

    ``sampler``: ``"engine"`` (default) decodes through an
    :class:`~rljax.models.engine.Engine` with ``slots`` decode rows (``None``: one per row of
    the call, so every request starts at once; fewer slots cap the KV cache and refill slots as
    rows finish, which pays on long-tailed completion lengths), then scores in one compiled
    program; request ``r`` samples with ``fold_in(key, r)``. ``"static"`` decodes the batch in
    lockstep (:func:`rljax.models.generate.generate`) inside the same compiled program as the
    scoring (its random stream is ``fold_in(key, step)``; the distribution is the same). Neither
    recompiles from one call to the next at a fixed shape.

    ``temperature`` is an argument of every call: one compiled sampler serves training, greedy
    evaluation at 0 and sampled evaluation at 1. ``ref_graphdef`` defaults to ``graphdef`` (the
    reference is the initial policy); ``ref_params=None`` with LoRA policy parameters is the
    policy with its adapters switched off (:func:`rljax.models.lora.disabled`: the base, no
    second copy). ``critic``: ``"head"`` (``graphdef`` carries a value head; its values come
    from the policy's forward pass), ``"separate"`` (a value model ``value_graphdef`` with
    ``value_params``) or ``"none"`` (``value_params`` is ignored; pass ``None``).

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
    if sampler not in SAMPLERS:
        raise ValueError(f"make_rollout_fn: sampler must be one of {SAMPLERS}, got {sampler!r}")
    if slots is not None and (sampler != "engine" or not isinstance(slots, int) or slots < 1):
        raise ValueError(
            f"make_rollout_fn: slots={slots!r} needs sampler='engine' and an int >= 1 "
            "(None: one slot per row)"
        )
    ref_graphdef = graphdef if ref_graphdef is None else ref_graphdef

    def score(policy_params, ref_params, value_params, gen: generate.GenerationOutput) -> dict:
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

    if sampler == "static":

        @functools.partial(jax.jit, static_argnames="group_size")
        def static_rollout(
            policy_params, ref_params, value_params, prompt_tokens, prompt_mask, key, temp,
            group_size=1,
        ):  # fmt: skip
            gen = generate.generate(
                (graphdef, policy_params), prompt_tokens, prompt_mask, key, sampling,
                temperature=temp, group_size=group_size,
            )  # fmt: skip
            return score(policy_params, ref_params, value_params, gen)

        return static_rollout

    # The engine compiles the sampler in only for a temperature > 0 config; every call passes
    # its temperature, so a greedy config's only effect would be to refuse the call's value.
    config = (
        sampling if sampling.temperature > 0 else dataclasses.replace(sampling, temperature=1.0)
    )
    scored = jax.jit(score)
    engines_by_shape: dict[tuple[int, int], engines.Engine] = {}

    def engine_rollout(
        policy_params, ref_params, value_params, prompt_tokens, prompt_mask, key, temp,
        group_size=1,
    ):  # fmt: skip
        prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
        rows, width = prompt_tokens.shape[0] * group_size, prompt_tokens.shape[1]
        shape = (rows if slots is None else slots, width)
        if shape not in engines_by_shape:  # one engine (its compiled pieces) per shape
            engines_by_shape[shape] = engines.Engine(
                graphdef, config, slots=shape[0], max_prompt_len=width
            )
        gen = engines_by_shape[shape].generate(
            policy_params, prompt_tokens, key, prompt_mask=prompt_mask, group_size=group_size,
            temperature=temp,
        )  # fmt: skip
        return scored(policy_params, ref_params, value_params, gen)

    # the engines (their traces and last-call stats) and the scoring program, for tests
    engine_rollout.engines, engine_rollout.score = engines_by_shape, scored
    return engine_rollout


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
