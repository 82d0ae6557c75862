"""Tests of the Direct Preference Optimization step :func:`rljax.updates.make_dpo_update` and the
language-model glue in :mod:`rljax.updates.lm`.

The independent reference computes sequence log-probs from the model's full ``[B, T, V]``
logits with :func:`rljax.logprobs.token_logprobs` and a numpy mask (no chunking, no
concatenation), and its gradient as ``J^T dL/dlogps``: a ``jax.vjp`` of those log-probs applied
to the gradient of :func:`rljax.dpo.dpo_loss` with respect to its inputs.
The update uses ``optax.sgd(1.0)``, so its gradient is ``params - new_params``. Everything in
the value/gradient checks is float64, the model's norms and attention softmax included (a
float64 model no longer drops to float32 there: that leak made rtol 1e-8 fail on another CPU).
Measured agreement is ~1e-14 relative in values and ~1e-12 in gradients (``params -
new_params`` cancels digits); the tolerances below leave four orders of magnitude for another
machine's summation order.

Compiled functions are shared between tests (module-level caches) to keep the file fast.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import TINY, TRL_DPO_METRICS, count_traces, preference_batch, tiny_llama

from rljax import sharding
from rljax.dpo import dpo_loss
from rljax.logprobs import token_logprobs
from rljax.models.transformer import Transformer
from rljax.updates import DPOConfig, DPOState, init_dpo_state, make_dpo_eval, make_dpo_update
from rljax.updates.lm import compile_update, reference_logps, sequence_logps, token_logps

VOCAB = TINY["vocab_size"]
PAIRS = 4
TIME = 12


def make_model(seed, dtype="float32"):
    return nnx.split(Transformer(tiny_llama(param_dtype=dtype, dtype=dtype), rngs=nnx.Rngs(seed)))


def make_batch(seed, pairs=PAIRS, time=TIME):
    """A right-padded preference batch following the rljax.data contract."""
    return preference_batch(np.random.default_rng(seed), pairs, time, VOCAB)


def full_logits_logps(graphdef, params, tokens, mask, loss_mask):
    """Independent: full logits, token_logprobs, then a masked sum."""
    model = nnx.merge(graphdef, params, copy=True)
    logits = model(tokens, mask)  # [B, T, V]
    lp = token_logprobs(logits[:, :-1], tokens[:, 1:])
    counted = jnp.asarray(loss_mask[:, 1:], lp.dtype)
    return jnp.sum(lp * counted, axis=-1), jnp.sum(counted, axis=-1)


@functools.cache
def policy64():
    return make_model(0, "float64")


@functools.cache
def reference64():
    return make_model(1, "float64")[1]


@functools.cache
def batch64():
    return make_batch(0)


def independent_logps(params):
    """Sequence log-probs [2, B] (chosen, rejected) of batch64 from the full logits."""
    graphdef, _ = policy64()
    batch = batch64()
    return jnp.stack(
        [
            full_logits_logps(
                graphdef, params, batch[f"{s}_tokens"], batch[f"{s}_mask"], batch[f"{s}_loss_mask"]
            )[0]
            for s in ("chosen", "rejected")
        ]
    )


@functools.cache
def jitted_independent_logps():
    return jax.jit(independent_logps)


@functools.cache
def independent_value():
    """The policy's sequence log-probs [2, B] (float64)."""
    return jitted_independent_logps()(policy64()[1])


@functools.cache
def jitted_independent_vjp():
    """``(params, cotangent [2, B]) -> J^T cotangent``: the gradient of any loss of the
    log-probs, given its gradient with respect to them (one compile for every mode)."""
    return jax.jit(lambda params, ct: jax.vjp(independent_logps, params)[1](ct)[0])


def lengths64():
    batch = batch64()
    return tuple(
        np.sum(batch[f"{s}_loss_mask"][:, 1:], axis=-1).astype(np.float64)
        for s in ("chosen", "rejected")
    )


@functools.cache
def ref_logps64():
    """The reference model's [B] chosen and rejected log-probs (same compiled function)."""
    chosen, rejected = np.asarray(jitted_independent_logps()(reference64()))
    return chosen, rejected


def dpo_kwargs(config: DPOConfig):
    """``dpo_loss`` arguments for ``config``: the completion lengths for the types whose TRL
    formula reads them (ipo and sigmoid_norm both, sft the chosen), label smoothing for
    robust/exo_pair/aot."""
    types, weights = config.loss_types_and_weights()
    chosen_len, rejected_len = lengths64()
    kwargs = dict(beta=config.beta, loss_type=types, loss_weights=weights)
    if {"ipo", "sigmoid_norm", "sft"} & set(types):
        kwargs["chosen_lengths"] = jnp.asarray(chosen_len)
    if {"ipo", "sigmoid_norm"} & set(types):
        kwargs["rejected_lengths"] = jnp.asarray(rejected_len)
    if {"robust", "exo_pair", "aot", "aot_unpaired"} & set(types):
        kwargs["label_smoothing"] = config.label_smoothing
    return kwargs


# One config per reference mode: (mode, beta, loss types, their weights, rpo_alpha, chunk size).
CONFIGS = {
    mode: DPOConfig(
        beta=beta,
        loss_type=loss_type,
        loss_weights=weights,
        rpo_alpha=rpo_alpha,
        reference=mode,
        chunk_size=chunk_size,
    )
    for mode, beta, loss_type, weights, rpo_alpha, chunk_size in [
        ("precomputed", 0.3, ("sigmoid", "ipo"), (1.0, 0.5), 0.7, 7),
        ("model", 0.2, ("sigmoid", "bco_pair"), (1.0, 0.3), None, 16),
        ("none", 0.1, ("sigmoid_norm", "hinge"), (0.6, 0.4), 0.25, 1024),
    ]
}


@functools.cache
def compiled_update64(mode):
    graphdef, _ = policy64()
    return jax.jit(make_dpo_update(graphdef, optax.sgd(1.0), CONFIGS[mode]))


def state64(mode, ref_params=None):
    _, params = policy64()
    if mode == "model" and ref_params is None:
        ref_params = reference64()
    return init_dpo_state(params, optax.sgd(1.0), ref_params if mode == "model" else None)


def batch_for(mode):
    batch = dict(batch64())
    if mode == "precomputed":
        graphdef, _ = policy64()
        batch.update(reference_logps(graphdef, reference64(), batch64(), batch_size=3))
    return batch


# ---------------------------------------------------------------------------------------------
# rljax.updates.lm
# ---------------------------------------------------------------------------------------------


def test_sequence_and_token_logps_match_full_logits():
    graphdef, params = policy64()
    batch = batch64()
    value = independent_value()

    @jax.jit
    def both(params, tokens, mask, loss_mask):
        return (
            sequence_logps(graphdef, params, tokens, mask, loss_mask, chunk_size=5),
            token_logps(graphdef, params, tokens, mask, chunk_size=5),
        )

    for i, side in enumerate(("chosen", "rejected")):
        (logps, count), per_token = both(
            params, batch[f"{side}_tokens"], batch[f"{side}_mask"], batch[f"{side}_loss_mask"]
        )
        np.testing.assert_allclose(logps, value[i], rtol=1e-8)
        np.testing.assert_array_equal(count, lengths64()[i])
        assert per_token.shape == (PAIRS, TIME - 1)
        counted = batch[f"{side}_loss_mask"][:, 1:]
        np.testing.assert_allclose(np.sum(per_token * counted, -1), value[i], rtol=1e-8)
        assert np.all(np.asarray(per_token)[~batch[f"{side}_mask"][:, 1:]] == 0)


def test_reference_logps_matches_independent():
    out = reference_logps(policy64()[0], reference64(), batch64(), batch_size=3)
    assert set(out) == {"ref_chosen_logps", "ref_rejected_logps"}
    assert out["ref_chosen_logps"].shape == (PAIRS,)
    assert out["ref_chosen_logps"].dtype == np.float32
    ref_chosen, ref_rejected = ref_logps64()
    np.testing.assert_allclose(out["ref_chosen_logps"], ref_chosen, rtol=1e-6)
    np.testing.assert_allclose(out["ref_rejected_logps"], ref_rejected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# (a) values and gradients against the independent computation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["precomputed", "model", "none"])
def test_update_matches_independent_loss_and_gradient(mode):
    config = CONFIGS[mode]
    value = independent_value()
    batch = batch_for(mode)
    if mode == "precomputed":
        refs = (
            jnp.asarray(batch["ref_chosen_logps"], jnp.float64),
            jnp.asarray(batch["ref_rejected_logps"], jnp.float64),
        )
    elif mode == "model":
        refs = tuple(jnp.asarray(r) for r in ref_logps64())
    else:
        refs = (None, None)

    def loss_of_logps(logps):
        return dpo_loss(logps[0], logps[1], *refs, **dpo_kwargs(config))

    (expected_loss, expected_metrics), dloss = jax.value_and_grad(loss_of_logps, has_aux=True)(
        value
    )
    expected_grads = jitted_independent_vjp()(policy64()[1], dloss)

    state = state64(mode)
    new_state, metrics = compiled_update64(mode)(state, batch)
    rtol = 1e-6 if mode == "precomputed" else 1e-10  # float32 precomputed reference log-probs
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=rtol)
    for key, val in expected_metrics.items():
        np.testing.assert_allclose(metrics[key], val, rtol=rtol, atol=1e-9, err_msg=key)
    for key in (*TRL_DPO_METRICS, "loss", "grad_norm"):
        assert metrics[key].shape == (), key
    grads = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
    leaves, expected_leaves = jax.tree.leaves(grads), jax.tree.leaves(expected_grads)
    assert len(leaves) == len(expected_leaves)
    # Relative to each leaf's scale: ``params - new_params`` loses the digits the parameters
    # and the gradient do not share (measured ~1e-12).
    for g, e in zip(leaves, expected_leaves, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-8 * float(np.max(np.abs(e))))
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(expected_grads), rtol=1e-10)
    assert int(new_state.step) == 1
    if mode == "model":
        assert jax.tree.leaves(new_state.ref_params)[0] is not None
        chex_equal = jax.tree.map(np.array_equal, new_state.ref_params, state.ref_params)
        assert all(jax.tree.leaves(chex_equal))
    else:
        assert new_state.ref_params is None


def test_policy_equal_to_reference_gives_log2():
    _, params = policy64()
    state = state64("model", ref_params=params)
    _, metrics = compiled_update64("model")(state, batch64())
    np.testing.assert_allclose(metrics["loss/sigmoid"], math.log(2.0), rtol=1e-9)
    np.testing.assert_allclose(metrics["rewards/margins"], 0.0, atol=1e-9)


def test_eval_matches_update_metrics():
    graphdef, _ = policy64()
    evaluate = jax.jit(make_dpo_eval(graphdef, CONFIGS["none"]))
    metrics = evaluate(state64("none"), batch64())
    _, update_metrics = compiled_update64("none")(state64("none"), batch64())
    assert set(update_metrics) == set(metrics) | {"grad_norm", "nonfinite", "nonfinite_updates"}
    for key, val in metrics.items():
        np.testing.assert_allclose(val, update_metrics[key], rtol=1e-8, err_msg=key)


def test_config_validation():
    with pytest.raises(ValueError, match="reference"):
        DPOConfig(reference="frozen")
    with pytest.raises(ValueError, match="unknown loss_type"):
        DPOConfig(loss_type="sigmoidd")
    with pytest.raises(ValueError, match="loss_weights"):
        DPOConfig(loss_type=("sigmoid", "ipo"), loss_weights=(1.0,))
    config = DPOConfig(loss_type=["sigmoid"], rpo_alpha=0.5)
    assert config.loss_types_and_weights() == (("sigmoid", "sft"), (1.0, 0.5))
    hash(config)
    graphdef, params = policy64()
    update = make_dpo_update(graphdef, optax.sgd(1.0), DPOConfig(reference="precomputed"))
    with pytest.raises(KeyError, match="ref_chosen_logps"):
        jax.eval_shape(update, init_dpo_state(params, optax.sgd(1.0)), batch64())
    update = make_dpo_update(graphdef, optax.sgd(1.0), DPOConfig(reference="model"))
    with pytest.raises(ValueError, match="ref_params"):
        jax.eval_shape(update, init_dpo_state(params, optax.sgd(1.0)), batch64())


def test_config_refuses_coefficients_no_loss_type_reads():
    with pytest.raises(ValueError, match=r"DPOConfig.label_smoothing=0.1.*'sigmoid'"):
        DPOConfig(label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"DPOConfig.discopop_tau=0.2.*\['sigmoid', 'ipo'\]"):
        DPOConfig(loss_type=("sigmoid", "ipo"), discopop_tau=0.2)
    with pytest.raises(ValueError, match=r"DPOConfig.f_alpha_divergence_coef.*alpha_divergence"):
        DPOConfig(f_alpha_divergence_coef=0.3)
    DPOConfig(loss_type=("sigmoid", "robust"), label_smoothing=0.1)  # robust reads it
    DPOConfig(loss_type="discopop", discopop_tau=0.2)
    DPOConfig(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)


# ---------------------------------------------------------------------------------------------
# Swept coefficients are traced: one compilation for a sweep, equal to the baked step
# ---------------------------------------------------------------------------------------------

SWEEP_CONFIG = DPOConfig(
    beta=0.3,
    loss_type=("robust", "ipo"),
    loss_weights=(1.0, 0.5),
    label_smoothing=0.1,
    rpo_alpha=0.2,
    reference="precomputed",
    chunk_size=7,
)
# The same keys in every call (the dict is a pytree: its keys are part of the compiled
# signature), the config's values first.
SWEEP = [
    {"beta": 0.3, "label_smoothing": 0.1, "loss_weights": (1.0, 0.5), "rpo_alpha": 0.2},
    {"beta": 0.05, "label_smoothing": 0.1, "loss_weights": (1.0, 0.5), "rpo_alpha": 0.2},
    {"beta": 1.5, "label_smoothing": 0.3, "loss_weights": (1.0, 0.5), "rpo_alpha": 0.2},
    {"beta": 0.2, "label_smoothing": 0.0, "loss_weights": (0.25, 2.0), "rpo_alpha": 0.7},
]


def _assert_states_and_metrics_equal(got, want, rtol=1e-10):
    (state, metrics), (want_state, want_metrics) = got, want
    assert set(metrics) == set(want_metrics)
    for key, val in want_metrics.items():
        np.testing.assert_allclose(metrics[key], val, rtol=rtol, atol=1e-12, err_msg=key)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)


def test_swept_coefficients_compile_once_and_equal_the_baked_step():
    graphdef, _ = policy64()
    batch = batch_for("precomputed")
    state = state64("precomputed")
    counted, traces = count_traces(make_dpo_update(graphdef, optax.sgd(1.0), SWEEP_CONFIG))
    step = jax.jit(counted)
    results = [step(state, batch, h) for h in SWEEP]
    assert step._cache_size() == 1 and len(traces) == 1  # four settings, one compilation
    losses = [float(m["loss"]) for _, m in results]
    assert len(set(losses)) == len(losses)  # the coefficients did change the step
    # the baked step (the config's values compiled in) gives the same state and metrics
    for i in (1, 3):
        baked_config = dataclasses.replace(SWEEP_CONFIG, **SWEEP[i])
        baked = jax.jit(make_dpo_update(graphdef, optax.sgd(1.0), baked_config))
        _assert_states_and_metrics_equal(results[i], baked(state, batch))
    # no hyperparams: the config's own values, the same result as passing them
    _assert_states_and_metrics_equal(
        results[0], jax.jit(make_dpo_update(graphdef, optax.sgd(1.0), SWEEP_CONFIG))(state, batch)
    )


def test_swept_beta_in_the_eval_step():
    graphdef, _ = policy64()
    evaluate = jax.jit(make_dpo_eval(graphdef, CONFIGS["none"]))
    got = [evaluate(state64("none"), batch64(), {"beta": b}) for b in (0.1, 0.4)]
    assert evaluate._cache_size() == 1
    baked = jax.jit(make_dpo_eval(graphdef, dataclasses.replace(CONFIGS["none"], beta=0.4)))
    want = baked(state64("none"), batch64())
    for key, val in want.items():
        np.testing.assert_allclose(got[1][key], val, rtol=1e-10, atol=1e-12, err_msg=key)
    assert float(got[0]["rewards/margins"]) != float(got[1]["rewards/margins"])


@pytest.mark.parametrize(
    ("hyperparams", "message"),
    [
        ({"label_smoothing": 0.1}, r"label_smoothing.*none of the loss types"),
        ({"rpo_alpha": 0.1}, r"rpo_alpha.*RPO is off"),
        ({"gamma": 0.1}, r"gamma.*valid keys: \['beta', 'loss_weights'\]"),
        (
            {"loss_weights": (1.0,)},
            r"loss_weights.*one weight per loss type of DPOConfig.loss_type \(2\)",
        ),
    ],
)
def test_hyperparams_the_config_does_not_trace_raise(hyperparams, message):
    graphdef, params = policy64()
    config = DPOConfig(loss_type=("sigmoid", "hinge"), reference="none")
    update = make_dpo_update(graphdef, optax.sgd(1.0), config)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(update, init_dpo_state(params, optax.sgd(1.0)), batch64(), hyperparams)
    with pytest.raises(TypeError, match="hyperparams must be a dict"):
        jax.eval_shape(update, init_dpo_state(params, optax.sgd(1.0)), batch64(), 0.1)


# ---------------------------------------------------------------------------------------------
# (b)-(d): training, sharding and tracing, float32 with Adam
# ---------------------------------------------------------------------------------------------

TRAIN_CONFIG = DPOConfig(beta=0.5, loss_type="sigmoid", rpo_alpha=0.1, reference="model")
SHARDED_STEPS = 3


def training_setup():
    """``(update, traces, state, batch)``: the step (TRAIN_CONFIG, Adam) on ``make_model(3)``,
    counting its traces in ``traces``, its first state (the reference a copy of the policy) and a
    fixed batch."""
    graphdef, params = make_model(3)
    optimizer = optax.adam(3e-3)
    update, traces = count_traces(make_dpo_update(graphdef, optimizer, TRAIN_CONFIG))
    state = init_dpo_state(params, optimizer, jax.tree.map(jnp.copy, params))
    return update, traces, state, make_batch(5, pairs=8)


@functools.cache
def one_device_run(steps=12):
    """Adam steps on a fixed batch on one device; returns per-step metrics and trace count."""
    update, traces, state, batch = training_setup()
    step = jax.jit(update, donate_argnums=0)
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    return history, len(traces)


def test_adam_steps_lower_the_loss_and_raise_accuracy():
    history, traces = one_device_run()
    losses = [h["loss"] for h in history]
    assert losses[-1] < losses[0] - 0.05, losses
    np.testing.assert_allclose(history[0]["loss/sigmoid"], math.log(2.0), rtol=1e-5)
    assert history[-1]["rewards/accuracies"] > 0.5
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]
    assert traces == 1  # (d) one trace for all steps


def test_sharded_update_matches_one_device():
    assert jax.device_count() >= 8
    history, _ = one_device_run()
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    update, traces, state, batch = training_setup()
    state, step, batch_shardings = compile_update(update, state, batch, mesh)
    batch = jax.device_put(batch, batch_shardings)
    q_spec = state.params["layers"]["q"].sharding.spec
    assert "fsdp" in str(q_spec) and "tensor" in str(q_spec)
    assert isinstance(state, DPOState)
    for i in range(SHARDED_STEPS):
        old = state
        state, metrics = step(state, batch)
        assert old.step.is_deleted()  # donated
        for key, val in history[i].items():
            np.testing.assert_allclose(float(metrics[key]), val, rtol=1e-5, atol=1e-5, err_msg=key)
    assert state.params["layers"]["q"].sharding.spec == q_spec
    assert state.ref_params["layers"]["q"].sharding.spec == q_spec
    assert len(traces) == 1
