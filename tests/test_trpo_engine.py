"""Tests of the natural-gradient engine of :mod:`rljax.trpo` and of ``make_trpo_update``.

References are built densely and independently of the library: the Fisher is materialised
twice in float64, once as the Hessian (``jax.hessian``) of the masked mean KL written here
from its definition, once as ``J^T blockdiag(F_out) J`` with ``J = jax.jacobian`` of the
policy outputs and the closed-form output Fisher in numpy. Conjugate gradient is checked
against ``numpy.linalg.solve`` and a numpy transcription of the recursion, the line search
against a numpy loop over the candidate fractions, and the TRPO step against a dense solve.

Parameters and inputs are drawn in float32 and widened, so that one float64 reference serves
the float64 runs and the float32 runs alike (the float32 run sees exactly the same numbers).
Relative errors are ``max|got - ref| / max|ref|``.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import count_traces
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from rljax.trpo import (
    conjugate_gradient,
    fisher_vector_product,
    kl_line_search,
    make_fisher_vector_product,
    natural_step,
    output_fisher_product,
)
from rljax.updates import PPOState, TRPOConfig, init_trpo_state, make_trpo_update

FAMILIES = ("categorical", "gaussian")
METHODS = ("gauss_newton", "hessian")
TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}

# Shapes of the sequence policies: [B, T, IN] inputs, A actions or D action dimensions.
B, T, IN, HID, A, D = 3, 4, 3, 5, 4, 2
# Contextual bandit for make_trpo_update: [ROWS, IN] contexts.
ROWS = 16


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def ravel(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)


# Random numbers come from numpy: eager jax.random compiles a kernel for every new shape.


def f32_rounded(rng, shape, scale=1.0):
    """A float64 array of normal draws whose values are exactly representable in float32."""
    return jnp.asarray((np.float32(scale) * rng.normal(size=shape).astype(np.float32)), jnp.float64)


def cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


# ---------------------------------------------------------------------------------------------
# Policies written for the tests
# ---------------------------------------------------------------------------------------------


def init_mlp(rng, n_out, gaussian=False):
    params = {
        "w1": f32_rounded(rng, (IN, HID), 0.8),
        "b1": f32_rounded(rng, (HID,), 0.3),
        "w2": f32_rounded(rng, (HID, n_out), 0.8),
        "b2": f32_rounded(rng, (n_out,), 0.3),
    }
    if gaussian:
        params["log_std"] = f32_rounded(rng, (n_out,), 0.4)
    return params


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def categorical_policy(params, x):
    return mlp(params, x)


def gaussian_policy(params, x):
    return mlp(params, x), params["log_std"]


POLICIES = {"categorical": categorical_policy, "gaussian": gaussian_policy}

# Tiny causal transformer on tokens [TB, TT] with a vocabulary of TV.
TB, TT, TV, TD, TH = 2, 5, 6, 4, 8


def init_transformer(rng):
    shapes = {
        "embed": (TV, TD),
        "pos": (TT, TD),
        "wq": (TD, TD),
        "wk": (TD, TD),
        "wv": (TD, TD),
        "wo": (TD, TD),
        "w1": (TD, TH),
        "b1": (TH,),
        "w2": (TH, TD),
        "b2": (TD,),
        "unembed": (TD, TV),
        "unembed_b": (TV,),
    }
    return {name: f32_rounded(rng, shape, 0.7) for name, shape in shapes.items()}


def transformer_policy(params, tokens):
    t = tokens.shape[-1]
    h = params["embed"][tokens] + params["pos"][:t]
    q, k, v = h @ params["wq"], h @ params["wk"], h @ params["wv"]
    scores = q @ jnp.swapaxes(k, -1, -2) / math.sqrt(TD)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, -1e9)
    h = h + (jax.nn.softmax(scores, axis=-1) @ v) @ params["wo"]
    h = h + jnp.tanh(h @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    return h @ params["unembed"] + params["unembed_b"]


# ---------------------------------------------------------------------------------------------
# Independent references: KL, log-probs and the dense Fisher
# ---------------------------------------------------------------------------------------------


def ref_kl(family, old, new):
    """Per-position KL(old || new), written from the definitions."""
    if family == "categorical":
        log_p = jax.nn.log_softmax(old, axis=-1)
        log_q = jax.nn.log_softmax(new, axis=-1)
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    (mp, sp), (mq, sq) = old, new
    sp, sq = jnp.broadcast_to(sp, mp.shape), jnp.broadcast_to(sq, mq.shape)
    return jnp.sum(sq - sp + (jnp.exp(2 * sp) + (mp - mq) ** 2) / (2 * jnp.exp(2 * sq)) - 0.5, -1)


def ref_log_prob(family, outputs, actions):
    if family == "categorical":
        return jnp.take_along_axis(jax.nn.log_softmax(outputs, -1), actions[..., None], -1)[..., 0]
    mean, log_std = outputs
    z = (actions - mean) / jnp.exp(log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi), axis=-1)


def masked_average(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def fisher_by_hessian(policy, family, params, inputs, mask):
    """``jax.hessian`` of the masked mean KL(pi_old || pi_theta) over the raveled parameters."""
    flat, unravel = ravel_pytree(params)
    old = policy(params, inputs)

    def kl(flat_params):
        return masked_average(ref_kl(family, old, policy(unravel(flat_params), inputs)), mask)

    return np.asarray(jax.jit(jax.hessian(kl))(flat), np.float64)


def fisher_by_jacobian(policy, family, params, inputs, mask):
    """``J^T blockdiag(w_i F_out,i) J`` in numpy with the closed-form output Fisher."""
    flat, unravel = ravel_pytree(params)

    def outputs(flat_params):
        out = policy(unravel(flat_params), inputs)
        if family == "categorical":
            return out
        mean, log_std = out
        return jnp.stack([mean, jnp.broadcast_to(log_std, mean.shape)], axis=-2)  # [..., 2, D]

    out, jac = jax.jit(lambda p: (outputs(p), jax.jacobian(outputs)(p)))(flat)
    out, jac = np.asarray(out, np.float64), np.asarray(jac, np.float64)
    mask = np.asarray(mask, np.float64)
    positions = mask.size
    weights = mask.reshape(positions) / max(mask.sum(), 1.0)
    if family == "categorical":
        logits = out.reshape(positions, -1)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        f_out = np.einsum("pa,ab->pab", p, np.eye(p.shape[-1])) - p[:, :, None] * p[:, None, :]
    else:
        log_std = out.reshape(positions, 2, -1)[:, 1]
        diag = np.concatenate([np.exp(-2 * log_std), 2 * np.ones_like(log_std)], axis=-1)
        f_out = np.einsum("pa,ab->pab", diag, np.eye(diag.shape[-1]))
    jac = jac.reshape(positions, f_out.shape[-1], flat.size)
    return np.einsum("p,pan,pab,pbm->nm", weights, jac, f_out, jac)


def random_mask(rng, shape):
    mask = (rng.uniform(size=shape) < 0.6).astype(np.float64)
    mask.flat[0] = 1.0
    return jnp.asarray(mask)


def random_like(rng, tree):
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


@functools.cache
def sequence_problem(family):
    """Params, inputs, mask and both explicit float64 Fishers of a family's MLP policy."""
    rng = np.random.default_rng(0 if family == "categorical" else 1)
    params = init_mlp(rng, A if family == "categorical" else D, family == "gaussian")
    x = f32_rounded(rng, (B, T, IN))
    mask = random_mask(rng, (B, T))
    policy = POLICIES[family]
    return {
        "params": params,
        "x": x,
        "mask": mask,
        "F_hessian": fisher_by_hessian(policy, family, params, x, mask),
        "F_jacobian": fisher_by_jacobian(policy, family, params, x, mask),
    }


@functools.cache
def transformer_problem():
    rng = np.random.default_rng(2)
    params = init_transformer(rng)
    tokens = jnp.asarray(rng.integers(0, TV, size=(TB, TT)))
    mask = random_mask(rng, (TB, TT))
    return params, tokens, mask


def fvp_matrix(policy, params, inputs, mask, method):
    """The matrix of ``v -> F v`` in the raveled basis, one jitted product per column."""
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def column(e):
        return ravel_pytree(
            fisher_vector_product(policy, params, inputs, unravel(e), mask, method=method)
        )[0]

    return np.asarray(jax.vmap(column)(jnp.eye(flat.size, dtype=flat.dtype)), np.float64).T


# ---------------------------------------------------------------------------------------------
# Fisher-vector products
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_explicit_fishers_agree(family):
    """The two dense references agree with each other and are not trivial."""
    prob = sequence_problem(family)
    fh, fj = prob["F_hessian"], prob["F_jacobian"]
    assert rel_err(fh, fj) < 1e-12
    assert np.max(np.abs(fj)) > 1e-2
    # The random mask matters: an all-ones mask gives a different Fisher.
    ones = fisher_by_jacobian(
        POLICIES[family], family, prob["params"], prob["x"], 1 + 0 * prob["mask"]
    )
    assert rel_err(fj, ones) > 1e-3


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fvp_matches_explicit_fisher(family, method, dtype, jit):
    prob = sequence_problem(family)
    policy = POLICIES[family]
    params, x, mask = cast((prob["params"], prob["x"], prob["mask"]), dtype)
    fvp = functools.partial(fisher_vector_product, policy, method=method)
    if jit:
        fvp = jax.jit(fvp)
    rng = np.random.default_rng(10)
    for _ in range(3):
        vector = cast(random_like(rng, prob["params"]), dtype)
        got = fvp(params, x, vector, mask)
        assert jax.tree.structure(got) == jax.tree.structure(vector)
        for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(vector), strict=True):
            assert g.dtype == dtype and g.shape == v.shape
        v64 = ravel(vector)
        assert rel_err(ravel(got), prob["F_hessian"] @ v64) < TOL[np.dtype(dtype)]
        assert rel_err(ravel(got), prob["F_jacobian"] @ v64) < TOL[np.dtype(dtype)]


@pytest.mark.parametrize("method", METHODS)
def test_fvp_normalizer_and_no_mask(method):
    """``normalizer`` replaces the valid count; ``mask=None`` means every position is valid."""
    prob = sequence_problem("categorical")
    params, x, mask = prob["params"], prob["x"], prob["mask"]
    vector = random_like(np.random.default_rng(3), params)
    count = float(np.sum(mask))
    got = fisher_vector_product(categorical_policy, params, x, vector, mask, method, normalizer=7.0)
    assert rel_err(ravel(got), prob["F_hessian"] @ ravel(vector) * count / 7.0) < 1e-10
    ones = jnp.ones_like(mask)
    f_all = fisher_by_jacobian(categorical_policy, "categorical", params, x, ones)
    got = fisher_vector_product(categorical_policy, params, x, vector, None, method)
    assert rel_err(ravel(got), f_all @ ravel(vector)) < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_fvp_matrix_symmetric_psd(family):
    """The whole matrix built from products is symmetric with no negative eigenvalue."""
    prob = sequence_problem(family)
    for method in METHODS:
        f = fvp_matrix(POLICIES[family], prob["params"], prob["x"], prob["mask"], method)
        assert rel_err(f, prob["F_jacobian"]) < 1e-10
        assert np.max(np.abs(f - f.T)) <= 1e-12 * np.max(np.abs(f))
        eig = np.linalg.eigvalsh(0.5 * (f + f.T))
        assert eig.min() >= -1e-12 * eig.max()
        assert eig.max() > 1e-2


@functools.cache
def jitted_fvp(family, method):
    return jax.jit(functools.partial(fisher_vector_product, POLICIES[family], method=method))


@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**30),
    family=st.sampled_from(FAMILIES),
    method=st.sampled_from(METHODS),
)
def test_fvp_symmetric_and_psd_on_random_vectors(seed, family, method):
    prob = sequence_problem(family)
    params, x, mask = prob["params"], prob["x"], prob["mask"]
    rng = np.random.default_rng(seed)
    v, w = random_like(rng, params), random_like(rng, params)
    # Also probe a near-null direction: the smallest eigenvector plus a little noise.
    null = np.linalg.eigh(prob["F_jacobian"])[1][:, 0] + 1e-3 * rng.normal(size=ravel(params).size)
    unravel = ravel_pytree(params)[1]
    fvp = jitted_fvp(family, method)
    fv, fw = fvp(params, x, v, mask), fvp(params, x, w, mask)
    vfw, wfv = float(ravel(v) @ ravel(fw)), float(ravel(w) @ ravel(fv))
    scale = np.linalg.norm(ravel(v)) * np.linalg.norm(ravel(w)) * np.abs(prob["F_jacobian"]).max()
    assert abs(vfw - wfv) <= 1e-12 * scale
    assert float(ravel(v) @ ravel(fv)) > 0
    fn = ravel(fvp(params, x, unravel(jnp.asarray(null)), mask))
    assert float(null @ fn) >= -1e-14 * np.abs(prob["F_jacobian"]).max()


def test_fvp_transformer_methods_agree():
    params, tokens, mask = transformer_problem()
    n = ravel(params).size
    assert 150 <= n <= 500
    f_gn = fvp_matrix(transformer_policy, params, tokens, mask, "gauss_newton")
    f_h = fvp_matrix(transformer_policy, params, tokens, mask, "hessian")
    assert rel_err(f_gn, f_h) < 1e-8
    f_ref = fisher_by_jacobian(transformer_policy, "categorical", params, tokens, mask)
    assert rel_err(f_gn, f_ref) < 1e-10
    assert np.max(np.abs(f_gn - f_gn.T)) <= 1e-12 * np.max(np.abs(f_gn))
    # The test model really is causal: changing the last token leaves earlier logits alone.
    t2 = np.array(tokens)
    t2[:, -1] = (t2[:, -1] + 1) % TV
    policy = jax.jit(transformer_policy)
    out1, out2 = np.asarray(policy(params, tokens)), np.asarray(policy(params, jnp.asarray(t2)))
    np.testing.assert_array_equal(out1[:, :-1], out2[:, :-1])
    assert not np.allclose(out1[:, -1], out2[:, -1])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_make_fvp_closure_reused(family, method):
    prob = sequence_problem(family)
    policy = POLICIES[family]
    params, x, mask = prob["params"], prob["x"], prob["mask"]
    calls = [0]

    def counted_policy(p, inputs):
        calls[0] += 1
        return policy(p, inputs)

    fvp = make_fisher_vector_product(counted_policy, params, x, mask, method)
    calls_after_build = calls[0]
    rng = np.random.default_rng(20)
    for _ in range(3):
        vector = random_like(rng, params)
        got = fvp(vector)
        want = fisher_vector_product(policy, params, x, vector, mask, method)
        np.testing.assert_allclose(ravel(got), ravel(want), rtol=1e-12, atol=1e-15)
        assert rel_err(ravel(got), prob["F_jacobian"] @ ravel(vector)) < 1e-10
    if method == "gauss_newton":
        # Linearised once: products never run the policy's forward pass again.
        assert calls_after_build == 1 and calls[0] == 1


def test_unknown_fvp_method_raises():
    prob = sequence_problem("categorical")
    with pytest.raises(ValueError, match="foo"):
        make_fisher_vector_product(categorical_policy, prob["params"], prob["x"], method="foo")


# ---------------------------------------------------------------------------------------------
# output_fisher_product
# ---------------------------------------------------------------------------------------------


def test_output_fisher_product_categorical():
    rng = np.random.default_rng(4)
    logits, u = jnp.asarray(rng.normal(size=(B, T, A))), jnp.asarray(rng.normal(size=(B, T, A)))
    w = jnp.asarray(rng.uniform(size=(B, T)))
    got = output_fisher_product(logits, u, w)
    p = np.asarray(jax.nn.softmax(logits))
    fisher = np.einsum("...a,ab->...ab", p, np.eye(A)) - p[..., :, None] * p[..., None, :]
    want = np.asarray(w)[..., None] * np.einsum("...ab,...b->...a", fisher, np.asarray(u))
    assert rel_err(got, want) < 1e-12
    # The output keeps the tangent's dtype.
    got32 = output_fisher_product(logits.astype(jnp.float32), u.astype(jnp.float32), w)
    assert got32.dtype == jnp.float32
    assert rel_err(got32, want) < 1e-5


@pytest.mark.parametrize("broadcast_log_std", [False, True])
def test_output_fisher_product_gaussian(broadcast_log_std):
    rng = np.random.default_rng(5)
    mean = jnp.asarray(rng.normal(size=(B, T, D)))
    log_std = jnp.asarray(0.5 * rng.normal(size=(D,)))
    if broadcast_log_std:
        log_std = jnp.broadcast_to(log_std, mean.shape)
    u_mean, u_log_std = (jnp.asarray(rng.normal(size=(B, T, D))) for _ in range(2))
    w = jnp.asarray(rng.uniform(size=(B, T)))
    got_mean, got_log_std = output_fisher_product((mean, log_std), (u_mean, u_log_std), w)
    # Block-diagonal output Fisher per position: diag(1/sigma^2) for the mean, 2 for log_std.
    diag = np.concatenate(
        [np.broadcast_to(np.exp(-2 * np.asarray(log_std)), mean.shape), 2 * np.ones(mean.shape)],
        axis=-1,
    )
    fisher = np.einsum("...a,ab->...ab", diag, np.eye(2 * D))
    tangent = np.concatenate([np.asarray(u_mean), np.asarray(u_log_std)], axis=-1)
    want = np.asarray(w)[..., None] * np.einsum("...ab,...b->...a", fisher, tangent)
    assert got_mean.shape == got_log_std.shape == mean.shape
    assert rel_err(np.concatenate([got_mean, got_log_std], -1), want) < 1e-12


# ---------------------------------------------------------------------------------------------
# Conjugate gradient
# ---------------------------------------------------------------------------------------------

N_CG = 7
CG_UNRAVEL = ravel_pytree({"u": jnp.zeros(3), "w": jnp.zeros((2, 2))})[1]


def cg_problem(seed, rank=N_CG):
    """A random symmetric PSD matrix of the given rank and a dict right-hand side (3 + 2x2)."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(N_CG, rank))
    a = m @ m.T / rank + (0.05 * np.eye(N_CG) if rank == N_CG else 0)
    b_flat = rng.normal(size=N_CG)
    return a, b_flat, CG_UNRAVEL(jnp.asarray(b_flat))


def dense_matvec(a):
    return lambda v: CG_UNRAVEL(a @ ravel_pytree(v)[0])


@functools.partial(jax.jit, static_argnames="max_iters")
def cg_jit(a, b, max_iters, damping, tol):
    """CG on the dense matrix ``a`` (a jit argument, so every problem shares one compile)."""
    return conjugate_gradient(dense_matvec(a), b, max_iters, damping, tol)


def numpy_cg(a, b, iters):
    """The CG recursion in numpy: iterates x_k and squared residuals r_k^T r_k, k = 0..iters."""
    x, r, p = np.zeros_like(b), b.copy(), b.copy()
    xs, r2 = [x.copy()], [r @ r]
    for _ in range(iters):
        z = a @ p
        alpha = r2[-1] / (p @ z)
        x, r = x + alpha * p, r - alpha * z
        p = r + (r @ r) / r2[-1] * p
        xs.append(x.copy())
        r2.append(r @ r)
    return xs, np.array(r2)


@pytest.mark.parametrize(
    ("rank", "damping"),
    [(N_CG, 0.0), (N_CG, 0.3), (3, 0.3)],
    ids=["spd", "spd_damped", "psd_damped"],
)
def test_cg_matches_dense_solve(rank, damping):
    a, b_flat, b = cg_problem(0, rank)
    x, info = cg_jit(a, b, 50, damping, 1e-26)
    assert jax.tree.structure(x) == jax.tree.structure(b)
    want = np.linalg.solve(a + damping * np.eye(N_CG), b_flat)
    assert rel_err(ravel(x), want) < 1e-9
    assert 1 <= int(info.iterations) < 50
    assert float(info.residual_norm) ** 2 < 1e-26


def test_cg_respects_max_iters_and_tol():
    a, b_flat, b = cg_problem(1)
    damping = 0.2
    xs, r2 = numpy_cg(a + damping * np.eye(N_CG), b_flat, 5)
    # tol = 0: exactly max_iters iterations, and the iterate is the k-th Krylov iterate.
    for k in (1, 3, 5):
        x, info = cg_jit(a, b, k, damping, 0.0)
        assert int(info.iterations) == k
        assert rel_err(ravel(x), xs[k]) < 1e-10
        assert abs(float(info.residual_norm) - math.sqrt(r2[k])) <= 1e-8 * math.sqrt(r2[0])
    # A loose tol (between r2[2] and r2[3], away from every r2) stops early at the first k with
    # r_k^T r_k < tol, as the numpy recursion says.
    tol = math.sqrt(r2[2] * r2[3])
    assert np.min(np.abs(np.log(r2 / tol))) > 0.05
    expected = int(np.argmax(r2 < tol))
    x, info = cg_jit(a, b, 50, damping, tol)
    assert int(info.iterations) == expected < 50
    assert rel_err(ravel(x), xs[expected]) < 1e-10


def test_cg_zero_rhs():
    a, _, b = cg_problem(2)
    zero = jax.tree.map(jnp.zeros_like, b)
    x, info = cg_jit(a, zero, 5, 0.1, 1e-10)
    assert int(info.iterations) == 0
    assert float(info.residual_norm) == 0.0
    np.testing.assert_array_equal(ravel(x), 0.0)


@pytest.mark.parametrize("case", ["zero_rhs", "exact_convergence"])
def test_cg_zero_tol_stays_finite_when_residual_vanishes(case):
    """With ``tol=0`` CG must not divide 0 by 0 once the residual is exactly zero.

    ``tol=0`` asks for "run max_iters iterations"; a zero right-hand side (e.g. a zero policy
    gradient with ``TRPOConfig(cg_tol=0)``) or exact convergence (A = 2I converges in one
    iteration) must still give the exact, finite solution.
    """
    a, _, b = cg_problem(2)
    if case == "zero_rhs":
        x, _ = cg_jit(a, jax.tree.map(jnp.zeros_like, b), 5, 0.1, 0.0)
        np.testing.assert_array_equal(ravel(x), 0.0)
    else:
        x, _ = cg_jit(2.0 * np.eye(N_CG), b, 5, 0.0, 0.0)
        np.testing.assert_allclose(ravel(x), ravel(b) / 2, rtol=1e-14)


def test_cg_under_jit_matches_eager():
    a, b_flat, b = cg_problem(3)
    for damping in (0.0, 0.5):
        x, info = cg_jit(a, b, 50, damping, 1e-26)
        x_eager, info_eager = conjugate_gradient(dense_matvec(a), b, 50, damping, 1e-26)
        np.testing.assert_allclose(ravel(x), ravel(x_eager), rtol=1e-12)
        assert int(info.iterations) == int(info_eager.iterations)
        want = np.linalg.solve(a + damping * np.eye(N_CG), b_flat)
        assert rel_err(ravel(x), want) < 1e-9


def test_cg_minimises_the_quadratic():
    a, b_flat, b = cg_problem(4)
    damping = 0.1
    ad = a + damping * np.eye(N_CG)

    def objective(x):
        return 0.5 * x @ ad @ x - b_flat @ x

    # The Krylov iterates decrease the quadratic monotonically ...
    values = [objective(ravel(cg_jit(a, b, k, damping, 0.0)[0])) for k in (1, 3, 5)]
    assert values[0] > values[1] > values[2]
    # ... and the converged solution beats every random perturbation of it.
    x_star = ravel(cg_jit(a, b, 50, damping, 1e-26)[0])
    assert objective(x_star) < values[-1]
    rng = np.random.default_rng(5)
    for scale in (1e-3, 1e-1, 1.0):
        for _ in range(10):
            assert objective(x_star) < objective(x_star + scale * rng.normal(size=N_CG))


# ---------------------------------------------------------------------------------------------
# KL line search
# ---------------------------------------------------------------------------------------------
# A quadratic model: surrogate(p) = g.d - c/2 |d|^2 and kl(p) = h/2 |d|^2 with d = p - p0.

LS_P0 = {"a": jnp.array([0.3, -1.2, 0.7]), "b": jnp.array([[0.1, 2.0], [-0.5, 0.25]])}
LS_G = np.array([1.0, -0.5, 0.25, 0.8, -0.3, 0.1, 0.6])
LS_UNRAVEL = ravel_pytree(LS_P0)[1]
# A float64 array: a Python-float ``surrogate_before`` would make the search run in float32.
LS_BEFORE = jnp.zeros((), jnp.float64)


def ls_model(p, c, h):
    d = ravel_pytree(p)[0] - ravel_pytree(LS_P0)[0]
    return jnp.asarray(LS_G) @ d - 0.5 * c * d @ d, 0.5 * h * d @ d


def numpy_line_search(step, c, h, max_kl, coeff, max_steps):
    """Index of the first accepted fraction coeff**k (None if none), as specified."""
    g = LS_G
    for k in range(max_steps):
        d = coeff**k * step
        surrogate, kl = g @ d - 0.5 * c * d @ d, 0.5 * h * d @ d
        if surrogate > 0.0 and kl <= max_kl:
            return k, surrogate, kl
    return None


@functools.cache
def jitted_line_search(max_steps):
    @jax.jit
    def search(step, c, h, max_kl, coeff):
        return kl_line_search(
            lambda p: ls_model(p, c, h),
            LS_P0,
            LS_UNRAVEL(step),
            LS_BEFORE,
            max_kl,
            coeff,
            max_steps,
        )

    return search


def assert_unchanged_bitwise(new, old):
    for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
        assert np.asarray(n).dtype == np.asarray(o).dtype
        assert np.asarray(n).tobytes() == np.asarray(o).tobytes()


def test_line_search_accepts_full_step():
    step = 0.1 * LS_G / np.linalg.norm(LS_G)
    new, info = kl_line_search(
        lambda p: ls_model(p, 0.1, 1.0), LS_P0, LS_UNRAVEL(jnp.asarray(step)), LS_BEFORE, 0.01
    )
    assert bool(info.accepted)
    assert float(info.step_fraction) == 1.0 and int(info.steps) == 1
    np.testing.assert_array_equal(ravel(new), ravel(LS_P0) + step)
    surrogate, kl = ls_model(new, 0.1, 1.0)
    assert float(info.surrogate) == pytest.approx(float(surrogate), rel=1e-14) and surrogate > 0
    assert float(info.kl) == pytest.approx(float(kl), rel=1e-14) and kl <= 0.01


@pytest.mark.parametrize(
    ("scale", "c", "h", "max_kl", "coeff", "k_expected"),
    [
        (10.0, 0.0, 1.0, 0.01, 0.5, 7),  # KL too large until 0.5**7
        (5.0, 2.1, 1e-6, 1.0, 0.8, 6),  # overshoots the surrogate's maximum until 0.8**6
    ],
    ids=["kl_bound", "surrogate_overshoot"],
)
def test_line_search_backtracks(scale, c, h, max_kl, coeff, k_expected):
    step = scale * LS_G / np.linalg.norm(LS_G)
    k, _, _ = numpy_line_search(step, c, h, max_kl, coeff, 10)
    assert k == k_expected  # the case really backtracks the intended number of times
    tried = []

    def surrogate_and_kl(p):
        jax.debug.callback(lambda q: tried.append(np.asarray(q)), ravel_pytree(p)[0], ordered=True)
        return ls_model(p, c, h)

    search = jax.jit(  # without the direction check's extra evaluation at p0
        lambda s: kl_line_search(
            surrogate_and_kl,
            LS_P0,
            LS_UNRAVEL(s),
            LS_BEFORE,
            max_kl,
            coeff,
            10,
            check_direction=False,
        )
    )
    new, info = search(jnp.asarray(step))
    jax.effects_barrier()
    assert bool(info.accepted)
    assert int(info.steps) == k + 1
    assert float(info.step_fraction) == pytest.approx(coeff**k, rel=1e-14)
    assert rel_err(ravel(new) - ravel(LS_P0), coeff**k * step) < 1e-13
    # Exactly the candidates p0 + coeff**j s, j = 0..k, were evaluated, in order.
    assert len(tried) == k + 1
    for j, q in enumerate(tried):
        assert rel_err(q - ravel(LS_P0), coeff**j * step) < 1e-13


@settings(max_examples=20)
@given(
    log_scale=st.floats(-2.0, 2.0),
    c=st.floats(0.0, 5.0),
    log_max_kl=st.floats(-4.0, 0.0),
    coeff=st.floats(0.3, 0.9),
    direction_seed=st.integers(0, 2**16),
)
def test_line_search_matches_numpy_loop(log_scale, c, log_max_kl, coeff, direction_seed):
    max_steps, h = 8, 1.0
    direction = np.random.default_rng(direction_seed).normal(size=LS_G.size)
    step = 10**log_scale * direction / np.linalg.norm(direction)
    max_kl = 10**log_max_kl
    # Keep away from ties, where rounding could decide either way.
    for k in range(max_steps):
        d = coeff**k * step
        surrogate, kl = LS_G @ d - 0.5 * c * d @ d, 0.5 * h * d @ d
        assume(abs(kl - max_kl) > 1e-9 * max_kl and abs(surrogate) > 1e-12)
    expected = numpy_line_search(step, c, h, max_kl, coeff, max_steps)
    new, info = jitted_line_search(max_steps)(jnp.asarray(step), c, h, max_kl, coeff)
    if expected is None:
        assert not bool(info.accepted)
        assert int(info.steps) == max_steps and float(info.step_fraction) == 0.0
        assert_unchanged_bitwise(new, LS_P0)
    else:
        k, surrogate, kl = expected
        assert bool(info.accepted) and int(info.steps) == k + 1
        assert float(info.step_fraction) == pytest.approx(coeff**k, rel=1e-13)
        np.testing.assert_allclose(ravel(new), ravel(LS_P0) + coeff**k * step, rtol=1e-13)
        assert float(info.surrogate) == pytest.approx(surrogate, rel=1e-9, abs=1e-15)
        assert float(info.kl) == pytest.approx(kl, rel=1e-9)


@pytest.mark.parametrize("case", ["worse_surrogate", "kl_everywhere", "nan_step", "zero_step"])
def test_line_search_rejects(case):
    max_steps = 6
    if case == "worse_surrogate":
        step, c, h = -0.01 * LS_G, 0.0, 1.0  # descent on the surrogate at every fraction
    elif case == "kl_everywhere":
        step, c, h = 100.0 * LS_G, 0.0, 1.0  # KL > max_kl even at 0.8**5
    elif case == "nan_step":
        step, c, h = np.full(LS_G.size, np.nan), 0.0, 1.0
    else:
        step, c, h = np.zeros(LS_G.size), 0.0, 1.0  # no improvement: equal is not better
    assert numpy_line_search(step, c, h, 0.01, 0.8, max_steps) is None
    new, info = jitted_line_search(max_steps)(jnp.asarray(step), c, h, 0.01, 0.8)
    assert not bool(info.accepted)
    assert float(info.step_fraction) == 0.0
    assert int(info.steps) == max_steps
    assert float(info.surrogate) == 0.0 and float(info.kl) == 0.0
    assert_unchanged_bitwise(new, LS_P0)


# ---------------------------------------------------------------------------------------------
# natural_step's sign convention, the line search's descent check, the damping defaults
# ---------------------------------------------------------------------------------------------

VARIANT = pytest.mark.parametrize("variant", ["eager", "jit"])


def dense_natural_step(a, g, damping, max_kl):
    """float64 numpy: s = (A + damping I)^-1 g, scaled so that 1/2 step^T (A + damping I) step
    = max_kl; returns the step and the linear model's gain g^T step."""
    damped = a + damping * np.eye(len(g))
    s = np.linalg.solve(damped, g)
    step = np.sqrt(2.0 * max_kl / (s @ damped @ s)) * s
    return step, g @ step


@VARIANT
@pytest.mark.parametrize("gradient_of", ["objective", "loss"])
def test_natural_step_sign_convention(gradient_of, variant):
    """``gradient_of='loss'`` takes the loss's gradient (-g) and gives the objective's step."""
    a, g_flat, g = cg_problem(3)
    given = g if gradient_of == "objective" else jax.tree.map(jnp.negative, g)

    def step_fn(grad):
        return natural_step(grad, dense_matvec(a), 0.01, N_CG, 0.1, 0.0, gradient_of=gradient_of)

    full_step, info = (jax.jit(step_fn) if variant == "jit" else step_fn)(given)
    want_step, want_gain = dense_natural_step(a, g_flat, 0.1, 0.01)
    assert want_gain > 0
    assert rel_err(ravel(full_step), want_step) < 1e-8  # CG in N_CG steps, float64
    np.testing.assert_allclose(float(info.expected_improvement), want_gain, rtol=1e-8)


def test_natural_step_rejects_an_unknown_gradient_of():
    _, _, g = cg_problem(3)
    with pytest.raises(ValueError, match=r"natural_step: gradient_of='grad'.*'objective', 'loss'"):
        natural_step(g, lambda v: v, 0.01, gradient_of="grad")


@VARIANT
def test_natural_step_damping_is_conjugate_gradient_damping(variant):
    """natural_step(cg_damping=d) solves (F + d I) s = g: conjugate_gradient(damping=d); the
    solver's own default (0) solves F s = g, a different direction."""
    a, g_flat, g = cg_problem(5)

    def both(grad):
        _, info = natural_step(grad, dense_matvec(a), 0.01, N_CG, 0.1, 0.0)
        damped, _ = conjugate_gradient(dense_matvec(a), grad, N_CG, 0.1, 0.0)
        undamped, _ = conjugate_gradient(dense_matvec(a), grad, N_CG, tol=0.0)
        return info.direction, damped, undamped

    direction, damped, undamped = (jax.jit(both) if variant == "jit" else both)(g)
    assert rel_err(ravel(direction), ravel(damped)) < 1e-12
    assert rel_err(ravel(damped), np.linalg.solve(a + 0.1 * np.eye(N_CG), g_flat)) < 1e-8
    assert rel_err(ravel(undamped), np.linalg.solve(a, g_flat)) < 1e-8
    assert rel_err(ravel(undamped), ravel(damped)) > 1e-3
    for doc in (conjugate_gradient.__doc__, natural_step.__doc__):
        assert "damping=0" in doc and "0.1" in doc


def test_line_search_fails_loudly_on_a_step_down_the_objective():
    """A loss's gradient given to natural_step as the objective's: every candidate is worse.
    Eagerly kl_line_search raises; under jit its slope says so."""
    loss_grad = LS_UNRAVEL(jnp.asarray(-LS_G))  # the surrogate ls_model's ascent is +LS_G

    def search(step, **kw):
        return kl_line_search(lambda p: ls_model(p, 0.1, 1.0), LS_P0, step, LS_BEFORE, 0.01, **kw)

    wrong, _ = natural_step(loss_grad, lambda v: v, 0.01)  # declared as the objective's
    with pytest.raises(ValueError, match=r"goes down the surrogate.*gradient_of='loss'"):
        search(wrong)
    new, info = jax.jit(search)(wrong)
    assert not bool(info.accepted)
    assert_unchanged_bitwise(new, LS_P0)
    np.testing.assert_allclose(float(info.slope), LS_G @ ravel(wrong), rtol=1e-12)
    assert float(info.slope) < 0
    _, info = search(wrong, check_direction=False)  # the check off: no error, no slope
    assert info.slope is None and not bool(info.accepted)
    # the same gradient declared as the loss's: accepted, slope = the predicted gain
    right, step_info = natural_step(loss_grad, lambda v: v, 0.01, gradient_of="loss")
    for fn in (search, jax.jit(search)):
        new, info = fn(right)
        assert bool(info.accepted) and float(info.slope) > 0
        np.testing.assert_allclose(float(info.slope), LS_G @ ravel(right), rtol=1e-12)
        np.testing.assert_allclose(
            float(info.slope), float(step_info.expected_improvement), rtol=1e-12
        )


# ---------------------------------------------------------------------------------------------
# make_trpo_update on a contextual bandit
# ---------------------------------------------------------------------------------------------

METRIC_KEYS = {
    "surrogate_before",
    "surrogate_after",
    "improvement",
    "kl",
    "step_fraction",
    "line_search_steps",
    "accepted",
    "cg_iterations",
    "cg_residual",
    "step_size",
    "grad_norm",
    "value_loss",
    "explained_variance",
    "nonfinite",
    "nonfinite_policy",
    "nonfinite_critic",
    "nonfinite_updates",
}


def value_fn(vp, x):
    return x @ vp["w"] + vp["b"]


@functools.cache
def bandit(family):
    """Policy params, value params and an on-policy batch of ROWS contexts (with a mask)."""
    rng = np.random.default_rng(7 if family == "categorical" else 8)
    params = init_mlp(rng, A if family == "categorical" else D, family == "gaussian")
    x = f32_rounded(rng, (ROWS, IN))
    outputs = jax.tree.map(np.asarray, POLICIES[family](params, x))
    if family == "categorical":  # inverse-CDF sampling from the policy
        cdf = np.cumsum(np.exp(outputs) / np.exp(outputs).sum(-1, keepdims=True), axis=-1)
        actions = np.minimum((rng.uniform(size=(ROWS, 1)) > cdf).sum(-1), A - 1)
    else:
        mean, log_std = outputs
        actions = mean + np.exp(log_std) * rng.normal(size=mean.shape)
    advantages = rng.normal(size=ROWS) + 0.7
    returns = np.asarray(x) @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=ROWS)
    mask = random_mask(rng, (ROWS,))
    batch = {
        "inputs": x,
        "actions": jnp.asarray(actions),
        "advantages": jnp.asarray(advantages),
        "returns": jnp.asarray(returns),
        "mask": mask,
    }
    value_params = {"w": jnp.zeros(IN), "b": jnp.zeros(())}
    return params, value_params, batch


VALUE_OPT = optax.sgd(0.05)


def make_state(family, seed=0):
    params, value_params, _ = bandit(family)
    return init_trpo_state(params, value_params, VALUE_OPT, jnp.array([0, seed], jnp.uint32))


@functools.cache
def trpo_update(
    family="categorical", method="gauss_newton", subsample=1, normalize=True, flat=False
):
    """A jitted update (shared by the tests that use the same settings) and its trace count.

    CG runs to convergence (``cg_iters`` above the parameter count, a tiny ``cg_tol``) so the
    step can be compared with a dense solve.
    """
    config = TRPOConfig(
        max_kl=0.02,
        cg_iters=100,
        cg_damping=0.1,
        cg_tol=1e-26,
        backtrack_coeff=0.7,
        fvp_method=method,
        fvp_subsample=subsample,
        normalize_advantages=normalize,
        n_critic_updates=10,
        critic_minibatches=2,
        flat_params=flat,
    )
    counted, traces = count_traces(make_trpo_update(POLICIES[family], value_fn, VALUE_OPT, config))
    return config, jax.jit(counted), traces


def ref_objectives(family, params, batch, normalize):
    """Surrogate and mean KL as functions of raveled candidate parameters, from definitions."""
    policy = POLICIES[family]
    x, actions, mask = batch["inputs"], batch["actions"], batch["mask"]
    adv = batch["advantages"]
    if normalize:
        mean = masked_average(adv, mask)
        var = masked_average((adv - mean) ** 2, mask)
        adv = (adv - mean) / jnp.sqrt(var + 1e-8)
    old = policy(params, x)
    old_logp = ref_log_prob(family, old, actions)
    unravel = ravel_pytree(params)[1]

    def surrogate(flat):
        logp = ref_log_prob(family, policy(unravel(flat), x), actions)
        return masked_average(jnp.exp(logp - old_logp) * adv, mask)

    def kl(flat):
        return masked_average(ref_kl(family, old, policy(unravel(flat), x)), mask)

    return jax.jit(surrogate), jax.jit(kl)


def test_update_metrics_and_trust_region():
    config, update, _ = trpo_update()
    state = make_state("categorical")
    params, _, batch = bandit("categorical")
    new_state, metrics = update(state, batch)
    assert set(metrics) == METRIC_KEYS
    assert isinstance(new_state, PPOState)
    assert int(new_state.step) == 1
    assert not np.array_equal(np.asarray(new_state.key), np.asarray(state.key))
    assert bool(metrics["accepted"])
    assert 0 < float(metrics["kl"]) <= config.max_kl + 1e-12
    assert float(metrics["surrogate_after"]) > float(metrics["surrogate_before"])
    assert float(metrics["improvement"]) == pytest.approx(
        float(metrics["surrogate_after"] - metrics["surrogate_before"]), rel=1e-12
    )
    # The reported surrogate and KL are those of the returned parameters.
    surrogate, kl = ref_objectives("categorical", params, batch, normalize=True)
    new_flat = jnp.asarray(ravel(new_state.params["policy"]))
    assert float(metrics["surrogate_after"]) == pytest.approx(float(surrogate(new_flat)), rel=1e-10)
    assert float(metrics["kl"]) == pytest.approx(float(kl(new_flat)), rel=1e-10)
    assert float(metrics["surrogate_before"]) == pytest.approx(
        float(surrogate(jnp.asarray(ravel(params)))), abs=1e-12
    )
    assert 1 <= int(metrics["line_search_steps"]) <= config.max_backtracks
    assert 1 <= int(metrics["cg_iterations"]) <= config.cg_iters


def explicit_fisher_rows(family, params, batch, rows):
    mask = batch["mask"][rows]
    return fisher_by_jacobian(POLICIES[family], family, params, batch["inputs"][rows], mask)


def dense_step(f, g, damping, max_kl):
    fd = f + damping * np.eye(f.shape[0])
    s = np.linalg.solve(fd, g)
    step_size = math.sqrt(2 * max_kl / (s @ fd @ s))
    return step_size * s, step_size


@pytest.mark.parametrize(
    ("family", "method", "subsample", "normalize", "flat"),
    [
        ("categorical", "gauss_newton", 1, True, False),
        ("categorical", "hessian", 2, False, False),
        ("gaussian", "gauss_newton", 2, True, False),
        ("gaussian", "gauss_newton", 1, True, True),
    ],
)
def test_update_matches_dense_natural_step(family, method, subsample, normalize, flat):
    config, update, _ = trpo_update(family, method, subsample, normalize, flat)
    damping, max_kl = config.cg_damping, config.max_kl
    params, _, batch = bandit(family)
    new_state, metrics = update(make_state(family), batch)

    flat = jnp.asarray(ravel(params))
    surrogate, kl = ref_objectives(family, params, batch, normalize)
    g = np.asarray(jax.grad(surrogate)(flat))
    f = explicit_fisher_rows(family, params, batch, slice(None, None, subsample))
    full_step, step_size = dense_step(f, g, damping, max_kl)

    # The line-search fraction is the first coeff**k with improvement and KL <= max_kl.
    before = float(surrogate(flat))
    for k in range(config.max_backtracks):
        cand = flat + config.backtrack_coeff**k * full_step
        if float(surrogate(cand)) > before and float(kl(cand)) <= max_kl:
            break
    else:
        pytest.fail("the dense reference step is never accepted")
    assert bool(metrics["accepted"])
    assert int(metrics["line_search_steps"]) == k + 1
    fraction = float(metrics["step_fraction"])
    assert fraction == pytest.approx(config.backtrack_coeff**k, rel=1e-12)

    delta = ravel(new_state.params["policy"]) - np.asarray(flat)
    assert rel_err(delta, fraction * full_step) < 1e-7
    assert float(metrics["step_size"]) == pytest.approx(step_size, rel=1e-7)
    assert float(metrics["grad_norm"]) == pytest.approx(np.linalg.norm(g), rel=1e-10)
    assert float(metrics["kl"]) <= max_kl + 1e-12
    assert float(metrics["surrogate_after"]) > float(metrics["surrogate_before"])

    # The checks above can tell the settings apart: the other subsample / normalisation
    # would have given a clearly different step.
    if subsample > 1:
        other = dense_step(
            explicit_fisher_rows(family, params, batch, slice(None)), g, damping, max_kl
        )
        assert rel_err(other[0], full_step) > 1e-3
    g_other = np.asarray(jax.grad(ref_objectives(family, params, batch, not normalize)[0])(flat))
    assert rel_err(dense_step(f, g_other, damping, max_kl)[0], full_step) > 1e-3
    if family == "gaussian":
        assert not np.allclose(new_state.params["policy"]["log_std"], params["log_std"])


def test_value_function_fitting_reduces_loss():
    _, update, _ = trpo_update()
    _, _, batch = bandit("categorical")
    state = make_state("categorical", seed=1)
    x, returns, mask = (np.asarray(batch[k]) for k in ("inputs", "returns", "mask"))
    valid = mask.astype(bool)

    def value_mse(vp):
        pred = np.asarray(value_fn(vp, x))
        return float(np.mean((pred - returns)[valid] ** 2))

    def ref_explained_variance(vp):
        residual = (returns - np.asarray(value_fn(vp, x)))[valid]
        return 1.0 - residual.var() / returns[valid].var()

    losses, evs = [value_mse(state.params["value"])], []
    for _ in range(5):
        ev_before = ref_explained_variance(state.params["value"])
        state, metrics = update(state, batch)
        losses.append(value_mse(state.params["value"]))
        evs.append(float(metrics["explained_variance"]))
        assert evs[-1] <= 1.0
        assert evs[-1] == pytest.approx(ev_before, rel=1e-10, abs=1e-12)
        assert np.isfinite(float(metrics["value_loss"]))
    assert all(l1 < l0 for l0, l1 in itertools.pairwise(losses))
    assert losses[-1] < 0.5 * losses[0]
    assert evs[-1] > evs[0]


def test_jitted_update_does_not_retrace():
    _, update, traces = trpo_update()
    _, _, batch = bandit("categorical")
    state = make_state("categorical", seed=2)
    state, _ = update(state, batch)
    after_first = len(traces)
    assert after_first >= 1
    # Feeding the returned state back (and a fresh batch of the same shapes) reuses the trace.
    state, _ = update(state, batch)
    state, _ = update(state, jax.tree.map(lambda v: v + 0, batch))
    assert len(traces) == after_first
    assert int(state.step) == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_kl", 0.0),
        ("max_kl", -1.0),
        ("cg_iters", 0),
        ("cg_damping", -0.1),
        ("backtrack_coeff", 1.0),
        ("backtrack_coeff", 0.0),
        ("max_backtracks", 0),
        ("fvp_subsample", 0),
        ("n_critic_updates", -1),
        ("critic_minibatches", 0),
        ("fvp_method", "foo"),
    ],
)
def test_bad_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        TRPOConfig(**{field: value})


def test_good_config_and_type_check():
    TRPOConfig(max_kl=1e-4, cg_damping=0.0, n_critic_updates=0, fvp_method="hessian")
    with pytest.raises(TypeError, match="TRPOConfig"):
        make_trpo_update(categorical_policy, value_fn, VALUE_OPT, {"max_kl": 0.01})


@pytest.mark.parametrize("missing", ["advantages", "returns", "actions", "inputs"])
def test_batch_missing_key_raises(missing):
    update = make_trpo_update(categorical_policy, value_fn, VALUE_OPT)
    _, _, batch = bandit("categorical")
    batch = {k: v for k, v in batch.items() if k != missing}
    with pytest.raises(KeyError, match=missing):
        update(make_state("categorical"), batch)


def test_critic_minibatches_must_divide_rows():
    update = make_trpo_update(
        categorical_policy, value_fn, VALUE_OPT, TRPOConfig(critic_minibatches=3)
    )
    _, _, batch = bandit("categorical")
    with pytest.raises(ValueError, match="critic_minibatches=3"):
        jax.jit(update)(make_state("categorical"), batch)
