"""Tests of the KTO step (:func:`rljax.updates.make_kto_update`), its KL batch
(:func:`rljax.updates.mismatched_pairs`), the unpaired data step and a CI-sized run of
experiments/kto.py.

The independent reference computes sequence log-probs from the model's full ``[B, T, V]``
logits (no chunking) and the KTO loss in numpy-style jnp from its definition (TRL 1.16), all
in float64; the update uses ``optax.sgd(1.0)``, so its gradient is ``params - new_params``."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import TINY, preference_batch, run_preference_script, tiny_llama

from rljax import data, experiment
from rljax.logprobs import token_logprobs
from rljax.models.transformer import Transformer
from rljax.tasks import sorting
from rljax.updates import (
    KTOConfig,
    init_kto_state,
    kto_reference_logps,
    make_kto_eval,
    make_kto_update,
    mismatched_pairs,
)

ROWS, TIME = 4, 12


def unpaired_batch(seed):
    pairs = preference_batch(np.random.default_rng(seed), ROWS // 2, TIME, TINY["vocab_size"])
    batch = {
        k: np.concatenate([pairs[f"chosen_{k}"], pairs[f"rejected_{k}"]])
        for k in ("tokens", "mask", "loss_mask")
    }
    batch["desirable"] = np.array([True] * (ROWS // 2) + [False] * (ROWS // 2))
    return {**batch, **mismatched_pairs(batch, ROWS)}


@functools.cache
def models():
    make = lambda seed: nnx.split(
        Transformer(tiny_llama(param_dtype="float64", dtype="float64"), rngs=nnx.Rngs(seed))
    )
    (graphdef, params), (_, ref) = make(0), make(1)
    return graphdef, params, ref


def full_logps(graphdef, params, tokens, mask, loss_mask):
    logits = nnx.merge(graphdef, params, copy=True)(jnp.asarray(tokens), jnp.asarray(mask))
    lp = token_logprobs(logits[:, :-1], jnp.asarray(tokens)[:, 1:])
    return jnp.sum(lp * jnp.asarray(loss_mask[:, 1:] & mask[:, 1:], lp.dtype), axis=-1)


def reference_loss(params, ref, batch, beta, wd, wu, graphdef):
    """KTO from its definition: z0 = max(0, mean KL-batch log-ratio), no gradient."""
    logratio = full_logps(graphdef, params, batch["tokens"], batch["mask"], batch["loss_mask"])
    logratio = logratio - full_logps(
        graphdef, ref, batch["tokens"], batch["mask"], batch["loss_mask"]
    )
    kl = full_logps(graphdef, params, batch["kl_tokens"], batch["kl_mask"], batch["kl_loss_mask"])
    kl = kl - full_logps(graphdef, ref, batch["kl_tokens"], batch["kl_mask"], batch["kl_loss_mask"])
    z0 = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl), 0.0))
    d = batch["desirable"]
    losses = jnp.where(
        d,
        wd * (1 - jax.nn.sigmoid(beta * (logratio - z0))),
        wu * (1 - jax.nn.sigmoid(beta * (z0 - logratio))),
    )
    return jnp.mean(losses), z0


def test_mismatched_pairs_rotate_completions_within_groups():
    batch = unpaired_batch(0)
    kl = mismatched_pairs(batch, 2)
    for i, j in ((0, 1), (1, 0), (2, 3), (3, 2)):
        prompt = batch["tokens"][i][batch["mask"][i] & ~batch["loss_mask"][i]]
        completion = batch["tokens"][j][batch["loss_mask"][j]]
        want = np.concatenate([prompt, completion])[:TIME]
        got = kl["kl_tokens"][i][kl["kl_mask"][i]]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(
            kl["kl_tokens"][i][kl["kl_loss_mask"][i]], want[len(prompt) :]
        )


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_kto_update_is_a_gradient_step_on_the_reference_loss(reference):
    graphdef, params, ref = models()
    batch = unpaired_batch(1)
    config = KTOConfig(beta=0.5, desirable_weight=1.3, undesirable_weight=0.7, reference=reference)
    if reference == "precomputed":
        batch = {**batch, **kto_reference_logps(graphdef, ref, batch)}
        # float32 reference log-probs: compare the step against the same values
    optimizer = optax.sgd(1.0)
    state = init_kto_state(params, optimizer, ref if reference == "model" else None)
    new, metrics = jax.jit(make_kto_update(graphdef, optimizer, config))(state, batch)
    if reference == "precomputed":
        refs = (
            jnp.asarray(batch["ref_logps"], jnp.float64),
            jnp.asarray(batch["ref_kl_logps"], jnp.float64),
        )

        def loss_fn(p):
            lr = (
                full_logps(graphdef, p, batch["tokens"], batch["mask"], batch["loss_mask"])
                - refs[0]
            )
            kl = (
                full_logps(graphdef, p, batch["kl_tokens"], batch["kl_mask"], batch["kl_loss_mask"])
                - refs[1]
            )
            z0 = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl), 0.0))
            d = batch["desirable"]
            losses = jnp.where(
                d,
                1.3 * (1 - jax.nn.sigmoid(0.5 * (lr - z0))),
                0.7 * (1 - jax.nn.sigmoid(0.5 * (z0 - lr))),
            )
            return jnp.mean(losses), z0
    else:
        loss_fn = lambda p: reference_loss(p, ref, batch, 0.5, 1.3, 0.7, graphdef)
    (loss, z0), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-9)
    np.testing.assert_allclose(float(metrics["kl"]), float(z0), rtol=1e-9, atol=1e-12)
    step = jax.tree.map(lambda a, b: a - b, params, new.params)
    for got, want in zip(jax.tree.leaves(step), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-7, atol=1e-12)
    assert int(new.step) == 1 and float(metrics["nonfinite"]) == 0.0
    assert float(metrics["count/chosen"]) == float(metrics["count/rejected"]) == ROWS // 2
    evaluated = jax.jit(make_kto_eval(graphdef, config))(state, batch)
    np.testing.assert_allclose(float(evaluated["loss"]), float(loss), rtol=1e-9)


def test_kto_update_skips_a_nonfinite_step():
    graphdef, params, _ = models()
    batch = unpaired_batch(2)
    batch = {**batch, "ref_logps": np.full(ROWS, np.nan), "ref_kl_logps": np.zeros(ROWS)}
    optimizer = optax.sgd(1.0)
    state = init_kto_state(params, optimizer)
    new, metrics = jax.jit(make_kto_update(graphdef, optimizer, KTOConfig()))(state, batch)
    assert float(metrics["nonfinite"]) == 1.0 and int(new.nonfinite_updates) == 1
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kto_config_and_batch_errors():
    with pytest.raises(ValueError, match="loss_type"):
        KTOConfig(loss_type="sigmoid")
    with pytest.raises(ValueError, match="beta"):
        KTOConfig(beta=0.0)
    graphdef, params, _ = models()
    batch = unpaired_batch(0)
    del batch["kl_tokens"]
    update = make_kto_update(graphdef, optax.sgd(1.0), KTOConfig(reference="model"))
    with pytest.raises(KeyError, match="kl_tokens"):
        update(init_kto_state(params, optax.sgd(1.0), params), batch)


def test_unpaired_rows_and_validation():
    rows = experiment.unpaired_rows([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert rows == [
        {"prompt": "p", "completion": "a", "label": True},
        {"prompt": "p", "completion": "b", "label": False},
    ]
    bad = [*rows, {"prompt": "q", "completion": "c", "label": "yes"}]
    numbering = data.RowNumbers.of(len(bad))
    with pytest.raises(ValueError, match="row 2: field 'label' is 'yes'"):
        experiment.validate_unpaired(bad, numbering, skip_invalid=False)
    kept, _, report = experiment.validate_unpaired(bad, numbering, skip_invalid=True)
    assert kept == rows and report["skipped"] == {"invalid_label": 1}
    with pytest.raises(ValueError, match="row 0: field 'completion' is missing"):
        experiment.validate_unpaired([{"prompt": "p", "label": True}], data.RowNumbers.of(1), False)


def test_kto_experiment_ci_sized_run(tmp_path):
    model = tmp_path / "base"
    sorting.warmup_base_model(str(model), steps=20, seed=0, eval_prompts=0)
    summary, steps = run_preference_script("kto", tmp_path, model)
    for row in steps:
        for key in ("loss", "kl", "rewards/margins", "grad_norm"):
            assert math.isfinite(row[key]), (key, row)
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
        assert math.isfinite(summary["eval"][key]), key


def test_nll_alpha_adds_the_desirable_rows_token_nll():
    graphdef, params, ref = models()
    batch = unpaired_batch(3)
    config = KTOConfig(beta=0.5, reference="model", nll_alpha=0.7)
    optimizer = optax.sgd(1.0)
    state = init_kto_state(params, optimizer, ref)
    new, metrics = jax.jit(make_kto_update(graphdef, optimizer, config))(state, batch)

    def loss_fn(p):
        kto, _ = reference_loss(p, ref, batch, 0.5, 1.0, 1.0, graphdef)
        logps = full_logps(graphdef, p, batch["tokens"], batch["mask"], batch["loss_mask"])
        tokens = (batch["loss_mask"][:, 1:] & batch["mask"][:, 1:]).sum(-1)
        d = batch["desirable"]
        nll = -jnp.sum(jnp.where(d, logps, 0.0)) / tokens[d].sum()
        return kto + 0.7 * nll, nll

    (loss, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-9)
    np.testing.assert_allclose(float(metrics["nll_loss"]), float(nll), rtol=1e-9)
    step = jax.tree.map(lambda a, b: a - b, params, new.params)
    for got, want in zip(jax.tree.leaves(step), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-7, atol=1e-12)
    with pytest.raises(ValueError, match="nll_alpha"):
        KTOConfig(nll_alpha=-1.0)
