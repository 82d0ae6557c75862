"""Trust Region Policy Optimization (Schulman et al., 2015, arXiv:1502.05477).

TRPO maximises the importance-weighted surrogate subject to a bound on the mean KL between
the old and the new policy (Eq. 14 of the paper):

.. math::
    \\max_\\theta\\ L(\\theta) = \\hat{\\mathbb E}\\Big[\\frac{\\pi_\\theta(a|s)}{\\pi_{old}(a|s)}
    \\hat A\\Big] \\quad \\text{s.t.}\\quad
    \\bar D_{KL}(\\theta) = \\hat{\\mathbb E}\\big[\\mathrm{KL}(\\pi_{old}(\\cdot|s)\\,\\|\\,
    \\pi_\\theta(\\cdot|s))\\big] \\le \\delta.

This module holds the pure objectives; policies are categorical (logits) or diagonal
Gaussian (``(mean, log_std)``), see :mod:`rljax.distributions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp

from rljax.advantages import whiten
from rljax.distributions import Outputs, is_gaussian, kl_divergence, log_prob
from rljax.logprobs import masked_mean, masked_sum_and_count

__all__ = [
    "FVP_METHODS",
    "GRADIENT_OF",
    "CGInfo",
    "LineSearchInfo",
    "NaturalStepInfo",
    "conjugate_gradient",
    "fisher_vector_product",
    "kl_line_search",
    "make_fisher_vector_product",
    "mean_kl",
    "natural_step",
    "output_fisher_product",
    "surrogate_objective",
    "tree_vdot",
    "trpo_objectives",
]


def surrogate_objective(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array | None = None,
    normalizer: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Importance-weighted surrogate :math:`L = \mathrm{mean}\,[\exp(\log\pi - \log\pi_{old}) A]`.

    Schulman et al. (2015), Eq. 14. This is an objective to *maximise*; its gradient at
    ``logps == old_logps`` is the policy gradient.

    Args:
      logps: ``[batch, time]`` or ``[batch]`` log-probs of the taken actions under the
        candidate policy (gradients flow through these).
      old_logps: same shape, under the policy that collected the data (gradient stopped).
      advantages: same shape (gradient stopped).
      mask: same shape, 1 at valid positions.
      normalizer: divide the masked sum by this instead of the local valid count.

    Returns:
      ``(surrogate, metrics)`` with ``surrogate`` (the value), ``ratio`` (mean) and ``count``.
    """
    chex.assert_equal_shape([logps, old_logps, advantages])
    ratio = jnp.exp(logps - jax.lax.stop_gradient(old_logps))
    surrogate = masked_mean(ratio * jax.lax.stop_gradient(advantages), mask, normalizer=normalizer)
    metrics = {
        "surrogate": jax.lax.stop_gradient(surrogate),
        "ratio": masked_mean(jax.lax.stop_gradient(ratio), mask),
        "count": masked_sum_and_count(ratio, mask)[1],
    }
    return surrogate, metrics


def mean_kl(
    old_outputs: Outputs,
    new_outputs: Outputs,
    mask: jax.Array | None = None,
    normalizer: float | jax.Array | None = None,
) -> jax.Array:
    r"""Mean of :math:`\mathrm{KL}(\pi_{old}(\cdot|s) \| \pi_{new}(\cdot|s))` over valid positions.

    The constraint of TRPO (Schulman et al., 2015, Eq. 12), computed exactly from the output
    distributions (not from samples). ``old_outputs`` is treated as data (gradient stopped),
    so the gradient and Hessian are with respect to the new policy only.

    Args:
      old_outputs: logits ``[..., num_actions]`` or ``(mean, log_std)`` of the old policy.
      new_outputs: same structure, of the new policy.
      mask: ``[...]`` validity mask over positions (the outputs' shape minus the last axis).
      normalizer: divide the masked sum by this instead of the local valid count.
    """
    old_outputs = jax.tree.map(jax.lax.stop_gradient, old_outputs)
    return masked_mean(kl_divergence(old_outputs, new_outputs), mask, normalizer=normalizer)


# ---------------------------------------------------------------------------------------------
# Natural-gradient engine: Fisher-vector products, conjugate gradient, KL line search.
# Everything works on parameter pytrees (no flattening), so parameter shardings survive.
# ---------------------------------------------------------------------------------------------

FVP_METHODS = ("gauss_newton", "hessian")


def tree_vdot(a, b) -> jax.Array:
    """Inner product of two pytrees with the same structure, accumulated in float32 or wider."""
    leaves = jax.tree.map(
        lambda x, y: jnp.vdot(x, y).astype(jnp.promote_types(x.dtype, jnp.float32)), a, b
    )
    return sum(jax.tree.leaves(leaves), start=jnp.zeros((), jnp.float32))


def _tree_axpy(alpha, x, y):
    """``alpha * x + y`` on pytrees, keeping each leaf's dtype."""
    return jax.tree.map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def _broadcast_outputs(outputs):
    """Policy outputs with a state-independent ``log_std`` broadcast to the mean's shape."""
    if is_gaussian(outputs):
        mean, log_std = outputs
        return mean, jnp.broadcast_to(log_std, mean.shape)
    return outputs


def _position_weights(outputs, mask, normalizer):
    """Per-position weights ``mask / count`` of the mean over valid positions."""
    shape = (outputs[0] if is_gaussian(outputs) else outputs).shape[:-1]
    dtype = jnp.promote_types((outputs[0] if is_gaussian(outputs) else outputs).dtype, jnp.float32)
    valid = jnp.ones(shape, dtype) if mask is None else mask.astype(dtype)
    chex.assert_shape(valid, shape)
    denominator = jnp.maximum(jnp.sum(valid), 1.0) if normalizer is None else normalizer
    return valid / denominator


def output_fisher_product(outputs, tangent, weights):
    r"""Apply the Fisher of the output distribution to an output-space ``tangent``.

    The Hessian of :math:`\mathrm{KL}(p_{old}\|p)` at :math:`p = p_{old}` with respect to the
    distribution's natural outputs, times ``weights`` per position:

    * categorical logits :math:`z`: :math:`F u = p \odot u - p\,(p^\top u)`, i.e.
      :math:`\mathrm{diag}(p) - pp^\top` (as kfac-jax builds it);
    * diagonal Gaussian :math:`(\mu, \log\sigma)`: :math:`F(u_\mu, u_s) = (u_\mu/\sigma^2, 2u_s)`.
    """
    if is_gaussian(outputs):
        _, log_std = outputs
        u_mean, u_log_std = tangent
        w = weights[..., None]
        return (w * u_mean * jnp.exp(-2.0 * log_std), w * 2.0 * u_log_std)
    probs = jax.nn.softmax(outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32)), -1)
    u = tangent.astype(probs.dtype)
    fu = probs * (u - jnp.sum(probs * u, axis=-1, keepdims=True))
    return (weights[..., None] * fu).astype(tangent.dtype)


def make_fisher_vector_product(
    policy_fn: Callable,
    params,
    inputs,
    mask: jax.Array | None = None,
    method: str = "gauss_newton",
    normalizer: float | jax.Array | None = None,
) -> Callable:
    """Build ``v -> F v`` at ``params``, sharing all work that does not depend on ``v``.

    For ``"gauss_newton"`` the policy is linearised once (``jax.linearize``: one forward pass),
    and each product is a tangent pass, the closed-form output Fisher and the transpose of the
    linear map (``jax.linear_transpose``): no forward pass is repeated across the conjugate
    gradient iterations. For ``"hessian"`` each product is forward-over-reverse
    (``jax.jvp`` of ``jax.grad`` of the mean KL). See :func:`fisher_vector_product`.
    """
    if method not in FVP_METHODS:
        raise ValueError(f"unknown FVP method {method!r}; valid choices: {list(FVP_METHODS)}")

    def outputs_fn(p):
        return _broadcast_outputs(policy_fn(p, inputs))

    if method == "gauss_newton":
        outputs, jvp_fn = jax.linearize(outputs_fn, params)
        outputs = jax.lax.stop_gradient(outputs)
        vjp_fn = jax.linear_transpose(jvp_fn, params)
        weights = _position_weights(outputs, mask, normalizer)

        def gauss_newton_product(vector):
            tangent = jvp_fn(vector)
            (product,) = vjp_fn(output_fisher_product(outputs, tangent, weights))
            return jax.tree.map(lambda x, v: x.astype(v.dtype), product, vector)

        return gauss_newton_product

    old_outputs = jax.lax.stop_gradient(outputs_fn(params))

    def kl_fn(p):
        return mean_kl(old_outputs, outputs_fn(p), mask, normalizer)

    grad_kl = jax.grad(kl_fn)

    def hessian_product(vector):
        return jax.jvp(grad_kl, (params,), (vector,))[1]

    return hessian_product


def fisher_vector_product(
    policy_fn: Callable,
    params,
    inputs,
    vector,
    mask: jax.Array | None = None,
    method: str = "gauss_newton",
    normalizer: float | jax.Array | None = None,
):
    r"""Fisher-vector product :math:`F v` of a policy at ``params``, on parameter pytrees.

    :math:`F` is the Hessian at :math:`\theta' = \theta` of the mask-weighted mean
    :math:`\bar D_{KL}(\theta') = \mathrm{mean}_s \mathrm{KL}(\pi_\theta(\cdot|s)\,\|\,
    \pi_{\theta'}(\cdot|s))`, i.e. the mean Fisher information over valid positions
    (Schulman et al., 2015, Appendix C). No damping is added here.

    Methods:

    * ``"gauss_newton"``: :math:`F v = J^\top F_{out} J v` with :math:`J` the Jacobian of the
      policy outputs, computed as a ``jvp``, the closed-form output Fisher
      (:func:`output_fisher_product`) and a ``vjp``; never materialises :math:`J` or :math:`F`
      (Martens & Grosse, 2015; Schraudolph, 2002).
    * ``"hessian"``: forward-over-reverse, ``jax.jvp`` of ``jax.grad`` of the mean KL; works for
      any distribution with a KL function.

    Args:
      policy_fn: ``policy_fn(params, inputs) -> outputs``: logits ``[..., num_actions]`` of a
        categorical policy or ``(mean, log_std)`` of a diagonal Gaussian.
      params: parameter pytree.
      inputs: whatever ``policy_fn`` takes (arrays or a pytree).
      vector: pytree like ``params``.
      mask: ``[...]`` validity mask over positions (the outputs' shape minus the last axis).
      method: ``"gauss_newton"`` or ``"hessian"``.
      normalizer: divide by this instead of the number of valid positions.

    Returns:
      :math:`F v`, a pytree like ``params``.
    """
    return make_fisher_vector_product(policy_fn, params, inputs, mask, method, normalizer)(vector)


class CGInfo(NamedTuple):
    """Diagnostics of :func:`conjugate_gradient`."""

    iterations: jax.Array
    residual_norm: jax.Array


def conjugate_gradient(
    matvec: Callable,
    b,
    max_iters: int = 10,
    damping: float | jax.Array = 0.0,
    tol: float | jax.Array = 1e-10,
):
    r"""Solve :math:`(A + \lambda I) x = b` by conjugate gradient (Hestenes & Stiefel, 1952).

    ``A`` is symmetric positive semi-definite and given only as ``matvec``; ``b`` and ``x`` are
    pytrees. Starts from :math:`x_0 = 0` and stops after ``max_iters`` iterations or once the
    squared residual norm :math:`r^\top r` is at most ``tol`` (the criterion of the original
    TRPO code). Runs in a ``lax.while_loop``, so it is jit-able and traces ``matvec`` once.

    Args:
      matvec: ``v -> A v`` on pytrees shaped like ``b``.
      b: the right-hand side (a pytree).
      max_iters: iterations at most (a Python int).
      damping: :math:`\lambda \ge 0` added to the diagonal (``None`` = 0). The default 0
        solves the system exactly as given, as a general linear solver should;
        :func:`natural_step` defaults to ``cg_damping=0.1`` (the original TRPO code's and
        sb3-contrib's value) because a Fisher estimated from one batch is singular or
        ill-conditioned, and it adds that damping itself. To reproduce
        :func:`natural_step`'s direction, pass ``damping=0.1`` here.
      tol: stop once :math:`r^\top r \le` ``tol``.

    Returns:
      ``(x, CGInfo(iterations, residual_norm))`` with ``residual_norm`` :math:`\|b - (A +
      \lambda I)x\|` as tracked by the recursion.

    Example (a 2 x 2 system: CG is exact in two iterations)::

        >>> import jax.numpy as jnp
        >>> from rljax.trpo import conjugate_gradient
        >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        >>> x, info = conjugate_gradient(lambda v: A @ v, jnp.array([1.0, 2.0]), max_iters=10)
        >>> [round(float(v), 4) for v in x], int(info.iterations)
        ([0.0909, 0.6364], 2)
    """

    def damped(v):
        return _tree_axpy(damping, v, matvec(v)) if damping is not None else matvec(v)

    x0 = jax.tree.map(jnp.zeros_like, b)
    rdotr0 = tree_vdot(b, b)

    def cond(state):
        i, _, _, _, rdotr = state
        # Strict: with ``tol=0`` the loop still ends once the residual is exactly zero.
        return (i < max_iters) & (rdotr > tol)

    def body(state):
        i, x, r, p, rdotr = state
        z = damped(p)
        p_dot_z = tree_vdot(p, z)
        # Guards against 0/0 (a singular A along p, or a residual that vanished exactly).
        alpha = jnp.where(p_dot_z != 0, rdotr / jnp.where(p_dot_z != 0, p_dot_z, 1), 0.0)
        x = _tree_axpy(alpha, p, x)
        r = _tree_axpy(-alpha, z, r)
        new_rdotr = tree_vdot(r, r)
        beta = jnp.where(rdotr != 0, new_rdotr / jnp.where(rdotr != 0, rdotr, 1), 0.0)
        p = _tree_axpy(beta, p, r)
        return i + 1, x, r, p, new_rdotr

    i, x, _, _, rdotr = jax.lax.while_loop(cond, body, (jnp.int32(0), x0, b, b, rdotr0))
    return x, CGInfo(iterations=i, residual_norm=jnp.sqrt(rdotr))


class LineSearchInfo(NamedTuple):
    """Diagnostics of :func:`kl_line_search`."""

    accepted: jax.Array
    step_fraction: jax.Array
    steps: jax.Array
    surrogate: jax.Array
    kl: jax.Array
    slope: jax.Array | None = None


def _backtrack(surrogate_and_kl_at, surrogate_before, max_kl, backtrack_coeff, max_steps, dtype):
    """The loop of :func:`kl_line_search`: ``(steps, accepted, surrogate, kl)`` after trying
    the fractions ``backtrack_coeff ** k`` (``surrogate_and_kl_at(fraction)``) until one
    improves the surrogate within ``max_kl`` or ``max_steps`` have been tried."""

    def cond(state):
        k, accepted, _, _ = state
        return (k < max_steps) & ~accepted

    def body(state):
        k, _, _, _ = state
        fraction = jnp.asarray(backtrack_coeff, dtype) ** k
        surrogate, kl = surrogate_and_kl_at(fraction)
        ok = (
            (surrogate > surrogate_before)
            & (kl <= max_kl)
            & jnp.isfinite(surrogate)
            & (jnp.isfinite(kl))
        )
        return k + 1, ok, surrogate.astype(dtype), kl.astype(dtype)

    zero = jnp.zeros((), dtype)
    return jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.bool_(False), zero, zero))


def kl_line_search(
    surrogate_and_kl: Callable,
    params,
    full_step,
    surrogate_before: jax.Array,
    max_kl: float | jax.Array,
    backtrack_coeff: float | jax.Array = 0.8,
    max_steps: int = 10,
    *,
    check_direction: bool = True,
):
    r"""Backtracking line search under a KL constraint (Schulman et al., 2015, Appendix C).

    Tries :math:`\theta + \alpha^k s` for :math:`k = 0, \dots,` ``max_steps - 1`` with
    :math:`\alpha` = ``backtrack_coeff`` and accepts the first candidate whose surrogate
    *improves* on ``surrogate_before`` and whose mean KL to the old policy is at most
    ``max_kl``. If none does, the old ``params`` are returned and ``accepted`` is False.

    Args:
      surrogate_and_kl: ``params -> (surrogate, mean_kl)`` of a candidate: the objective being
        *maximised* (e.g. :func:`surrogate_objective`) and the mean KL from the old policy.
      params: current parameters (the old policy).
      full_step: pytree, the full natural-gradient step :math:`s` (from :func:`natural_step`).
      surrogate_before: the surrogate's value at ``params``, before the step (the first output
        of ``surrogate_and_kl(params)``; for on-policy data, where the ratios are 1, the mean
        advantage). A candidate must beat it.
      max_kl: :math:`\delta`.
      backtrack_coeff: :math:`\alpha \in (0, 1)`.
      max_steps: number of candidates tried (a Python int).
      check_direction: also compute ``slope``, the directional derivative of the surrogate
        along ``full_step`` at ``params`` (one more forward pass with a ``jax.jvp``). A
        negative slope means ``full_step`` goes *down* the objective, which is what a
        :func:`natural_step` given a loss's gradient as the objective's produces. When the
        slope is negative and no candidate is accepted, a concrete (un-jitted) call raises
        ``ValueError`` saying so; under ``jit`` it cannot raise: read ``info.slope``.
        :func:`make_trpo_update` turns it off (it computes the gradient itself).

    Returns:
      ``(new_params, LineSearchInfo(accepted, step_fraction, steps, surrogate, kl, slope))``
      where ``step_fraction`` is :math:`\alpha^k` of the accepted step (0 when rejected),
      ``steps`` the number of candidates evaluated, ``surrogate``/``kl`` those of the returned
      params, and ``slope`` the directional derivative (``None`` without
      ``check_direction``).
    """
    # The working dtype follows the parameters (a Python-float surrogate_before is weak).
    dtype = jnp.result_type(*jax.tree.leaves(full_step), surrogate_before, jnp.float32)

    def candidate(fraction):
        return _tree_axpy(fraction, full_step, params)

    steps, accepted, surrogate, kl = _backtrack(
        lambda fraction: surrogate_and_kl(candidate(fraction)),
        surrogate_before,
        max_kl,
        backtrack_coeff,
        max_steps,
        dtype,
    )
    zero = jnp.zeros((), dtype)
    fraction = jnp.where(accepted, jnp.asarray(backtrack_coeff, dtype) ** (steps - 1), 0.0)
    new_params = jax.tree.map(
        lambda new, old: jnp.where(accepted, new, old), candidate(fraction), params
    )
    slope = None
    if check_direction:
        _, slope = jax.jvp(
            lambda t: surrogate_and_kl(candidate(t))[0], (zero,), (jnp.ones((), dtype),)
        )
        _raise_if_descent(slope, accepted)
    info = LineSearchInfo(
        accepted=accepted,
        step_fraction=fraction,
        steps=steps,
        surrogate=jnp.where(accepted, surrogate, surrogate_before),
        kl=jnp.where(accepted, kl, 0.0),
        slope=slope,
    )
    return new_params, info


def _raise_if_descent(slope, accepted) -> None:
    """The loud failure of :func:`kl_line_search` for a step down the objective (concrete
    values only: under ``jit`` nothing can be raised from values)."""
    if isinstance(slope, jax.core.Tracer) or isinstance(accepted, jax.core.Tracer):
        return
    if float(slope) < 0 and not bool(accepted):
        raise ValueError(
            f"kl_line_search: full_step goes down the surrogate (its directional derivative "
            f"at params is {float(slope):.3g} < 0), so no candidate improved it. "
            "natural_step(grad, ...) needs the gradient of the objective being MAXIMISED; for "
            "the gradient of a loss (e.g. -surrogate) pass natural_step(..., "
            "gradient_of='loss'). (check_direction=False turns this check off.)"
        )


class NaturalStepInfo(NamedTuple):
    """Diagnostics of :func:`natural_step`."""

    direction: Any
    step_size: jax.Array
    curvature: jax.Array
    cg_iterations: jax.Array
    cg_residual: jax.Array
    expected_improvement: jax.Array | None = None


GRADIENT_OF = ("objective", "loss")


def natural_step(
    grad,
    fvp: Callable,
    max_kl: float | jax.Array,
    cg_iters: int = 10,
    cg_damping: float | jax.Array = 0.1,
    cg_tol: float | jax.Array = 1e-10,
    *,
    gradient_of: str = "objective",
):
    r"""The full TRPO step: :math:`\sqrt{2\delta / s^\top \tilde F s}\; s` with
    :math:`s \approx \tilde F^{-1} g`, :math:`\tilde F = F + \lambda I`.

    The step that maximises the linearised surrogate :math:`g^\top \Delta` subject to the
    quadratic KL model :math:`\tfrac12 \Delta^\top \tilde F \Delta \le \delta` (Schulman et
    al., 2015, Appendix C). ``s`` comes from ``cg_iters`` iterations of
    :func:`conjugate_gradient` on the damped ``fvp``; a non-positive curvature gives a zero
    step.

    Sign convention: :math:`g` is the gradient of the objective being **maximised** (the
    surrogate of :func:`surrogate_objective`), and the returned step is added to the
    parameters. A loss gradient (of ``-surrogate``, or of a PPO-style loss) given as that
    :math:`g` yields a step *down* the objective, which :func:`kl_line_search` would then
    reject at every fraction: say which one you pass with ``gradient_of``. The step always
    goes up the objective (down the loss).

    Args:
      grad: the gradient (a pytree like the parameters), of what ``gradient_of`` names.
      fvp: ``v -> F v``, e.g. :func:`make_fisher_vector_product` (undamped).
      max_kl: :math:`\delta`, the bound on the quadratic model of the mean KL.
      cg_iters: conjugate-gradient iterations.
      cg_damping: :math:`\lambda`, added to ``fvp`` here. Default 0.1 (the original TRPO
        code's and sb3-contrib's ``cg_damping``): a batch's Fisher is singular or badly
        conditioned, and the damping keeps CG stable and the step bounded.
        :func:`conjugate_gradient` alone defaults to ``damping=0`` (a general solver solves the
        system as given); :func:`natural_step` calls it on the damped product.
      cg_tol: conjugate gradient's tolerance on the squared residual norm.
      gradient_of: ``"objective"`` (default: ``grad`` is :math:`g`, the gradient of what is
        maximised) or ``"loss"`` (``grad`` is the gradient of a loss, :math:`-g`: it is
        negated first). Any other value raises ``ValueError``.

    Returns:
      ``(full_step, NaturalStepInfo(direction, step_size, curvature, cg_iterations,
      cg_residual, expected_improvement))``; ``direction`` is :math:`s`, and
      ``expected_improvement`` is :math:`g^\top` ``full_step``, the objective's gain the
      linear model predicts (>= 0), to compare with the line search's measured one.
    """
    if gradient_of not in GRADIENT_OF:
        raise ValueError(
            f"natural_step: gradient_of={gradient_of!r}; valid choices: {list(GRADIENT_OF)} "
            "('objective': grad is the gradient of the surrogate being maximised; 'loss': of a "
            "loss being minimised)"
        )
    if gradient_of == "loss":
        grad = jax.tree.map(jnp.negative, grad)

    def damped_fvp(v):
        return _tree_axpy(cg_damping, v, fvp(v))

    direction, cg_info = conjugate_gradient(
        damped_fvp, grad, max_iters=cg_iters, damping=None, tol=cg_tol
    )
    curvature = tree_vdot(direction, damped_fvp(direction))
    step_size = jnp.where(
        curvature > 0, jnp.sqrt(2.0 * max_kl / jnp.maximum(curvature, 1e-30)), 0.0
    )
    full_step = jax.tree.map(lambda x: (step_size * x).astype(x.dtype), direction)
    return full_step, NaturalStepInfo(
        direction,
        step_size,
        curvature,
        cg_info.iterations,
        cg_info.residual_norm,
        tree_vdot(grad, full_step),
    )


def trpo_objectives(
    policy_fn: Callable, params, batch: dict, normalize_advantages: bool = True
) -> tuple[Callable, Callable]:
    """The surrogate and KL of a batch as functions of candidate parameters.

    ``batch`` is as for :func:`make_trpo_update`; the old policy is ``params``. Returns
    ``(surrogate_fn, surrogate_and_kl)``: ``surrogate_fn(p)`` is
    :func:`surrogate_objective` at ``p``, ``surrogate_and_kl(p)`` also gives
    :func:`mean_kl` between the old policy and ``p`` (one forward pass for both).
    """
    missing = [k for k in ("inputs", "actions", "advantages") if k not in batch]
    if missing:
        raise KeyError(f"TRPO batch is missing {missing}; it has {sorted(batch)}")
    inputs, actions, mask = batch["inputs"], batch["actions"], batch.get("mask")
    advantages = batch["advantages"]
    if normalize_advantages:
        advantages = whiten(advantages, mask)
    old_outputs = jax.lax.stop_gradient(policy_fn(params, inputs))
    old_logps = batch.get("old_logps")
    if old_logps is None:
        old_logps = log_prob(old_outputs, actions)

    def surrogate_and_kl(p):
        outputs = policy_fn(p, inputs)
        logps = log_prob(outputs, actions)
        surrogate = surrogate_objective(logps, old_logps, advantages, mask)[0]
        return surrogate, mean_kl(old_outputs, outputs, mask)

    def surrogate_fn(p):
        logps = log_prob(policy_fn(p, inputs), actions)
        return surrogate_objective(logps, old_logps, advantages, mask)[0]

    return surrogate_fn, surrogate_and_kl
