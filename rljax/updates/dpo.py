"""The DPO update: :func:`make_dpo_update` and :func:`make_dpo_eval` bind
:func:`rljax.dpo.dpo_loss` to a language model (policy and reference log-probs of
chosen/rejected pairs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rljax import checks
from rljax.dpo import (
    ARGUMENT_READERS,
    _name,
    _validate,
    dpo_loss,
)
from rljax.models import lora
from rljax.updates.common import (
    check_config,
    check_hyperparams,
    check_router_aux_loss_coef,
    make_objective_eval,
    make_optax_update,
    reference_params,
)
from rljax.updates.lm import pair_sequence_logps

__all__ = [
    "REFERENCE_MODES",
    "DPOConfig",
    "DPOState",
    "init_dpo_state",
    "make_dpo_eval",
    "make_dpo_update",
]


# ---------------------------------------------------------------------------- update step

REFERENCE_MODES = ("precomputed", "model", "none")


def _config_label(field: str) -> str:
    return f"DPOConfig.{field}"


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Settings of :func:`make_dpo_update` and :func:`make_dpo_eval`.

    The float coefficients (``beta``, ``label_smoothing``, ``discopop_tau``, ``loss_weights``,
    ``rpo_alpha``) are the values the step uses when it is called without ``hyperparams``
    (then compiled in as constants); pass ``hyperparams`` to the step to trace them instead,
    so a sweep over them compiles once (:func:`make_dpo_update`).

    Attributes:
      beta: :math:`\\beta` of :func:`dpo_loss`.
      loss_type: one name from ``LOSS_TYPES`` (or a custom ``PairTerms -> [batch]``
        function), or a tuple of them.
      loss_weights: one weight per loss type (``None``: 1 each).
      label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau: as in
        :func:`dpo_loss`, including its rule that a setting no loss type reads is an error
        (``label_smoothing`` 0, ``discopop_tau`` and ``f_alpha_divergence_coef`` ``None`` are
        "not set"; ``None`` means TRL's default 0.05 / 0.5 where the setting is read).
      rpo_alpha: weight of the chosen-completion NLL per token (RPO, Pang et al., 2024,
        arXiv:2404.19733; TRL's ``rpo_alpha``): adds ``"sft"`` with this weight to the loss
        types. ``None`` = off. Same as ``loss_type=(..., "sft")`` with that weight.
      reference: where the reference log-probs come from: ``"precomputed"`` (the batch's
        ``ref_chosen_logps`` / ``ref_rejected_logps``, e.g. from
        :func:`rljax.lm.reference_logps`), ``"model"`` (a forward pass of the frozen
        ``state.ref_params`` in every step) or ``"none"`` (reference-free: log-probs 0, as in
        SimPO-style training and TRL's ``reference_free=True``).
      chunk_size: rows per chunk of the chunked log-prob computation.
      router_aux_loss_coef: weight of a mixture-of-experts policy's load-balancing loss
        (:func:`rljax.models.moe.load_balancing_loss` over every real token of the policy's
        forward pass, prompts and both completions; the Switch Transformer's auxiliary loss)
        added to the loss and reported as ``router_aux_loss``; 0 (the default, as
        :class:`rljax.updates.SFTConfig`'s) leaves it out. TRL's DPO trainer adds the
        model's ``router_aux_loss_coef`` times it when ``output_router_logits`` is set.
        Static: a new value recompiles the step. A model without experts refuses it.
    """

    beta: float = 0.1
    loss_type: str | Callable | tuple[str | Callable, ...] = "sigmoid"
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float | None = None
    discopop_tau: float | None = None
    rpo_alpha: float | None = None
    reference: str = "precomputed"
    chunk_size: int = 1024
    router_aux_loss_coef: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.loss_type, str) or callable(self.loss_type)):
            object.__setattr__(self, "loss_type", tuple(self.loss_type))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        if self.reference not in REFERENCE_MODES:
            raise ValueError(
                f"DPOConfig.reference={self.reference!r}; valid choices: {list(REFERENCE_MODES)}"
            )
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"DPOConfig.chunk_size must be a positive int, got {self.chunk_size}")
        checks.check(
            self, {"beta": "> 0", "discopop_tau": "> 0", "rpo_alpha": ">= 0"}, library=True
        )
        check_router_aux_loss_coef(self.router_aux_loss_coef, "DPOConfig.router_aux_loss_coef")
        types, weights = self.loss_types_and_weights()
        # Validate the loss-type combination now rather than at the first trace. The update
        # computes the completion lengths itself, so only the coefficients are checked.
        _validate(
            types,
            weights,
            self.f_divergence_type,
            self.f_alpha_divergence_coef,
            optional={"label_smoothing": self.label_smoothing, "discopop_tau": self.discopop_tau},
            label=_config_label,
            where="DPOConfig",
        )

    def loss_types_and_weights(self) -> tuple[tuple, tuple[float, ...]]:
        """The loss types and weights passed to :func:`dpo_loss` (with the RPO term)."""
        single = isinstance(self.loss_type, str) or callable(self.loss_type)
        types = (self.loss_type,) if single else tuple(self.loss_type)
        weights = (1.0,) * len(types) if self.loss_weights is None else tuple(self.loss_weights)
        if len(weights) != len(types):
            raise ValueError(
                f"DPOConfig.loss_weights has {len(weights)} entries for {len(types)} loss types "
                f"{[_name(t) for t in types]}; give one weight per loss type"
            )
        if self.rpo_alpha is not None:
            types, weights = (*types, "sft"), (*weights, float(self.rpo_alpha))
        return types, weights

    def traced_coefficients(self) -> tuple[str, ...]:
        """The keys ``hyperparams`` may hold for this config (see :func:`make_dpo_update`)."""
        types, _ = self.loss_types_and_weights()
        names = {t for t in types if isinstance(t, str)}
        custom = any(not isinstance(t, str) for t in types)  # may read anything
        keys = ["beta", "loss_weights"]
        for field in ("label_smoothing", "discopop_tau"):
            if custom or ARGUMENT_READERS[field] & names:
                keys.append(field)
        if self.rpo_alpha is not None:
            keys.append("rpo_alpha")
        return tuple(keys)

    def loss_kwargs(self, hyperparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The coefficient arguments of :func:`dpo_loss` for this config: ``beta``,
        ``loss_type``, ``loss_weights`` and whichever of ``label_smoothing``, ``discopop_tau``,
        ``f_divergence_type`` and ``f_alpha_divergence_coef`` the loss types read, each taken
        from ``hyperparams`` where it has the key (traced values), else from the config."""
        types, weights = self.loss_types_and_weights()
        allowed = self.traced_coefficients()
        reasons = {
            "label_smoothing": f"none of the loss types {[_name(t) for t in types]} reads it",
            "discopop_tau": "'discopop' is not a loss type",
            "rpo_alpha": "RPO is off (DPOConfig.rpo_alpha=None; set it to 0.0 to sweep it)",
        }
        hyperparams = check_hyperparams(
            self, hyperparams, allowed, where="make_dpo_update", reasons=reasons
        )
        kwargs: dict[str, Any] = {"beta": hyperparams.get("beta", self.beta)}
        if "loss_weights" in hyperparams:
            given = hyperparams["loss_weights"]
            count = len(types) - (self.rpo_alpha is not None)
            shape = (len(given),) if isinstance(given, list | tuple) else jnp.shape(given)
            if tuple(shape) != (count,):
                raise ValueError(
                    f"make_dpo_update: hyperparams['loss_weights'] needs one weight per loss "
                    f"type of DPOConfig.loss_type ({count}), got shape {tuple(shape)}"
                )
            weights = (*(given[i] for i in range(count)), *weights[count:])
        if "rpo_alpha" in hyperparams:
            weights = (*weights[:-1], hyperparams["rpo_alpha"])
        kwargs.update(loss_type=types, loss_weights=weights)
        if "label_smoothing" in allowed:
            kwargs["label_smoothing"] = hyperparams.get("label_smoothing", self.label_smoothing)
        if "discopop_tau" in allowed:
            kwargs["discopop_tau"] = hyperparams.get("discopop_tau", self.discopop_tau)
        kwargs["f_divergence_type"] = self.f_divergence_type
        kwargs["f_alpha_divergence_coef"] = self.f_alpha_divergence_coef
        return kwargs


def _needs_lengths(types) -> dict[str, bool]:
    """Which completion lengths the loss types read (a custom loss type gets both)."""
    custom = any(not isinstance(t, str) for t in types)
    return {
        side: custom or bool(ARGUMENT_READERS[f"{side}_lengths"] & set(types))
        for side in ("chosen", "rejected")
    }


class DPOState(NamedTuple):
    """Train state of :func:`make_dpo_update` (a pytree).

    ``params``: the policy's parameters (``nnx.split(model)[1]``); ``opt_state``: the optax
    state; ``step``: int32 count of updates; ``ref_params``: the frozen reference policy's
    parameters for ``DPOConfig(reference="model")``, else ``None`` (never updated);
    ``nonfinite_updates``: int32 count of updates skipped as non-finite
    (:func:`rljax.finite.step_if_finite`).
    """

    params: Any
    opt_state: Any
    step: jax.Array
    ref_params: Any = None
    nonfinite_updates: Any = np.int32(0)


def init_dpo_state(params, optimizer, ref_params=None) -> DPOState:
    """Initial :class:`DPOState`. For ``reference="model"`` pass ``ref_params`` (typically a
    copy of the initial policy: ``jax.tree.map(jnp.copy, params)``); with LoRA parameters
    (:func:`rljax.models.lora.split`) leave it ``None``: the reference is then the base model,
    the adapters switched off, and the optimizer state covers the adapters only."""
    step, skipped = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # two buffers: donated
    return DPOState(params, optimizer.init(lora.trainable(params)), step, ref_params, skipped)


def _dpo_objective(graphdef, config: DPOConfig) -> tuple[Callable, Callable]:
    """``prepare(state, batch, hyperparams=None) -> (ref_logps, hyperparams)`` (the reference
    log-probs, the overrides checked) and ``objective(params, (ref_logps, hyperparams), batch)
    -> (loss, metrics)`` of one preference batch."""
    needs_lengths = _needs_lengths(config.loss_types_and_weights()[0])

    def reference(ref_params, batch):
        if config.reference == "none":
            return None, None
        if config.reference == "precomputed":
            missing = [k for k in ("ref_chosen_logps", "ref_rejected_logps") if k not in batch]
            if missing:
                raise KeyError(
                    f"DPOConfig(reference='precomputed') needs {missing} in the batch (compute "
                    "them with rljax.updates.lm.reference_logps), or use reference='model' / 'none'"
                )
            return jnp.asarray(batch["ref_chosen_logps"]), jnp.asarray(batch["ref_rejected_logps"])
        if ref_params is None:
            raise ValueError(
                "DPOConfig(reference='model') needs state.ref_params (init_dpo_state(params, "
                "optimizer, ref_params=...))"
            )
        ref_chosen, ref_rejected, _, _ = pair_sequence_logps(
            graphdef, jax.lax.stop_gradient(ref_params), batch, chunk_size=config.chunk_size
        )
        return jax.lax.stop_gradient(ref_chosen), jax.lax.stop_gradient(ref_rejected)

    router_aux_loss = config.router_aux_loss_coef > 0

    def objective(params, context, batch):
        ref_logps, hyperparams = context
        outputs = pair_sequence_logps(
            graphdef,
            params,
            batch,
            chunk_size=config.chunk_size,
            return_router_aux_loss=router_aux_loss,
        )
        chosen, rejected, chosen_lengths, rejected_lengths = outputs[:4]
        loss, metrics = dpo_loss(
            chosen,
            rejected,
            *ref_logps,
            chosen_lengths=chosen_lengths if needs_lengths["chosen"] else None,
            rejected_lengths=rejected_lengths if needs_lengths["rejected"] else None,
            **config.loss_kwargs(hyperparams),
        )
        if router_aux_loss:
            loss = loss + config.router_aux_loss_coef * outputs[4]
            metrics = {**metrics, "router_aux_loss": outputs[4]}
        return loss, {"loss": loss, **metrics}

    def prepare(state: DPOState, batch: dict, hyperparams: Mapping[str, Any] | None = None):
        config.loss_kwargs(hyperparams)  # raises for a key this config does not trace
        return reference(reference_params(state), batch), hyperparams

    return prepare, objective


def make_dpo_update(
    graphdef, optimizer, config: DPOConfig = DPOConfig()
) -> Callable[..., tuple[DPOState, dict[str, jax.Array]]]:
    """Build the pure Direct Preference Optimization step ``update(state, batch,
    hyperparams=None) -> (state, metrics)`` for a Flax NNX language model.

    One optax step on :func:`dpo_loss` of the batch's sequence log-probs. The policy runs
    chosen and rejected as ONE ``[2B, T]`` batch (:func:`rljax.lm.concatenated_sequence_logps`,
    chunked log-probs: no ``[2B, T, V]`` logits); the reference log-probs come from the batch,
    from a forward pass of the frozen ``state.ref_params`` under ``stop_gradient``, or are 0
    (``config.reference``). Gradient clipping and schedules belong to ``optimizer``.

    Args:
      graphdef: ``nnx.split(model)[0]`` of a :class:`rljax.models.transformer.Transformer`.
      optimizer: optax ``GradientTransformation`` over ``state.params``.
      config: :class:`DPOConfig`.

    The ``batch`` follows the :mod:`rljax.data` contract: ``chosen_tokens``, ``chosen_mask``,
    ``chosen_loss_mask``, ``rejected_tokens``, ``rejected_mask``, ``rejected_loss_mask`` (all
    ``[B, T]``), or the shared-prompt layout of :func:`rljax.data.share_prompts` (each prompt
    run once, then both completions against its key/value cache: same losses, fewer FLOPs;
    :func:`rljax.lm.pair_sequence_logps` picks the forward by the keys), plus
    ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]`` for ``reference="precomputed"``.

    Swept coefficients are traced through ``hyperparams``, a dict with any of
    ``config.traced_coefficients()``: ``"beta"``, ``"loss_weights"`` (one per
    ``config.loss_type``), ``"label_smoothing"`` and ``"discopop_tau"`` (when a loss type reads
    them) and ``"rpo_alpha"`` (when ``config.rpo_alpha`` is set); missing keys take the
    config's values. Called without ``hyperparams`` the config's values are compiled in as
    constants (one program per config); with it, one compiled step serves every value::

        step = jax.jit(make_dpo_update(graphdef, optimizer, config), donate_argnums=0)
        for beta in (0.05, 0.1, 0.5):  # one compilation (keep the Python/array types fixed)
            state, metrics = step(state, batch, {"beta": beta})

    The result equals the step built with ``dataclasses.replace(config, beta=beta)``.
    ``f_divergence_type``, ``f_alpha_divergence_coef`` (a formula switch), ``reference`` and
    ``chunk_size`` stay static.

    Metrics (TRL's names, all scalars): ``loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
    ``loss/<type>`` per loss type (``loss/sft`` is the RPO NLL), ``router_aux_loss`` (with
    ``config.router_aux_loss_coef > 0``; ``loss`` then includes it), ``grad_norm`` (global norm
    of the gradient before the optimizer), ``nonfinite`` (1.0 if the loss, the gradients or
    the new parameters or optimizer state had a NaN or inf: the update is then skipped, the
    parameters and optimizer state stay bitwise unchanged) and ``nonfinite_updates`` (the
    running count of skipped updates, also ``state.nonfinite_updates``).

    Not jitted; jit it with the state and batch shardings and donate the state::

        step = jax.jit(update, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)

    or use :func:`rljax.lm.compile_update` (two arguments: the config's coefficients). The
    batch is one global array, so every mean in the loss (over pairs, and the RPO term's over
    chosen tokens) is the exact global-batch mean under data parallelism.
    """
    check_config(config, DPOConfig, "make_dpo_update")
    prepare, objective = _dpo_objective(graphdef, config)
    return make_optax_update(objective, optimizer, prepare)


def make_dpo_eval(graphdef, config: DPOConfig = DPOConfig()) -> Callable[..., dict[str, jax.Array]]:
    """The metrics of :func:`make_dpo_update` on held-out pairs, without an update:
    ``evaluate(state, batch, hyperparams=None) -> metrics`` (no ``grad_norm``; ``hyperparams``
    as for the update). Pure; jit it as the update (``in_shardings=(state_shardings,
    batch_sharding), out_shardings=replicated``)."""
    check_config(config, DPOConfig, "make_dpo_eval")
    prepare, objective = _dpo_objective(graphdef, config)
    return make_objective_eval(objective, prepare)
