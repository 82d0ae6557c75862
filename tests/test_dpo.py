"""Tests for :func:`rljax.dpo.dpo_loss` against TRL 1.16's ``DPOTrainer``.

The reference below is an independent float64 NumPy transcription of
``trl/trainer/dpo_trainer.py`` (``DPOTrainer._compute_loss`` and the checks in ``__init__``),
with this mapping of TRL's tensors to ``dpo_loss``'s arguments:

* ``chosen_logps``/``rejected_logps`` (sequence sums) -> ``policy_chosen_logps``/
  ``policy_rejected_logps``; ``ref_*_logps`` -> ``ref_*_logps`` (zeros when reference-free);
* ``completion_mask.chunk(2)[k].sum(dim=1)`` -> ``chosen_lengths``/``rejected_lengths``;
* the ``sft`` term ``-chosen_per_token_logps[chosen_mask].mean()`` ->
  ``-sum(policy_chosen_logps) / sum(chosen_lengths)``;
* WPO's ``chosen_weights * rejected_weights`` -> ``weights``.

TRL's alpha-divergence clamps the exponent in ``.float()`` with a clamp table that has no
float64 entry; the float64 reference uses the float32 clamp (80) and computes in float64.
"""

from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TRL_DPO_METRICS, finite_diff, np_logsigmoid
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax import dpo
from rljax.dpo import dpo_loss

# ------------------------------------------------------------------------------------------
# Constants transcribed from TRL 1.16 (dpo_trainer.py)
# ------------------------------------------------------------------------------------------

TRL_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
TRL_F_DIVERGENCE_LOSS_TYPES = (
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "robust",
    "discopop",
    "sft",
)
NON_F_DIVERGENCE_TYPES = tuple(t for t in TRL_LOSS_TYPES if t not in TRL_F_DIVERGENCE_LOSS_TYPES)
SORTING_TYPES = ("aot", "aot_unpaired")
PER_PAIR_TYPES = tuple(t for t in TRL_LOSS_TYPES if t not in SORTING_TYPES)
# The optional arguments each TRL 1.16 loss type reads, transcribed from
# ``DPOTrainer._compute_loss``: ``self.label_smoothing`` appears in the exo_pair, robust, aot and
# aot_unpaired branches, ``self.args.discopop_tau`` in discopop, the completion-mask token counts
# in ipo and sigmoid_norm (chosen and rejected) and sft (chosen, with its own normaliser).
TRL_READS = {
    "label_smoothing": {"exo_pair", "robust", "aot", "aot_unpaired"},
    "discopop_tau": {"discopop"},
    "chosen_lengths": {"ipo", "sigmoid_norm", "sft"},
    "rejected_lengths": {"ipo", "sigmoid_norm"},
    "sft_normalizer": {"sft"},
}
LN2 = math.log(2.0)

VARIANTS = pytest.mark.parametrize("variant", ["eager", "jit"])


# ------------------------------------------------------------------------------------------
# Independent float64 NumPy reference (transcribed from TRL, not from rljax)
# ------------------------------------------------------------------------------------------


def np_sigmoid(x):
    """torch.sigmoid, float64 (stable on both sides)."""
    x = np.asarray(x, np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def trl_scores(logratios, f_divergence_type, alpha):
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - np.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return LN2 + np_logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        coef = 1.0 / (alpha - 1.0)
        t = np.minimum((alpha - 1.0) * logratios, 80.0)
        return (np.exp(t) - 1.0) * coef
    raise AssertionError(f_divergence_type)


def trl_per_sequence_loss(lt, d):
    """One iteration of TRL's ``for loss_type in self.loss_types`` loop (before weighting)."""
    beta, ls = d.beta, d.label_smoothing
    if lt == "sigmoid":
        return -np_logsigmoid(beta * d.delta_score)
    if lt == "hinge":
        return np.maximum(1 - beta * d.delta_score, 0.0)
    if lt == "ipo":
        chosen_avg = d.chosen_scores / np.maximum(d.chosen_lengths, 1.0)
        rejected_avg = d.rejected_scores / np.maximum(d.rejected_lengths, 1.0)
        return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    if lt == "exo_pair":
        qw = np_sigmoid(beta * d.delta_score)
        log_qw = np_logsigmoid(beta * d.delta_score)
        log_pw = np.log1p(-ls)
        ql = np_sigmoid(-beta * d.delta_score)
        log_ql = np_logsigmoid(-beta * d.delta_score)
        log_pl = np.log(ls)
        return qw * (log_qw - log_pw) + ql * (log_ql - log_pl)
    if lt == "nca_pair":
        cr = beta * d.chosen_logratios
        rr = beta * d.rejected_logratios
        return -np_logsigmoid(cr) - 0.5 * np_logsigmoid(-cr) - 0.5 * np_logsigmoid(-rr)
    if lt == "robust":
        clean = -(1 - ls) * np_logsigmoid(beta * d.delta_score)
        flipped = -ls * np_logsigmoid(-beta * d.delta_score)
        return (clean - flipped) / (1 - 2 * ls)
    if lt == "bco_pair":
        cr = beta * d.chosen_logratios
        rr = beta * d.rejected_logratios
        return -np_logsigmoid(cr) - np_logsigmoid(-rr)
    if lt == "sppo_hard":
        return (d.chosen_logratios - 0.5 / beta) ** 2 + (d.rejected_logratios + 0.5 / beta) ** 2
    if lt in ("aot", "aot_unpaired"):
        if lt == "aot":
            a = np.sort(d.chosen_logps - d.rejected_logps, axis=0)
            b = np.sort(d.ref_chosen_logps - d.ref_rejected_logps, axis=0)
        else:
            a = np.sort(d.chosen_logratios, axis=0)
            b = np.sort(d.rejected_logratios, axis=0)
        delta = a - b
        return -np_logsigmoid(beta * delta) * (1 - ls) - np_logsigmoid(-beta * delta) * ls
    if lt == "apo_zero":
        return (1 - np_sigmoid(beta * d.chosen_logratios)) + np_sigmoid(beta * d.rejected_logratios)
    if lt == "apo_down":
        return np_sigmoid(beta * d.chosen_logratios) + (
            1 - np_sigmoid(beta * (d.chosen_logratios - d.rejected_logratios))
        )
    if lt == "discopop":
        logits = d.delta_score * beta
        modulation = np_sigmoid(logits / d.discopop_tau)
        return -np_logsigmoid(logits) * (1 - modulation) + np.exp(-logits) * modulation
    if lt == "sft":
        batch_loss = -np.sum(d.chosen_logps) / np.sum(d.chosen_lengths)
        return np.full(d.chosen_logps.shape, batch_loss)
    if lt == "sigmoid_norm":
        chosen_avg = d.chosen_scores / np.maximum(d.chosen_lengths, 1.0)
        rejected_avg = d.rejected_scores / np.maximum(d.rejected_lengths, 1.0)
        return -np_logsigmoid(beta * (chosen_avg - rejected_avg))
    raise AssertionError(lt)


def _f64(x):
    return None if x is None else np.asarray(x, np.float64)


def trl_terms(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths=None,
    rejected_lengths=None,
    *,
    beta=0.1,
    label_smoothing=0.0,
    discopop_tau=0.05,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
):
    """What TRL's loss branches read (``d`` of :func:`trl_per_sequence_loss`), in float64."""
    d = types.SimpleNamespace(
        beta=float(beta), label_smoothing=float(label_smoothing), discopop_tau=float(discopop_tau)
    )
    d.chosen_logps, d.rejected_logps = _f64(chosen_logps), _f64(rejected_logps)
    d.ref_chosen_logps, d.ref_rejected_logps = _f64(ref_chosen_logps), _f64(ref_rejected_logps)
    d.chosen_logratios = d.chosen_logps - d.ref_chosen_logps
    d.rejected_logratios = d.rejected_logps - d.ref_rejected_logps
    d.chosen_scores, d.rejected_scores = (
        trl_scores(x, f_divergence_type, f_alpha_divergence_coef)
        for x in (d.chosen_logratios, d.rejected_logratios)
    )
    d.delta_score = d.chosen_scores - d.rejected_scores
    d.chosen_lengths, d.rejected_lengths = _f64(chosen_lengths), _f64(rejected_lengths)
    return d


def trl_dpo(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta=0.1,
    loss_type="sigmoid",
    loss_weights=None,
    chosen_lengths=None,
    rejected_lengths=None,
    weights=None,
    **hyperparameters,
):
    """TRL 1.16's DPO loss and logged metrics, in float64 NumPy. ``hyperparameters``:
    ``label_smoothing``, ``discopop_tau``, ``f_divergence_type``, ``f_alpha_divergence_coef``
    (:func:`trl_terms`)."""
    if ref_chosen_logps is None:
        ref_chosen_logps = np.zeros_like(_f64(chosen_logps))
        ref_rejected_logps = np.zeros_like(_f64(rejected_logps))
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    loss_weights = list(loss_weights) if loss_weights else [1.0] * len(loss_types)
    d = trl_terms(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        beta=beta,
        **hyperparameters,
    )
    loss = 0.0
    metrics = {}
    for lt, w in zip(loss_types, loss_weights, strict=True):
        per_sequence_loss = trl_per_sequence_loss(lt, d)
        if weights is not None:
            per_sequence_loss = per_sequence_loss * _f64(weights)
        metrics[f"loss/{lt}"] = per_sequence_loss.mean()
        loss += per_sequence_loss.mean() * w
    chosen_rewards = beta * d.chosen_logratios
    rejected_rewards = beta * d.rejected_logratios
    metrics["rewards/chosen"] = chosen_rewards.mean()
    metrics["rewards/rejected"] = rejected_rewards.mean()
    metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).astype(np.float64).mean()
    metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
    metrics["logps/chosen"] = d.chosen_logps.mean()
    metrics["logps/rejected"] = d.rejected_logps.mean()
    return float(loss), metrics


# ------------------------------------------------------------------------------------------
# Inputs and the function under test, eager or jitted
# ------------------------------------------------------------------------------------------


def make_batch(seed, batch, *, max_len=20, spread=None, min_len=1):
    """Sequence log-probs ``-N * U(0.5, 3)`` for completion lengths ``N``.

    With ``spread`` the reference log-probs are ``policy + N * U(-spread, spread)`` (small
    log-ratios); otherwise they are drawn independently like the policy's.
    """
    rng = np.random.default_rng(seed)
    cl = rng.integers(min_len, max_len + 1, batch)
    rl = rng.integers(min_len, max_len + 1, batch)
    c = -cl * rng.uniform(0.5, 3.0, batch)
    r = -rl * rng.uniform(0.5, 3.0, batch)
    if spread is None:
        rc = -cl * rng.uniform(0.5, 3.0, batch)
        rr = -rl * rng.uniform(0.5, 3.0, batch)
    else:
        rc = c + cl * rng.uniform(-spread, spread, batch)
        rr = r + rl * rng.uniform(-spread, spread, batch)
    return {"c": c, "r": r, "rc": rc, "rr": rr, "cl": cl, "rl": rl}


def read_only(kwargs, loss_type):
    """``kwargs`` without the optional arguments that none of ``loss_type`` reads (TRL ignores
    them, ``dpo_loss`` refuses them: tested on its own below), and without
    ``f_alpha_divergence_coef`` unless the f-divergence is ``alpha_divergence``."""
    types_ = {loss_type} if isinstance(loss_type, str) else set(loss_type)
    out = {k: v for k, v in kwargs.items() if k not in TRL_READS or TRL_READS[k] & types_}
    if out.get("f_divergence_type", "reverse_kl") != "alpha_divergence":
        out.pop("f_alpha_divergence_coef", None)
    return out


def _hashable(v):
    return tuple(v) if isinstance(v, list | tuple) else v


@functools.cache
def _loss_fn(variant, static_items):
    static = dict(static_items)

    def f(c, r, rc, rr, arrays, traced):
        return dpo_loss(c, r, rc, rr, **arrays, **traced, **static)

    return jax.jit(f) if variant == "jit" else f


def run_dpo(
    variant,
    c,
    r,
    rc=None,
    rr=None,
    *,
    chosen_lengths=None,
    rejected_lengths=None,
    weights=None,
    normalizer=None,
    sft_normalizer=None,
    traced=None,
    **static,
):
    """``dpo_loss`` eagerly or under ``jax.jit``; array arguments (and ``traced``) are jit
    arguments, the remaining keyword arguments are closed over (static). Arguments the loss
    types do not read are left out (:func:`read_only`), so one configuration serves every type."""
    loss_type = static.get("loss_type", "sigmoid")
    static = read_only(static, loss_type)
    traced = read_only(traced or {}, loss_type)
    arrays = {
        k: v
        for k, v in {
            "chosen_lengths": chosen_lengths,
            "rejected_lengths": rejected_lengths,
            "weights": weights,
            "normalizer": normalizer,
            "sft_normalizer": sft_normalizer,
        }.items()
        if v is not None
    }
    arrays = {k: jnp.asarray(v) for k, v in read_only(arrays, loss_type).items()}
    conv = lambda x: None if x is None else jnp.asarray(x)
    static_items = tuple(sorted((k, _hashable(v)) for k, v in static.items()))
    fn = _loss_fn(variant, static_items)
    loss, metrics = fn(conv(c), conv(r), conv(rc), conv(rr), arrays, traced or {})
    return loss, metrics


def assert_matches(got, want, *, rtol, atol=0.0):
    loss, metrics = got
    ref_loss, ref_metrics = want
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=rtol, atol=atol, err_msg="loss")
    assert set(metrics) == set(ref_metrics)
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(
            np.asarray(metrics[key]), value, rtol=rtol, atol=atol, err_msg=key
        )


def logps(b, sl=slice(None)):
    """``(chosen, rejected, ref chosen, ref rejected)`` sequence log-probs of ``b`` (rows ``sl``;
    ``None`` for a reference ``b`` sets to ``None``: reference-free)."""
    return tuple(None if b[k] is None else b[k][sl] for k in ("c", "r", "rc", "rr"))


def lengths(b, sl=slice(None)):
    """``b``'s completion lengths (rows ``sl``) as ``dpo_loss``'s keyword arguments."""
    return {"chosen_lengths": b["cl"][sl], "rejected_lengths": b["rl"][sl]}


def check_against_trl(variant, b, *, rtol, atol=0.0, traced=None, **kw):
    """``dpo_loss`` (:func:`run_dpo`) on ``b``'s log-probs matches :func:`trl_dpo` given the same
    arguments (``traced`` ones included); returns both."""
    got = run_dpo(variant, *logps(b), traced=traced, **kw)
    want = trl_dpo(*logps(b), **kw, **(traced or {}))
    assert_matches(got, want, rtol=rtol, atol=atol)
    return got, want


def default_config(lt):
    # EXO needs epsilon > 0 (the paper recommends 1e-3); TRL's other defaults otherwise.
    return {"beta": 0.1, "label_smoothing": 1e-3 if lt == "exo_pair" else 0.0}


# Non-default values for every hyper-parameter (label smoothing 0.3 is valid for every type and
# must be ignored by the types whose TRL formula does not use it).
OTHER_CONFIG = {"beta": 0.7, "label_smoothing": 0.3, "discopop_tau": 0.4}


def _lengths_kw(b, lt_or_types, *, always=True):
    needs = {"ipo", "sigmoid_norm", "sft"}
    lts = {lt_or_types} if isinstance(lt_or_types, str) else set(lt_or_types)
    if always or lts & needs:
        return {"chosen_lengths": b["cl"], "rejected_lengths": b["rl"]}
    return {}


# ------------------------------------------------------------------------------------------
# The loss registry matches TRL
# ------------------------------------------------------------------------------------------


def test_loss_type_registry_matches_trl():
    assert tuple(dpo.LOSS_TYPES) == TRL_LOSS_TYPES
    assert set(dpo.LOSS_FUNCTIONS) == set(TRL_LOSS_TYPES)
    assert set(dpo.F_DIVERGENCE_LOSS_TYPES) == set(TRL_F_DIVERGENCE_LOSS_TYPES)
    assert set(dpo.F_DIVERGENCE_TYPES) == {
        "reverse_kl",
        "forward_kl",
        "js_divergence",
        "alpha_divergence",
    }


# ------------------------------------------------------------------------------------------
# Values and metrics against the reference: every loss type, float64 and float32
# ------------------------------------------------------------------------------------------


@VARIANTS
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_matches_trl_float64(loss_type, variant):
    cases = [
        (7, default_config(loss_type), True),
        (7, OTHER_CONFIG, True),
        (1, OTHER_CONFIG, True),
        (5, default_config(loss_type), False),  # reference-free: ref log-probs None == zeros
    ]
    for i, (batch, cfg, with_ref) in enumerate(cases):
        b = make_batch(100 + i, batch)
        kw = _lengths_kw(b, loss_type, always=with_ref)
        b = b if with_ref else {**b, "rc": None, "rr": None}
        got, _ = check_against_trl(variant, b, rtol=1e-10, loss_type=loss_type, **kw, **cfg)
        assert got[0].dtype == jnp.float64


@VARIANTS
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_matches_trl_float32(loss_type, variant):
    # float32 inputs; the reference sees the same float32-rounded values in float64, so only the
    # float32 arithmetic differs (eps ~6e-8, on log-probs up to ~60 in magnitude): 1e-5 relative.
    for i, (batch, cfg, with_ref) in enumerate(
        [(7, default_config(loss_type), True), (4, OTHER_CONFIG, False)]
    ):
        b = make_batch(200 + i, batch)
        b32 = {k: v.astype(np.int32 if k in ("cl", "rl") else np.float32) for k, v in b.items()}
        if not with_ref:
            b32.update(rc=None, rr=None)
        got, _ = check_against_trl(
            variant, b32, rtol=1e-5, loss_type=loss_type, **lengths(b32), **cfg
        )
        assert got[0].dtype == jnp.float32


@VARIANTS
def test_bfloat16_inputs_are_computed_in_float32(variant):
    b = make_batch(7, 6)
    bf = {k: jnp.asarray(b[k], jnp.bfloat16) for k in ("c", "r", "rc", "rr")}
    got = run_dpo(variant, *logps(bf), loss_type="sigmoid")
    assert got[0].dtype == jnp.float32
    rounded = {k: np.asarray(v.astype(jnp.float32), np.float64) for k, v in bf.items()}
    want = trl_dpo(*logps(rounded))
    assert_matches(got, want, rtol=1e-5)


@settings(max_examples=10)
@given(
    batch=st.sampled_from([1, 2, 5, 8]),
    seed=st.integers(0, 2**31 - 1),
    type_set=st.lists(st.sampled_from(TRL_LOSS_TYPES), min_size=1, max_size=4, unique=True),
    loss_weights=st.lists(st.floats(0.05, 2.0), min_size=4, max_size=4),
    beta=st.floats(0.01, 2.0),
    label_smoothing=st.floats(0.001, 0.45),
    discopop_tau=st.floats(0.02, 1.0),
)
@VARIANTS
def test_multiple_loss_types_match_trl(
    variant, batch, seed, type_set, loss_weights, beta, label_smoothing, discopop_tau
):
    # beta, label_smoothing and discopop_tau are traced under jit (no recompile per example)
    b = make_batch(seed, batch, spread=0.5)
    weights = loss_weights[: len(type_set)]
    scalars = {"beta": beta, "label_smoothing": label_smoothing, "discopop_tau": discopop_tau}
    # tiny absolute floor: random examples can put a mean (e.g. the margin) near zero, where
    # float64 summation-order differences (~1e-15) dominate a relative comparison
    check_against_trl(
        variant,
        b,
        rtol=1e-10,
        atol=1e-14,
        traced=scalars,
        loss_type=type_set,
        loss_weights=weights,
        **lengths(b),
    )


@VARIANTS
@pytest.mark.parametrize(
    ("loss_type", "loss_weights"),
    [
        (["sigmoid", "sft"], [1.0, 0.5]),  # RPO
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
        (["ipo", "hinge"], None),  # default weights: 1 each
    ],
)
def test_named_combinations_match_trl(variant, loss_type, loss_weights):
    b = make_batch(11, 6)
    got, want = check_against_trl(
        variant, b, rtol=1e-10, loss_type=loss_type, loss_weights=loss_weights, **lengths(b)
    )
    weights = loss_weights or [1.0] * len(loss_type)
    total = sum(w * want[1][f"loss/{lt}"] for lt, w in zip(loss_type, weights, strict=True))
    np.testing.assert_allclose(np.asarray(got[0]), total, rtol=1e-10)


# ------------------------------------------------------------------------------------------
# f-divergences
# ------------------------------------------------------------------------------------------

F_DIVERGENCE_CASES = [
    ("forward_kl", 0.5),
    ("js_divergence", 0.5),
    ("alpha_divergence", 0.5),
    ("alpha_divergence", 0.25),
    ("alpha_divergence", 1.5),
    ("alpha_divergence", 1.0),  # limit case: reverse KL
]


@VARIANTS
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("f_type", "alpha"), F_DIVERGENCE_CASES)
def test_f_divergences_match_trl(f_type, alpha, dtype, variant):
    # All eight f-divergence loss types at once; loss/<type> checks each one separately. Small
    # log-ratios: forward KL's exp(-log ratio) would otherwise overflow discopop's exp(-logits).
    b = make_batch(31, 7, max_len=12, spread=0.15)
    arr = dict(zip(("c", "r", "rc", "rr"), (x.astype(dtype) for x in logps(b)), strict=True))
    check_against_trl(
        variant,
        arr,
        rtol=1e-10 if dtype == np.float64 else 1e-5,
        loss_type=list(TRL_F_DIVERGENCE_LOSS_TYPES),
        loss_weights=[0.3, 1.0, 0.7, 0.2, 0.5, 1.3, 0.4, 0.9],
        label_smoothing=0.2,
        beta=0.3,
        f_divergence_type=f_type,
        f_alpha_divergence_coef=alpha,
        **lengths(b),
    )


@VARIANTS
def test_f_divergences_wide_logratios_float64(variant):
    # independent reference log-probs: log-ratios up to ~+-50 (forward KL scores ~1e21)
    b = make_batch(32, 7)
    types_ = ["sigmoid", "hinge", "ipo", "robust", "sigmoid_norm", "sft", "exo_pair"]
    # 1 + 5e-7 is inside TRL's |alpha - 1| < 1e-6 band: the reverse-KL limit, not the formula
    for f_type, alpha in [*F_DIVERGENCE_CASES, ("alpha_divergence", 1.0 + 5e-7)]:
        check_against_trl(
            variant,
            b,
            rtol=1e-10,
            loss_type=types_,
            label_smoothing=0.1,
            f_divergence_type=f_type,
            f_alpha_divergence_coef=alpha,
            **lengths(b),
        )


@VARIANTS
def test_alpha_divergence_exponent_is_clamped_at_80(variant):
    # (alpha - 1) * log ratio = -0.5 * -200 = 100 > 80: TRL clamps the exponent at 80.
    c = np.array([-210.0, -5.0, -3.0])
    r = np.array([-4.0, -300.0, -2.0])
    rc = np.array([-10.0, -4.0, -2.5])
    rr = np.array([-3.0, -20.0, -2.2])
    kw = {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "beta": 0.1}
    loss, _ = run_dpo(variant, c, r, rc, rr, **kw)
    want = trl_dpo(c, r, rc, rr, **kw)
    np.testing.assert_allclose(np.asarray(loss), want[0], rtol=1e-10)
    scores = trl_scores(c - rc, "alpha_divergence", 0.5)
    assert scores[0] == pytest.approx((math.exp(80.0) - 1.0) / -0.5, rel=1e-12)


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------


def _grad_case(loss_type):
    cfg = {"beta": 0.3, "label_smoothing": 0.2, "discopop_tau": 0.4, "loss_type": loss_type}
    return make_batch(41, 5, max_len=10, spread=0.3), cfg


def _grad_fn(variant, b, cfg, argnums):
    kw = read_only({**lengths(b), **cfg}, cfg.get("loss_type"))

    def loss_fn(c, r, rc, rr):
        return dpo_loss(c, r, rc, rr, **kw)[0]

    g = jax.grad(loss_fn, argnums=argnums)
    return jax.jit(g) if variant == "jit" else g


def _check_fd(b, cfg, got, *, batch):
    def ref(x):
        return trl_dpo(x[:batch], x[batch:], b["rc"], b["rr"], **lengths(b), **cfg)[0]

    x = np.concatenate([b["c"], b["r"]])
    want = finite_diff(ref, x)
    got = np.concatenate([np.asarray(g) for g in got])
    # FD truncation + rounding (~1e-10 of the loss scale): the absolute floor covers entries whose
    # exact gradient is ~0 (e.g. the rejected side of sft).
    scale = max(1.0, abs(ref(x)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8 * scale)
    return want


@VARIANTS
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_gradients_match_finite_differences(loss_type, variant):
    b, cfg = _grad_case(loss_type)
    got = _grad_fn(variant, b, cfg, (0, 1, 2, 3))(*logps(b))
    want = _check_fd(b, cfg, got[:2], batch=5)
    assert np.any(np.abs(want) > 1e-4)  # the check is not vacuous
    # no gradient flows to the reference log-probs (TRL computes them under no_grad)
    np.testing.assert_array_equal(np.asarray(got[2]), 0.0)
    np.testing.assert_array_equal(np.asarray(got[3]), 0.0)


@VARIANTS
@pytest.mark.parametrize(("f_type", "alpha"), F_DIVERGENCE_CASES)
def test_f_divergence_gradients_match_finite_differences(f_type, alpha, variant):
    b = make_batch(43, 5, max_len=10, spread=0.15)
    cfg = {
        "loss_type": list(TRL_F_DIVERGENCE_LOSS_TYPES),
        "loss_weights": [0.3, 1.0, 0.7, 0.2, 0.5, 1.3, 0.4, 0.9],
        "label_smoothing": 0.2,
        "beta": 0.3,
        "f_divergence_type": f_type,
        "f_alpha_divergence_coef": alpha,
    }
    got = _grad_fn(variant, b, cfg, (0, 1, 2, 3))(*logps(b))
    _check_fd(b, cfg, got[:2], batch=5)
    np.testing.assert_array_equal(np.asarray(got[2]), 0.0)
    np.testing.assert_array_equal(np.asarray(got[3]), 0.0)


@VARIANTS
def test_reference_free_gradients_match_finite_differences(variant):
    b = make_batch(44, 4, max_len=4)
    cfg = {"loss_type": ["sigmoid", "apo_zero", "aot"], "beta": 0.2}

    def loss_fn(c, r):
        return dpo_loss(c, r, **cfg)[0]

    g = jax.grad(loss_fn, argnums=(0, 1))
    got = (jax.jit(g) if variant == "jit" else g)(b["c"], b["r"])
    want = finite_diff(lambda x: trl_dpo(x[:4], x[4:], **cfg)[0], np.concatenate([b["c"], b["r"]]))
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------
# Invariants and hand-computed cases
# ------------------------------------------------------------------------------------------


@VARIANTS
@pytest.mark.parametrize(("f_type", "alpha"), [("reverse_kl", 0.5), *F_DIVERGENCE_CASES])
def test_policy_equal_to_reference_gives_log2_for_sigmoid(f_type, alpha, variant):
    b = make_batch(51, 6)
    for beta in (0.1, 2.5):
        loss, metrics = run_dpo(
            variant,
            b["c"],
            b["r"],
            b["c"],
            b["r"],
            traced={"beta": beta},
            f_divergence_type=f_type,
            f_alpha_divergence_coef=alpha,
        )
        np.testing.assert_allclose(np.asarray(loss), LN2, rtol=1e-12)
        assert float(metrics["rewards/accuracies"]) == 0.0  # ties are not counted
        assert float(metrics["rewards/margins"]) == 0.0


@VARIANTS
def test_hand_computed_sigmoid(variant):
    # log ratios: chosen (-1) - (-2) = 1, rejected (-3) - (-2) = -1; beta = 0.5:
    # loss = -log sigmoid(0.5 * 2) = log(1 + e^-1).
    # Second pair: chosen ratio 0, rejected ratio 2 -> logit 0.5 * -2 = -1: loss = log(1 + e).
    c, r = np.array([-1.0, -4.0]), np.array([-3.0, -1.0])
    rc, rr = np.array([-2.0, -4.0]), np.array([-2.0, -3.0])
    loss, m = run_dpo(variant, c, r, rc, rr, beta=0.5)
    expected = 0.5 * (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0)))
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(loss), 0.5 * (0.31326168751822286 + 1.3132616875182228))
    np.testing.assert_allclose(float(m["rewards/chosen"]), 0.25, rtol=1e-14)  # (0.5 + 0) / 2
    np.testing.assert_allclose(float(m["rewards/rejected"]), 0.25, rtol=1e-14)  # (-0.5 + 1) / 2
    np.testing.assert_allclose(float(m["rewards/margins"]), 0.0, atol=1e-15)
    assert float(m["rewards/accuracies"]) == 0.5
    assert float(m["logps/chosen"]) == -2.5
    assert float(m["logps/rejected"]) == -2.0
    assert float(m["loss/sigmoid"]) == pytest.approx(expected, rel=1e-14)


@VARIANTS
def test_hand_computed_ipo(variant):
    # pair 1: chosen ratio 1 over 2 tokens (0.5), rejected ratio -1 over 4 tokens (-0.25);
    #   beta = 0.25 -> 1/(2 beta) = 2 -> (0.75 - 2)^2 = 1.5625
    # pair 2: chosen ratio 3 over 0 tokens (clamped to 1): 3, rejected ratio 0 -> (3 - 2)^2 = 1
    c, r = np.array([-4.0, -1.0]), np.array([-6.0, -2.0])
    rc, rr = np.array([-5.0, -4.0]), np.array([-5.0, -2.0])
    kw = {"chosen_lengths": np.array([2, 0]), "rejected_lengths": np.array([4, 3])}
    loss, m = run_dpo(variant, c, r, rc, rr, beta=0.25, loss_type="ipo", **kw)
    np.testing.assert_allclose(np.asarray(loss), (1.5625 + 1.0) / 2, rtol=1e-14)
    # metrics use the unnormalised log ratios: beta * [1, 3] and beta * [-1, 0]
    np.testing.assert_allclose(float(m["rewards/chosen"]), 0.5, rtol=1e-14)
    np.testing.assert_allclose(float(m["rewards/rejected"]), -0.125, rtol=1e-14)
    assert float(m["rewards/accuracies"]) == 1.0


@VARIANTS
def test_hand_computed_sft_and_hinge(variant):
    # sft: -(-2 - 6) / (1 + 3) = 2 (a per-token mean, not a per-sequence mean)
    c, r = np.array([-2.0, -6.0]), np.array([-1.0, -9.0])
    kw = {"chosen_lengths": np.array([1, 3]), "rejected_lengths": np.array([5, 5])}
    loss, _ = run_dpo(variant, c, r, c, r, loss_type="sft", **kw)
    np.testing.assert_allclose(np.asarray(loss), 2.0, rtol=1e-14)
    # hinge, reference-free, beta 0.25: deltas -1 and 3 -> max(0, 1.25) and max(0, 0.25)
    loss, _ = run_dpo(variant, c, r, beta=0.25, loss_type="hinge")
    np.testing.assert_allclose(np.asarray(loss), (1.25 + 0.25) / 2, rtol=1e-14)


# ------------------------------------------------------------------------------------------
# Traced hyper-parameters
# ------------------------------------------------------------------------------------------


def test_traced_beta_and_label_smoothing_trace_once():
    b = make_batch(61, 6)
    kw = lengths(b)
    lts = ["sigmoid", "robust", "exo_pair", "aot", "ipo", "discopop", "sppo_hard"]
    traces = 0

    @jax.jit
    def f(c, r, rc, rr, beta, label_smoothing, discopop_tau):
        nonlocal traces
        traces += 1
        return dpo_loss(
            c,
            r,
            rc,
            rr,
            beta=beta,
            label_smoothing=label_smoothing,
            discopop_tau=discopop_tau,
            loss_type=lts,
            **kw,
        )

    seen = []
    for beta in (0.05, 0.1, 0.5, 1.0, 3.0):
        for ls in (0.01, 0.2, 0.4):
            got = f(*logps(b), beta, ls, 0.3)
            want = trl_dpo(
                *logps(b), beta=beta, label_smoothing=ls, discopop_tau=0.3, loss_type=lts, **kw
            )
            assert_matches(got, want, rtol=1e-10)
            seen.append(float(got[0]))
    assert traces == 1
    assert len(set(seen)) == len(seen)


def test_concrete_array_hyperparameters_work_eagerly():
    b = make_batch(62, 4)
    got = dpo_loss(
        *map(jnp.asarray, logps(b)),
        beta=jnp.asarray(0.4),
        label_smoothing=jnp.asarray(0.25),
        loss_type="robust",
    )
    want = trl_dpo(*logps(b), beta=0.4, label_smoothing=0.25, loss_type="robust")
    assert_matches(got, want, rtol=1e-10)


# ------------------------------------------------------------------------------------------
# normalizer / sft_normalizer: micro-batches sum to the full batch
# ------------------------------------------------------------------------------------------


@VARIANTS
def test_micro_batches_with_normalizer_sum_to_full_batch(variant):
    b = make_batch(71, 8)
    lts = list(PER_PAIR_TYPES)
    lws = [0.5 + 0.1 * i for i in range(len(lts))]
    static = {"loss_type": lts, "loss_weights": lws, "label_smoothing": 0.2, "beta": 0.3}
    _, want = check_against_trl(variant, b, rtol=1e-10, **lengths(b), **static)
    parts = []
    for sl in (slice(0, 3), slice(3, 8)):
        parts.append(
            run_dpo(
                variant,
                *logps(b, sl),
                **lengths(b, sl),
                normalizer=8,
                sft_normalizer=int(b["cl"].sum()),
                **static,
            )
        )
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), want[0], rtol=1e-10)
    for lt in lts:
        np.testing.assert_allclose(
            sum(float(p[1][f"loss/{lt}"]) for p in parts),
            want[1][f"loss/{lt}"],
            rtol=1e-10,
            atol=1e-14,
            err_msg=lt,
        )


@VARIANTS
def test_micro_batch_gradients_sum_to_full_batch(variant):
    # every per-pair type at once, with distinct loss weights so no term can hide another
    b = make_batch(72, 8, max_len=10, spread=0.3)
    lts = list(PER_PAIR_TYPES)
    cfg = {
        "loss_type": lts,
        "loss_weights": [0.5 + 0.1 * i for i in range(len(lts))],
        "beta": 0.3,
        "label_smoothing": 0.2,
    }

    def loss_fn(c, r, sl, normalizer=None, sft_normalizer=None):
        return dpo_loss(
            c,
            r,
            *logps(b, sl)[2:],
            **lengths(b, sl),
            normalizer=normalizer,
            sft_normalizer=sft_normalizer,
            **cfg,
        )[0]

    def grads(sl, **kw):
        g = jax.grad(functools.partial(loss_fn, sl=sl, **kw), argnums=(0, 1))
        g = jax.jit(g) if variant == "jit" else g
        return np.concatenate(g(b["c"][sl], b["r"][sl]))

    full = grads(slice(0, 8))
    kw = {"normalizer": 8, "sft_normalizer": int(b["cl"].sum())}
    g1, g2 = grads(slice(0, 3), **kw), grads(slice(3, 8), **kw)
    got = np.concatenate([g1[:3], g2[:5], g1[3:], g2[5:]])  # [chosen..., rejected...]
    np.testing.assert_allclose(got, full, rtol=1e-10, atol=1e-15)
    _check_fd(b, cfg, (got[:8], got[8:]), batch=8)


def test_default_normalizer_is_local_batch_size():
    b = make_batch(73, 5)
    base = dpo_loss(*logps(b))[0]
    scaled = dpo_loss(*logps(b), normalizer=20)[0]
    np.testing.assert_allclose(float(scaled), float(base) * 5 / 20, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# Per-pair weights (WPO)
# ------------------------------------------------------------------------------------------


@VARIANTS
def test_per_pair_weights_match_trl(variant):
    b = make_batch(81, 7)
    w = np.random.default_rng(81).uniform(0.0, 1.0, 7)
    lts = [lt for lt in PER_PAIR_TYPES if lt != "sft"]
    cfg = {"loss_type": lts, "label_smoothing": 0.2, "beta": 0.3}
    got, _ = check_against_trl(variant, b, rtol=1e-10, weights=w, **lengths(b), **cfg)
    # and explicitly: loss/<type> = mean_i(w_i * loss_i), with loss_i the unweighted reference
    # loss of pair i alone (these types do not couple pairs)
    pairs = [slice(i, i + 1) for i in range(7)]
    for lt in lts:
        per_pair = [
            trl_dpo(*logps(b, sl), **lengths(b, sl), **cfg)[1][f"loss/{lt}"] for sl in pairs
        ]
        expected = np.mean(w * np.array(per_pair))
        np.testing.assert_allclose(float(got[1][f"loss/{lt}"]), expected, rtol=1e-10, err_msg=lt)
        assert not np.isclose(expected, np.mean(per_pair), rtol=1e-6)  # the weights matter


@VARIANTS
def test_per_pair_weights_sft_matches_trl(variant):
    # TRL expands the scalar SFT loss to every pair, then multiplies by the pair weights:
    # mean_i(w_i * L_sft) = mean(w) * (-sum(chosen_logps) / sum(chosen_lengths)).
    b = make_batch(82, 5)
    w = np.array([0.1, 1.0, 0.5, 0.9, 0.2])
    got, _ = run_dpo(variant, *logps(b), weights=w, loss_type="sft", **lengths(b))
    batch_loss = -b["c"].sum() / b["cl"].sum()
    np.testing.assert_allclose(float(got), w.mean() * batch_loss, rtol=1e-10)


@VARIANTS
def test_weighted_gradients_match_finite_differences(variant):
    # all per-pair types (sft included) with per-pair weights, against FD of TRL's weighted loss
    b = make_batch(85, 5, max_len=10, spread=0.3)
    w = np.array([0.2, 1.0, 0.6, 0.9, 0.4])
    lts = list(PER_PAIR_TYPES)
    cfg = {
        "loss_type": lts,
        "loss_weights": [1.5 - 0.1 * i for i in range(len(lts))],
        "beta": 0.3,
        "label_smoothing": 0.2,
        "weights": w,
    }
    got = _grad_fn(variant, b, cfg, (0, 1))(*logps(b))
    _check_fd(b, cfg, got, batch=5)


@VARIANTS
def test_no_gradient_to_per_pair_weights(variant):
    b = make_batch(83, 4)
    w = np.array([0.3, 0.6, 1.0, 0.8])

    def loss_fn(w):
        return dpo_loss(*logps(b), weights=w, loss_type="bco_pair")[0]

    g = jax.grad(loss_fn)
    np.testing.assert_array_equal(np.asarray((jax.jit(g) if variant == "jit" else g)(w)), 0.0)


@pytest.mark.parametrize("loss_type", SORTING_TYPES)
def test_weights_with_sorting_losses_raise(loss_type):
    b = make_batch(84, 4)
    with pytest.raises(ValueError, match="aot"):
        dpo_loss(*logps(b), weights=np.ones(4), loss_type=loss_type)
    with pytest.raises(ValueError, match="aot"):
        dpo_loss(b["c"], b["r"], weights=np.ones(4), loss_type=["sigmoid", loss_type])


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

_B = make_batch(91, 3)
_ARGS = (_B["c"], _B["r"], _B["rc"], _B["rr"])


@pytest.mark.parametrize("loss_type", ["dpo", ["sigmoid", "simpo"], "Sigmoid"])
def test_unknown_loss_type_lists_valid_choices(loss_type):
    with pytest.raises(ValueError) as excinfo:
        dpo_loss(*_ARGS, loss_type=loss_type)
    message = str(excinfo.value)
    for lt in TRL_LOSS_TYPES:
        assert f"'{lt}'" in message


def test_unknown_f_divergence_type_lists_valid_choices():
    with pytest.raises(ValueError) as excinfo:
        dpo_loss(*_ARGS, f_divergence_type="kl")
    for f_type in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
        assert f_type in str(excinfo.value)


@pytest.mark.parametrize("label_smoothing", [0.5, 0.7, -0.1])
def test_robust_rejects_label_smoothing_outside_half_open_unit_half(label_smoothing):
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(*_ARGS, loss_type="robust", label_smoothing=label_smoothing)
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(*_ARGS, loss_type="robust", label_smoothing=jnp.asarray(label_smoothing))


def test_exo_pair_rejects_zero_label_smoothing():
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(*_ARGS, loss_type="exo_pair")
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(*_ARGS, loss_type=["sigmoid", "exo_pair"], label_smoothing=0.0)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_length_normalised_types_require_both_lengths(loss_type):
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*_ARGS, loss_type=loss_type)
    with pytest.raises(ValueError, match="rejected_lengths"):
        dpo_loss(*_ARGS, loss_type=loss_type, chosen_lengths=_B["cl"])
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*_ARGS, loss_type=loss_type, rejected_lengths=_B["rl"])


def test_sft_requires_chosen_lengths_only():
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*_ARGS, loss_type="sft")
    loss, _ = dpo_loss(*_ARGS, loss_type="sft", chosen_lengths=_B["cl"])
    np.testing.assert_allclose(float(loss), -_B["c"].sum() / _B["cl"].sum(), rtol=1e-12)


@pytest.mark.parametrize("f_type", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", NON_F_DIVERGENCE_TYPES)
def test_f_divergence_with_unsupported_loss_type_raises(loss_type, f_type):
    with pytest.raises(ValueError, match=loss_type):
        dpo_loss(*_ARGS, loss_type=loss_type, f_divergence_type=f_type)
    with pytest.raises(ValueError, match=loss_type):
        dpo_loss(*_ARGS, loss_type=["sigmoid", loss_type], f_divergence_type=f_type)


def test_forward_kl_with_nca_pair_raises():
    with pytest.raises(ValueError, match="nca_pair"):
        dpo_loss(*_ARGS, loss_type="nca_pair", f_divergence_type="forward_kl")


@pytest.mark.parametrize(
    ("loss_type", "loss_weights"),
    [
        ("sigmoid", [1.0, 1.0]),
        (["sigmoid", "hinge"], [1.0]),
        (["sigmoid", "hinge"], [1.0] * 3),
        # an empty list is a length mismatch too (TRL's DPOConfig.__post_init__ raises as well)
        (["sigmoid", "hinge"], []),
    ],
)
def test_mismatched_loss_weights_raise(loss_type, loss_weights):
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(*_ARGS, loss_type=loss_type, loss_weights=loss_weights)


def test_only_one_reference_raises():
    with pytest.raises(ValueError, match="ref_"):
        dpo_loss(_B["c"], _B["r"], _B["rc"], None)
    with pytest.raises(ValueError, match="ref_"):
        dpo_loss(_B["c"], _B["r"], None, _B["rr"])


def test_empty_loss_type_raises():
    with pytest.raises(ValueError):
        dpo_loss(*_ARGS, loss_type=[])


# ------------------------------------------------------------------------------------------
# Arguments a loss type does not read are errors, not silently ignored
# ------------------------------------------------------------------------------------------

_UNREAD_VALUES = {
    "label_smoothing": 0.3,
    "discopop_tau": 0.2,
    "chosen_lengths": _B["cl"],
    "rejected_lengths": _B["rl"],
    "sft_normalizer": 10.0,
}
_UNREAD_CASES = [
    (argument, lt)
    for argument, readers in TRL_READS.items()
    for lt in TRL_LOSS_TYPES
    if lt not in readers
]


def test_argument_readers_match_trl():
    assert {k: set(v) for k, v in dpo.ARGUMENT_READERS.items()} == TRL_READS


@VARIANTS
@pytest.mark.parametrize(("argument", "loss_type"), _UNREAD_CASES)
def test_argument_no_loss_type_reads_raises(argument, loss_type, variant):
    kw = {argument: _UNREAD_VALUES[argument]}
    # what the type needs otherwise (so the only fault is the unread argument)
    for name in ("chosen_lengths", "rejected_lengths"):
        if loss_type in TRL_READS[name] and name != argument:
            kw[name] = _UNREAD_VALUES[name]
    if loss_type == "exo_pair":
        kw.setdefault("label_smoothing", 1e-3)

    def call(c, r, rc, rr, kw):
        return dpo_loss(c, r, rc, rr, loss_type=loss_type, **kw)

    fn = jax.jit(call) if variant == "jit" else call
    with pytest.raises(ValueError) as excinfo:
        fn(*_ARGS, kw)
    message = str(excinfo.value)
    assert argument in message and f"'{loss_type}'" in message and "dpo_loss" in message
    for reader in TRL_READS[argument]:
        assert f"'{reader}'" in message
    # next to a type that reads it, the same argument is fine
    both = [loss_type, sorted(TRL_READS[argument])[0]]
    kw = {argument: _UNREAD_VALUES[argument]}
    for name in ("chosen_lengths", "rejected_lengths"):
        if TRL_READS[name] & set(both):
            kw[name] = _UNREAD_VALUES[name]
    if "exo_pair" in both and argument != "label_smoothing":
        kw["label_smoothing"] = 0.2
    loss, _ = dpo_loss(*_ARGS, loss_type=both, **kw)
    assert np.isfinite(float(loss))


def test_sigmoid_with_label_smoothing_is_an_error_not_conservative_dpo():
    """TRL 1.16's sigmoid branch is -logsigmoid(beta * delta) with no smoothing (cDPO was
    removed from it), so rljax refuses the setting instead of ignoring or reinterpreting it."""
    for value in (0.3, jnp.asarray(0.3)):
        with pytest.raises(ValueError, match=r"label_smoothing.*'sigmoid'.*cDPO.*PairTerms"):
            dpo_loss(*_ARGS, loss_type="sigmoid", label_smoothing=value)
    with pytest.raises(ValueError, match=r"label_smoothing.*traced"):
        jax.jit(lambda ls: dpo_loss(*_ARGS, loss_type="sigmoid", label_smoothing=ls))(0.0)
    # a concrete 0 means "no smoothing" and is accepted for every type
    zero, _ = dpo_loss(*_ARGS, loss_type="sigmoid", label_smoothing=0.0)
    np.testing.assert_allclose(float(zero), trl_dpo(*_ARGS)[0], rtol=1e-12)


def test_f_alpha_divergence_coef_needs_alpha_divergence():
    for f_type in ("reverse_kl", "forward_kl", "js_divergence"):
        with pytest.raises(ValueError, match=f"f_alpha_divergence_coef.*{f_type}"):
            dpo_loss(*_ARGS, f_divergence_type=f_type, f_alpha_divergence_coef=0.3)
    loss, _ = dpo_loss(*_ARGS, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    want = trl_dpo(*_ARGS, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    np.testing.assert_allclose(float(loss), want[0], rtol=1e-12)


# ------------------------------------------------------------------------------------------
# reduction="none": per-pair losses
# ------------------------------------------------------------------------------------------


def trl_per_pair(b, loss_types, loss_weights, *, weights=None, **cfg):
    """``sum_k w_k * loss_k(i)`` per pair in float64 NumPy, from TRL's per-sequence losses;
    the sft entry is pair i's share of the per-token NLL, ``-c_i * B / sum(chosen_lengths)``
    (TRL's batch value times ``w_i`` with per-pair weights, as TRL weights it)."""
    d = trl_terms(*logps(b), b["cl"], b["rl"], **cfg)
    cl = d.chosen_lengths
    total = np.zeros_like(d.chosen_logps)
    for lt, w in zip(loss_types, loss_weights, strict=True):
        if lt == "sft" and weights is None:
            per_pair = -d.chosen_logps * len(cl) / cl.sum()
        else:
            per_pair = trl_per_sequence_loss(lt, d)
        if weights is not None:
            per_pair = per_pair * _f64(weights)
        total += w * per_pair
    return total


@VARIANTS
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_weights", [False, True])
def test_reduction_none_gives_per_pair_losses(dtype, with_weights, variant):
    b = make_batch(95, 6, spread=0.5)
    b = {k: v.astype(dtype) if k in ("c", "r", "rc", "rr") else v for k, v in b.items()}
    lts = list(PER_PAIR_TYPES)
    lws = [0.4 + 0.1 * i for i in range(len(lts))]
    w = np.linspace(0.2, 1.0, 6) if with_weights else None
    cfg = {"beta": 0.3, "label_smoothing": 0.2, "discopop_tau": 0.4}
    kw = {**lengths(b), "weights": w}
    common = {"loss_type": lts, "loss_weights": lws, **cfg}
    per_pair, metrics = run_dpo(variant, *logps(b), **kw, **common, reduction="none")
    mean, mean_metrics = run_dpo(variant, *logps(b), **kw, **common)
    assert per_pair.shape == (6,) and per_pair.dtype == dtype
    want = trl_per_pair(b, lts, lws, weights=w, **cfg)
    rtol = 1e-10 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(
        np.asarray(per_pair), want, rtol=rtol, atol=rtol * np.abs(want).max()
    )
    # their mean is the default reduction; the metrics are the same scalars
    np.testing.assert_allclose(float(jnp.mean(per_pair)), float(mean), rtol=rtol)
    np.testing.assert_allclose(np.mean(want), trl_dpo(*logps(b), **kw, **common)[0], rtol=rtol)
    assert set(metrics) == set(mean_metrics)
    for key in metrics:
        np.testing.assert_allclose(metrics[key], mean_metrics[key], rtol=rtol, err_msg=key)


@VARIANTS
def test_reduction_none_sums_to_mean_with_a_global_normalizer(variant):
    b = make_batch(96, 8)
    full, _ = run_dpo(variant, *logps(b), **lengths(b), loss_type=["ipo", "sft"])
    parts = []
    for sl in (slice(0, 3), slice(3, 8)):
        per_pair, _ = run_dpo(
            variant,
            *logps(b, sl),
            **lengths(b, sl),
            loss_type=["ipo", "sft"],
            normalizer=8,
            sft_normalizer=int(b["cl"].sum()),
            reduction="none",
        )
        parts.append(np.asarray(per_pair))
    np.testing.assert_allclose(np.concatenate(parts).sum() / 8, float(full), rtol=1e-10)


@pytest.mark.parametrize("loss_type", SORTING_TYPES)
def test_reduction_none_refuses_sorting_losses(loss_type):
    with pytest.raises(ValueError, match=f"reduction='none'.*{loss_type}"):
        dpo_loss(*_ARGS, loss_type=loss_type, reduction="none")
    with pytest.raises(ValueError, match=r"reduction.*'mean', 'none'"):
        dpo_loss(*_ARGS, reduction="sum")


# ------------------------------------------------------------------------------------------
# A custom variant written from PairTerms
# ------------------------------------------------------------------------------------------


def conservative_dpo(terms: dpo.PairTerms) -> jax.Array:
    """cDPO (Mitchell, 2023): DPO with labels flipped with probability 0.1, written from the
    per-pair terms as a researcher would."""
    eps = 0.1
    logits = terms.beta * terms.delta_score
    return -(1 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)


def np_conservative_dpo(b, beta):
    delta = (_f64(b["c"]) - _f64(b["rc"])) - (_f64(b["r"]) - _f64(b["rr"]))
    return -0.9 * np_logsigmoid(beta * delta) - 0.1 * np_logsigmoid(-beta * delta)


@VARIANTS
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_custom_variant_from_pair_terms(dtype, variant):
    b = make_batch(97, 7, spread=0.5)
    arr = {k: jnp.asarray(b[k].astype(dtype)) for k in ("c", "r", "rc", "rr")}
    rtol = 1e-10 if dtype == np.float64 else 2e-6

    def call(c, r, rc, rr, beta):
        return (
            dpo_loss(c, r, rc, rr, beta=beta, loss_type=conservative_dpo),
            dpo_loss(c, r, rc, rr, beta=beta, loss_type=conservative_dpo, reduction="none")[0],
            dpo_loss(
                c,
                r,
                rc,
                rr,
                beta=beta,
                loss_type=["sigmoid", conservative_dpo],
                loss_weights=[0.5, 2.0],
            )[0],
            jax.grad(lambda c: dpo_loss(c, r, rc, rr, beta=beta, loss_type=conservative_dpo)[0])(c),
        )

    fn = jax.jit(call) if variant == "jit" else call
    (loss, metrics), per_pair, combined, grad = fn(arr["c"], arr["r"], arr["rc"], arr["rr"], 0.4)
    rounded = {k: np.asarray(v, np.float64) for k, v in arr.items()}
    want = np_conservative_dpo(rounded, 0.4)
    np.testing.assert_allclose(np.asarray(per_pair), want, rtol=rtol)
    np.testing.assert_allclose(float(loss), want.mean(), rtol=rtol)
    np.testing.assert_allclose(float(metrics["loss/conservative_dpo"]), want.mean(), rtol=rtol)
    sigmoid = trl_dpo(rounded["c"], rounded["r"], rounded["rc"], rounded["rr"], beta=0.4)[0]
    np.testing.assert_allclose(float(combined), 0.5 * sigmoid + 2.0 * want.mean(), rtol=rtol)
    expected_grad = finite_diff(
        lambda x: np_conservative_dpo({**rounded, "c": x}, 0.4).mean(), rounded["c"]
    )
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-8)
    for key in TRL_DPO_METRICS:
        assert key in metrics


def test_custom_variant_must_return_per_pair_losses():
    def total(t):
        return jnp.sum(t.delta_score)

    with pytest.raises(ValueError, match="'total' returned shape"):
        dpo_loss(*_ARGS, loss_type=total)
