"""Supervised fine-tuning: :func:`rljax.sft.sft_loss` against a numpy float64 loop, packing
(:func:`rljax.data.pack`), the transformer's segment ids (a packed row's log-probs equal each
sequence run alone) and the update step (:func:`rljax.updates.make_sft_update`): a gradient
step on an independent loss, and the same on 8 simulated devices as on one."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import TRANSFORMS, load_experiment, np_log_softmax, tiny_gpt2, tiny_llama

from rljax import cli, runs, sharding
from rljax.data import pack, pack_arrays
from rljax.models import hf
from rljax.models.transformer import Transformer, positions_from_segments
from rljax.sft import sft_loss
from rljax.tasks import arithmetic
from rljax.updates import (
    SFTConfig,
    SFTState,
    init_sft_state,
    make_sft_eval,
    make_sft_update,
    sft_token_logps,
)
from rljax.updates.lm import compile_update

VOCAB = 64


# ----------------------------------------------------------------------------- the objective


def np_sft(logps, mask, normalize, segment_ids=None):
    """The loss written as loops in float64: a sequence is a row, or a (row, segment)."""
    logps, mask = np.asarray(logps, np.float64), np.asarray(mask, bool)
    if normalize == "tokens":
        return -logps[mask].sum() / max(mask.sum(), 1)
    means = []
    for b in range(logps.shape[0]):
        ids = np.zeros(logps.shape[1], int) if segment_ids is None else segment_ids[b]
        for s in np.unique(ids):
            keep = mask[b] & (ids == s)
            if keep.any():
                means.append(-logps[b][keep].mean())
    return np.mean(means) if means else 0.0


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("normalize", ["tokens", "sequences"])
@pytest.mark.parametrize("segmented", [False, True])
def test_sft_loss_matches_numpy(transform, normalize, segmented):
    rng = np.random.default_rng(0)
    logps = -rng.exponential(1.0, (3, 9))
    mask = rng.uniform(size=(3, 9)) < 0.7
    mask[2] = False  # a row with nothing counted
    segment_ids = np.sort(rng.integers(0, 4, (3, 9)), axis=1) if segmented else None
    correct = rng.uniform(size=(3, 9)) < 0.5
    entropy = rng.uniform(0, 3, (3, 9))
    logps_nan = np.where(mask, logps, np.nan)  # masked entries must not leak

    def fn(lp, m, c, e, s):
        return sft_loss(lp, m, normalize=normalize, segment_ids=s, correct=c, entropy=e)

    loss, metrics = transform(fn)(logps_nan, mask, correct, entropy, segment_ids)
    np.testing.assert_allclose(loss, np_sft(logps, mask, normalize, segment_ids), rtol=1e-12)
    np.testing.assert_allclose(metrics["num_tokens"], mask.sum())
    np.testing.assert_allclose(metrics["nll_sum"], -logps[mask].sum(), rtol=1e-12)
    np.testing.assert_allclose(metrics["mean_token_accuracy"], correct[mask].mean(), rtol=1e-12)
    np.testing.assert_allclose(metrics["entropy"], entropy[mask].mean(), rtol=1e-12)
    grads = jax.grad(lambda lp: fn(lp, mask, None, None, segment_ids)[0])(logps_nan)
    assert np.all(np.isfinite(grads)) and np.all(grads[~mask] == 0)


def test_sft_loss_num_items_and_errors():
    logps, mask = -np.ones((2, 3)), np.ones((2, 3))
    loss, _ = sft_loss(logps, mask, num_items=12.0)
    np.testing.assert_allclose(loss, 0.5)
    with pytest.raises(ValueError, match="normalize"):
        sft_loss(logps, mask, normalize="rows")


# ----------------------------------------------------------------------------- packing


def sequences_of(seed, n, low=2, high=9):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, VOCAB, rng.integers(low, high)).astype(np.int32) for _ in range(n)]
    # a prompt of 1-2 tokens (not counted), then the completion
    masks = [np.arange(len(s)) >= min(2, len(s) - 1) for s in seqs]
    return seqs, masks


@pytest.mark.parametrize("strategy", ["bfd", "greedy"])
def test_pack_places_every_sequence_once(strategy):
    seqs, masks = sequences_of(0, 13)
    arrays, report = pack(seqs, 16, loss_masks=masks, strategy=strategy)
    found = []
    for r in range(arrays["tokens"].shape[0]):
        seg = arrays["segment_ids"][r]
        n = int((seg > 0).sum())  # segments 1, 2, ... side by side, padding at the end
        assert (seg[:n] > 0).all() and np.all(np.diff(seg[:n]) >= 0) and seg[0] == 1
        for s in np.unique(seg[seg > 0]):
            span = seg == s
            found.append(arrays["tokens"][r][span])
            np.testing.assert_array_equal(arrays["positions"][r][span], np.arange(span.sum()))
            loss = arrays["loss_mask"][r][span]
            assert not loss[0]
            (i,) = [i for i, q in enumerate(seqs) if np.array_equal(q, arrays["tokens"][r][span])]
            np.testing.assert_array_equal(loss[1:], masks[i][1:])
        assert not arrays["loss_mask"][r][seg == 0].any()
    assert sorted(map(tuple, found)) == sorted(map(tuple, seqs))
    np.testing.assert_array_equal(arrays["mask"], arrays["segment_ids"] > 0)
    assert report.packed == report.sequences == 13 and report.rows == arrays["tokens"].shape[0]
    assert report.tokens == sum(map(len, seqs)) and report.truncated == report.dropped == 0
    if strategy == "greedy":  # keeps the order
        assert [tuple(f) for f in found] == [tuple(s) for s in seqs]
    else:
        assert report.rows == -(-sum(map(len, seqs)) // 16) or report.efficiency > 0.8


def test_bfd_fills_rows_best_fit():
    arrays, report = pack([[1] * 5, [2] * 4, [3] * 3, [4] * 3, [5] * 1], 8)
    # longest first: 5 -> row 0 (3 left), 4 -> row 1 (4 left), 3 -> row 0 (best fit, 0 left),
    # 3 -> row 1 (1 left), 1 -> row 1 (0 left)
    np.testing.assert_array_equal(arrays["tokens"][0], [1] * 5 + [3] * 3)
    np.testing.assert_array_equal(arrays["tokens"][1], [2] * 4 + [4] * 3 + [5])
    assert report.rows == 2 and report.efficiency == 1.0


def test_overlong_sequences_are_counted():
    seqs = [[1] * 3, [2] * 10, [3] * 12]
    arrays, report = pack(seqs, 8, overflow="truncate")
    assert arrays["tokens"].shape == (3, 8)
    assert report.truncated == 2 and report.truncated_sequences == [1, 2]
    assert report.truncated_tokens == 6 and report.packed == 3
    assert "truncated 2" in report.summary()
    _, report = pack(seqs, 8, overflow="drop")
    assert report.dropped == 2 and report.dropped_sequences == [1, 2] and report.packed == 1
    with pytest.raises(ValueError, match="sequence 1 has 10 tokens > max_length 8"):
        pack(seqs, 8, overflow="error")


def test_pack_arrays_strips_padding():
    tokens = np.array([[0, 5, 6, 7], [8, 9, 0, 0]])
    mask = tokens > 0
    loss = np.array([[0, 0, 1, 1], [0, 1, 0, 0]], bool)
    arrays, _ = pack_arrays({"tokens": tokens, "mask": mask, "loss_mask": loss}, 8)
    np.testing.assert_array_equal(arrays["tokens"], [[5, 6, 7, 8, 9, 0, 0, 0]])
    np.testing.assert_array_equal(arrays["segment_ids"], [[1, 1, 1, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(arrays["loss_mask"], [[0, 1, 1, 0, 1, 0, 0, 0]])


def test_positions_from_segments():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(
        positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6]]
    )


# ----------------------------------------------------------------------------- the model


def model_of(config_fn, seed=0, dtype="float64"):
    return Transformer(config_fn(param_dtype=dtype, dtype=dtype), rngs=nnx.Rngs(seed))


def alone_logps(model, seq):
    """Per-token log-probs of one sequence run alone, from the full logits ([len - 1])."""
    logits = np.asarray(model(jnp.asarray(seq)[None]), np.float64)[0]
    return np_log_softmax(logits[:-1])[np.arange(len(seq) - 1), seq[1:]]


@pytest.mark.parametrize("config_fn", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_packed_row_equals_each_sequence_alone(config_fn):
    # float64 only: equality to 1e-10 proves the masking; a float32 copy (16 s) added nothing.
    model = model_of(config_fn, dtype="float64")
    seqs, _ = sequences_of(1, 7)
    arrays, _ = pack(seqs, 20)
    logits = model(jnp.asarray(arrays["tokens"]), segment_ids=jnp.asarray(arrays["segment_ids"]))
    logps = np_log_softmax(np.asarray(logits, np.float64))
    tol = dict(rtol=1e-10, atol=1e-12)
    checked = 0
    for r in range(arrays["tokens"].shape[0]):
        seg = arrays["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            (where,) = np.nonzero(seg == s)
            seq = arrays["tokens"][r][where]
            packed = logps[r, where[:-1], seq[1:]]
            np.testing.assert_allclose(packed, alone_logps(model, seq), **tol)
            checked += 1
    assert checked == 7


def test_default_path_ignores_segments_when_none():
    model = model_of(tiny_llama)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 6)))
    one = jnp.ones((2, 6), jnp.int32)
    np.testing.assert_allclose(model(tokens, segment_ids=one), model(tokens), rtol=1e-12)
    with pytest.raises(ValueError, match="KV cache"):
        model.decode(tokens, segment_ids=one, cache=model.init_cache(2, 8))


def padded_batch(seqs, masks, length):
    n = len(seqs)
    batch = {k: np.zeros((n, length), np.int32) for k in ("tokens", "mask", "loss_mask")}
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        batch["tokens"][i, : len(s)] = s
        batch["mask"][i, : len(s)] = 1
        batch["loss_mask"][i, : len(s)] = m
    return batch


@pytest.mark.parametrize("normalize", ["tokens", "sequences"])
@pytest.mark.parametrize("config_fn", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_packed_loss_equals_unpacked_loss(normalize, config_fn):
    graphdef, params = nnx.split(model_of(config_fn))
    seqs, masks = sequences_of(2, 9)
    config = SFTConfig(normalize=normalize)
    evaluate = make_sft_eval(graphdef, config)
    state = SFTState(params, None, jnp.zeros((), jnp.int32))
    packed, _ = pack(seqs, 24, loss_masks=masks)
    unpacked = evaluate(state, padded_batch(seqs, masks, 8))
    got = evaluate(state, packed)
    for key in ("loss", "nll_sum", "num_tokens", "num_sequences", "mean_token_accuracy"):
        np.testing.assert_allclose(got[key], unpacked[key], rtol=1e-10, err_msg=key)
    assert packed["tokens"].size < 9 * 8


# ----------------------------------------------------------------------------- the update


def independent_loss(graphdef, params, seqs, masks):
    """Token-mean NLL of the completions, each sequence run alone through ``model(...)``."""
    model = nnx.merge(graphdef, params, copy=True)
    total, count = 0.0, 0.0
    for seq, m in zip(seqs, masks, strict=True):
        logits = model(jnp.asarray(seq)[None])[0, :-1]
        logp = jax.nn.log_softmax(logits)[jnp.arange(len(seq) - 1), seq[1:]]
        total = total - jnp.sum(jnp.where(m[1:], logp, 0.0))
        count = count + m[1:].sum()
    return total / count


@pytest.mark.parametrize("config_fn", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_update_is_a_gradient_step_on_the_independent_loss(config_fn):
    graphdef, params = nnx.split(model_of(config_fn))
    seqs, masks = sequences_of(3, 6)
    batch, _ = pack(seqs, 16, loss_masks=masks)
    # the reference runs each sequence alone, compiled as one program (eager: 16 s a case)
    reference = jax.jit(jax.value_and_grad(independent_loss, argnums=1), static_argnums=0)
    loss, grads = reference(graphdef, params, seqs, masks)
    optimizer = optax.sgd(1.0)
    state = init_sft_state(params, optimizer)
    new_state, metrics = jax.jit(make_sft_update(graphdef, optimizer))(state, batch)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-10)
    update_grads = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
    # the key bias's gradient is 0 up to rounding (softmax ignores a shift of every logit):
    # the absolute floor is relative to the largest gradient entry of any parameter
    scale = max(float(np.max(np.abs(e))) for e in jax.tree.leaves(grads))
    for g, e in zip(jax.tree.leaves(update_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-10 * scale)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-10)
    assert int(new_state.step) == 1 and int(metrics["nonfinite"]) == 0


def test_sharded_steps_equal_one_device():
    graphdef, params = nnx.split(model_of(tiny_llama, dtype="float32"))
    seqs, masks = sequences_of(4, 30)
    batch, _ = pack(seqs, 16, loss_masks=masks, strategy="greedy")
    batch = {k: v[:8] for k, v in batch.items()}
    assert batch["tokens"].shape[0] == 8
    # SGD, not Adam: Adam's 1/sqrt(v) turns a rounding-level difference in a near-zero
    # gradient (the key bias's) into a visible one in the parameters
    optimizer = optax.sgd(0.5)
    update = make_sft_update(graphdef, optimizer, SFTConfig(entropy=True))
    state = init_sft_state(params, optimizer)
    step = jax.jit(update)
    history = []
    for _ in range(2):
        state, metrics = step(state, batch)
        history.append(metrics)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    placed, sharded_step, batch_shardings = compile_update(
        update, init_sft_state(params, optimizer), batch, mesh
    )
    placed_batch = jax.device_put(batch, batch_shardings)
    for i in range(2):
        old = placed
        placed, metrics = sharded_step(placed, placed_batch)
        assert old.step.is_deleted()  # donated
        for key, value in history[i].items():
            np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(placed.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_missing_keys_are_named():
    graphdef, params = nnx.split(model_of(tiny_llama, dtype="float32"))
    with pytest.raises(KeyError, match="loss_mask"):
        sft_token_logps(graphdef, params, {"tokens": np.zeros((2, 4)), "mask": np.ones((2, 4))})


# ----------------------------------------------------------------------------- the experiment

TINY_RUN = [
    "--steps", "4", "--batch-size", "8", "--train-examples", "64", "--eval-examples", "16",
    "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2", "--max-length", "192",
]  # fmt: skip


def test_sft_experiment_builtin_then_resume(tmp_path):
    sft = load_experiment("sft")
    summary = sft.main(cli.parse(sft.Config, [*TINY_RUN, "--out", str(tmp_path)]))
    assert summary["data"]["train"]["examples"] == 64
    assert summary["data"]["train"]["rows"] < 64  # packed
    assert summary["eval"]["loss"] < summary["eval_before"]["loss"]
    assert set(summary["greedy"]) == {"before", "after"}
    rows = [row for _, row in runs.read_jsonl(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert hf.load_model(str(tmp_path / "model")).config.family == "llama"
    # the same --out with more steps resumes from the last checkpoint
    more = [*TINY_RUN, "--steps", "6", "--allow-config-change", "--out", str(tmp_path)]
    with pytest.warns(UserWarning, match="changed settings"):
        again = sft.main(cli.parse(sft.Config, more))
    assert again["resumed_from"] == 4


@pytest.mark.parametrize(
    "rows",
    [
        [{"text": f"{i}+{i}={2 * i}"} for i in range(20)],
        [
            {
                "messages": [
                    {"role": "user", "content": f"{i}+1"},
                    {"role": "assistant", "content": f"{i + 1}"},
                ]
            }
            for i in range(20)
        ],
    ],
    ids=["text", "messages"],
)
def test_sft_experiment_on_a_file(rows, tmp_path):
    sft = load_experiment("sft")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = arithmetic.default_base_model()
    args = [*TINY_RUN, "--data", str(path), "--model", model, "--out", str(tmp_path / "run")]
    args += ["--no-packing", "--batch-size", "2"]
    summary = sft.main(cli.parse(sft.Config, args))
    assert summary["data"]["train"]["format"] == next(iter(rows[0]))
    assert summary["data"]["train"]["rows"] == 18 and summary["data"]["eval"]["rows"] == 2
    assert np.isfinite(summary["eval"]["loss"]) and "greedy" not in summary


def test_messages_need_an_assistant_reply(tmp_path):
    """(Multi-turn rows, every assistant turn trained on: tests/test_sft_messages.py.)"""
    from rljax import data, experiment

    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}]
    with pytest.raises(ValueError, match="row 0: field 'messages' has no assistant message"):
        experiment.sft_sequences(rows, data.RowNumbers.of(1), None, experiment.SFTRunConfig())
