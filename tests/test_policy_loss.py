"""Tests of :func:`rljax.rlhf.policy_loss` (the GRPO family as TRL 1.16's
``GRPOTrainer._compute_loss`` defines it) against an independent float64 numpy reference.

The reference is written per row and per token from TRL's formulas and never calls library
code; its gradient w.r.t. ``logps`` is analytic (chain rule through the ratio, the clip branch,
CISPO's stop-gradient weight and the k3 KL) and is itself checked by central finite
differences where the loss is differentiable through the ratio (all types but CISPO). When
torch is importable, a direct transcription of TRL's formula lines (autograd for the gradient)
is a second reference.

Tolerances: float64 throughout (``jax_enable_x64`` is on in conftest). The implementation
and the references differ only in summation order and in the last bits of ``exp`` (XLA's vs
libm's): measured at most 3e-15 relative (a loss whose terms partly cancel) and 3e-16
absolute. ``rtol=1e-10`` leaves five orders of magnitude for another CPU's or XLA version's
reduction order and still catches any formula error (those are >= 1e-3 here); ``atol=1e-12``
covers entries that are 0 in one and ~1e-17 in the other (gradients of clipped tokens).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.rlhf import IMPORTANCE_SAMPLING_LEVELS, POLICY_LOSS_TYPES, policy_loss

TOL = dict(rtol=1e-10, atol=1e-12)
B, T = 4, 5
# Coefficients of the matrix; a second set checks that sweeping them does not recompile.
COEFS = dict(
    clip_eps=0.2,
    clip_eps_high=0.28,  # clip-higher (DAPO's value), used with [B, T] advantages
    eps_max=1.3,  # CISPO's cap: small enough that some ratios in [0.5, 2] are capped
    beta=0.05,
    num_items=23,  # dapo/cispo: a token count larger than this batch's (other micro-batches)
    max_completion_len=8,  # dr_grpo's constant, > T as in a padded batch
)
COEFS_2 = dict(
    clip_eps=0.1, clip_eps_high=0.4, eps_max=1.1, beta=0.5, num_items=40, max_completion_len=6
)
COEF_SETS = {"base": COEFS, "sweep": COEFS_2}
MATRIX = list(
    itertools.product(POLICY_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS, [False, True], [1, 2])
)
IDS = [f"{t}-{lv}-{'ref' if r else 'noref'}-adv{n}d" for t, lv, r, n in MATRIX]


# ------------------------------------------------------------------------------ data


def make_data(seed=0):
    """Ragged mask with an all-masked row (row 2); ratios spread over [~0.5, ~2] so every clip
    branch is hit; finite junk at masked positions (TRL multiplies it by the mask)."""
    rng = np.random.default_rng(seed)
    mask = np.array(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=np.float64
    )
    logps = -rng.uniform(0.1, 3.0, (B, T))
    return dict(
        logps=logps,
        old_logps=logps + rng.normal(0.0, 0.35, (B, T)),
        ref_logps=logps + rng.normal(0.0, 0.3, (B, T)),
        adv1=rng.normal(0.0, 1.0, B),
        adv2=rng.normal(0.0, 1.0, (B, T)),
        mask=mask,
    )


@functools.cache
def variants():
    """The inputs every case runs on: random, padding poisoned (-inf log-probs, nan
    advantages and old log-probs, +inf reference), on-policy (ratio 1), nothing valid."""
    clean = make_data()
    pad = ~clean["mask"].astype(bool)
    dirty = {k: v.copy() for k, v in clean.items()}
    dirty["logps"][pad], dirty["old_logps"][pad], dirty["ref_logps"][pad] = -np.inf, np.nan, np.inf
    dirty["adv2"][pad], dirty["adv1"][2] = np.nan, np.nan
    return {
        "clean": clean,
        "dirty": dirty,
        "on_policy": clean | {"old_logps": clean["logps"]},
        "empty": clean | {"mask": np.zeros_like(clean["mask"])},
    }


def case_kwargs(case, data, coefs):
    """The optional arguments of a case: clip-higher with [B, T] advantages, the default
    (clip_eps_high = clip_eps) with [B]; num_items given with a reference, absent without."""
    loss_type, _, with_ref, adv_ndim = case
    kw = {"clip_eps": coefs["clip_eps"]}
    if loss_type == "cispo":
        kw["clip_eps_high"] = coefs["eps_max"]
    elif adv_ndim == 2:
        kw["clip_eps_high"] = coefs["clip_eps_high"]
    if loss_type == "dr_grpo":
        kw["max_completion_len"] = coefs["max_completion_len"]
    if loss_type in ("dapo", "cispo") and with_ref:
        kw["num_items"] = coefs["num_items"]
    if with_ref:
        kw |= {"ref_logps": data["ref_logps"], "beta": coefs["beta"]}
    return kw


# ------------------------------------------------------------------------------ references


def reference(logps, old, adv, mask, loss_type, level, *, clip_eps=0.2, clip_eps_high=None,
              ref_logps=None, beta=0.0, max_completion_len=None, num_items=None):  # fmt: skip
    """``(loss, metrics, dloss/dlogps)`` by loops over rows and tokens, from TRL's formulas."""
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    valid = mask.astype(bool)
    n_row = [int(valid[i].sum()) for i in range(B)]
    n_all = sum(n_row)

    def a(i, t):
        return adv[i] if adv.ndim == 1 else adv[i, t]

    # ratio per (row, token) and its derivative w.r.t. logps[i, j]
    seq_ratio = []
    for i in range(B):
        s = sum(logps[i, t] - old[i, t] for t in range(T) if valid[i, t])
        seq_ratio.append(np.exp(s / max(n_row[i], 1)))

    def ratio(i, t):
        return np.exp(logps[i, t] - old[i, t]) if level == "token" else seq_ratio[i]

    def dratio(i, t, j):
        if level == "token":
            return ratio(i, t) if j == t else 0.0
        return seq_ratio[i] / max(n_row[i], 1) if valid[i, j] else 0.0

    def weight(i):  # d loss / d (per-token loss at a valid token of row i)
        if loss_type == "grpo":
            return 1.0 / (B * max(n_row[i], 1))
        if loss_type == "bnpo":
            return 1.0 / max(n_all, 1)
        if loss_type == "dr_grpo":
            return 1.0 / (B * max_completion_len)
        if loss_type in ("dapo", "cispo"):
            return 1.0 / max(n_all if num_items is None else num_items, 1)
        assert loss_type == "luspo"
        return 1.0 / B

    loss, grad = 0.0, np.zeros((B, T))
    kls, ratios = [], []
    for i in range(B):
        for t in range(T):
            if not valid[i, t]:
                continue
            r, at = ratio(i, t), a(i, t)
            ratios.append(r)
            if loss_type == "cispo":
                w = min(r, eps_high)
                ell, dell_dr, dell_dlogp = -w * at * logps[i, t], 0.0, -w * at
            else:
                c = min(max(r, 1 - eps_low), 1 + eps_high)
                ell = -min(r * at, c * at)
                dell_dr = -at if r * at <= c * at else 0.0
                dell_dlogp = 0.0
            if ref_logps is not None:
                d = ref_logps[i, t] - logps[i, t]
                kls.append(np.exp(d) - d - 1)
                ell += beta * kls[-1]
                dell_dlogp += beta * (1.0 - np.exp(d))
            loss += weight(i) * ell
            grad[i, t] += weight(i) * dell_dlogp
            for j in range(T):
                grad[i, j] += weight(i) * dell_dr * dratio(i, t, j)

    metrics = {
        "count": float(n_all),
        "policy/ratio": sum(ratios) / max(n_all, 1),
        "policy/ratio_min": min(ratios, default=0.0),
        "policy/ratio_max": max(ratios, default=0.0),
    }
    if ref_logps is not None:
        metrics["kl"] = sum(kls) / max(n_all, 1)
    # TRL's flags have shape broadcast(ratio, advantages): [B, 1] only for sequence-level
    # ratios with [B] advantages, where its means run over all B rows (empty ones included).
    per_row = level == "sequence" and adv.ndim == 1

    def fraction(flag):  # -> (global mean, per-row means of rows that count)
        if per_row:
            rows = [float(flag(i, 0)) for i in range(B)]
            return sum(rows) / B, rows
        hits = [[float(flag(i, t)) for t in range(T) if valid[i, t]] for i in range(B)]
        rows = [sum(h) / len(h) for h in hits if h]
        return sum(map(sum, hits)) / max(n_all, 1), rows

    if loss_type == "cispo":

        def capped(i, t):
            return ratio(i, t) > eps_high and a(i, t) > 0

        metrics["cispo_clip_ratio"] = fraction(capped)[0]
        return loss, metrics, grad

    def low(i, t):
        return ratio(i, t) < 1 - eps_low and a(i, t) < 0

    def high(i, t):
        return ratio(i, t) > 1 + eps_high and a(i, t) > 0

    low_mean, low_rows = fraction(low)
    high_mean, high_rows = fraction(high)
    metrics |= {
        "clip_ratio/low_mean": low_mean,
        "clip_ratio/high_mean": high_mean,
        "clip_ratio/region_mean": fraction(lambda i, t: low(i, t) or high(i, t))[0],
        "clip_ratio/low_min": min(low_rows, default=0.0),
        "clip_ratio/high_max": max(high_rows, default=0.0),
    }
    return loss, metrics, grad


def trl_torch(logps, old, adv, mask, loss_type, level, *, clip_eps=0.2, clip_eps_high=None,
              ref_logps=None, beta=0.0, max_completion_len=None, num_items=None):  # fmt: skip
    """TRL 1.16 ``_compute_loss``'s formula lines (trl/trainer/grpo_trainer.py 3083-3184 and
    its metrics 3254-3287; one process, no gradient accumulation, no vLLM correction) in torch.
    Returns (loss, dloss/dlogps by autograd, the clip and kl metrics TRL logs)."""
    torch = pytest.importorskip("torch")
    per_token_logps = torch.tensor(logps, requires_grad=True)
    old_per_token_logps = torch.tensor(old)
    advantages = torch.tensor(adv)
    mask = torch.tensor(mask)
    epsilon_low = clip_eps
    epsilon_high = clip_eps if clip_eps_high is None else clip_eps_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        ref = torch.tensor(ref_logps)
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_len)
    elif loss_type in ("cispo", "dapo"):
        num_items_in_batch = mask.sum() if num_items is None else torch.tensor(float(num_items))
        loss = (per_token_loss * mask).sum() / num_items_in_batch.clamp(min=1.0)
    else:
        loss = (per_token_loss * mask).sum(-1).mean()
    loss.backward()

    def masked_seq_mean(x):
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            return (x.sum() / max(x.shape[0], 1)).item()
        return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()

    coef_1 = coef_1.detach()
    metrics = {}
    if beta != 0.0:
        metrics["kl"] = global_masked_mean(per_token_kl.detach())
    if loss_type == "cispo":
        is_cispo_clipped = (coef_1 > epsilon_high) & (advantages > 0)
        metrics["cispo_clip_ratio"] = global_masked_mean(is_cispo_clipped.float())
    else:
        is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
        is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
        is_region_clipped = is_low_clipped | is_high_clipped
        metrics["clip_ratio/low_mean"] = global_masked_mean(is_low_clipped.double())
        metrics["clip_ratio/high_mean"] = global_masked_mean(is_high_clipped.double())
        metrics["clip_ratio/region_mean"] = global_masked_mean(is_region_clipped.double())
        low_rows = masked_seq_mean(is_low_clipped.double())
        high_rows = masked_seq_mean(is_high_clipped.double())
        metrics["clip_ratio/low_min"] = low_rows[~low_rows.isnan()].min().item()
        metrics["clip_ratio/high_max"] = high_rows[~high_rows.isnan()].max().item()
    return loss.item(), per_token_logps.grad.numpy(), metrics


# ------------------------------------------------------------------------------ runs

TRACES = []


@jax.jit
def all_cases(data, coefs):
    """(loss, metrics, dloss/dlogps) of every case of MATRIX in one compiled function (one
    compilation for the whole file: a jit per case would cost ~0.5 s each)."""
    TRACES.append(1)
    out = {}
    for case in MATRIX:
        loss_type, level, _, adv_ndim = case
        kw = case_kwargs(case, data, coefs)
        advantages = data[f"adv{adv_ndim}"]

        def f(logps, advantages=advantages, kw=kw, loss_type=loss_type, level=level):
            return policy_loss(
                logps, data["old_logps"], advantages, data["mask"], loss_type=loss_type,
                importance_sampling_level=level, **kw,
            )  # fmt: skip

        (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(data["logps"])
        out[str(case)] = (loss, metrics, grad)
    return out


@functools.cache
def jitted(variant, coefs_name="base"):
    coefs = {k: jnp.asarray(v) for k, v in COEF_SETS[coefs_name].items()}
    data = {k: jnp.asarray(v) for k, v in variants()[variant].items()}
    return jax.device_get(all_cases(data, coefs))


def reference_of(case, variant="clean", coefs=COEFS):
    data = variants()[variant]
    loss_type, level, _, adv_ndim = case
    args = (data["logps"], data["old_logps"], data[f"adv{adv_ndim}"], data["mask"])
    return reference(*args, loss_type, level, **case_kwargs(case, data, coefs))


def assert_matches(got, want, what=""):
    loss, metrics, grad = got
    want_loss, want_metrics, want_grad = want
    np.testing.assert_allclose(loss, want_loss, **TOL, err_msg=f"{what} loss")
    assert sorted(metrics) == sorted(want_metrics), what
    for k in want_metrics:
        np.testing.assert_allclose(metrics[k], want_metrics[k], **TOL, err_msg=f"{what} {k}")
    if grad is not None:
        np.testing.assert_allclose(grad, want_grad, **TOL, err_msg=f"{what} grad")


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", MATRIX, ids=IDS)
def test_matches_numpy_reference_with_and_without_jit(case):
    want = reference_of(case)
    assert_matches(jitted("clean")[str(case)], want, "jit")
    # Without jit (op by op): loss and metrics.
    data = {k: jnp.asarray(v) for k, v in variants()["clean"].items()}
    loss_type, level, _, adv_ndim = case
    loss, metrics = policy_loss(
        data["logps"], data["old_logps"], data[f"adv{adv_ndim}"], data["mask"],
        loss_type=loss_type, importance_sampling_level=level,
        **case_kwargs(case, data, COEFS),
    )  # fmt: skip
    assert_matches((loss, metrics, None), want, "eager")


@pytest.mark.parametrize("variant", ["on_policy", "empty"])
def test_on_policy_and_empty_batches_match_the_reference(variant):
    for case, name in zip(MATRIX, IDS, strict=True):
        assert_matches(jitted(variant)[str(case)], reference_of(case, variant), name)


def test_sweeping_coefficients_does_not_recompile():
    jitted("clean")
    traces = len(TRACES)
    got = jitted("clean", "sweep")
    assert len(TRACES) == traces
    for case, name in zip(MATRIX, IDS, strict=True):
        assert_matches(got[str(case)], reference_of(case, coefs=COEFS_2), name)


def test_on_policy_ratio_one_clips_nothing():
    for case, name in zip(MATRIX, IDS, strict=True):
        _, metrics, _ = jitted("on_policy")[str(case)]
        for k, v in metrics.items():
            if "clip_ratio" in k:
                assert v == 0.0, (name, k)
        assert metrics["policy/ratio_min"] == metrics["policy/ratio_max"] == 1.0, name
        np.testing.assert_allclose(metrics["policy/ratio"], 1.0, rtol=1e-15)


def test_masked_padding_never_reaches_loss_or_gradient():
    """-inf log-probs, nan advantages/old log-probs, +inf reference at masked positions (and
    a nan [B] advantage for the empty row): the same loss, metrics and gradient as finite
    padding, and a gradient of exactly 0 at every masked position."""
    pad = ~variants()["clean"]["mask"].astype(bool)
    for case, name in zip(MATRIX, IDS, strict=True):
        dirty, clean = jitted("dirty")[str(case)], jitted("clean")[str(case)]
        assert np.all(dirty[2][pad] == 0.0), name
        assert_matches(dirty, clean, name)


def test_empty_batch_is_zero():
    for case, name in zip(MATRIX, IDS, strict=True):
        loss, metrics, grad = jitted("empty")[str(case)]
        assert loss == 0.0 and np.all(grad == 0.0), name
        assert all(np.isfinite(v) for v in metrics.values()), name


def test_dapo_without_num_items_equals_bnpo():
    for level, adv_ndim in itertools.product(IMPORTANCE_SAMPLING_LEVELS, [1, 2]):
        dapo = jitted("clean")[str(("dapo", level, False, adv_ndim))]
        bnpo = jitted("clean")[str(("bnpo", level, False, adv_ndim))]
        assert_matches(dapo, bnpo, f"{level} adv{adv_ndim}d")


@pytest.mark.parametrize("loss_type", [t for t in POLICY_LOSS_TYPES if t != "cispo"])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
def test_reference_gradient_is_the_derivative_of_the_reference_loss(loss_type, level):
    """Validates the analytic reference gradient by central differences (numpy only; CISPO's
    stop-gradient weight makes its gradient differ from the loss's derivative by design)."""
    data = variants()["clean"]
    case = (loss_type, level, True, 2)
    kw = case_kwargs(case, data, COEFS)
    args = [data["logps"], data["old_logps"], data["adv2"], data["mask"], loss_type, level]
    grad = reference(*args, **kw)[2]
    h, fd = 1e-6, np.zeros((B, T))
    for i, t in np.ndindex(B, T):
        e = np.zeros((B, T))
        e[i, t] = h
        up = reference(args[0] + e, *args[1:], **kw)[0]
        down = reference(args[0] - e, *args[1:], **kw)[0]
        fd[i, t] = (up - down) / (2 * h)
    # central differences: O(h^2) truncation, O(eps / h) ~ 1e-10 rounding
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_matches_trl_torch_transcription(loss_type):
    data = variants()["clean"]
    for level, adv_ndim in itertools.product(IMPORTANCE_SAMPLING_LEVELS, [1, 2]):
        case = (loss_type, level, True, adv_ndim)
        args = (data["logps"], data["old_logps"], data[f"adv{adv_ndim}"], data["mask"])
        want_loss, want_grad, want_metrics = trl_torch(
            *args, loss_type, level, **case_kwargs(case, data, COEFS)
        )
        loss, metrics, grad = jitted("clean")[str(case)]
        np.testing.assert_allclose(loss, want_loss, **TOL, err_msg=str(case))
        np.testing.assert_allclose(grad, want_grad, **TOL, err_msg=str(case))
        for k, v in want_metrics.items():
            np.testing.assert_allclose(metrics[k], v, **TOL, err_msg=f"{case} {k}")


# ------------------------------------------------------------------------------ errors


def call(loss_type="dapo", **kw):
    data = variants()["clean"]
    args = (data["logps"], data["old_logps"], data["adv1"], data["mask"])
    return policy_loss(*args, loss_type=loss_type, **kw)


def test_unknown_loss_type_or_level_lists_the_choices():
    with pytest.raises(ValueError, match=r"not one of.*'grpo'.*'cispo'"):
        call("ppo")
    with pytest.raises(ValueError, match=r"not one of.*'token'.*'sequence'"):
        call(importance_sampling_level="sequence_token")


@pytest.mark.parametrize("loss_type", [t for t in POLICY_LOSS_TYPES if t != "dr_grpo"])
def test_max_completion_len_is_refused_where_unread(loss_type):
    kw = {"clip_eps_high": 5.0} if loss_type == "cispo" else {}
    with pytest.raises(ValueError, match=r"max_completion_len is given.*does not read it"):
        call(loss_type, max_completion_len=8, **kw)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "luspo"])
def test_num_items_is_refused_where_unread(loss_type):
    kw = {"max_completion_len": 8} if loss_type == "dr_grpo" else {}
    with pytest.raises(ValueError, match=r"num_items is given.*does not read it"):
        call(loss_type, num_items=10, **kw)


def test_required_arguments():
    with pytest.raises(ValueError, match="pass max_completion_len"):
        call("dr_grpo")
    with pytest.raises(ValueError, match="clip_eps_high"):
        call("cispo")
    with pytest.raises(ValueError, match="needs ref_logps"):
        call(beta=0.1)
    with pytest.raises(ValueError, match="needs ref_logps"):  # traced: cannot be known to be 0
        jax.jit(lambda beta: call(beta=beta)[0])(0.0)
    call(beta=0.0)  # the number 0 needs no reference
    call(beta=jnp.asarray(0.0))


def test_shape_errors():
    data = variants()["clean"]
    logps, old, adv, mask, ref = (
        data[k] for k in ("logps", "old_logps", "adv1", "mask", "ref_logps")
    )
    with pytest.raises(AssertionError):  # advantages [T]
        policy_loss(logps, old, adv[:1].repeat(T), mask)
    with pytest.raises(AssertionError):  # advantages [B, T + 1]
        policy_loss(logps, old, np.zeros((B, T + 1)), mask)
    with pytest.raises(AssertionError):  # mask [B, T - 1]
        policy_loss(logps, old, adv, mask[:, :-1])
    with pytest.raises(AssertionError):  # ref_logps [B, T - 1]
        policy_loss(logps, old, adv, mask, ref_logps=ref[:, :-1], beta=0.1)
    with pytest.raises(AssertionError):  # logps [B]
        policy_loss(logps[:, 0], old[:, 0], adv, mask[:, 0])
