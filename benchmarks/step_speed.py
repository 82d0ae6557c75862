"""One harness for every compiled rljax step: compile time, step time, throughput, model FLOPs,
MFU and memory, plus the FSDP and rematerialisation memory comparisons.

Steps (the registry :data:`STEPS`, name -> builder; ``--steps a,b`` picks some):

* ``ppo_classic``, ``trpo_classic``: a whole compiled classic-control run
  (:func:`rljax.classic.train_ppo` / :func:`~rljax.classic.train_trpo` on CartPole-v1, the
  library's presets, ``--iterations`` iterations of rollout + update, 1 greedy evaluation
  episode) compiled with :func:`rljax.classic.compiler_options`; the step time is the run's
  time over its iterations, the throughput env-steps/s.
* ``lm``: next-token cross-entropy + AdamW (``benchmarks/lm_speed.py``'s train step).
* ``dpo``: :func:`rljax.updates.make_dpo_update`, sigmoid loss, a frozen reference model's forward
  pass on every batch (``DPOConfig(reference="model")``, TRL's default), AdamW; batches from
  ``benchmarks/dpo_speed.py``. Tokens count chosen and rejected sequences.
* ``reward``: :func:`rljax.updates.make_reward_update` on a reward-head model (no LM head).
* ``rlhf_ppo``: :func:`rljax.updates.make_rlhf_ppo_update` (value head on the policy, 4 epochs of
  one minibatch) on a random rollout; tokens = rows x sequence x epochs.
* ``rlhf_trpo``: :func:`rljax.updates.make_rlhf_trpo_update` with a separate value-head critic
  (10 CG iterations, 10 critic steps); FLOPs are an estimate (one line-search step). On a mesh
  the critic is replicated (``compile_update`` shards the state's first item, the policy).
* ``generate``: sampling with a KV cache, the program of
  :func:`rljax.models.generate.make_generate_fn` (temperature 1), compiled ahead of time;
  tokens = new tokens.

Models are the :data:`rljax.models.transformer.PRESETS` in ``--dtype`` (float32 parameters and
optimizer state), with random weights (:func:`random_model`); batches are random token ids.
* ``fvp_grad``, ``fvp``, ``fvp_cg``: on the LM as a categorical policy
  (``benchmarks/fvp.py``'s computations): the surrogate's gradient, one Gauss-Newton
  Fisher-vector product, and the per-product cost inside a 10-product CG loop that shares the
  linearisation. FVP FLOPs are estimates (4 and 3 forward passes).

Each step is compiled ahead of time (``jit(f).lower(...).compile()``; compile time reported
apart), warmed up, then timed over ``--repeats`` calls, each synchronised with
``block_until_ready``; an update step's state is donated and carried from call to call. The
table gives the median and the 10th/90th percentiles, throughput, model FLOPs per step
(:func:`rljax.bench.transformer_flops_per_token`: 6N per token with the backward pass, 2N
without, plus attention), MFU against the device's bfloat16 peak where known
(:func:`rljax.bench.device_peak_flops`), XLA's compiled memory analysis per device (argument
and temporary bytes) and the allocator's peak where the backend reports one (since process
start, so it only grows down the table).

``--mesh fsdp=8`` places the language-model update steps (lm, dpo, reward, rlhf_*) on a mesh
with :func:`rljax.updates.lm.compile_update` (``--rules`` picks the sharding preset); the other steps
run on one device. On a CPU-only machine the script simulates the devices it needs
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) when run as a script; when importing
it, set that variable before jax is imported.

Memory section (``--memory all|fsdp|remat|none``): the DPO step at ``--memory-preset``
(default ``--preset``) compiled (not run) from abstract shapes on 1 device and on
``--memory-devices`` (8) devices with FSDP rules (:data:`rljax.sharding.FSDP_RULES`);
per-device parameter + optimizer (+ reference) bytes from the shardings and XLA's argument
bytes, and their ratios (about 8x: only norm scales stay replicated). Where fewer devices exist
than needed (one GPU), it compiles for the simulated CPU devices: the same shard shapes. Then
the DPO step with and without ``remat``: XLA temporary bytes and step time.

Run: ``python benchmarks/step_speed.py --preset small`` (``--quick``: the tiny preset, small
batches, 3 timed calls, about a minute on CPU; ``--results-md`` appends the table to
``benchmarks/RESULTS.md``); on a GPU ``--preset 125m --dtype bfloat16`` or ``--preset 1b
--dtype bfloat16``. Prints markdown tables and writes JSON (``--json PATH``).
"""

from __future__ import annotations

import os
import re
import sys


def _devices_needed(argv) -> int:
    """Enough devices for ``--mesh`` and the FSDP memory comparison."""
    text = " ".join(argv)
    needed = 1
    mesh = re.search(r"--mesh[= ](\S+)", text)
    if mesh:
        sizes = [int(v) for v in re.findall(r"=(\d+)", mesh.group(1))]
        needed = max(needed, int(__import__("math").prod(sizes)) if sizes else 1)
    if not re.search(r"--memory[= ](none|remat)", text):
        devices = re.search(r"--memory-devices[= ](\d+)", text)
        needed = max(needed, int(devices.group(1)) if devices else 8)
    return needed


if __name__ == "__main__":  # before jax is imported
    from _devices import simulate_host_devices

    simulate_host_devices(_devices_needed(sys.argv[1:]))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the sibling benchmark scripts, whose builders are reused
    sys.path.insert(0, str(_HERE))

import _common  # noqa: E402
import dpo_speed  # noqa: E402
import fvp  # noqa: E402
import lm_speed  # noqa: E402

from rljax import bench, classic, sharding, updates  # noqa: E402
from rljax.models import generate as gen  # noqa: E402
from rljax.models.transformer import PRESETS, Transformer, TransformerConfig, preset  # noqa: E402
from rljax.updates import (  # noqa: E402
    DPOConfig,
    init_dpo_state,
    init_reward_state,
    lm,
    make_dpo_update,
    make_reward_update,
)

RLHF_IMPORT_ERROR = None  # the RLHF updates are part of rljax.updates (always present)

MiB = 2**20


# ------------------------------------------------------------------------------ registry


@dataclasses.dataclass
class Step:
    """One timed computation: ``fn(*args)``, jitted as ``jitted`` (default
    ``jax.jit(fn, donate_argnums=0 if carry else ())``).

    With ``carry`` the first argument is a state that ``fn`` returns first (an update step):
    it is donated and carried from call to call. One call does ``steps_per_call`` steps and
    processes ``units_per_call`` units (tokens or env steps) with ``flops_per_call`` model
    FLOPs (None = not counted; ``flops_estimate`` marks a rough count).
    """

    fn: Callable
    args: tuple
    unit: str
    units_per_call: float
    flops_per_call: float | None = None
    flops_estimate: bool = False
    carry: bool = True
    steps_per_call: int = 1
    jitted: Callable | None = None
    compiler_options: dict | None = None  # XLA options of this step's compile
    model: str = "-"
    shape: str = "-"
    devices: int = 1


@dataclasses.dataclass
class Context:
    """What every builder gets: the parsed flags, the mesh (None = one device) and helpers."""

    args: argparse.Namespace
    mesh: Any = None
    rules: sharding.ShardingRules = sharding.DEFAULT_RULES
    compiler_options: dict | None = None  # overrides every step's (--fast-compile)

    def model_config(self, **overrides) -> TransformerConfig:
        a = self.args
        kwargs = dict(dtype=a.dtype, param_dtype="float32", remat=a.remat)
        return preset(a.preset, **{**kwargs, **overrides})

    def model(self, **overrides):
        """``(config, graphdef, params)`` of the preset model with random weights
        (:func:`random_model`; fresh device buffers on every call, so a donated state never
        aliases another step's)."""
        config = self.model_config(**overrides)
        graphdef, host = random_model(config)
        return config, graphdef, jax.tree.map(jnp.asarray, host)

    def describe(self, config: TransformerConfig) -> str:
        return f"{self.args.preset} ({config.num_params / 1e6:.1f}M, {config.dtype})"

    def place(self, update: Callable, state: Any, batch: Any) -> tuple[Callable, tuple, int]:
        """``(jitted, (state, batch), devices)``: on the mesh via :func:`rljax.updates.lm.compile_update`
        (state donated), else a plain donating jit on the default device."""
        if self.mesh is None:
            return jax.jit(update, donate_argnums=0), (state, batch), 1
        placed, step, batch_shardings = lm.compile_update(
            update, state, batch, self.mesh, self.rules
        )
        return step, (placed, jax.device_put(batch, batch_shardings)), self.mesh.size

    def update_step(
        self, update, state, batch, config, *, tokens, flops, shape, flops_estimate=False
    ) -> Step:
        """The :class:`Step` of an LM update ``update(state, batch)``, placed by :meth:`place`."""
        jitted, args, devices = self.place(update, state, batch)
        return Step(
            update,
            args,
            "tokens",
            tokens,
            flops,
            flops_estimate=flops_estimate,
            jitted=jitted,
            model=self.describe(config),
            shape=shape,
            devices=devices,
        )


@functools.lru_cache(maxsize=8)
def random_model(config: TransformerConfig, seed: int = 0):
    """``(graphdef, params)`` of a :class:`Transformer` with numpy-drawn weights, params as
    host arrays: normal with std ``config.initializer_range``, norm scales 1, biases 0.

    The values do not change the timings; drawing them with numpy (the module built
    abstractly, ``nnx.eval_shape``) compiles nothing, where the eager initialisation compiles
    a program per operation and shape (seconds for the tiny model on a busy CPU).
    """
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm_scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        values = rng.standard_normal(leaf.shape, np.float32) * config.initializer_range
        return values.astype(leaf.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


STEPS: dict[str, Callable[[Context], Step]] = {}
#: Registered names whose builder cannot run in this checkout, with the reason.
UNAVAILABLE: dict[str, str] = {}


def register(name: str, unavailable: str | None = None):
    """Add ``builder(ctx) -> Step`` to :data:`STEPS` under ``name`` (or, with a reason in
    ``unavailable``, to :data:`UNAVAILABLE`)."""

    def add(builder):
        if unavailable:
            UNAVAILABLE[name] = unavailable
        else:
            STEPS[name] = builder
        return builder

    return add


def _flops(config, seq: int, tokens: int, *, forward: float = 0.0, train: float = 0.0) -> float:
    """``train`` forward+backward passes and ``forward`` forward-only passes over ``tokens``
    tokens of sequences of ``seq``."""
    per_fwd = bench.transformer_flops_per_token(config, seq, backward=False)
    per_train = bench.transformer_flops_per_token(config, seq, backward=True)
    return tokens * (forward * per_fwd + train * per_train)


# ------------------------------------------------------------------------------ classic


def _classic(ctx: Context, algo: str) -> Step:
    a = ctx.args
    config = classic.preset(a.env, algo, eval_episodes=1)
    config = dataclasses.replace(config, total_steps=a.iterations * config.steps_per_iteration)
    train = classic.train_ppo if algo == "ppo" else classic.train_trpo
    env_steps = config.env_steps
    return Step(
        fn=lambda key: train(config, key),
        args=(jax.random.key(0),),
        carry=False,
        unit="env-steps",
        units_per_call=env_steps,
        steps_per_call=config.num_iterations,
        compiler_options=classic.compiler_options(env_steps),
        model=f"MLP {config.hidden}x2 ({config.env})",
        shape=f"{config.num_iterations} it x {config.num_envs} envs x {config.num_steps}",
    )


register("ppo_classic")(functools.partial(_classic, algo="ppo"))
register("trpo_classic")(functools.partial(_classic, algo="trpo"))


# ------------------------------------------------------------------------------ language models


@register("lm")
def build_lm(ctx: Context) -> Step:
    a = ctx.args
    config, graphdef, params = ctx.model()
    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    train_step = lm_speed.make_train_step(graphdef, optimizer)
    tokens, mask = lm_speed.train_batch(config, a.batch, a.seq)
    update = lambda state, batch: train_step(state, batch["tokens"], batch["mask"])
    state, batch = (params, optimizer.init(params)), {"tokens": tokens, "mask": mask}
    n = a.batch * a.seq
    flops = _flops(config, a.seq, n, train=1)
    return ctx.update_step(
        update, state, batch, config, tokens=n, flops=flops, shape=f"{a.batch} x {a.seq}"
    )


def _pair_batch(ctx: Context, config: TransformerConfig, batch: int | None = None) -> dict:
    a = ctx.args
    shape = argparse.Namespace(batch=batch or a.batch, seq=a.seq, prompt_len=a.prompt_len)
    return dpo_speed.make_batch(shape, config.vocab_size)


def dpo_parts(ctx: Context, *, remat: bool | None = None, batch: int | None = None, abstract=False):
    """``(config, update, state, batch)`` of the DPO step; ``abstract=True`` builds the model
    and state as shapes only (``nnx.eval_shape``), for compile-only memory analysis."""
    overrides = {} if remat is None else {"remat": remat}
    config = ctx.model_config(**overrides)
    if abstract:
        graphdef, params = nnx.split(
            nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param
        )
    else:
        graphdef, params = random_model(config)
    optimizer = optax.adamw(1e-6, weight_decay=0.0)
    update = make_dpo_update(graphdef, optimizer, DPOConfig(beta=0.1, reference="model"))
    init = lambda p: init_dpo_state(p, optimizer, ref_params=p)
    if abstract:
        state = jax.eval_shape(init, params)
    else:
        fresh = lambda: jax.tree.map(jnp.asarray, params)
        state = init_dpo_state(fresh(), optimizer, ref_params=fresh())
    return config, update, state, _pair_batch(ctx, config, batch)


@register("dpo")
def build_dpo(ctx: Context) -> Step:
    a = ctx.args
    config, update, state, batch = dpo_parts(ctx)
    n = 2 * a.batch * a.seq
    flops = _flops(config, a.seq, n, train=1, forward=1)  # policy train pass + reference forward
    shape = f"{a.batch} pairs x {a.seq}"
    return ctx.update_step(update, state, batch, config, tokens=n, flops=flops, shape=shape)


@register("reward")
def build_reward(ctx: Context) -> Step:
    a = ctx.args
    config, graphdef, params = ctx.model(head="reward", lm_head=False)
    optimizer = optax.adamw(1e-5, weight_decay=0.0)
    update = make_reward_update(graphdef, optimizer)
    state, batch = init_reward_state(params, optimizer), _pair_batch(ctx, config)
    n = 2 * a.batch * a.seq
    flops = _flops(config, a.seq, n, train=1)
    shape = f"{a.batch} pairs x {a.seq}"
    return ctx.update_step(update, state, batch, config, tokens=n, flops=flops, shape=shape)


def rollout_batch(ctx: Context, vocab_size: int) -> dict:
    """A random RLHF rollout: ``tokens``/``mask`` ``[B, P + N]`` (prompt then completion),
    ``completion_mask``, ``old_logps``, ``advantages``, ``returns``, ``old_values`` ``[B, N]``."""
    a = ctx.args
    b, n = a.batch, a.seq - a.prompt_len
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, vocab_size, (b, a.seq)), jnp.int32)
    per_token = lambda scale, shift=0.0: jnp.asarray(
        shift + scale * rng.standard_normal((b, n)), jnp.float32
    )
    return {
        "tokens": tokens,
        "mask": jnp.ones((b, a.seq), bool),
        "completion_mask": jnp.ones((b, n), bool),
        "old_logps": per_token(0.5, -float(np.log(vocab_size))),
        "advantages": per_token(1.0),
        "returns": per_token(1.0),
        "old_values": per_token(1.0),
    }


@register("rlhf_ppo", unavailable=RLHF_IMPORT_ERROR)
def build_rlhf_ppo(ctx: Context) -> Step:
    a = ctx.args
    config, graphdef, params = ctx.model(head="value")
    optimizer = optax.adamw(1e-6, weight_decay=0.0)
    ppo_config = updates.PPOConfig(value_coef=0.1, num_minibatches=1)  # TRL's PPO trainer's
    update = updates.make_rlhf_ppo_update(graphdef, optimizer, ppo_config, critic="head")
    state = updates.init_rlhf_ppo_state(params, optimizer, jax.random.key(0))
    batch = rollout_batch(ctx, config.vocab_size)
    n = a.batch * a.seq * ppo_config.num_epochs
    flops = _flops(config, a.seq, n, train=1)
    shape = f"{a.batch} x ({a.prompt_len}+{a.seq - a.prompt_len}), {ppo_config.num_epochs} ep"
    return ctx.update_step(update, state, batch, config, tokens=n, flops=flops, shape=shape)


@register("rlhf_trpo", unavailable=RLHF_IMPORT_ERROR)
def build_rlhf_trpo(ctx: Context) -> Step:
    a = ctx.args
    config, graphdef, params = ctx.model()
    value_config, value_graphdef, value_params = ctx.model(head="value", lm_head=False)
    value_optimizer = optax.adam(1e-5)
    trpo_config = updates.TRPOConfig()
    update = updates.make_rlhf_trpo_update(graphdef, value_optimizer, trpo_config, value_graphdef)
    state = updates.init_trpo_state(params, value_params, value_optimizer, jax.random.key(0))
    batch = rollout_batch(ctx, config.vocab_size)
    n = a.batch * a.seq
    # Estimate: old outputs, the gradient, the linearisation, cg_iters products (tangent +
    # transpose), one line-search forward; the critic's n_critic_updates train passes.
    policy_passes = 1 + 3 + 2 + 3 * trpo_config.cg_iters + 1
    flops = _flops(config, a.seq, n, forward=policy_passes)
    flops += _flops(value_config, a.seq, n, train=trpo_config.n_critic_updates, forward=1)
    shape = f"{a.batch} x ({a.prompt_len}+{a.seq - a.prompt_len}), CG {trpo_config.cg_iters}"
    return ctx.update_step(
        update, state, batch, config, tokens=n, flops=flops, shape=shape, flops_estimate=True
    )


@register("generate")
def build_generate(ctx: Context) -> Step:
    a = ctx.args
    config, graphdef, params = ctx.model()
    b, p, n = a.batch, a.prompt_len, a.new_tokens
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(0, config.vocab_size, (b, p)), jnp.int32)
    sampling = gen.SamplingConfig(max_new_tokens=n, temperature=1.0)

    def generate(params, prompts, prompt_mask, key):  # make_generate_fn's program
        return gen.generate((graphdef, params), prompts, prompt_mask, key, sampling)

    # Prefill over the prompt, then n - 1 one-token steps over a growing context.
    flops = _flops(config, p, b * p, forward=1) + _flops(config, p + n // 2, b * (n - 1), forward=1)
    return Step(
        generate,
        (params, prompts, jnp.ones_like(prompts, bool), jax.random.key(0)),
        "new tokens",
        b * n,
        flops,
        carry=False,
        model=ctx.describe(config),
        shape=f"{b} x ({p} prompt + {n} new)",
    )


def _fvp_step(ctx: Context, which: str) -> Step:
    a = ctx.args
    config, graphdef, params = ctx.model()
    rng = np.random.default_rng(2)
    b, t = a.batch, a.seq
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32)
    actions = jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32)
    advantages = jnp.asarray(rng.standard_normal((b, t)), jnp.float32)
    policy_fn = lambda p, x: nnx.merge(graphdef, p)(x).astype(jnp.float32)
    case = ("lm", params, policy_fn, tokens, actions, advantages)
    fn, args, products = fvp.computations(case)[which]
    # Forward passes: gradient 3; one Gauss-Newton product ~4 (primal + tangent, transpose
    # ~2); a product inside CG ~3 (tangent + transpose; the linearisation is shared).
    passes = {"grad": 3, "gauss_newton": 4, "gauss_newton (in CG)": 3}[which]
    return Step(
        fn,
        args,
        "tokens",
        b * t * max(products, 1),
        _flops(config, t, b * t * max(products, 1), forward=passes),
        flops_estimate=which != "grad",
        carry=False,
        steps_per_call=max(products, 1),
        model=ctx.describe(config),
        shape=f"{b} x {t}" + (f", {products} products" if products > 1 else ""),
    )


register("fvp_grad")(functools.partial(_fvp_step, which="grad"))
register("fvp")(functools.partial(_fvp_step, which="gauss_newton"))
register("fvp_cg")(functools.partial(_fvp_step, which="gauss_newton (in CG)"))


# ------------------------------------------------------------------------------ measuring


def measure(
    name: str, step: Step, *, repeats: int, warmup: int, compiler_options: dict | None = None
) -> dict[str, Any]:
    """Compile ``step`` ahead of time (with ``compiler_options`` if given, else the step's),
    time ``repeats`` calls after ``warmup``, and report."""
    jitted = step.jitted or jax.jit(step.fn, donate_argnums=0 if step.carry else ())
    options = step.compiler_options if compiler_options is None else compiler_options
    compiled, compile_s = bench.compile_ahead(jitted, *step.args, compiler_options=options)
    if step.carry:
        state, *rest = step.args
        timing = bench.time_calls(
            (lambda s: compiled(s, *rest)[0], state), steps=repeats, warmup=warmup, carry=True
        )
    else:
        timing = bench.time_calls(lambda: compiled(*step.args), steps=repeats, warmup=warmup)
    k = step.steps_per_call
    median, p10, p90 = timing.median / k, timing.p10 / k, timing.p90 / k
    peak = bench.device_peak_flops()
    flops = None if step.flops_per_call is None else step.flops_per_call / k
    memory = bench.memory_analysis(compiled)
    row = {
        "step": name,
        "model": step.model,
        "shape": step.shape,
        "devices": step.devices,
        "compile_s": compile_s,
        "median_s": median,
        "p10_s": p10,
        "p90_s": p90,
        "calls": len(timing.times),
        "steps_per_call": k,
        "call_times_s": list(timing.times),
        "unit": step.unit,
        "units_per_step": step.units_per_call / k,
        "throughput": step.units_per_call / timing.median,
        "model_flops_per_step": flops,
        "flops_estimate": step.flops_estimate,
        "achieved_tflops": None if flops is None else flops / median / 1e12,
        "mfu": None if flops is None or peak is None else flops / median / (peak * step.devices),
        "memory": memory,
        "argument_mib": None if memory is None else memory["argument_size_in_bytes"] / MiB,
        "temp_mib": None if memory is None else memory["temp_size_in_bytes"] / MiB,
        "peak_memory_mib": None
        if bench.peak_memory_bytes() is None
        else bench.peak_memory_bytes() / MiB,
    }
    return row


def _abstract(tree, shardings):
    """``jax.ShapeDtypeStruct``\\ s of ``tree`` carrying ``shardings`` (a prefix tree of it)."""
    return jax.tree.map(
        lambda s, sub: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), sub
        ),
        shardings,
        tree,
    )


def _memory_devices(n: int):
    devices = jax.devices()
    if len(devices) >= n:
        return devices[:n]
    cpus = jax.devices("cpu")
    return cpus[:n] if len(cpus) >= n else None


def fsdp_memory(ctx: Context) -> dict[str, Any]:
    """Per-device state and XLA argument/temporary bytes of the DPO step compiled (from
    abstract shapes, not run) on 1 device and on an ``N``-device FSDP mesh."""
    n = ctx.args.memory_devices
    devices = _memory_devices(n)
    if devices is None:
        return {
            "skipped": f"needs {n} devices (set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={n} before jax is imported)"
        }
    batch_pairs = math.ceil(ctx.args.batch / n) * n  # the batch splits over the mesh too
    config, update, state, batch = dpo_parts(ctx, batch=batch_pairs, abstract=True)
    out = {
        "step": "dpo",
        "model": ctx.describe(config),
        "batch_pairs": batch_pairs,
        "seq": ctx.args.seq,
        "platform": devices[0].platform,
    }
    for label, spec, rules in (
        ("1 device", "data=1", sharding.DATA_PARALLEL_RULES),
        (f"fsdp={n}", f"fsdp={n}", sharding.FSDP_RULES),
    ):
        mesh = sharding.make_mesh(spec, devices=devices[: 1 if spec == "data=1" else n])
        state_shardings = sharding.train_state_shardings(state, mesh, rules)
        batch_sharding = sharding.batch_sharding(mesh, rules)
        batch_shardings = jax.tree.map(lambda _, s=batch_sharding: s, batch)
        abstract_state = _abstract(state, state_shardings)
        abstract_batch = _abstract(batch, batch_shardings)
        compiled, compile_s = bench.compile_ahead(
            update,
            abstract_state,
            abstract_batch,
            in_shardings=(state_shardings, batch_shardings),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=0,
            compiler_options=ctx.compiler_options,
        )
        state_bytes = sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(abstract_state)
        )
        memory = bench.memory_analysis(compiled)
        out[label] = {
            "compile_s": compile_s,
            "state_bytes_per_device": state_bytes,
            "argument_bytes": None if memory is None else memory["argument_size_in_bytes"],
            "temp_bytes": None if memory is None else memory["temp_size_in_bytes"],
            "memory": memory,
        }
    one, many = out["1 device"], out[f"fsdp={n}"]
    out["state_ratio"] = one["state_bytes_per_device"] / many["state_bytes_per_device"]
    if one["argument_bytes"] and many["argument_bytes"]:
        out["argument_ratio"] = one["argument_bytes"] / many["argument_bytes"]
    return out


def remat_memory(ctx: Context, dpo_row: dict | None = None) -> list[dict[str, Any]]:
    """The DPO step without and with rematerialisation: XLA temporary bytes and step time
    (``dpo_row``, the main table's one-device DPO row, stands for ``--remat``'s setting)."""
    rows = []
    for remat in (False, True):
        if dpo_row is not None and remat == ctx.args.remat and dpo_row["devices"] == 1:
            rows.append({**dpo_row, "remat": remat})
            continue
        config, update, state, batch = dpo_parts(ctx, remat=remat)
        n = 2 * ctx.args.batch * ctx.args.seq
        flops = _flops(config, ctx.args.seq, n, train=1, forward=1)
        step = Step(update, (state, batch), "tokens", n, flops, model=ctx.describe(config))
        row = measure(
            "dpo",
            step,
            repeats=ctx.args.repeats,
            warmup=ctx.args.warmup,
            compiler_options=ctx.compiler_options,
        )
        rows.append({**row, "remat": remat, "shape": f"{ctx.args.batch} pairs x {ctx.args.seq}"})
    return rows


# ------------------------------------------------------------------------------ reporting

COLUMNS = [
    ("step", "step"),
    ("model", "model"),
    ("shape", "shape"),
    ("devices", "devices"),
    ("compile_s", "compile s"),
    ("median_s", "step s (median)"),
    ("p10_s", "p10"),
    ("p90_s", "p90"),
    ("throughput_text", "throughput"),
    ("gflops", "GFLOP/step"),
    ("mfu", "MFU"),
    ("argument_mib", "args MiB"),
    ("temp_mib", "temp MiB"),
    ("peak_memory_mib", "peak MiB"),
]


def _mib(x: float | None) -> str | None:
    return None if x is None else "<0.1" if x < 0.05 else f"{x:,.1f}"


def _table_rows(rows):
    out = []
    for r in rows:
        unit = {"tokens": "tok/s", "new tokens": "new tok/s", "env-steps": "env-steps/s"}
        flops = r.get("model_flops_per_step")
        out.append(
            {
                **r,
                "throughput_text": f"{r['throughput']:,.0f} {unit.get(r['unit'], r['unit'])}",
                **{k: _mib(r[k]) for k in ("argument_mib", "temp_mib", "peak_memory_mib")},
                "gflops": None
                if flops is None
                else f"{'~' if r['flops_estimate'] else ''}{flops / 1e9:.4g}",
            }
        )
    return out


def memory_tables(memory: dict[str, Any]) -> str:
    parts = []
    fsdp = memory.get("fsdp")
    if fsdp and "skipped" not in fsdp:
        labels = [k for k in fsdp if isinstance(fsdp[k], dict)]
        mib = lambda x: None if x is None else _mib(x / MiB)
        rows = [
            {
                "mesh": label,
                "state": mib(fsdp[label]["state_bytes_per_device"]),
                "args": mib(fsdp[label]["argument_bytes"]),
                "temp": mib(fsdp[label]["temp_bytes"]),
            }
            for label in labels
        ]
        parts.append(
            f"FSDP, DPO step, {fsdp['model']}, {fsdp['batch_pairs']} pairs x {fsdp['seq']} "
            f"(compiled for {fsdp['platform']}, not run): per-device params + AdamW state + "
            f"reference {fsdp['state_ratio']:.2f}x smaller"
            + (
                f", XLA argument bytes {fsdp['argument_ratio']:.2f}x smaller"
                if "argument_ratio" in fsdp
                else ""
            )
            + "\n\n"
            + bench.markdown_table(
                rows,
                [
                    ("mesh", "mesh"),
                    ("state", "state MiB/device"),
                    ("args", "XLA args MiB/device"),
                    ("temp", "XLA temp MiB/device"),
                ],
            )
        )
    elif fsdp:
        parts.append(f"FSDP comparison skipped: {fsdp['skipped']}")
    remat = memory.get("remat")
    if remat:
        parts.append(
            "Rematerialisation, DPO step:\n\n"
            + bench.markdown_table(
                [{**r, "temp_mib": _mib(r["temp_mib"])} for r in remat],
                [
                    ("remat", "remat"),
                    ("model", "model"),
                    ("compile_s", "compile s"),
                    ("median_s", "step s (median)"),
                    ("p10_s", "p10"),
                    ("p90_s", "p90"),
                    ("temp_mib", "XLA temp MiB"),
                ],
            )
        )
    return "\n\n".join(parts)


def results_section(env: dict, args: argparse.Namespace, rows, memory) -> str:
    name = "CPU" if env["platform"] == "cpu" else env["device"]
    command = "python benchmarks/step_speed.py " + " ".join(args.argv)
    lines = [
        f"## Step-speed harness ({name})",
        "",
        f"`{command.strip()}`, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{env['device']} ({env['device_count']} device(s) visible), jax {env['jax']}, "
        f"flax {env['flax']}, optax {env['optax']}; 1-minute load average "
        f"{env['load_avg_start'][0]:.1f} at the start, {env['load_avg_end'][0]:.1f} at the end "
        f"({os.cpu_count()} CPUs).",
    ]
    if rows:
        lines += ["", bench.markdown_table(_table_rows(rows), COLUMNS)]
    if memory:
        lines += ["", memory_tables(memory)]
    return "\n".join(lines) + "\n"


#: Sizes by default and with ``--quick`` (flags given explicitly override both).
SIZES = dict(
    preset="small", batch=8, seq=128, prompt_len=64, new_tokens=64, iterations=10, repeats=10
)
QUICK = dict(preset="tiny", batch=2, seq=16, prompt_len=8, new_tokens=8, iterations=2, repeats=3)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", default="all", help=f"comma list of {', '.join(STEPS)}; all; none"
    )
    parser.add_argument("--preset", choices=list(PRESETS), help="model size; small by default")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mesh", default=None, help="e.g. fsdp=8 or data=2,fsdp=4 (LM steps)")
    parser.add_argument("--rules", default="default", choices=sorted(sharding.RULE_PRESETS))
    parser.add_argument("--remat", action="store_true", help="rematerialise layer activations")
    parser.add_argument("--repeats", type=int, help="timed calls per step; 10 (--quick: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--batch", type=int, help="rows (pairs for dpo/reward); 8")
    parser.add_argument("--seq", type=int, help="tokens per sequence; 128")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens of --seq (RLHF); 64")
    parser.add_argument("--new-tokens", type=int, help="generated tokens per row; 64")
    parser.add_argument("--env", default="CartPole-v1", help="classic-control environment")
    parser.add_argument("--iterations", type=int, help="classic-control iterations; 10")
    parser.add_argument("--memory-devices", type=int, default=8, help="FSDP comparison mesh")
    parser.add_argument(
        "--memory",
        default="all",
        choices=["all", "fsdp", "remat", "none"],
        help="memory comparisons to run (fsdp: compile only; remat: compile and time)",
    )
    parser.add_argument(
        "--memory-preset", choices=list(PRESETS), help="model of the FSDP comparison (--preset)"
    )
    parser.add_argument(
        "--fast-compile",
        action="store_true",
        help="XLA:CPU options that compile faster and run slower (smoke runs; implied by --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny preset, small batches, 3 calls, --fast-compile"
    )
    parser.add_argument("--json", default="benchmarks/step_speed_results.json", help="output")
    parser.add_argument(
        "--results-md",
        nargs="?",
        const=str(_HERE / "RESULTS.md"),
        default=None,
        help="append a section with the tables to this file (default benchmarks/RESULTS.md)",
    )
    args = parser.parse_args(argv)
    args.argv = list(argv)
    for k, v in (QUICK if args.quick else SIZES).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.warmup, args.fast_compile = min(args.warmup, 1), True
    if args.steps in ("all", "none"):
        names = list(STEPS) + list(UNAVAILABLE) if args.steps == "all" else []
    else:
        names = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in names if s not in STEPS and s not in UNAVAILABLE]
    if unknown:
        parser.error(f"--steps: unknown {unknown}; choose from {', '.join(STEPS)}")
    if not 0 < args.prompt_len < args.seq:
        parser.error(f"--prompt-len {args.prompt_len} must be in (0, --seq {args.seq})")
    args.step_names = names
    return args


def main(argv=None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    mesh = None
    if args.mesh:
        mesh = sharding.make_mesh(args.mesh, devices=jax.devices()[: _mesh_size(args.mesh)])
    fast = args.fast_compile and jax.default_backend() == "cpu"
    options = dict(bench.FAST_COMPILE_CPU_OPTIONS) if fast else None
    ctx = Context(args, mesh, sharding.RULE_PRESETS[args.rules], options)
    env = {**bench.environment(), "load_avg_start": os.getloadavg()}
    print(f"step_speed on {env['device']} ({env['device_count']} device(s)), jax {env['jax']}")
    rows, skipped = [], {}
    for name in args.step_names:
        if name in UNAVAILABLE:
            skipped[name] = UNAVAILABLE[name]
            print(f"[{name}] skipped: {UNAVAILABLE[name]}")
            continue
        row = measure(
            name,
            STEPS[name](ctx),
            repeats=args.repeats,
            warmup=args.warmup,
            compiler_options=options,
        )
        rows.append(row)
        print(
            f"[{name}] compile {row['compile_s']:.2f}s, step {row['median_s']:.4g}s "
            f"[{row['p10_s']:.4g}-{row['p90_s']:.4g}], {row['throughput']:,.0f} {row['unit']}/s",
            flush=True,
        )
    by_name = {r["step"]: r for r in rows}
    for name in ("fvp", "fvp_cg"):
        if name in by_name and "fvp_grad" in by_name:
            by_name[name]["x_grad"] = by_name[name]["median_s"] / by_name["fvp_grad"]["median_s"]
    memory = {}
    if args.memory in ("all", "fsdp"):
        big = argparse.Namespace(**{**vars(args), "preset": args.memory_preset or args.preset})
        memory["fsdp"] = fsdp_memory(dataclasses.replace(ctx, args=big))
    if args.memory in ("all", "remat"):
        memory["remat"] = remat_memory(ctx, by_name.get("dpo"))
    env["load_avg_end"] = os.getloadavg()
    if rows:
        print(bench.markdown_table(_table_rows(rows), COLUMNS))
    if memory:
        print("\n" + memory_tables(memory))
    record = {
        "environment": env,
        "compiler_options": options,
        "args": {k: v for k, v in vars(args).items()},
        "results": rows,
        "skipped": skipped,
        "memory": memory,
    }
    _common.write_json(args.json, record, default=str)
    if args.results_md:
        with open(args.results_md, "a") as f:
            f.write("\n" + results_section(env, args, rows, memory))
        print(f"appended to {args.results_md}")
    return record


def _mesh_size(spec: str) -> int:
    sizes = sharding.parse_mesh_spec(spec)
    if any(v == -1 for v in sizes.values()):
        return len(jax.devices())
    return math.prod(sizes.values())


if __name__ == "__main__":
    main()
