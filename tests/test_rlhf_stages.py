"""Exact tests of the RLHF loop's stages (:mod:`rljax.rl.rlhf`, :mod:`rljax.rlhf`), each
against a reference written here from the docstrings, in float64:

1. reward shaping (:func:`make_shaping_fn`): the missing-EOS penalty, the per-token KL penalty,
   group-relative advantages (critic none) or token GAE (with a critic), and the metrics;
2. the rollout (:func:`make_rollout_fn`): log-probs, entropies and values read from one full
   forward pass at the right columns (completion token ``j`` is predicted at column
   ``P - 1 + j``);
3. the TRPO update on a policy LM (:func:`rljax.updates.make_rlhf_trpo_update`): the dense natural
   step with the explicit Gauss-Newton Fisher, solved exactly with numpy.

Each stage also shows that its check fails for the bug it guards against (a KL term rewarded
instead of penalised, a one-column shift, a Fisher without subsampling or damping).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import np_log_softmax, one_layer_llama
from jax.flatten_util import ravel_pytree

from rljax import rlhf, updates
from rljax.models import generate
from rljax.models.transformer import Transformer, with_head
from rljax.rl.rlhf import PPORunConfig, TRPORunConfig, make_shaping_fn
from rljax.rl.rollout import make_rollout_fn

# float64 throughout: summation order alone moves results by ~1e-15 relative, so 1e-10 leaves
# five orders of magnitude for another CPU while any real change (a sign, a column) is O(1e-2+).
RTOL, ATOL = 1e-10, 1e-12

# ------------------------------------------------------------------------------ 1. shaping

GROUPS, K, N = 3, 4, 7  # prompts, samples per prompt, completion tokens
ROWS = GROUPS * K
KL_COEF = 0.375  # exact in float32, the KL controller's dtype
EOS_PENALTY = 1.5


def shaping_rollout(seed=0):
    """A rollout as :func:`make_rollout_fn` returns it: ragged prefix completion masks (rows
    cut at ``N`` without EOS, and rows that stopped at an EOS), per-token arrays 0 at padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, N + 1, ROWS)
    lengths[[0, 5]] = N
    cmask = np.arange(N)[None, :] < lengths[:, None]
    finished = lengths < N
    finished[5] = True  # EOS at the very last slot
    assert not finished[0] and len(set(lengths.tolist())) > 3
    zero = lambda x: np.where(cmask, x, 0.0)
    p = 3
    return {
        "tokens": rng.integers(0, 50, (ROWS, p + N)).astype(np.int32),
        "mask": np.concatenate([np.ones((ROWS, p), bool), cmask], axis=1),
        "completion_mask": cmask,
        "finished": finished,
        "old_logps": zero(rng.normal(-2.0, 1.0, (ROWS, N))),
        "ref_logps": zero(rng.normal(-2.0, 1.0, (ROWS, N))),
        "entropy": zero(rng.uniform(0.5, 3.0, (ROWS, N))),
        "old_values": zero(rng.normal(0.0, 1.0, (ROWS, N))),
    }, rng.normal(0.0, 1.0, ROWS)


def ref_kl(logps, ref_logps, estimator):
    """Schulman (2020): k1 = log pi - log ref, k2 = (log ref - log pi)^2 / 2, k3 = r - 1 - log r."""
    d = logps - ref_logps
    return {"k1": d, "k2": 0.5 * d * d, "k3": np.expm1(-d) + d}[estimator]


def ref_group_advantages(r, k, baseline, scale, eps=1e-4):
    """GRPO / RLOO over contiguous groups of ``k`` rows, from the definitions."""
    adv = np.zeros_like(r)
    for g in range(len(r) // k):
        rg = r[g * k : (g + 1) * k]
        for i in range(k):
            others = np.delete(rg, i)
            base = rg.mean() if baseline == "mean" else others.mean()
            adv[g * k + i] = rg[i] - base
        if scale == "std":
            std = np.sqrt(np.sum((rg - rg.mean()) ** 2) / (k - 1))  # ddof=1
            adv[g * k : (g + 1) * k] /= std + eps
    return adv


def ref_whiten_keep_mean(x, mask, eps=1e-8):
    """(x - mu) / sqrt(var + eps) + mu over valid positions (population variance), 0 at padding."""
    mu = x[mask].mean()
    var = np.mean((x[mask] - mu) ** 2)
    return np.where(mask, (x - mu) / np.sqrt(var + eps) + mu, 0.0)


def ref_token_gae(rewards, values, mask, gamma, lam):
    """GAE per row over its valid prefix; the value after the last valid token is 0."""
    adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        next_value = next_adv = 0.0
        for t in reversed(np.flatnonzero(mask[b])):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t], ret[b, t] = next_adv, next_adv + values[b, t]
    return adv, ret


def ref_shaping(rollout, scores, config, kl_sign=-1.0):
    """The shaping stage in numpy float64. ``kl_sign=+1`` is the planted bug (KL rewarded)."""
    cmask = rollout["completion_mask"]
    scores = np.array(scores, np.float64)
    if config.missing_eos_penalty is not None:
        scores[~rollout["finished"]] -= config.missing_eos_penalty
    kl = np.where(cmask, ref_kl(rollout["old_logps"], rollout["ref_logps"], config.kl_estimator), 0)
    seq_kl = kl.sum(axis=1)
    non_score = kl_sign * KL_COEF * seq_kl
    out = {"seq_kl": seq_kl}
    if config.critic == "none":
        adv = ref_group_advantages(
            scores + non_score, config.samples_per_prompt, config.baseline, config.scale
        )
        out["advantages"] = np.where(cmask, adv[:, None], 0.0)
    else:
        rewards = np.where(cmask, kl_sign * KL_COEF * kl, 0.0)
        for b in range(ROWS):
            rewards[b, np.flatnonzero(cmask[b])[-1]] += scores[b]
        if config.whiten_rewards:
            rewards = ref_whiten_keep_mean(rewards, cmask)
        out["advantages"], out["returns"] = ref_token_gae(
            rewards, rollout["old_values"], cmask, config.gamma, config.lam
        )
        out["old_values"] = rollout["old_values"]
    lengths = cmask.sum(axis=1)
    out["metrics"] = {
        "objective/kl": seq_kl.mean(),
        "objective/non_score_reward": non_score.mean(),
        "objective/rlhf_reward": (scores + non_score).mean(),
        "objective/scores": scores.mean(),
        "objective/entropy": -rollout["old_logps"].sum(axis=1).mean(),
        "objective/kl_coef": KL_COEF,
        "val/num_eos_tokens": rollout["finished"].sum(),
        "completion_length": lengths.mean(),
        "policy/token_entropy": rollout["entropy"][cmask].mean(),
    }
    return out


def check_shaping(got, want, rollout, config):
    batch, metrics, seq_kl = got
    for key in ("advantages", "returns", "old_values"):
        if key in want:
            np.testing.assert_allclose(batch[key], want[key], RTOL, ATOL, err_msg=key)
            assert batch[key].dtype == np.float64, key
    assert ("returns" in batch) == (config.critic != "none")
    for key in ("tokens", "mask", "completion_mask", "old_logps"):
        np.testing.assert_array_equal(batch[key], rollout[key], err_msg=key)
    np.testing.assert_allclose(seq_kl, want["seq_kl"], RTOL, ATOL, err_msg="seq_kl")
    assert set(want["metrics"]) <= set(metrics)
    for name, value in want["metrics"].items():
        np.testing.assert_allclose(metrics[name], value, RTOL, ATOL, err_msg=name)


def shaping_config(critic, **overrides):
    settings = dict(
        critic=critic,
        batch_size=GROUPS,
        samples_per_prompt=K,
        kl_coef=KL_COEF,
        missing_eos_penalty=EOS_PENALTY,
    )
    if critic == "none":  # group advantages are used as they are (not whitened again)
        settings["ppo"] = dataclasses.replace(PPORunConfig.ppo, normalize_advantages=False)
    return PPORunConfig(**{**settings, **overrides})


SHAPING_CASES = {
    "grpo": shaping_config("none"),
    "rloo": shaping_config("none", baseline="leave_one_out", scale="none"),
    "loo_std_k3_no_eos_penalty": shaping_config(
        "none", baseline="leave_one_out", kl_estimator="k3", missing_eos_penalty=None
    ),
    "head_gae": shaping_config("head", gamma=0.9, lam=0.8),
    "separate_whitened_k2": shaping_config(
        "separate", gamma=1.0, lam=0.95, kl_estimator="k2", whiten_rewards=True
    ),
}


def run_shaping(config, rollout, scores):
    shape = make_shaping_fn(config)
    kl_coef = config.kl_controller().init()  # float32, as in rl.rlhf.run
    return jax.device_get(shape(rollout, jnp.asarray(scores), kl_coef))


@pytest.mark.parametrize("case", list(SHAPING_CASES))
def test_shaping_matches_numpy_reference(case):
    config = SHAPING_CASES[case]
    rollout, scores = shaping_rollout()
    got = run_shaping(config, rollout, scores)
    check_shaping(got, ref_shaping(rollout, scores, config), rollout, config)
    if case == "grpo":
        assert PPORunConfig().kl_estimator == "k1"  # the default: kl_t = log pi - log ref
        assert not config.ppo.normalize_advantages  # group advantages kept as is
    # The check catches KL rewarded instead of penalised.
    with pytest.raises(AssertionError, match="advantages"):
        check_shaping(got, ref_shaping(rollout, scores, config, kl_sign=1.0), rollout, config)


def test_shaping_check_fails_for_planted_kl_sign_flip(monkeypatch):
    """Plant the bug for real (critic none): the sequence KL enters the rewards with a + sign.
    ``make_shaping_fn`` reads ``rlhf.sequence_kl`` when it traces, so the patch reaches it."""
    config = SHAPING_CASES["grpo"]
    rollout, scores = shaping_rollout()
    want = ref_shaping(rollout, scores, config)
    original = rlhf.sequence_kl
    monkeypatch.setattr(rlhf, "sequence_kl", lambda kl, mask: -original(kl, mask))
    with pytest.raises(AssertionError, match="advantages"):
        check_shaping(run_shaping(config, rollout, scores), want, rollout, config)


# ------------------------------------------------------------------------------ tiny models

V = 8  # vocabulary
EOS, PAD = 1, 0
TINY = one_layer_llama(
    V, hidden_size=8, intermediate_size=8, param_dtype="float64", dtype="float64"
)


def random_model(build, seed):
    """``nnx.split`` of ``build()`` with random float64 parameters drawn in numpy (no model is
    initialised, so nothing compiles): norm scales 1 + N(0, 0.2^2), the rest N(0, 0.5^2). The
    0.02 initialisation would give near-uniform next-token distributions, in which a misread
    column hides."""
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        is_norm = any("norm" in str(getattr(k, "key", "")) for k in path)
        return (1.0 if is_norm else 0.0) + (0.2 if is_norm else 0.5) * rng.normal(size=leaf.shape)

    return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


@functools.cache
def tiny_models():
    """``{name: (graphdef, params)}``: a base LM, a reference, a policy with a value head
    (:func:`with_head`) and a separate critic, all float64."""
    base = lambda: Transformer(TINY, rngs=nnx.Rngs(0))
    policy_with_head = lambda: with_head(base(), "value", rngs=nnx.Rngs(1), lm_head=True)
    critic = lambda: with_head(base(), "value", rngs=nnx.Rngs(2))
    return {
        "base": random_model(base, 10),
        "ref": random_model(base, 11),
        "head": random_model(policy_with_head, 12),
        "critic": random_model(critic, 13),
    }


@functools.cache
def full_forward(graphdef):
    """Jitted ``(params, tokens, mask) -> (logits [B, T, V], values [B, T] or None)``: the plain
    forward ``model(tokens, mask)`` and ``model.decode`` + ``model.scores``."""

    @jax.jit
    def forward(params, tokens, mask):
        model = nnx.merge(graphdef, params)
        logits = model(tokens, mask) if model.config.lm_head else None
        values = None
        if model.config.head is not None:
            values = model.scores(model.decode(tokens, mask)[0])
        return logits, values

    return forward


def left_padded_prompts(lengths, width, seed):
    rng = np.random.default_rng(seed)
    mask = np.arange(width)[None, :] >= (width - np.asarray(lengths))[:, None]
    tokens = np.where(mask, rng.integers(2, V, (len(lengths), width)), PAD).astype(np.int32)
    return tokens, mask


# ------------------------------------------------------------------------------ 2. rollout

P, NEW = 5, 6
PROMPT_LENGTHS = [5, 1, 3, 2, 4, 5, 1, 3]
SAMPLING = generate.SamplingConfig(
    max_new_tokens=NEW, temperature=1.0, eos_token_id=EOS, pad_token_id=PAD
)


@functools.cache
def rollout_fn(critic, sampler="engine", slots=None):
    models = tiny_models()
    policy = models["head"] if critic == "head" else models["base"]
    value_graphdef = models["critic"][0] if critic == "separate" else None
    return make_rollout_fn(
        policy[0], SAMPLING, ref_graphdef=models["ref"][0], critic=critic,
        value_graphdef=value_graphdef, chunk_size=4,  # several chunks, the last one partial
        sampler=sampler, slots=slots,
    )  # fmt: skip


def ref_completion_outputs(graphdef, params, tokens, mask, cmask, offset=0):
    """Per-token arrays ``[B, NEW]`` of completion token ``j``, read at column
    ``P - 1 + j + offset`` of a full forward (``offset=0`` is right; +-1 is the bug)."""
    logits, values = jax.device_get(full_forward(graphdef)(params, tokens, mask))
    cols = P - 1 + np.arange(NEW) + offset
    rows = np.arange(tokens.shape[0])[:, None]
    out = {}
    if logits is not None:
        logp_all = np_log_softmax(logits)[:, cols]  # [B, NEW, V]
        targets = tokens[:, P:]
        out["logps"] = np.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
        out["entropy"] = -np.sum(np.exp(logp_all) * logp_all, axis=-1)
    if values is not None:
        out["values"] = np.asarray(values)[rows, cols]
    return {k: np.where(cmask, v, 0.0) for k, v in out.items()}


def rollout_references(critic, out, offset=0):
    models = tiny_models()
    tokens, mask, cmask = out["tokens"], out["mask"], out["completion_mask"]
    policy = models["head"] if critic == "head" else models["base"]
    pol = ref_completion_outputs(*policy, tokens, mask, cmask, offset)
    ref = ref_completion_outputs(*models["ref"], tokens, mask, cmask, offset)
    want = {"old_logps": pol["logps"], "entropy": pol["entropy"], "ref_logps": ref["logps"]}
    if critic == "head":
        want["old_values"] = pol["values"]
    elif critic == "separate":
        critic_out = ref_completion_outputs(*models["critic"], tokens, mask, cmask, offset)
        want["old_values"] = critic_out["values"]
    return want


@pytest.mark.parametrize(
    "critic, sampler, slots",
    [
        ("head", "engine", None),  # every row in a slot
        ("separate", "engine", 3),  # 8 rows through 3 slots: refilled as rows finish
        ("none", "static", None),  # lockstep decoding, fused with the scoring
    ],
)
def test_rollout_outputs_match_full_forward(critic, sampler, slots):
    models = tiny_models()
    prompt_tokens, prompt_mask = left_padded_prompts(PROMPT_LENGTHS, P, seed=1)
    policy_params = models["head" if critic == "head" else "base"][1]
    value_params = models["critic"][1] if critic == "separate" else None
    out = rollout_fn(critic, sampler, slots)(
        policy_params, models["ref"][1], value_params, prompt_tokens, prompt_mask,
        jax.random.key(3), 1.0,
    )  # fmt: skip
    out = jax.device_get(out)

    # The layout: prompt as given, then a ragged completion (prefix mask up to the first EOS).
    cmask, lengths = out["completion_mask"], out["completion_mask"].sum(axis=1)
    np.testing.assert_array_equal(out["tokens"][:, :P], prompt_tokens)
    np.testing.assert_array_equal(out["mask"], np.concatenate([prompt_mask, cmask], axis=1))
    np.testing.assert_array_equal(cmask, np.arange(NEW)[None, :] < lengths[:, None])
    completion = out["tokens"][:, P:]
    ends_with_eos = completion[np.arange(len(lengths)), lengths - 1] == EOS
    np.testing.assert_array_equal(out["finished"], ends_with_eos)
    assert np.all(completion[~cmask] == PAD)
    # Precondition: ragged rows, some cut at NEW without EOS, some stopped early.
    assert 0 < out["finished"].sum() < len(lengths) and len(set(lengths.tolist())) >= 3

    want = rollout_references(critic, out)
    assert set(want) <= set(out) and ("old_values" in out) == (critic != "none")
    for key, value in want.items():
        assert out[key].dtype == np.float64, key
        np.testing.assert_allclose(out[key], value, RTOL, ATOL, err_msg=key)
    # The sampler's own log-probs (KV-cache decode, temperature 1) are the trainer's up to the
    # sampler's float32 log-softmax (~2e-7 seen with this float64 model), so the
    # sampler/trainer mismatch starts near 0; a wrong column or temperature is O(1e-1).
    np.testing.assert_allclose(out["sampler_logps"], want["old_logps"], rtol=1e-5, atol=1e-5)

    # A reader one column off (either way) fails every per-token check.
    for offset in (-1, 1):
        shifted = rollout_references(critic, out, offset)
        for key, value in shifted.items():
            with pytest.raises(AssertionError):
                np.testing.assert_allclose(out[key], value, RTOL, ATOL, err_msg=key)


def test_rollout_fn_checks_its_critic_arguments():
    graphdef = tiny_models()["base"][0]
    with pytest.raises(ValueError, match="critic must be one of"):
        make_rollout_fn(graphdef, SAMPLING, critic="both")
    with pytest.raises(ValueError, match="pass value_graphdef exactly when critic='separate'"):
        make_rollout_fn(graphdef, SAMPLING, critic="separate")
    with pytest.raises(ValueError, match="pass value_graphdef exactly when critic='separate'"):
        make_rollout_fn(graphdef, SAMPLING, critic="none", value_graphdef=graphdef)
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_rollout_fn(graphdef, SAMPLING, sampler="vllm")
    for kwargs in (dict(sampler="static", slots=4), dict(slots=0), dict(slots=2.0)):
        with pytest.raises(ValueError, match="needs sampler='engine' and an int >= 1"):
            make_rollout_fn(graphdef, SAMPLING, **kwargs)


def test_engine_and_static_rollouts_agree_on_greedy_groups():
    """Greedy (temperature 0, one compiled sampler for both temperatures) groups of 2 from both
    samplers: the same completions and the same per-token outputs; the engine, 3 slots for 16
    rows, prefilled each prompt once and compiled nothing on a second call."""
    models = tiny_models()
    tokens, mask = left_padded_prompts(PROMPT_LENGTHS, P, seed=2)
    args = (models["head"][1], models["ref"][1], None, tokens, mask, jax.random.key(4), 0.0)
    static = jax.device_get(rollout_fn("head", "static")(*args, group_size=2))
    engine = rollout_fn("head", "engine", 3)
    for _ in range(2):
        out = jax.device_get(engine(*args, group_size=2))
    assert set(out) == set(static)
    for key in static:
        np.testing.assert_allclose(out[key], static[key], rtol=1e-6, atol=1e-7, err_msg=key)
    (only,) = engine.engines.values()
    assert only.stats.prefills == len(PROMPT_LENGTHS) and only.stats.requests == 16
    assert only.traces["decode"] == 1 and engine.score._cache_size() == 1


# ------------------------------------------------------------------------------ 3. TRPO step

TRPO_PROMPTS, TRPO_K = 3, 2  # rows = 6
TRPO_ROWS = TRPO_PROMPTS * TRPO_K
MAX_KL = 1e-4
DAMPING = 0.1
SUBSAMPLE = 2


def trpo_batch(seed=7):
    """A critic-free batch: left-padded prompts, ragged completions, per-row (group) advantages
    broadcast over valid tokens; and noise to put the old log-probs a little off the policy."""
    rng = np.random.default_rng(seed)
    prompt_tokens, prompt_mask = left_padded_prompts([5, 2, 4, 1, 3, 5], P, seed)
    lengths = np.array([NEW, 2, 5, NEW, 1, 4])
    cmask = np.arange(NEW)[None, :] < lengths[:, None]
    completion = np.where(cmask, rng.integers(0, V, (TRPO_ROWS, NEW)), PAD).astype(np.int32)
    advantages = rng.normal(size=TRPO_ROWS)
    return {
        "tokens": np.concatenate([prompt_tokens, completion], axis=1),
        "mask": np.concatenate([prompt_mask, cmask], axis=1),
        "completion_mask": cmask,
        "advantages": np.where(cmask, advantages[:, None], 0.0),
    }, rng.normal(0.0, 0.05, (TRPO_ROWS, NEW))


def dense_fisher(jac, probs, weights):
    """sum_pos w_pos J_pos^T (diag(p) - p p^T) J_pos with ``jac`` [B, N, V, D]."""
    out_fisher = probs[..., :, None] * (np.eye(V) - probs[..., None, :])  # diag(p) - p p^T
    fisher_jac = np.einsum("bnvw,bnwd->bnvd", weights[..., None, None] * out_fisher, jac)
    return jac.reshape(-1, jac.shape[-1]).T @ fisher_jac.reshape(-1, jac.shape[-1])


def mean_categorical_kl(old_logits, new_logits, mask):
    lp, lq = np_log_softmax(old_logits), np_log_softmax(new_logits)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    return np.sum(kl * mask) / mask.sum()


@functools.cache
def dense_trpo_reference():
    """The TRPO step of Schulman et al. (2015), App. C, with dense matrices: the surrogate
    gradient g, the Gauss-Newton Fisher F on every SUBSAMPLE-th row (mean over that subset's
    valid tokens), x = (F + damping I)^-1 g, step = sqrt(2 max_kl / x^T (F + damping I) x) x."""
    graphdef, params = tiny_models()["base"]
    batch, noise = trpo_batch()
    flat0, unravel = ravel_pytree(params)
    forward = full_forward(graphdef)
    tokens, mask = batch["tokens"], batch["mask"]

    def logits_fn(flat):
        return forward(unravel(flat), tokens, mask)[0][:, P - 1 : P + NEW - 1]

    logits = np.asarray(logits_fn(flat0))
    jac = np.asarray(jax.jacfwd(logits_fn)(flat0))  # [B, N, V, D]
    logp_all = np_log_softmax(logits)
    probs = np.exp(logp_all)
    actions = tokens[:, P:]
    logps = np.take_along_axis(logp_all, actions[..., None], axis=-1)[..., 0]
    m = batch["completion_mask"].astype(np.float64)
    batch["old_logps"] = np.where(m > 0, logps + noise, 0.0)

    ratio = np.exp(logps - batch["old_logps"])
    adv = batch["advantages"]
    surrogate = np.sum(m * ratio * adv) / m.sum()
    # d(ratio A)/dz = ratio A (onehot(a) - p): the log-prob's gradient in the logits.
    coef = m * ratio * adv / m.sum()
    grad = np.einsum("bn,bnv,bnvd->d", coef, np.eye(V)[actions] - probs, jac)

    rows = slice(None, None, SUBSAMPLE)
    weights = m[rows] / max(m[rows].sum(), 1.0)
    fisher = dense_fisher(jac[rows], probs[rows], weights)
    damped = fisher + DAMPING * np.eye(flat0.size)
    direction = np.linalg.solve(damped, grad)
    curvature = direction @ damped @ direction
    step_size = np.sqrt(2 * MAX_KL / curvature)
    step = step_size * direction
    new_logits = np.asarray(logits_fn(flat0 + step))
    return {
        "batch": batch,
        "flat0": np.asarray(flat0),
        "grad": grad,
        "surrogate": surrogate,
        "step": step,
        "step_size": step_size,
        "kl": mean_categorical_kl(logits, new_logits, m),
        "full_fisher": dense_fisher(jac, probs, m / m.sum()),
        "fisher": fisher,
    }


def test_trpo_update_is_the_dense_natural_step():
    graphdef, params = tiny_models()["base"]
    ref = dense_trpo_reference()
    n_params = ref["flat0"].size
    assert 100 < n_params < 1000
    run_config = TRPORunConfig(
        critic="none",
        batch_size=TRPO_PROMPTS,
        samples_per_prompt=TRPO_K,
        trpo=updates.TRPOConfig(
            max_kl=MAX_KL,
            cg_iters=n_params,
            cg_damping=DAMPING,
            fvp_subsample=SUBSAMPLE,
            normalize_advantages=False,
        ),
    )
    config = run_config.trpo
    assert config.fvp_method == "gauss_newton" and not config.normalize_advantages
    # Run CG to convergence: stop at |r| <= 1e-10 |g| (the default 1e-10 on |r|^2 is absolute).
    config = dataclasses.replace(config, cg_tol=float(1e-20 * ref["grad"] @ ref["grad"]))
    value_optimizer = optax.adam(1e-3)
    update = jax.jit(updates.make_rlhf_trpo_update(graphdef, value_optimizer, config))
    state = updates.init_trpo_state(params, {}, value_optimizer, jax.random.key(0))
    new_state, metrics = update(state, ref["batch"])
    metrics = jax.device_get(metrics)

    # Exact (no CG involved): the surrogate at the old policy and its gradient.
    np.testing.assert_allclose(metrics["surrogate_before"], ref["surrogate"], RTOL, ATOL)
    np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(ref["grad"]), RTOL)
    # The full step is accepted at once (small max_kl: the quadratic KL model holds).
    assert bool(metrics["accepted"])
    assert float(metrics["step_fraction"]) == 1.0 and int(metrics["line_search_steps"]) == 1
    assert metrics["improvement"] > 0
    assert 0 < int(metrics["cg_iterations"]) < n_params  # converged before the cap
    # CG stopped at |r| <= 1e-10 |g| on a system with condition number
    # (lambda_max + damping) / damping ~ 1e2 here, so its x is within ~1e-8 of the exact solve
    # (observed: ~1e-12); 1e-6 leaves room for rounding in other summation orders and another
    # CPU's iteration count, and is still 1e3 below the alternatives checked last.
    cg_rtol = 1e-6
    np.testing.assert_allclose(metrics["step_size"], ref["step_size"], rtol=cg_rtol)
    np.testing.assert_allclose(metrics["kl"], ref["kl"], rtol=cg_rtol)
    delta = np.asarray(ravel_pytree(new_state.params["policy"])[0]) - ref["flat0"]
    step = ref["step"]
    assert np.linalg.norm(delta - step) <= cg_rtol * np.linalg.norm(step)
    assert int(new_state.step) == 1

    # The check tells the definition apart: the Fisher on all rows, or without damping, or the
    # plain gradient scaled to the same radius would each give another step.
    grad = ref["grad"]
    for name, matrix in (
        ("all rows", ref["full_fisher"] + DAMPING * np.eye(n_params)),
        ("no damping", ref["fisher"] + 1e-9 * np.eye(n_params)),
        ("identity", np.eye(n_params)),
    ):
        x = np.linalg.solve(matrix, grad)
        other = np.sqrt(2 * MAX_KL / (x @ matrix @ x)) * x
        assert np.linalg.norm(delta - other) > 1e3 * cg_rtol * np.linalg.norm(step), name
