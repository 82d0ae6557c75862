"""The shared-prompt layout (rljax.data.share_prompts) and its forward pass
(rljax.updates.lm.shared_prompt_sequence_logps): the layout is checked element by element against the
standard arrays, bad rows get errors naming them, and the log-probs, gradients, reference
log-probs, DPO updates and reward-model rewards and updates equal those of the standard layout
(independently: full logits in float64), with and without jit."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_gpt2, tiny_llama

from rljax import data
from rljax.logprobs import token_logprobs
from rljax.models.transformer import Transformer
from rljax.updates import (
    DPOConfig,
    RewardConfig,
    init_dpo_state,
    init_reward_state,
    lm,
    make_dpo_update,
    make_reward_update,
)

VOCAB = 48


def standard_arrays(seed, pairs=5, time=14):
    """Right-padded [prompt | completion | padding] rows, a prompt shared by each pair, lengths
    drawn at random (prompts 1-5 tokens, completions 1-8)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, 6, pairs)
    prompt_ids = rng.integers(1, VOCAB, (pairs, time))
    pos = np.arange(time)[None]
    out = {}
    for side in ("chosen", "rejected"):
        length = prompt + rng.integers(1, 9, pairs)
        mask = pos < length[:, None]
        ids = np.where(pos < prompt[:, None], prompt_ids, rng.integers(1, VOCAB, (pairs, time)))
        out[f"{side}_tokens"] = (ids * mask).astype(np.int32)
        out[f"{side}_mask"] = mask
        out[f"{side}_loss_mask"] = mask & (pos >= prompt[:, None])
    out["prompt_lengths"] = prompt.astype(np.int32)
    return out


def test_layout_element_by_element():
    arrays = standard_arrays(0)
    arrays["ref_chosen_logps"] = np.arange(5, dtype=np.float32)
    shared = data.share_prompts(arrays)
    assert set(shared) == {*data.SHARED_PROMPT_KEYS, "prompt_lengths", "ref_chosen_logps"}
    prompt = arrays["prompt_lengths"]
    p = int(prompt.max())
    assert shared["prompt_tokens"].shape == (5, p)
    for i in range(5):
        row = arrays["chosen_tokens"][i]
        np.testing.assert_array_equal(shared["prompt_tokens"][i, p - prompt[i] :], row[: prompt[i]])
        assert not shared["prompt_mask"][i, : p - prompt[i]].any()
        assert shared["prompt_mask"][i, p - prompt[i] :].all()
        for side in ("chosen", "rejected"):
            real = arrays[f"{side}_tokens"][i][arrays[f"{side}_loss_mask"][i]]
            n = len(real)
            np.testing.assert_array_equal(shared[f"{side}_completion_tokens"][i, :n], real)
            assert shared[f"{side}_completion_mask"][i, :n].all()
            assert not shared[f"{side}_completion_mask"][i, n:].any()
    np.testing.assert_array_equal(shared["prompt_lengths"], prompt)
    np.testing.assert_array_equal(shared["ref_chosen_logps"], arrays["ref_chosen_logps"])
    wide = data.share_prompts(arrays, prompt_length=9, completion_length=11)
    assert wide["prompt_tokens"].shape == (5, 9)
    assert wide["chosen_completion_tokens"].shape == (5, 11)


def _bad(arrays, match, **kwargs):
    with pytest.raises((ValueError, KeyError), match=match):
        data.share_prompts(arrays, **kwargs)


def test_bad_rows_are_named():
    arrays = standard_arrays(1)
    bad = {k: v.copy() for k, v in arrays.items()}
    bad["rejected_tokens"][3, 0] += 1  # a different prompt in pair 3
    _bad(bad, r"prompts of row\(s\) 3 differ")
    bad = {k: v.copy() for k, v in arrays.items()}
    bad["chosen_mask"][2, 0] = False  # a hole: not right padding
    _bad(bad, r"chosen_mask of row\(s\) 2 ")
    bad = {k: v.copy() for k, v in arrays.items()}
    bad["rejected_loss_mask"][1, 0] = True  # loss on the first prompt token
    _bad(bad, r"rejected_loss_mask of row\(s\) 1 ")
    bad = {k: v.copy() for k, v in arrays.items()}
    bad["chosen_loss_mask"][4] = False  # no completion
    _bad(bad, r"row\(s\) 4 have an empty chosen completion")
    longest = int(arrays["chosen_loss_mask"].sum(1).max())
    _bad(arrays, "completion_length=1 is shorter than row", completion_length=1)
    _bad(arrays, "prompt_length=0", prompt_length=0)
    assert longest > 1
    _bad({k: v for k, v in arrays.items() if k != "rejected_mask"}, "missing")
    _bad({**arrays, "extra": np.zeros((5, 2))}, "cannot carry 'extra'")
    with pytest.raises(KeyError, match="missing"):
        lm.shared_prompt_sequence_logps(None, None, {"prompt_tokens": np.zeros((2, 3))})


def tiny_config(family, **overrides):
    """The two-layer model of ``family`` (the llama with 2 key/value heads) over :data:`VOCAB`
    tokens, 32 positions, MLP width 48."""
    make = {"llama": tiny_llama, "gpt2": tiny_gpt2}[family]
    return make(vocab_size=VOCAB, intermediate_size=48, max_position_embeddings=32, **overrides)


@functools.cache
def model(family):
    config = tiny_config(family, dtype="float64", param_dtype="float64")
    return nnx.split(Transformer(config, rngs=nnx.Rngs(3)), nnx.Param)


def full_logits_reference(graphdef, params, arrays):
    """Independent: the full-logits log-probs of each standard row, summed over its loss mask."""
    net = nnx.merge(graphdef, params, copy=True)
    out = []
    for side in ("chosen", "rejected"):
        tokens, mask = arrays[f"{side}_tokens"], arrays[f"{side}_mask"]
        lp = token_logprobs(net(tokens, mask)[:, :-1], tokens[:, 1:])
        out.append(jnp.sum(jnp.where(arrays[f"{side}_loss_mask"][:, 1:], lp, 0.0), axis=-1))
    return out


WEIGHTS = np.random.default_rng(0).normal(size=(2, 5))


def weighted(out):
    return jnp.sum(jnp.asarray(WEIGHTS) * jnp.stack(out[:2]))


@functools.cache
def standard_reference(family):
    """Full-logits log-probs of the standard rows, and the gradient of a weighted sum of the
    standard layout's log-probs (both jitted, once per model family)."""
    graphdef, params = model(family)
    arrays = standard_arrays(2)
    want = jax.jit(lambda p: full_logits_reference(graphdef, p, arrays))(params)
    grad = jax.jit(
        jax.grad(
            lambda p: weighted(lm.concatenated_sequence_logps(graphdef, p, arrays, chunk_size=8))
        )
    )(params)
    return arrays, want, grad


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("jit", [False, True])
def test_logps_and_gradients_equal_the_standard_layout(family, jit):
    graphdef, params = model(family)
    arrays, want, grad_standard = standard_reference(family)
    shared = data.share_prompts(arrays, prompt_length=7)  # extra left padding too
    fn = lambda p, b: lm.pair_sequence_logps(graphdef, p, b, chunk_size=8)
    if jit:
        fn = jax.jit(fn)
    chosen, rejected, chosen_n, rejected_n = fn(params, shared)
    np.testing.assert_allclose(chosen, want[0], rtol=1e-6)
    np.testing.assert_allclose(rejected, want[1], rtol=1e-6)
    np.testing.assert_array_equal(chosen_n, arrays["chosen_loss_mask"].sum(1))
    np.testing.assert_array_equal(rejected_n, arrays["rejected_loss_mask"].sum(1))
    # Right-padded prompts (a layout of one's own) give the same log-probs.
    pads = (~shared["prompt_mask"]).sum(axis=1)
    right = dict(shared)
    for key in ("prompt_tokens", "prompt_mask"):
        right[key] = np.stack([np.roll(row, -n) for row, n in zip(shared[key], pads, strict=True)])
    assert right["prompt_mask"][:, 0].all() and not right["prompt_mask"][:, -1].any()
    np.testing.assert_allclose(fn(params, right)[0], want[0], rtol=1e-6)
    if not jit:
        return  # the gradient below is compiled; op by op it takes most of this file's time

    grad_shared = jax.jit(jax.grad(lambda p: weighted(fn(p, shared))))(params)
    # One scale for all leaves: some gradients are zero in exact arithmetic (a key bias under
    # softmax) and only rounding noise in both layouts.
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(grad_standard))
    leaves = jax.tree_util.tree_leaves_with_path(grad_shared)
    for (path, a), b in zip(leaves, jax.tree.leaves(grad_standard), strict=True):
        np.testing.assert_allclose(a / scale, b / scale, atol=1e-6, err_msg=str(path))


def test_reference_logps_and_dpo_update_equal_the_standard_layout():
    graphdef, params = model("llama")
    arrays = standard_arrays(4, pairs=6)
    shared = data.share_prompts(arrays)
    ref_standard = lm.reference_logps(graphdef, params, arrays, batch_size=4)
    ref_shared = lm.reference_logps(graphdef, params, shared, batch_size=4)
    for key in ref_standard:
        np.testing.assert_allclose(ref_shared[key], ref_standard[key], rtol=1e-6, err_msg=key)

    optimizer = optax.sgd(1e-2)  # linear in the gradient (Adam would magnify rounding noise)
    policy = jax.tree.map(lambda x: x * 1.01, params)  # differs from the reference
    for mode in ("model", "precomputed"):
        config = DPOConfig(beta=0.2, loss_type=("sigmoid", "ipo"), rpo_alpha=0.5, reference=mode)
        step = jax.jit(make_dpo_update(graphdef, optimizer, config))
        results = []
        for batch in (arrays, shared):
            batch = {**batch, **ref_standard} if mode == "precomputed" else batch
            state = init_dpo_state(policy, optimizer, params if mode == "model" else None)
            state, metrics = step(state, batch)
            state, metrics = step(state, batch)
            results.append((state.params, metrics))
        (params_a, metrics_a), (params_b, metrics_b) = results
        for key in metrics_a:
            np.testing.assert_allclose(
                metrics_b[key], metrics_a[key], rtol=1e-5, atol=1e-8, err_msg=f"{mode} {key}"
            )
        for a, b in zip(jax.tree.leaves(params_b), jax.tree.leaves(params_a), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_reward_update_equals_the_standard_layout():
    config = tiny_config("llama", num_kv_heads=None, head="reward", lm_head=False)  # no GQA
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(5)), nnx.Param)
    arrays = standard_arrays(6, pairs=6)
    arrays["margin"] = np.linspace(0.0, 1.0, 6).astype(np.float32)
    shared = data.share_prompts(arrays)
    # The shared forward reads the score at each completion's last token, as model.rewards does.
    net = nnx.merge(graphdef, params, copy=True)
    for side, index in (("chosen", 0), ("rejected", 1)):
        want = net.rewards(arrays[f"{side}_tokens"], arrays[f"{side}_mask"])
        got = lm.pair_rewards(graphdef, params, shared)[index]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=side)

    optimizer = optax.sgd(0.1)
    step = jax.jit(make_reward_update(graphdef, optimizer, RewardConfig(use_margin=True)))
    results = []
    for batch in (arrays, shared):
        state, metrics = step(init_reward_state(params, optimizer), batch)
        results.append((state.params, metrics))
    (params_a, metrics_a), (params_b, metrics_b) = results
    for key in metrics_a:
        np.testing.assert_allclose(
            metrics_b[key], metrics_a[key], rtol=1e-5, atol=1e-6, err_msg=key
        )
    for a, b in zip(jax.tree.leaves(params_b), jax.tree.leaves(params_a), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
