"""Tests of the reference-free preference steps (ORPO, CPO, SimPO:
:func:`rljax.updates.make_reference_free_update`).

The independent reference computes sequence log-probs from the model's full ``[B, T, V]``
logits (no chunking) and each loss from its definition (TRL 1.16's ``ORPOTrainer`` /
``CPOTrainer`` formulas written out here in jnp, float64), not from :mod:`rljax.dpo`; the step
uses ``optax.sgd(1.0)``, so its gradient is ``params - new_params``."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import (
    TINY,
    count_traces,
    preference_batch,
    run_preference_script,
    tiny_llama,
)

from rljax import experiment
from rljax.data import share_prompts
from rljax.logprobs import token_logprobs
from rljax.models.transformer import Transformer
from rljax.tasks import sorting
from rljax.updates import (
    CPOConfig,
    ORPOConfig,
    init_reference_free_state,
    make_reference_free_eval,
    make_reference_free_update,
)

PAIRS, TIME = 3, 12


@functools.cache
def model():
    config = tiny_llama(param_dtype="float64", dtype="float64")
    return nnx.split(Transformer(config, rngs=nnx.Rngs(0)))


def batch(seed=0):
    return preference_batch(np.random.default_rng(seed), PAIRS, TIME, TINY["vocab_size"])


def summed_logps(graphdef, params, b, side):
    tokens, mask = jnp.asarray(b[f"{side}_tokens"]), jnp.asarray(b[f"{side}_mask"])
    logits = nnx.merge(graphdef, params, copy=True)(tokens, mask)
    lp = token_logprobs(logits[:, :-1], tokens[:, 1:])
    counted = jnp.asarray(b[f"{side}_loss_mask"][:, 1:] & b[f"{side}_mask"][:, 1:], lp.dtype)
    return jnp.sum(lp * counted, -1), jnp.sum(counted, -1)


def reference_loss(params, b, config):
    graphdef, _ = model()
    (c, nc), (r, nr) = (summed_logps(graphdef, params, b, s) for s in ("chosen", "rejected"))
    nll = -jnp.sum(c) / jnp.sum(nc)  # TRL: cross-entropy over all chosen tokens
    cm, rm = c / nc, r / nr
    if isinstance(config, ORPOConfig):  # Hong et al., 2024, Eqs. 4 and 7; TRL odds_ratio_loss
        log_odds = (cm - rm) - (jnp.log1p(-jnp.exp(cm)) - jnp.log1p(-jnp.exp(rm)))
        return nll - jnp.mean(config.beta * jax.nn.log_sigmoid(log_odds))
    beta, ls = config.beta, config.label_smoothing or 0.0
    if config.loss_type == "sigmoid":
        m = c - r
        per_pair = -(1 - ls) * jax.nn.log_sigmoid(beta * m) - ls * jax.nn.log_sigmoid(-beta * m)
    elif config.loss_type == "hinge":
        per_pair = jax.nn.relu(1 - beta * (c - r))
    elif config.loss_type == "ipo":
        per_pair = (cm - rm - 1 / (2 * beta)) ** 2
    else:  # simpo: TRL subtracts gamma / beta from the mean-log-prob margin
        gamma = 0.5 if config.simpo_gamma is None else config.simpo_gamma
        z = beta * (cm - rm - gamma / beta)
        per_pair = -(1 - ls) * jax.nn.log_sigmoid(z) - ls * jax.nn.log_sigmoid(-z)
    return jnp.mean(per_pair) + config.cpo_alpha * nll


CONFIGS = [
    ORPOConfig(beta=0.3),
    CPOConfig(beta=0.2, loss_type="sigmoid", label_smoothing=0.1, cpo_alpha=0.5),
    CPOConfig(beta=0.7, loss_type="hinge"),
    CPOConfig(beta=0.4, loss_type="ipo", cpo_alpha=0.0),
    CPOConfig(beta=2.0, loss_type="simpo", simpo_gamma=0.8, cpo_alpha=0.0),
]


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: getattr(c, "loss_type", "orpo"))
def test_step_is_a_gradient_step_on_the_reference_loss(config, jit):
    graphdef, params = model()
    b, optimizer = batch(), optax.sgd(1.0)
    update = make_reference_free_update(graphdef, optimizer, config)
    state = init_reference_free_state(params, optimizer)
    new, metrics = (jax.jit(update) if jit else update)(state, b)
    loss, grads = jax.value_and_grad(reference_loss)(params, b, config)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-9)
    step = jax.tree.map(lambda a, g: a - g, params, new.params)
    for got, want in zip(jax.tree.leaves(step), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-7, atol=1e-12)
    assert int(new.step) == 1 and float(metrics["nonfinite"]) == 0.0
    evaluated = make_reference_free_eval(graphdef, config)(state, b)
    np.testing.assert_allclose(float(evaluated["loss"]), float(loss), rtol=1e-9)


def test_shared_prompt_layout_gives_the_same_loss():
    graphdef, params = model()
    b = batch(1)
    evaluate = make_reference_free_eval(graphdef, ORPOConfig())
    state = init_reference_free_state(params, optax.sgd(1.0))
    padded, shared = evaluate(state, b), evaluate(state, share_prompts(b))
    for key in ("loss", "nll_loss", "log_odds_ratio"):
        np.testing.assert_allclose(float(shared[key]), float(padded[key]), rtol=1e-9)


def test_hyperparams_sweep_compiles_once_and_equals_the_replaced_config():
    graphdef, params = model()
    b, optimizer = batch(2), optax.sgd(1.0)
    config = CPOConfig(loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.2)
    counted, traces = count_traces(make_reference_free_update(graphdef, optimizer, config))
    step = jax.jit(counted)
    state = init_reference_free_state(params, optimizer)
    for gamma in (0.1, 0.5, 1.0):
        _, metrics = step(state, b, {"simpo_gamma": gamma, "beta": 0.3})
        want = reference_loss(
            params, b, CPOConfig(**{**vars(config), "simpo_gamma": gamma, "beta": 0.3})
        )
        np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-9)
    assert len(traces) == 1


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CPOConfig(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (lambda: CPOConfig(loss_type="sigmoid", simpo_gamma=0.3), "simpo_gamma"),
        (lambda: CPOConfig(loss_type="kto"), "loss_type"),
        (lambda: ORPOConfig(beta=0.0), "beta"),
        (lambda: ORPOConfig(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_configs_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_hyperparams_and_config_type_raise():
    graphdef, params = model()
    optimizer = optax.sgd(1.0)
    state = init_reference_free_state(params, optimizer)
    update = make_reference_free_update(graphdef, optimizer, CPOConfig())
    with pytest.raises(ValueError, match="simpo_gamma"):  # None in the config: not traced
        update(state, batch(), {"simpo_gamma": 0.3})
    with pytest.raises(TypeError, match="ORPOConfig or CPOConfig"):
        make_reference_free_update(graphdef, optimizer, {"beta": 0.1})


def test_run_config_reads_only_what_the_method_uses():
    config = experiment.ReferenceFreeRunConfig
    assert config(method="simpo").update_config() == CPOConfig(
        beta=2.0, loss_type="simpo", simpo_gamma=1.0, cpo_alpha=0.0
    )
    assert config(method="cpo", loss_type="hinge").update_config().loss_type == "hinge"
    assert config().update_config() == ORPOConfig(beta=0.1)
    with pytest.raises(ValueError, match="--loss-type is not read by --method orpo"):
        config(loss_type="hinge")
    with pytest.raises(ValueError, match="--simpo-gamma is not read by --method cpo"):
        config(method="cpo", simpo_gamma=0.5)
    with pytest.raises(ValueError, match="use --method simpo"):
        config(method="cpo", loss_type="simpo")
    with pytest.raises(ValueError, match="--method must be one of"):
        config(method="dpo")


def test_experiment_ci_sized_run(tmp_path):
    model = tmp_path / "base"
    sorting.warmup_base_model(str(model), steps=20, seed=0, eval_prompts=0)
    summary, steps = run_preference_script("orpo", tmp_path, model, "--method", "cpo", steps=3)
    for row in steps:
        for key in ("loss", "nll_loss", "rewards/margins", "grad_norm"):
            assert math.isfinite(row[key]), (key, row)
    assert math.isfinite(summary["eval"]["nll_loss"])
