"""Tests for :func:`rljax.dpo.kto_loss`, :func:`rljax.dpo.orpo_loss` and :func:`rljax.dpo.cpo_loss`
against TRL 1.16.

The references below are independent float64 NumPy transcriptions of the formulas in
``trl/trainer/kto_trainer.py`` (``KTOTrainer._compute_loss``: the KL reference point, the
per-class losses, ``torch.cat(...).nanmean()`` and the per-class metric sums over counts),
``trl/experimental/orpo/orpo_trainer.py`` (``odds_ratio_loss`` and
``get_batch_loss_metrics``) and ``trl/experimental/cpo/cpo_trainer.py`` (``cpo_loss`` with
``alpha=0`` and ``get_batch_loss_metrics``). TRL's ``nll_loss`` (a cross-entropy over the
chosen tokens) is the ``chosen_nll`` input here. Gradients are compared with central finite
differences of those references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import finite_diff

from rljax.dpo import CPO_LOSS_TYPES, KTO_LOSS_TYPES, cpo_loss, kto_loss, orpo_loss

VARIANTS = pytest.mark.parametrize("variant", ["eager", "jit"])
# eager float64, jit float64 and float32 (eager float32 adds compile time, no coverage)
DTYPE_VARIANTS = pytest.mark.parametrize(
    "dtype,variant", [(np.float64, "eager"), (np.float64, "jit"), (np.float32, "jit")]
)
# (seed, batch size): several seeds, batch 1 twice (KTO: one desirable, one undesirable)
CASES = ((0, 1), (1, 5), (2, 5), (3, 1))
F64 = {"rtol": 1e-10, "atol": 1e-12}
F32 = {"rtol": 1e-5, "atol": 1e-5}
GRAD64 = {"rtol": 1e-6, "atol": 1e-8}  # central differences, step 1e-6
GRAD32 = {"rtol": 1e-4, "atol": 1e-5}


# ---------------------------------------------------------------------------------------------
# Independent float64 NumPy references (from TRL 1.16's formulas, not from rljax)
# ---------------------------------------------------------------------------------------------


def np_sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, np.float64)))


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def kto_reference(policy, reference, desirable, kl_policy, kl_reference, beta, dw, uw, loss_type):
    """TRL's KTOTrainer._compute_loss on sequence log-probs; metrics of an empty class are 0."""
    kl = 0.0 if kl_policy is None else max(float(np.mean(kl_policy - kl_reference)), 0.0)
    chosen = policy[desirable] - reference[desirable]
    rejected = policy[~desirable] - reference[~desirable]
    if loss_type == "kto":
        chosen_losses = 1.0 - np_sigmoid(beta * (chosen - kl))
        rejected_losses = 1.0 - np_sigmoid(beta * (kl - rejected))
    else:  # apo_zero_unpaired
        chosen_losses = 1.0 - np_sigmoid(beta * chosen)
        rejected_losses = np_sigmoid(beta * rejected)
    loss = np.concatenate([dw * chosen_losses, uw * rejected_losses]).mean()
    n_chosen, n_rejected = len(chosen), len(rejected)
    metrics = {"kl": kl, "count/chosen": n_chosen, "count/rejected": n_rejected}
    metrics["rewards/chosen"] = (beta * chosen).sum() / n_chosen if n_chosen else 0.0
    metrics["rewards/rejected"] = (beta * rejected).sum() / n_rejected if n_rejected else 0.0
    metrics["logps/chosen"] = policy[desirable].sum() / n_chosen if n_chosen else 0.0
    metrics["logps/rejected"] = policy[~desirable].sum() / n_rejected if n_rejected else 0.0
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


def pair_metrics(chosen, rejected, beta):
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(np.float64).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
    }


def orpo_reference(chosen, rejected, nll, beta):
    """TRL's odds_ratio_loss and ORPO loss: nll - mean(beta * logsigmoid(log_odds))."""
    log_odds = (chosen - rejected) - (np.log1p(-np.exp(chosen)) - np.log1p(-np.exp(rejected)))
    ratio = np_log_sigmoid(log_odds)
    loss = nll - (beta * ratio).mean()
    metrics = pair_metrics(chosen, rejected, beta)
    metrics.update(nll_loss=nll, log_odds_ratio=ratio.mean(), log_odds_chosen=log_odds.mean())
    return loss, metrics


def cpo_reference(chosen, rejected, nll, beta, loss_type, label_smoothing, simpo_gamma, alpha):
    """TRL's CPOTrainer.cpo_loss (alpha = 0: plain log-prob rewards) plus cpo_alpha * nll."""
    logits = chosen - rejected
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = (
            -np_log_sigmoid(beta * logits) * (1 - label_smoothing)
            - np_log_sigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1.0 - beta * logits)
    else:  # ipo
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    loss = losses.mean() + alpha * nll
    metrics = pair_metrics(chosen, rejected, beta)
    metrics["nll_loss"] = nll
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def kto_batch(seed, batch):
    rng = np.random.default_rng(seed)
    policy = -rng.uniform(5.0, 50.0, batch)
    desirable = rng.random(batch) < 0.5
    if batch > 1:  # both classes present; batch 1 alternates the class with the seed
        desirable[0], desirable[1] = True, False
    else:
        desirable[0] = seed % 2 == 0
    return {
        "policy": policy,
        "reference": policy + rng.normal(0.0, 3.0, batch),
        "desirable": desirable,
        "kl_policy": -rng.uniform(5.0, 50.0, batch),
        "kl_reference": -rng.uniform(5.0, 50.0, batch),
        "beta": rng.uniform(0.05, 1.0),
        "dw": rng.uniform(0.5, 2.0),
        "uw": rng.uniform(0.5, 2.0),
    }


def pair_batch(seed, batch):
    """Per-token mean log-probs in [-3, -0.05] (ORPO needs log-probs below 0)."""
    rng = np.random.default_rng(seed + 100)
    return {
        "chosen": -rng.uniform(0.05, 3.0, batch),
        "rejected": -rng.uniform(0.05, 3.0, batch),
        "nll": rng.uniform(0.5, 2.0),
        "beta": rng.uniform(0.1, 2.0),
    }


def close(got, want, tol):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **tol)


def check_metrics(got, want, tol):
    assert set(want) <= set(got), f"missing metrics: {sorted(set(want) - set(got))}"
    for name, value in want.items():
        np.testing.assert_allclose(np.asarray(got[name], np.float64), value, **tol, err_msg=name)


def check_loss(loss, metrics, want, dtype, tol):
    """A scalar ``loss`` of ``dtype`` and its ``metrics`` match ``want = (loss, metrics)``."""
    assert loss.dtype == dtype and loss.shape == ()
    close(loss, want[0], tol)
    check_metrics(metrics, want[1], tol)


# ---------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------


def kto_value_and_grad(variant, loss_type, with_kl):
    """(loss, metrics), d loss / d (policy, reference, kl_policy, kl_reference); the
    hyper-parameters are traced under jit."""

    def f(policy, reference, desirable, kl_policy, kl_reference, beta, dw, uw):
        kl = (kl_policy, kl_reference) if with_kl else (None, None)
        return kto_loss(
            policy,
            reference,
            desirable,
            *kl,
            beta=beta,
            desirable_weight=dw,
            undesirable_weight=uw,
            loss_type=loss_type,
        )

    g = jax.value_and_grad(f, argnums=(0, 1, 3, 4), has_aux=True)
    return jax.jit(g) if variant == "jit" else g


@pytest.mark.parametrize(
    "loss_type,with_kl", [("kto", True), ("kto", False), ("apo_zero_unpaired", False)]
)
@DTYPE_VARIANTS
def test_kto_matches_trl(variant, loss_type, with_kl, dtype):
    value_and_grad = kto_value_and_grad(variant, loss_type, with_kl)
    tol, grad_tol = (F64, GRAD64) if dtype == np.float64 else (F32, GRAD32)
    for seed, batch in CASES:
        b = kto_batch(seed, batch)
        kl = (b["kl_policy"], b["kl_reference"]) if with_kl else (None, None)
        hyper = (b["beta"], b["dw"], b["uw"], loss_type)
        want, want_metrics = kto_reference(b["policy"], b["reference"], b["desirable"], *kl, *hyper)
        want_grad = finite_diff(
            lambda *a: kto_reference(*a)[0],
            b["policy"],
            b["reference"],
            b["desirable"],
            *kl,
            *hyper,
        )
        arrays = [jnp.asarray(b[k], dtype) for k in ("policy", "reference")]
        kl_arrays = [jnp.asarray(b[k], dtype) for k in ("kl_policy", "kl_reference")]
        (loss, metrics), grads = value_and_grad(
            *arrays, jnp.asarray(b["desirable"]), *kl_arrays, b["beta"], b["dw"], b["uw"]
        )
        check_loss(loss, metrics, (want, want_metrics), dtype, tol)
        close(grads[0], want_grad, grad_tol)
        for no_gradient in grads[1:]:  # reference and the KL batch carry no gradient
            np.testing.assert_array_equal(np.asarray(no_gradient), 0.0)


def test_kto_reference_point_is_clamped_at_zero_and_needs_no_kl_for_apo():
    b = kto_batch(0, 6)
    desirable = jnp.asarray(b["desirable"])
    policy, reference = jnp.asarray(b["policy"]), jnp.asarray(b["reference"])
    # a negative KL estimate gives z0 = 0: the same loss as no KL inputs at all
    negative = kto_loss(policy, reference, desirable, reference - 1.0, reference)
    none = kto_loss(policy, reference, desirable)
    assert float(negative[1]["kl"]) == 0.0 and float(none[1]["kl"]) == 0.0
    close(negative[0], float(none[0]), F64)
    # apo_zero_unpaired is KTO with z0 = 0, term by term
    apo = kto_loss(policy, reference, desirable, loss_type="apo_zero_unpaired")
    close(apo[0], float(none[0]), F64)
    # policy == reference and z0 = 0: every example's loss is 1/2, weighted
    loss, _ = kto_loss(policy, policy, desirable, desirable_weight=2.0, undesirable_weight=4.0)
    n_chosen = int(np.sum(b["desirable"]))
    close(loss, (2.0 * 0.5 * n_chosen + 4.0 * 0.5 * (6 - n_chosen)) / 6, F64)


def test_kto_one_class_batches_report_zero_for_the_missing_class():
    policy, reference = jnp.array([-3.0, -4.0]), jnp.array([-3.5, -3.0])
    _, metrics = kto_loss(policy, reference, jnp.array([True, True]))
    assert float(metrics["count/rejected"]) == 0.0 and float(metrics["rewards/rejected"]) == 0.0
    assert float(metrics["logps/rejected"]) == 0.0
    close(metrics["rewards/chosen"], 0.1 * (0.5 - 1.0) / 2, F64)


# ---------------------------------------------------------------------------------------------
# ORPO
# ---------------------------------------------------------------------------------------------


def orpo_value_and_grad(variant, with_nll):
    def f(chosen, rejected, nll, beta):
        return orpo_loss(chosen, rejected, beta=beta, chosen_nll=nll if with_nll else None)

    g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(g) if variant == "jit" else g


@pytest.mark.parametrize("with_nll", [True, False])
@DTYPE_VARIANTS
def test_orpo_matches_trl(variant, with_nll, dtype):
    value_and_grad = orpo_value_and_grad(variant, with_nll)
    tol, grad_tol = (F64, GRAD64) if dtype == np.float64 else (F32, GRAD32)
    for seed, batch in CASES:
        b = pair_batch(seed, batch)
        nll = b["nll"] if with_nll else 0.0
        want, want_metrics = orpo_reference(b["chosen"], b["rejected"], nll, b["beta"])
        both = np.concatenate([b["chosen"], b["rejected"]])
        want_grad = finite_diff(
            lambda x, *a: orpo_reference(*np.split(x, 2), *a)[0], both, nll, b["beta"]
        )
        (loss, metrics), grads = value_and_grad(
            jnp.asarray(b["chosen"], dtype),
            jnp.asarray(b["rejected"], dtype),
            jnp.asarray(b["nll"], dtype),
            b["beta"],
        )
        check_loss(loss, metrics, (want, want_metrics), dtype, tol)
        close(np.concatenate([grads[0], grads[1]]), want_grad, grad_tol)
        assert float(grads[2]) == (1.0 if with_nll else 0.0)


@VARIANTS
def test_orpo_log1mexp_is_accurate_and_has_finite_gradients_near_zero(variant):
    """Log-probs near 0 and on both sides of TRL's branch point -log(2)."""
    x = np.array([-1e-9, -1e-4, -0.5, -np.log(2.0) + 1e-12, -np.log(2.0) - 1e-12, -1.0, -30.0])
    rejected = np.full_like(x, -2.0)
    f = jax.value_and_grad(lambda c: orpo_loss(c, jnp.asarray(rejected))[0])
    f = jax.jit(f) if variant == "jit" else f
    loss, grad = f(jnp.asarray(x))
    log_odds = (x - rejected) - (np.log(-np.expm1(x)) - np.log(-np.expm1(rejected)))
    close(loss, -(0.1 * np_log_sigmoid(log_odds)).mean(), F64)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_orpo_equal_completions_give_nll_plus_beta_log2():
    logps = jnp.array([-0.3, -1.7, -2.2])
    loss, metrics = orpo_loss(logps, logps, beta=0.4, chosen_nll=1.25)
    close(loss, 1.25 + 0.4 * np.log(2.0), F64)
    assert float(metrics["log_odds_chosen"]) == 0.0
    assert float(metrics["rewards/accuracies"]) == 0.0


# ---------------------------------------------------------------------------------------------
# CPO / SimPO
# ---------------------------------------------------------------------------------------------

# loss type -> (label_smoothing, simpo_gamma) to pass (None = leave out)
CPO_CASES = {
    "sigmoid": (0.2, None),
    "hinge": (None, None),
    "ipo": (None, None),
    "simpo": (0.1, 0.8),
}


def cpo_value_and_grad(variant, loss_type):
    label_smoothing, simpo_gamma = CPO_CASES[loss_type]

    def f(chosen, rejected, nll, beta, alpha, smoothing, gamma):
        kwargs = {}
        if label_smoothing is not None:
            kwargs["label_smoothing"] = smoothing
        if simpo_gamma is not None:
            kwargs["simpo_gamma"] = gamma
        return cpo_loss(
            chosen,
            rejected,
            beta=beta,
            loss_type=loss_type,
            cpo_alpha=alpha,
            chosen_nll=nll,
            **kwargs,
        )

    g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(g) if variant == "jit" else g


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
@DTYPE_VARIANTS
def test_cpo_matches_trl(variant, loss_type, dtype):
    value_and_grad = cpo_value_and_grad(variant, loss_type)
    label_smoothing, simpo_gamma = CPO_CASES[loss_type]
    smoothing = label_smoothing or 0.0
    gamma = 0.5 if simpo_gamma is None else simpo_gamma
    tol, grad_tol = (F64, GRAD64) if dtype == np.float64 else (F32, GRAD32)
    for seed, batch in CASES:
        b = pair_batch(seed, batch)
        alpha = 0.5 + seed  # cpo_alpha, traced under jit
        hyper = (b["beta"], loss_type, smoothing, gamma, alpha)
        want, want_metrics = cpo_reference(b["chosen"], b["rejected"], b["nll"], *hyper)
        both = np.concatenate([b["chosen"], b["rejected"]])
        want_grad = finite_diff(
            lambda x, *a: cpo_reference(*np.split(x, 2), *a)[0], both, b["nll"], *hyper
        )
        (loss, metrics), grads = value_and_grad(
            jnp.asarray(b["chosen"], dtype),
            jnp.asarray(b["rejected"], dtype),
            jnp.asarray(b["nll"], dtype),
            b["beta"],
            alpha,
            smoothing,
            gamma,
        )
        check_loss(loss, metrics, (want, want_metrics), dtype, tol)
        close(np.concatenate([grads[0], grads[1]]), want_grad, grad_tol)
        close(grads[2], alpha, tol)


def test_cpo_hinge_covers_both_sides_of_the_hinge():
    chosen, rejected = jnp.array([-0.5, -2.0]), jnp.array([-2.0, -0.5])  # margins 1.5, -1.5
    loss, _ = cpo_loss(chosen, rejected, beta=1.0, loss_type="hinge")
    close(loss, (0.0 + 2.5) / 2, F64)
    grad = jax.grad(lambda c: cpo_loss(c, rejected, beta=1.0, loss_type="hinge")[0])(chosen)
    close(grad, [0.0, -0.5], F64)


def test_simpo_with_zero_margin_equals_sigmoid_and_no_nll_means_no_nll_term():
    b = pair_batch(5, 4)
    chosen, rejected = jnp.asarray(b["chosen"]), jnp.asarray(b["rejected"])
    simpo, _ = cpo_loss(chosen, rejected, beta=0.7, loss_type="simpo", simpo_gamma=0.0)
    sigmoid, metrics = cpo_loss(chosen, rejected, beta=0.7, cpo_alpha=3.0)
    close(simpo, float(sigmoid), F64)
    assert float(metrics["nll_loss"]) == 0.0
    # the default margin: TRL subtracts simpo_gamma / beta from the log-prob margin
    default, _ = cpo_loss(chosen, rejected, beta=0.7, loss_type="simpo")
    margin = b["chosen"] - b["rejected"]
    close(default, -np_log_sigmoid(0.7 * (margin - 0.5 / 0.7)).mean(), F64)


def test_traced_hyperparameters_trace_once():
    traces = []

    @jax.jit
    def f(chosen, rejected, beta, smoothing, gamma, alpha):
        traces.append(1)
        return cpo_loss(
            chosen,
            rejected,
            beta=beta,
            loss_type="simpo",
            label_smoothing=smoothing,
            simpo_gamma=gamma,
            cpo_alpha=alpha,
            chosen_nll=1.0,
        )[0]

    chosen, rejected = jnp.array([-0.5, -1.0]), jnp.array([-1.5, -1.2])
    values = [
        float(f(chosen, rejected, beta, 0.1, gamma, 0.3))
        for beta, gamma in [(0.1, 0.5), (2.0, 1.0)]
    ]
    assert len(traces) == 1 and values[0] != values[1]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

TWO = jnp.array([-1.0, -2.0])
THREE = jnp.array([-1.0, -2.0, -3.0])
DESIRABLE = jnp.array([True, False])


def test_kto_errors():
    with pytest.raises(
        ValueError, match=r"unknown loss_type 'sigmoid'.*'kto', 'apo_zero_unpaired'"
    ):
        kto_loss(TWO, TWO, DESIRABLE, loss_type="sigmoid")
    with pytest.raises(
        ValueError,
        match="kl_policy_logps=an array is not read by loss_type "
        "'apo_zero_unpaired'; only \\['kto'\\]",
    ):
        kto_loss(TWO, TWO, DESIRABLE, TWO, TWO, loss_type="apo_zero_unpaired")
    with pytest.raises(ValueError, match="give both kl_policy_logps and kl_reference_logps"):
        kto_loss(TWO, TWO, DESIRABLE, TWO)
    with pytest.raises(ValueError, match=r"desirable must be a bool array.*float"):
        kto_loss(TWO, TWO, jnp.array([1.0, 0.0]))
    with pytest.raises(AssertionError, match="different shapes"):
        kto_loss(TWO, THREE, DESIRABLE)
    with pytest.raises(AssertionError, match="different shapes"):
        kto_loss(TWO, TWO, DESIRABLE, TWO, THREE)
    with pytest.raises(AssertionError, match="rank"):
        kto_loss(TWO[None], TWO[None], DESIRABLE[None])
    assert set(KTO_LOSS_TYPES) == {"kto", "apo_zero_unpaired"}


def test_orpo_errors():
    with pytest.raises(ValueError, match=r"chosen_nll must be a scalar.*\(2,\)"):
        orpo_loss(TWO, TWO, chosen_nll=TWO)
    with pytest.raises(AssertionError, match="different shapes"):
        orpo_loss(TWO, THREE)
    with pytest.raises(AssertionError, match="rank"):
        orpo_loss(TWO[None], TWO[None])


# (argument, a value to refuse, the value that counts as not given, who reads it, loss type):
# label_smoothing 0 is "no smoothing"; simpo_gamma 0.5 is the default
CPO_UNREAD_CASES = [
    pytest.param(argument, value, neutral, readers, loss_type, id=f"{argument}-{loss_type}")
    for argument, value, neutral, readers, loss_types in [
        ("label_smoothing", 0.1, 0.0, r"\['sigmoid', 'simpo'\] read it", ["hinge", "ipo"]),
        (
            "simpo_gamma",
            1.0,
            0.5,
            r"\['simpo'\] read it.*use loss_type='simpo'",
            ["sigmoid", "hinge", "ipo"],
        ),
    ]
    for loss_type in loss_types
]


@pytest.mark.parametrize("argument,value,neutral,readers,loss_type", CPO_UNREAD_CASES)
def test_cpo_argument_is_refused_where_it_is_not_read(argument, value, neutral, readers, loss_type):
    message = f"cpo_loss: {argument}={value} is not read by loss_type '{loss_type}'; only {readers}"
    with pytest.raises(ValueError, match=message):
        cpo_loss(TWO, TWO, loss_type=loss_type, **{argument: value})
    with pytest.raises(ValueError, match=f"{argument}=a traced value .*'{loss_type}'"):
        jax.jit(lambda s: cpo_loss(TWO, TWO, loss_type=loss_type, **{argument: s})[0])(value)
    cpo_loss(TWO, TWO, loss_type=loss_type, **{argument: neutral})  # not given: fine


def test_cpo_other_errors():
    with pytest.raises(
        ValueError, match=r"unknown loss_type 'dpo'.*'sigmoid', 'hinge', 'ipo', 'simpo'"
    ):
        cpo_loss(TWO, TWO, loss_type="dpo")
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\]; got 1.5"):
        cpo_loss(TWO, TWO, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chosen_nll must be a scalar"):
        cpo_loss(TWO, TWO, chosen_nll=jnp.ones((1,)))
    with pytest.raises(AssertionError, match="different shapes"):
        cpo_loss(TWO, THREE)


def test_low_precision_inputs_are_computed_in_float32():
    chosen, rejected = TWO.astype(jnp.bfloat16), (TWO - 0.5).astype(jnp.bfloat16)
    assert cpo_loss(chosen, rejected)[0].dtype == jnp.float32
    assert orpo_loss(chosen, rejected)[0].dtype == jnp.float32
    assert kto_loss(chosen, rejected, DESIRABLE)[0].dtype == jnp.float32
