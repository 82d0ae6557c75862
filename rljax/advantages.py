"""Generalised advantage estimation, discounted returns and advantage whitening.

Time is the **last** axis; any leading axes (batch, environments) are carried along.

Episode ends: ``dones[..., t] = 1`` means the episode ended at step ``t`` (a termination), so
nothing is bootstrapped from ``values[..., t + 1]`` across it. For a time-limit truncation,
where the episode was cut but did not terminate, fold the bootstrap into the reward
(``r_t + gamma * V(s_{t+1})``, with ``s_{t+1}`` the state the time limit cut off) and set
``dones[t] = 1``: the next entry of ``values`` then belongs to the next episode.

Padding: positions with ``mask == 0`` are *not steps*. They are skipped by the backward
recursion (the next valid step's value and advantage pass through them unchanged) and get an
advantage and return of 0. This handles left padding, right padding and holes alike. Right
padding after a terminal step needs ``dones = 1`` at that step (as it would without padding).

Critic-free RL on language models (the second half of this file): one scalar outcome score per
completion, ``group_size`` completions per prompt stored contiguously (rows
``g * k .. g * k + k - 1`` share prompt ``g``). :func:`outcome_advantages` turns the scores into
one advantage per completion (GRPO, Dr. GRPO, RLOO, REINFORCE++), :func:`filter_groups` is
DAPO's dynamic-sampling filter, :func:`soft_overlong_penalty` and :func:`mask_truncated` are
DAPO's overlong handling, and :func:`truncated_importance_weights` corrects for the mismatch
between the sampler's and the trainer's log-probs. Definitions follow TRL 1.16
(``trl/trainer/grpo_trainer.py``, ``trl/rewards/other_rewards.py``) and the cited papers.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rljax.logprobs import kl_k3, masked_sum_and_count

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "IMPORTANCE_SAMPLING_MODES",
    "OUTCOME_ESTIMATORS",
    "discounted_returns",
    "explained_variance",
    "filter_groups",
    "gae",
    "mask_truncated",
    "outcome_advantages",
    "soft_overlong_penalty",
    "truncated_importance_weights",
    "whiten",
]


def _prepare(rewards, dones, mask):
    if rewards.ndim < 1:
        raise ValueError(f"rewards needs a time axis (last axis); got shape {rewards.shape}")
    chex.assert_equal_shape([rewards, dones])
    dtype = jnp.promote_types(rewards.dtype, jnp.float32)
    if mask is None:
        mask = jnp.ones(rewards.shape, dtype)
    chex.assert_equal_shape([rewards, mask])
    return dtype, dones.astype(dtype), mask.astype(bool)


def _check_time_last(
    function: str, rewards, *, values=None, dones=None, mask=None, bootstrap_value=None
):
    """Shape errors that name the layout: time is the LAST axis (rlax puts it first).

    ``rewards``, ``dones`` and ``mask`` are ``[..., T]``, ``values`` ``[..., T + 1]`` and
    ``bootstrap_value`` ``[...]``. A time-first batch (``rewards [T, B]``, ``values [T + 1,
    B]``, as rlax and many rollout loops store it) is recognised and the message says to
    transpose it."""
    layout = (
        f"{function} expects time on the LAST axis: rewards, dones and mask [..., T]"
        + (", values [..., T + 1] (the last entry bootstraps)" if values is not None else "")
        + (", bootstrap_value [...]" if bootstrap_value is not None else "")
    )
    rewards_shape = tuple(np.shape(rewards))
    if not rewards_shape:
        raise ValueError(f"{layout}; got rewards of shape () (no time axis)")
    for name, other in (("dones", dones), ("mask", mask)):
        if other is not None and tuple(np.shape(other)) != rewards_shape:
            raise ValueError(
                f"{layout}; got rewards {rewards_shape} and {name} {tuple(np.shape(other))}"
            )
    shapes = f"rewards {rewards_shape}"
    wrong = time_first = False
    if values is not None:
        values_shape = tuple(np.shape(values))
        shapes += f", values {values_shape}"
        wrong = values_shape != (*rewards_shape[:-1], rewards_shape[-1] + 1)
        time_first = len(rewards_shape) > 1 and values_shape == (
            rewards_shape[0] + 1,
            *rewards_shape[1:],
        )
    if bootstrap_value is not None:
        bootstrap_shape = tuple(np.shape(bootstrap_value))
        shapes += f", bootstrap_value {bootstrap_shape}"
        wrong = wrong or bootstrap_shape != rewards_shape[:-1]
        time_first = len(rewards_shape) > 1 and bootstrap_shape == rewards_shape[1:]
    if wrong:
        hint = ""
        if time_first:
            hint = (
                ". These look time-first ([T, ...], rlax's layout): move time last, e.g. "
                f"{function}(jnp.moveaxis(rewards, 0, -1), ...) for every time-indexed argument"
            )
        raise ValueError(f"{layout}; got {shapes}{hint}")


def _scan_backwards(step, init, xs):
    """Reverse-time ``lax.scan`` over the last axis of each array in ``xs``."""
    xs_time_major = jax.tree.map(lambda x: jnp.moveaxis(x, -1, 0), xs)
    _, ys = jax.lax.scan(step, init, xs_time_major, reverse=True)
    return jnp.moveaxis(ys, 0, -1)


def gae(
    rewards: jax.Array,
    values: jax.Array,
    dones: jax.Array,
    gamma: float | jax.Array = 0.99,
    lam: float | jax.Array = 0.95,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Generalised advantage estimation (Schulman et al., 2016, arXiv:1506.02438, Eq. 16).

    .. math::
        \delta_t = r_t + \gamma (1 - d_t) V_{t+1} - V_t, \qquad
        \hat A_t = \delta_t + \gamma \lambda (1 - d_t) \hat A_{t+1}

    with :math:`\hat A_T = 0` after the last step and :math:`V_T` the bootstrap value.

    Layout: time is the **last** axis (``[batch, time]``, the layout of every sequence array
    in rljax), unlike rlax's ``truncated_generalized_advantage_estimation``, which takes one
    time-first trajectory. Time-first ``[T, B]`` arrays fail with a ``ValueError`` that says
    so; move the axis (``jnp.moveaxis(x, 0, -1)``, or ``x.T`` for 2-D) on every time-indexed
    argument. Also unlike rlax, ``gamma`` is a scalar and episode ends are ``dones`` (rlax
    folds both into ``discount_t = gamma * (1 - done_t)``).

    Args:
      rewards: ``[..., T]``.
      values: ``[..., T + 1]``; the last entry is the bootstrap value of the state after the
        final step.
      dones: ``[..., T]``, 1 where the episode terminated at step ``t``.
      gamma: discount :math:`\gamma`.
      lam: GAE :math:`\lambda`. ``lam=1`` gives discounted returns minus values; ``lam=0``
        gives the one-step TD error.
      mask: optional ``[..., T]`` validity mask (see module docstring for padding semantics).

    Returns:
      ``(advantages, returns)``, both ``[..., T]``, with ``returns = advantages + values[..., :T]``
      at valid positions and 0 at padding. Returns are the TD(lambda) targets of the value
      function.

    Raises:
      ValueError: shapes that do not follow the layout above (the message names the expected
        layout and the shapes given, and recognises time-first input).

    Example (one episode of three steps; ``values`` has one more entry, the bootstrap)::

        >>> import jax.numpy as jnp
        >>> from rljax.advantages import gae
        >>> adv, returns = gae(
        ...     jnp.array([1.0, 0.0, 1.0]), jnp.array([0.5, 0.5, 0.5, 0.0]),
        ...     jnp.array([0.0, 0.0, 1.0]), gamma=0.9, lam=0.95,
        ... )
        >>> [round(float(a), 4) for a in adv], [round(float(r), 4) for r in returns]
        ([1.2728, 0.3775, 0.5], [1.7728, 0.8775, 1.0])
    """
    _check_time_last("gae", rewards, values=values, dones=dones, mask=mask)
    dtype, dones, valid = _prepare(rewards, dones, mask)
    rewards = rewards.astype(dtype)
    values = values.astype(dtype)
    gamma = jnp.asarray(gamma, dtype)
    lam = jnp.asarray(lam, dtype)

    def step(carry, x):
        next_value, next_adv = carry
        reward, value, done, is_valid = x
        not_done = 1.0 - done
        delta = reward + gamma * not_done * next_value - value
        adv = delta + gamma * lam * not_done * next_adv
        carry = (jnp.where(is_valid, value, next_value), jnp.where(is_valid, adv, next_adv))
        return carry, jnp.where(is_valid, adv, 0.0)

    init = (values[..., -1], jnp.zeros_like(values[..., -1]))
    advantages = _scan_backwards(step, init, (rewards, values[..., :-1], dones, valid))
    returns = jnp.where(valid, advantages + values[..., :-1], 0.0)
    return advantages, returns


def discounted_returns(
    rewards: jax.Array,
    dones: jax.Array,
    gamma: float | jax.Array = 0.99,
    bootstrap_value: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Discounted returns :math:`G_t = r_t + \gamma (1 - d_t) G_{t+1}`, :math:`G_T` = bootstrap.

    Time is the **last** axis, as in :func:`gae` (time-first input raises a ``ValueError``
    saying so).

    Args:
      rewards: ``[..., T]``.
      dones: ``[..., T]``, 1 where the episode terminated at step ``t``.
      gamma: discount.
      bootstrap_value: ``[...]`` value of the state after the last step (default 0).
      mask: optional ``[..., T]`` validity mask; padded positions are skipped and return 0.

    Returns:
      ``[..., T]`` returns.
    """
    _check_time_last(
        "discounted_returns", rewards, dones=dones, mask=mask, bootstrap_value=bootstrap_value
    )
    dtype, dones, valid = _prepare(rewards, dones, mask)
    rewards = rewards.astype(dtype)
    if bootstrap_value is None:
        bootstrap_value = jnp.zeros(rewards.shape[:-1], dtype)
    chex.assert_shape(bootstrap_value, rewards.shape[:-1])
    gamma = jnp.asarray(gamma, dtype)

    def step(next_return, x):
        reward, done, is_valid = x
        ret = reward + gamma * (1.0 - done) * next_return
        return jnp.where(is_valid, ret, next_return), jnp.where(is_valid, ret, 0.0)

    return _scan_backwards(step, bootstrap_value.astype(dtype), (rewards, dones, valid))


def whiten(
    x: jax.Array,
    mask: jax.Array | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> jax.Array:
    r"""Normalise ``x`` to zero mean and unit variance over valid positions only.

    .. math:: \tilde x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}

    with :math:`\mu, \sigma^2` the mean and (population) variance over all positions where
    ``mask == 1``; padded positions neither contribute nor receive a value (they are 0).
    Advantage normalisation as in PPO implementations (Andrychowicz et al., 2021,
    arXiv:2006.05990, Sec. 3).

    Args:
      x: any shape.
      mask: same shape as ``x`` or ``None``.
      shift_mean: if ``False``, the mean is added back after scaling (as TRL does for rewards).
      eps: added to the variance.
    """
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    total, count = masked_sum_and_count(x, mask)
    count = jnp.maximum(count, 1.0)
    mean = total / count
    centred = x - mean
    var = masked_sum_and_count(jnp.square(centred), mask)[0] / count
    out = centred * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    if mask is None:
        return out
    return jnp.where(mask.astype(bool), out, 0.0)


def explained_variance(
    predictions: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    r"""Explained variance :math:`1 - \mathrm{Var}[y - \hat y] / \mathrm{Var}[y]` over valid positions.

    1 is a perfect value function, 0 no better than a constant, negative worse. Returns
    ``nan`` when the targets have zero variance (undefined), as Stable-Baselines3 does.
    """
    chex.assert_equal_shape([predictions, targets])
    dtype = jnp.promote_types(targets.dtype, jnp.float32)
    predictions, targets = predictions.astype(dtype), targets.astype(dtype)

    def variance(x):
        total, count = masked_sum_and_count(x, mask)
        count = jnp.maximum(count, 1.0)
        mean = total / count
        return masked_sum_and_count(jnp.square(x - mean), mask)[0] / count

    var_targets = variance(targets)
    return jnp.where(var_targets > 0, 1.0 - variance(targets - predictions) / var_targets, jnp.nan)


# ------------------------------------------------------------------ critic-free outcome advantages


def _check_groups(num_rows: int, group_size, what: str, minimum: int = 2) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ValueError(f"group_size must be a Python int (static), got {group_size!r}")
    if group_size < minimum:
        raise ValueError(
            f"group_size must be >= {minimum} for {what} (a group baseline needs other samples "
            f"of the same prompt), got {group_size}"
        )
    if num_rows % group_size:
        raise ValueError(
            f"{num_rows} scores do not split into groups of group_size={group_size}: the batch "
            f"must hold a whole number of prompts, each with group_size contiguous completions"
        )
    return int(group_size)


def _masked_centre(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Centre ``x`` on the mean of its valid entries along the last axis.

    Returns ``(centred, count, std)``: ``centred`` is 0 at invalid entries; ``count`` and
    ``std`` keep the reduced axis (size 1). ``std`` is the sample standard deviation (Bessel's
    correction, as ``torch.std`` and TRL's ``nanstd``), 0 with fewer than two valid entries.
    The mean is taken of the differences to the first valid entry, a shift that changes nothing
    mathematically but makes a group of identical values centre to exactly 0.
    """
    count = jnp.sum(valid, axis=-1, keepdims=True, dtype=x.dtype)
    pivot = jnp.take_along_axis(x, jnp.argmax(valid, axis=-1, keepdims=True), axis=-1)
    shifted = jnp.where(valid, x - pivot, 0.0)
    mean_shift = jnp.sum(shifted, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
    centred = jnp.where(valid, shifted - mean_shift, 0.0)
    var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / jnp.maximum(count - 1.0, 1.0)
    positive = var > 0  # sqrt has an infinite derivative at 0: keep it out of the graph
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
    return centred, count, std


def _batch_std(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Sample standard deviation of the valid entries of ``x`` over the whole batch."""
    return _masked_centre(x.reshape(1, -1), valid.reshape(1, -1))[2]


# Each estimator maps grouped scores ``[G, k]`` (0 at invalid rows), the validity mask
# ``[G, k]`` and ``eps`` to advantages ``[G, k]``.


def _grpo(r, valid, eps):
    centred, _, std = _masked_centre(r, valid)
    return centred / (std + eps)


def _grpo_batch_std(r, valid, eps):
    centred, _, _ = _masked_centre(r, valid)
    return centred / (_batch_std(r, valid) + eps)


def _dr_grpo(r, valid, eps):
    del eps
    return _masked_centre(r, valid)[0]


def _rloo(r, valid, eps):
    del eps
    centred, count, _ = _masked_centre(r, valid)
    return centred * jnp.where(count > 1, count / jnp.maximum(count - 1.0, 1.0), 0.0)


def _reinforce_pp(r, valid, eps):
    centred, _, std = _masked_centre(r.reshape(1, -1), valid.reshape(1, -1))
    return centred.reshape(r.shape) / (std + eps)


def _reinforce_pp_baseline(r, valid, eps):
    centred, _, _ = _masked_centre(r, valid)
    return centred / (_batch_std(centred, valid) + eps)


OUTCOME_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "grpo": _grpo,
    "grpo_batch_std": _grpo_batch_std,
    "dr_grpo": _dr_grpo,
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
    "reinforce_pp_baseline": _reinforce_pp_baseline,
}
_NO_GROUP_BASELINE = frozenset({"reinforce_pp"})  # the only estimator valid with group_size=1


def outcome_advantages(
    scores: jax.Array,
    group_size: int,
    *,
    estimator: str = "grpo",
    eps: float | jax.Array = 1e-4,
    valid: jax.Array | None = None,
) -> jax.Array:
    r"""Critic-free advantages from one outcome score per completion.

    Rows are grouped contiguously: rows ``g * k .. g * k + k - 1`` (``k = group_size``) are
    completions of prompt ``g``. With :math:`\bar r_g` and :math:`s_g` the mean and sample
    standard deviation (Bessel-corrected) of group ``g``, :math:`\bar r_B` and :math:`s_B`
    those of the whole batch, and :math:`\epsilon` = ``eps`` (added to the deviation, as TRL):

    * ``"grpo"``: :math:`A_i = (r_i - \bar r_g) / (s_g + \epsilon)` (GRPO, Shao et al., 2024,
      arXiv:2402.03300, Sec. 4.1.2; TRL ``scale_rewards="group"``).
    * ``"grpo_batch_std"``: :math:`A_i = (r_i - \bar r_g) / (s_B + \epsilon)`, the batch
      standard deviation of the raw scores (TRL ``scale_rewards="batch"``, after Liu et al.,
      2025, arXiv:2508.08221).
    * ``"dr_grpo"``: :math:`A_i = r_i - \bar r_g` (Dr. GRPO, Liu et al., 2025,
      arXiv:2503.20783, Sec. 3.2; TRL ``scale_rewards="none"``).
    * ``"rloo"``: :math:`A_i = r_i - \frac{1}{k-1}\sum_{j \ne i} r_j
      = \frac{k}{k-1}(r_i - \bar r_g)` (RLOO, Ahmadian et al., 2024, arXiv:2402.14740, Eq. 7;
      TRL ``RLOOTrainer`` with ``normalize_advantages=False``).
    * ``"reinforce_pp"``: :math:`A_i = (r_i - \bar r_B) / (s_B + \epsilon)`, global batch
      normalisation without a per-prompt baseline (REINFORCE++, Hu, 2025, arXiv:2501.03262);
      the only estimator that accepts ``group_size=1``.
    * ``"reinforce_pp_baseline"``: :math:`c_i = r_i - \bar r_g`,
      :math:`A_i = c_i / (s_B(c) + \epsilon)` (REINFORCE++-baseline, same paper): the group
      mean as baseline, the batch deviation of the centred scores as scale. The batch mean of
      ``c`` is 0 by construction, so it is not subtracted again.

    REINFORCE++ as written in the paper (and OpenRLHF) normalises token-level returns over all
    completion tokens with the population variance and ``eps=1e-8`` inside the square root;
    here each completion counts once and the deviation is the sample deviation plus ``eps``,
    the same convention as the GRPO estimators (the difference is a factor
    :math:`\sqrt{(n-1)/n}` and the ``eps`` placement).

    ``valid`` excludes rows from every mean and deviation (e.g. a completion whose reward
    functions all failed): they receive advantage 0. Rows whose score is NaN are excluded the
    same way, as TRL does for unscorable completions. A group with fewer than two valid rows
    gets advantage 0 from every group estimator (TRL: ``nan_to_num`` of a NaN deviation). A
    group whose valid scores are all equal gets exactly 0 from the group estimators (see
    :func:`filter_groups` to drop such groups before the update, as DAPO does).

    Args:
      scores: ``[B]`` one scalar score per completion, ``B = num_prompts * group_size``.
      group_size: completions per prompt ``k`` (static Python int).
      estimator: a key of :data:`OUTCOME_ESTIMATORS`.
      eps: added to the standard deviation (TRL uses ``1e-4``); traced, sweepable.
      valid: optional ``[B]`` mask, 1 for rows that enter the statistics.

    Returns:
      ``[B]`` advantages, 0 at invalid rows (broadcast them over the completion tokens).
    """
    chex.assert_rank(scores, 1)
    if estimator not in OUTCOME_ESTIMATORS:
        raise ValueError(
            f"unknown estimator {estimator!r}; valid estimators: {sorted(OUTCOME_ESTIMATORS)}"
        )
    minimum = 1 if estimator in _NO_GROUP_BASELINE else 2
    k = _check_groups(scores.shape[0], group_size, f"estimator={estimator!r}", minimum)
    dtype = jnp.promote_types(scores.dtype, jnp.float32)
    scores = scores.astype(dtype)
    row_valid = ~jnp.isnan(scores)
    if valid is not None:
        chex.assert_shape(valid, scores.shape)
        row_valid = row_valid & valid.astype(bool)
    r = jnp.where(row_valid, scores, 0.0).reshape(-1, k)
    adv = OUTCOME_ESTIMATORS[estimator](r, row_valid.reshape(-1, k), jnp.asarray(eps, dtype))
    return jnp.where(row_valid, adv.reshape(-1), 0.0)


def filter_groups(scores, group_size: int, valid=None) -> tuple[np.ndarray, int]:
    r"""DAPO dynamic sampling: keep only groups whose scores are not all equal (host side).

    DAPO (Yu et al., 2025, arXiv:2503.14476, Sec. 3.2, constraint in Eq. 11) drops prompts
    whose ``group_size`` completions are all correct or all wrong,
    :math:`0 < |\{o_i : \mathrm{correct}(o_i)\}| < G`; for general scores this is "not all
    equal" (verl keeps groups with a non-zero score deviation). Such a group has zero
    advantage under every group-baseline estimator and only dilutes the batch; the sampling
    loop draws more prompts to refill it.

    Equality is exact (``max == min`` over the group's valid scores), so no rounding can
    keep a constant group. Rows with ``valid == 0`` or a NaN score are ignored; a group with
    fewer than two valid rows is dropped. Decisions are per group and broadcast to its rows,
    so the kept rows still form contiguous groups of ``group_size``.

    Args:
      scores: ``[B]`` scores (numpy or JAX; read on the host).
      group_size: completions per prompt, ``>= 2``.
      valid: optional ``[B]`` mask of rows whose score counts.

    Returns:
      ``(keep, num_dropped_groups)``: ``keep`` is a numpy bool ``[B]``; index the batch with
      it (``scores[keep]``) to build the filtered batch.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape [B], got {scores.shape}")
    k = _check_groups(scores.shape[0], group_size, "filter_groups")
    row_valid = ~np.isnan(scores)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != scores.shape:
            raise ValueError(
                f"valid must have the shape of scores {scores.shape}, got {valid.shape}"
            )
        row_valid &= valid
    grouped, grouped_valid = scores.reshape(-1, k), row_valid.reshape(-1, k)
    highest = np.where(grouped_valid, grouped, -np.inf).max(axis=1)
    lowest = np.where(grouped_valid, grouped, np.inf).min(axis=1)
    keep_group = (grouped_valid.sum(axis=1) >= 2) & (highest > lowest)
    return np.repeat(keep_group, k), int(np.count_nonzero(~keep_group))


# ------------------------------------------------------------------------- overlong handling


def soft_overlong_penalty(
    lengths: jax.Array,
    max_completion_len: int,
    overlong_buffer_len: int,
    penalty_factor: float | jax.Array = 1.0,
) -> jax.Array:
    r"""DAPO's soft overlong punishment (Yu et al., 2025, arXiv:2503.14476, Eq. 13).

    With :math:`L_{max}` = ``max_completion_len``, :math:`L_{cache}` = ``overlong_buffer_len``
    and :math:`|y|` the completion length in tokens:

    .. math::
        R_{length}(y) = \lambda \cdot \begin{cases}
            0 & |y| \le L_{max} - L_{cache} \\
            \frac{(L_{max} - L_{cache}) - |y|}{L_{cache}} & L_{max} - L_{cache} < |y| \le L_{max} \\
            -1 & L_{max} < |y|
        \end{cases}

    with :math:`\lambda` = ``penalty_factor`` (verl's ``overlong_buffer.penalty_factor``;
    1 in the paper). ``penalty_factor=1`` equals TRL's
    ``get_soft_overlong_punishment(max_completion_len, soft_punish_cache=overlong_buffer_len)``
    (``trl/rewards/other_rewards.py``). Add the result to the task score before computing
    advantages. ``overlong_buffer_len=0`` is a hard penalty beyond :math:`L_{max}`.

    Args:
      lengths: ``[B]`` completion lengths in tokens (integer or float).
      max_completion_len: :math:`L_{max}`, a positive Python int.
      overlong_buffer_len: :math:`L_{cache}`, a Python int in ``[0, max_completion_len]``.
      penalty_factor: :math:`\lambda >= 0`; traced, sweepable.

    Returns:
      ``[B]`` penalties in ``[-penalty_factor, 0]``, floating point (float64 for integer
      lengths when x64 is enabled, else at least float32).
    """
    chex.assert_rank(lengths, 1)
    for name, value in (
        ("max_completion_len", max_completion_len),
        ("overlong_buffer_len", overlong_buffer_len),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be a Python int, got {value!r}")
    if max_completion_len <= 0:
        raise ValueError(f"max_completion_len must be > 0, got {max_completion_len}")
    if not 0 <= overlong_buffer_len <= max_completion_len:
        raise ValueError(
            f"overlong_buffer_len must be in [0, max_completion_len={max_completion_len}], "
            f"got {overlong_buffer_len}"
        )
    if isinstance(penalty_factor, (int, float)) and penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0 (it scales a penalty), got {penalty_factor}")
    if not isinstance(lengths, jax.core.Tracer):
        negative = np.flatnonzero(np.asarray(lengths) < 0)
        if negative.size:
            raise ValueError(
                f"lengths must be >= 0; row {int(negative[0])} has length "
                f"{np.asarray(lengths)[negative[0]]}"
            )
    dtype = jnp.promote_types(jnp.result_type(lengths.dtype, float), jnp.float32)
    length = jnp.asarray(lengths).astype(dtype)
    start = max_completion_len - overlong_buffer_len
    ramp = (start - length) / max(overlong_buffer_len, 1)  # the ramp region is empty if 0
    penalty = jnp.where(length <= start, 0.0, jnp.where(length <= max_completion_len, ramp, -1.0))
    return penalty * jnp.asarray(penalty_factor, dtype)


def mask_truncated(mask: jax.Array, truncated: jax.Array) -> jax.Array:
    """Zero the completion mask of truncated completions (DAPO's overlong filtering).

    A completion is truncated when generation stopped at the length limit before an
    end-of-sequence token; TRL (``mask_truncated_completions=True``) marks a row truncated when
    its last completion token is neither an EOS token nor the pad token, and zeroes that row's
    completion mask, so the row contributes no loss and no tokens to the loss normaliser
    (DAPO, Yu et al., 2025, arXiv:2503.14476, Sec. 3.4). The row's reward still enters its
    group's statistics: TRL masks after scoring, and so should callers (compute advantages
    on all rows, then mask). TRL also drops the row from the attention mask; with a zero loss
    mask that changes nothing the loss can see.

    Args:
      mask: ``[B, T]`` completion mask (any dtype; 1 at valid tokens).
      truncated: ``[B]`` bool, True for rows that ended without EOS.

    Returns:
      ``[B, T]`` mask of the same dtype, all zero on truncated rows.
    """
    chex.assert_rank(mask, 2)
    chex.assert_shape(truncated, (mask.shape[0],))
    return jnp.where(truncated.astype(bool)[:, None], jnp.zeros_like(mask), mask)


# ----------------------------------------------- sampler/trainer mismatch: importance weights


def _token_level(log_ratio, valid):
    return log_ratio, valid


def _sequence_level(log_ratio, valid):
    return jnp.sum(log_ratio, axis=-1, keepdims=True), jnp.any(valid, axis=-1, keepdims=True)


def _truncate(ratio, low, high):
    return jnp.clip(ratio, low, high)


def _mask(ratio, low, high):
    return jnp.where((ratio < low) | (ratio > high), 0.0, ratio)


# level -> (masked per-token log-ratio [B, T], valid [B, T]) -> (unit log-ratio, unit valid)
IMPORTANCE_SAMPLING_LEVELS = {"token": _token_level, "sequence": _sequence_level}
# mode -> (ratio, low, high) -> weight
IMPORTANCE_SAMPLING_MODES = {"truncate": _truncate, "mask": _mask}


def _masked_stats(x, valid):
    """(mean, min, max) of ``x`` over ``valid``; 0 each when nothing is valid (as TRL)."""
    count = jnp.sum(valid, dtype=x.dtype)
    some = count > 0
    mean = jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(count, 1.0)
    low = jnp.where(some, jnp.min(jnp.where(valid, x, jnp.inf)), 0.0)
    high = jnp.where(some, jnp.max(jnp.where(valid, x, -jnp.inf)), 0.0)
    return mean, low, high


def _check_importance_args(cap, cap_min, level: str, mode: str) -> None:
    """Raise for an unknown level or mode, or concrete bounds that are out of order."""
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"unknown level {level!r}; valid levels: {sorted(IMPORTANCE_SAMPLING_LEVELS)}"
        )
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {sorted(IMPORTANCE_SAMPLING_MODES)}")
    if isinstance(cap, (int, float)) and cap <= 0:
        raise ValueError(f"cap must be > 0 (or None for no upper bound), got {cap}")
    if isinstance(cap_min, (int, float)) and cap_min < 0:
        raise ValueError(f"cap_min must be >= 0 (or None for no lower bound), got {cap_min}")
    if isinstance(cap, (int, float)) and isinstance(cap_min, (int, float)) and cap_min > cap:
        raise ValueError(f"cap_min={cap_min} must not exceed cap={cap}")


def _mismatch_metrics(delta, scorable, unit_weights, unit_valid, capped) -> dict[str, jax.Array]:
    """The metrics of :func:`truncated_importance_weights` (see its Returns): of the log-prob
    differences ``delta`` and their k3 KL over ``scorable`` tokens, of the weights and of the
    ``capped`` flags over the valid units (tokens or rows)."""
    diff_mean, _, diff_max = _masked_stats(jnp.abs(delta), scorable)
    # k3 with r = pi_old / pi_sampler = exp(delta): kl_k3 takes (log pi, log ref) = (0, delta)
    kl_mean, _, kl_max = _masked_stats(kl_k3(jnp.zeros_like(delta), delta), scorable)
    ratio_mean, ratio_min, ratio_max = _masked_stats(unit_weights, unit_valid)
    capped_frac = _masked_stats(capped.astype(delta.dtype), unit_valid)[0]
    return {
        "sampling/sampling_logp_difference/mean": diff_mean,
        "sampling/sampling_logp_difference/max": diff_max,
        "sampling/mismatch_kl/mean": kl_mean,
        "sampling/mismatch_kl/max": kl_max,
        "sampling/importance_sampling_ratio/min": ratio_min,
        "sampling/importance_sampling_ratio/mean": ratio_mean,
        "sampling/importance_sampling_ratio/max": ratio_max,
        "sampling/importance_sampling_ratio/capped_frac": capped_frac,
    }


def truncated_importance_weights(
    trainer_logps: jax.Array,
    sampler_logps: jax.Array,
    mask: jax.Array,
    *,
    cap: float | jax.Array | None = 2.0,
    cap_min: float | jax.Array | None = None,
    level: str = "token",
    mode: str = "truncate",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Importance weights correcting the sampler/trainer mismatch (truncated IS, "TIS").

    A fast sampler (vLLM, or a differently compiled decode) does not reproduce the trainer's
    probabilities exactly, so completions come from :math:`\pi_{sampler}`, not from the
    trainer's :math:`\pi_{old}`. Per valid token, with :math:`\delta_t = \log\pi_{old}(y_t) -
    \log\pi_{sampler}(y_t)`:

    * ``level="token"``: :math:`\rho_t = \exp(\delta_t)`;
    * ``level="sequence"``: :math:`\rho = \exp(\sum_t \delta_t)`, one ratio per row,
      broadcast over its tokens;
    * ``mode="truncate"``: :math:`w = \mathrm{clip}(\rho, C_{min}, C_{max})` (truncated IS,
      Yao et al., 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
      Training");
    * ``mode="mask"``: :math:`w = \rho` if :math:`C_{min} \le \rho \le C_{max}`, else 0.

    with :math:`C_{max}` = ``cap`` and :math:`C_{min}` = ``cap_min`` (``None``: unbounded).
    Multiply the per-token policy loss by ``w`` before aggregating it.

    TRL 1.16 (``GRPOTrainer`` with ``vllm_importance_sampling_correction=True``): the four
    ``vllm_importance_sampling_mode`` values ``token_truncate``, ``token_mask``,
    ``sequence_truncate``, ``sequence_mask`` are ``(level, mode)`` here; the bounds are
    ``vllm_importance_sampling_clip_max`` (default 3.0) and ``..._clip_min`` (default None);
    TRL's default mode is ``sequence_mask``. ``trainer_logps`` there are the
    ``old_per_token_logps`` (the trainer's no-grad log-probs under the parameters that
    sampled), so the weights are constants for all epochs of the update, and the per-token
    loss is multiplied by them after the clipped surrogate. Tokens whose sampler log-prob is
    NaN (unavailable) get :math:`\delta = 0`, i.e. weight 1, and are left out of the
    log-prob difference and KL metrics, as in TRL. Padding gets :math:`\delta = 0` too.

    Args:
      trainer_logps: ``[B, T]`` trainer log-probs of the sampled tokens (gradient is stopped).
      sampler_logps: ``[B, T]`` the sampler's log-probs of the same tokens.
      mask: ``[B, T]`` completion mask, 1 at valid tokens.
      cap: :math:`C_{max} > 0` or ``None``; traced, sweepable.
      cap_min: :math:`C_{min} \ge 0` or ``None``.
      level: a key of :data:`IMPORTANCE_SAMPLING_LEVELS`.
      mode: a key of :data:`IMPORTANCE_SAMPLING_MODES`.

    Returns:
      ``(weights, metrics)``: ``weights`` ``[B, T]`` with the gradient stopped; ``metrics``
      with TRL's names ``sampling/sampling_logp_difference/{mean,max}`` (of
      :math:`|\delta_t|` over valid tokens) and ``sampling/importance_sampling_ratio/{min,mean,max}``
      (of the weights, over valid tokens, or valid rows at sequence level; TRL also counts
      rows with no valid token there), plus ``sampling/mismatch_kl/{mean,max}``, the k3
      estimate of :math:`KL(\pi_{sampler} \| \pi_{old})` per valid token, and
      ``sampling/importance_sampling_ratio/capped_frac``, the fraction of ratios (tokens or
      rows) outside :math:`[C_{min}, C_{max}]`. All metrics are 0 when no token is valid.
    """
    chex.assert_rank(trainer_logps, 2)
    chex.assert_equal_shape([trainer_logps, sampler_logps, mask])
    _check_importance_args(cap, cap_min, level, mode)
    dtype = jnp.promote_types(
        jnp.promote_types(trainer_logps.dtype, sampler_logps.dtype), jnp.float32
    )
    trainer = jax.lax.stop_gradient(trainer_logps).astype(dtype)
    sampler = jax.lax.stop_gradient(sampler_logps).astype(dtype)
    valid = mask.astype(bool)
    delta = trainer - sampler
    scorable = valid & ~jnp.isnan(delta)
    delta = jnp.where(scorable, delta, 0.0)

    unit_log_ratio, unit_valid = IMPORTANCE_SAMPLING_LEVELS[level](delta, valid)
    ratio = jnp.exp(unit_log_ratio)
    low = jnp.asarray(0.0 if cap_min is None else cap_min, dtype)
    high = jnp.asarray(jnp.inf if cap is None else cap, dtype)
    unit_weights = IMPORTANCE_SAMPLING_MODES[mode](ratio, low, high)
    weights = jax.lax.stop_gradient(jnp.broadcast_to(unit_weights, trainer.shape))
    capped = (ratio < low) | (ratio > high)
    return weights, _mismatch_metrics(delta, scorable, unit_weights, unit_valid, capped)
