"""Plan one update step's memory per device at sizes this machine cannot hold: compile the step
for a device mesh from abstract shapes only and read XLA's memory analysis.

Nothing of the model is allocated: the model and the train state are built with
``nnx.eval_shape`` / ``jax.eval_shape``, the batch is ``jax.ShapeDtypeStruct``\\ s, and the
step is lowered and compiled (``jax.jit(update, in_shardings=..., out_shardings=...,
donate_argnums=0).lower(...).compile()``) for the mesh's devices, by default 8 simulated CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set by the script itself when
run as a script and the variable does not already ask for devices; when importing it, set the
variable before jax is imported). Parameters and the batch are placed with the rules of
:mod:`rljax.sharding` (``--rules``, default :data:`rljax.sharding.DEFAULT_RULES`: parameters
split along ``embed`` over ``fsdp`` and along heads / MLP width / vocabulary over ``tensor``;
the batch split over ``data`` x ``fsdp``), exactly as :func:`rljax.updates.lm.compile_update`
places a real run.

Update steps (``--algo``), each with ``optax.chain(clip_by_global_norm(1.0), adamw(...))``,
float32 master weights (``TransformerConfig.param_dtype``) and the compute dtype ``--dtype``:

* ``dpo``: :func:`rljax.updates.make_dpo_update`, sigmoid loss, ``--batch`` pairs of ``--seq``
  tokens (chosen and rejected: ``2 x batch`` sequences in one forward pass), the reference
  log-probs precomputed in the batch (``--reference precomputed``) or from a frozen float32 copy
  of the policy in the state (``--reference model``);
* ``grpo``: :func:`rljax.updates.make_grpo_update` (DAPO loss, no KL term, one epoch of one
  minibatch), ``--batch`` sequences of ``--prompt-len`` prompt + ``seq - prompt_len`` completion
  tokens;
* ``ppo``: :func:`rljax.updates.make_rlhf_ppo_update` with a value head on the policy (TRL's PPO
  settings: 4 epochs of one minibatch, value coefficient 0.1), the GRPO batch plus returns and
  old values;
* ``reward``: :func:`rljax.updates.make_reward_update` on a reward-head model (no LM head),
  ``--batch`` pairs.

What is trained and what is frozen is decided in one place, :func:`model_parts`: full
fine-tuning, or with ``--lora-rank R`` LoRA adapters (:mod:`rljax.models.lora`, every projection,
alpha = R) on a frozen base stored in ``--lora-base-dtype`` (default bfloat16), the adapters (and
a scalar head) trained in float32 with Adam moments for them only; DPO's ``--reference model`` is
then the base with the adapters switched off (no second copy: ``P_ref = 0``).

Reported (``--json``): ``params_total``, ``params_trainable``, ``per_device_bytes``
(``arguments``, ``temp``, ``outputs``, ``alias`` and ``total = arguments + outputs + temp -
alias`` from ``compiled.memory_analysis()``; the state is donated, so its outputs alias its
arguments), ``fits_80gb`` (``total <= 80e9``) and the analytic check below.

Analytic check of the argument bytes. With ``P`` trainable parameters stored in ``b = 4`` bytes
(float32), AdamW's two moments (``mu``, ``nu``) in the same dtype, ``P_ref`` reference parameters
(``--reference model``: ``P_ref = P``, else 0), ``P_frozen`` frozen parameters in ``b_frozen``
bytes, ``S`` the number of devices the parameter rules split over (the product of the mesh axes
they use: ``fsdp x tensor``) and ``D`` the number the batch is split over (``data x fsdp``)::

    arguments ~= (P * b * (1 + 2) + P_ref * b + P_frozen * b_frozen) / S + batch_bytes / D

This is exact for every leaf split over all ``S`` devices; leaves the rules leave whole (norm
scales; biases and per-head norms, which have no ``embed`` dimension; a dimension an axis does
not divide; their parameter count is ``unsplit_params``) are held in full on every device, and
the few scalars (step counters, Adam's count, the RNG key) are not in the formula, so XLA's
figure is a little above it. The script also sums the exact per-device shard bytes of every
argument (``exact_bytes``), which XLA's argument bytes equal. On the shipped 7-8B configs on
``fsdp=8`` the formula is within 0.03% of XLA's figure for full fine-tuning (with LoRA it is a
lower bound: adapter matrices without a dimension ``fsdp`` splits are whole on every device); ``tests/test_memory_plan.py`` asserts,
on a tiny Llama on ``fsdp=8`` (each step), that XLA's argument bytes equal the per-leaf count,
exceed the formula by no more than the unsplit leaves' copies and the scalars, and are within
5% of the formula (2.1% there: its norm scales are 0.3% of its parameters).

Run::

    python benchmarks/memory_plan.py --config benchmarks/configs/llama-3.1-8b.json --algo dpo \\
        --mesh fsdp=8 --batch 8 --seq 2048 --remat --json benchmarks/memory_plan/OUT.json

``--config`` is a Hugging Face ``config.json`` (or a folder holding one; weights are not read),
converted with :func:`rljax.models.hf.config_from_hf`. ``benchmarks/configs/`` has the shapes of
Qwen2.5-7B, Llama-3.1-8B and Qwen3-8B. ``--results-table`` prints the markdown table of
``benchmarks/RESULTS.md`` from a folder of saved JSON files instead of compiling.

The temporary bytes are XLA:CPU's buffer assignment for this program; a GPU compile of the same
program fuses differently (and does bfloat16 matrix products natively), so take them as an
estimate of the accelerator's figure, not a measurement of it.
"""

from __future__ import annotations

import math
import os
import re
import sys


def _devices_needed(argv) -> int:
    """The devices ``--mesh`` needs (8 when it is not given or has a ``-1`` axis)."""
    mesh = re.search(r"--mesh[= ](\S+)", " ".join(argv))
    sizes = [int(v) for v in re.findall(r"=(-?\d+)", mesh.group(1))] if mesh else []
    return math.prod(sizes) if sizes and min(sizes) > 0 else 8


if __name__ == "__main__":  # before jax is imported
    from _devices import simulate_host_devices

    simulate_host_devices(_devices_needed(sys.argv[1:]))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import _common  # noqa: E402

from rljax import bench, sharding, updates  # noqa: E402
from rljax.models import hf, lora  # noqa: E402
from rljax.models.transformer import Transformer, TransformerConfig  # noqa: E402

ALGOS = ("dpo", "grpo", "ppo", "reward")
#: The scalar head each step's model carries.
HEADS = {"dpo": None, "grpo": None, "ppo": "value", "reward": "reward"}
#: AdamW's moments per trainable parameter (mu and nu, each stored like the parameter).
ADAM_MOMENTS = 2
FITS_BYTES = 80e9  # one 80 GB accelerator


# ------------------------------------------------------------------------------ the model


def read_config(path: str | os.PathLike, *, algo: str, dtype: str, remat: bool):
    """The :class:`TransformerConfig` of a Hugging Face ``config.json`` (or of a folder holding
    one), with float32 parameters, compute dtype ``dtype``, ``remat`` and ``algo``'s head."""
    path = pathlib.Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"--config: {file} does not exist (a config.json or its folder)")
    raw = json.loads(file.read_text())
    # attention_impl="xla": the accelerator's XLA attention, not the CPU default ("grouped")
    overrides = dict(param_dtype="float32", dtype=dtype, remat=remat, attention_impl="xla")
    if HEADS[algo] is not None:
        overrides["head"] = HEADS[algo]
    return hf.config_from_hf(raw, **overrides)


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The model as shapes only: ``graphdef``; ``params``, what the update steps take as the
    parameters; the ``trainable`` ones among them (the optimizer's moments mirror these) and the
    ``frozen`` ones (``None``: nothing frozen). Leaves are abstract arrays in ``nnx.Param``\\ s
    that carry their ``logical_axes``."""

    config: TransformerConfig
    graphdef: Any
    params: Any
    trainable: Any
    frozen: Any = None


def model_parts(
    config: TransformerConfig, lora_rank: int = 0, lora_base_dtype: str | None = "bfloat16"
) -> ModelParts:
    """Build the model abstractly (``nnx.eval_shape``: no array is allocated) and split its
    parameters into trainable and frozen.

    ``lora_rank == 0``: full fine-tuning, every ``nnx.Param`` trainable, nothing frozen. Else
    LoRA adapters of that rank on every projection (:func:`rljax.models.lora.apply`, alpha =
    rank), the base cast to ``lora_base_dtype`` and frozen: ``params`` is the
    :class:`rljax.models.lora.LoRAParams` the updates take, ``trainable`` the adapters (and a
    scalar head), ``frozen`` the base.
    """
    if not lora_rank:
        abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(abstract, nnx.Param)
        return ModelParts(config, graphdef, params, trainable=params)
    abstract = nnx.eval_shape(
        lambda: lora.apply(
            Transformer(config, rngs=nnx.Rngs(0)), lora_rank, base_dtype=lora_base_dtype
        )
    )
    graphdef, params = lora.split(abstract)
    return ModelParts(config, graphdef, params, params.trainable, params.frozen)


def count(tree: Any) -> int:
    """Number of array elements in ``tree`` (0 for ``None``)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------ the steps


def optimizer() -> optax.GradientTransformation:
    """AdamW with global-norm clipping (TRL's defaults: max_grad_norm 1.0); the learning rate
    does not change the memory."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.0))


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def pair_batch(args: argparse.Namespace, *, loss_masks: bool = True) -> dict:
    """The preference batch of ``--batch`` pairs of ``--seq`` tokens (the :mod:`rljax.data`
    contract) as shapes."""
    shape = (args.batch, args.seq)
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = _spec(shape, jnp.int32)
        batch[f"{side}_mask"] = _spec(shape, bool)
        if loss_masks:
            batch[f"{side}_loss_mask"] = _spec(shape, bool)
    return batch


def rollout_batch(args: argparse.Namespace, *, critic: bool = False) -> dict:
    """The RL batch of ``--batch`` rows of ``--prompt-len`` + completion tokens as shapes
    (``tokens``/``mask`` ``[B, T]``, per-token arrays ``[B, N]``)."""
    b, t, n = args.batch, args.seq, args.seq - args.prompt_len
    batch = {
        "tokens": _spec((b, t), jnp.int32),
        "mask": _spec((b, t), bool),
        "completion_mask": _spec((b, n), bool),
        "old_logps": _spec((b, n), jnp.float32),
    }
    if critic:  # PPO: per-token advantages, returns and old values
        for key in ("advantages", "returns", "old_values"):
            batch[key] = _spec((b, n), jnp.float32)
    else:  # GRPO: one advantage per sequence
        batch["advantages"] = _spec((b,), jnp.float32)
    return batch


def build_dpo(parts: ModelParts, args: argparse.Namespace):
    opt = optimizer()
    config = updates.DPOConfig(beta=0.1, reference=args.reference)
    update = updates.make_dpo_update(parts.graphdef, opt, config)
    # With LoRA the reference is the base with the adapters off: no copy in the state.
    with_reference = args.reference == "model" and not lora.has_lora(parts.params)
    init = lambda p: updates.init_dpo_state(p, opt, ref_params=p if with_reference else None)
    batch = pair_batch(args)
    if args.reference == "precomputed":
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            batch[key] = _spec((args.batch,), jnp.float32)
    reference = count(parts.trainable) if with_reference else 0
    return update, jax.eval_shape(init, parts.params), batch, reference


def build_grpo(parts: ModelParts, args: argparse.Namespace):
    opt = optimizer()
    update = updates.make_grpo_update(parts.graphdef, opt, updates.GRPOConfig())
    init = lambda p: updates.init_grpo_state(p, opt, jax.random.key(0))
    return update, jax.eval_shape(init, parts.params), rollout_batch(args), 0


def build_ppo(parts: ModelParts, args: argparse.Namespace):
    opt = optimizer()
    ppo = updates.PPOConfig(value_coef=0.1, num_minibatches=1)  # TRL's PPO trainer's
    update = updates.make_rlhf_ppo_update(parts.graphdef, opt, ppo, critic="head")
    init = lambda p: updates.init_rlhf_ppo_state(p, opt, jax.random.key(0))
    return update, jax.eval_shape(init, parts.params), rollout_batch(args, critic=True), 0


def build_reward(parts: ModelParts, args: argparse.Namespace):
    opt = optimizer()
    update = updates.make_reward_update(parts.graphdef, opt)
    init = lambda p: updates.init_reward_state(p, opt)
    return update, jax.eval_shape(init, parts.params), pair_batch(args, loss_masks=False), 0


#: ``--algo`` -> ``builder(parts, args) -> (update, abstract state, abstract batch, reference
#: parameter count)``.
BUILDERS: dict[str, Callable] = {
    "dpo": build_dpo,
    "grpo": build_grpo,
    "ppo": build_ppo,
    "reward": build_reward,
}


# ------------------------------------------------------------------------------ planning


def _with_shardings(tree: Any, shardings: Any) -> Any:
    """``tree``'s leaves as ``ShapeDtypeStruct``\\ s carrying ``shardings`` (a prefix tree)."""
    return jax.tree.map(
        lambda s, sub: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub
        ),
        shardings,
        tree,
    )


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree`` (abstract arrays with shardings): each leaf's shard."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def _param_axes(params: Any, rules: sharding.ShardingRules) -> set[str]:
    """The mesh axes the rules map any parameter dimension to."""
    names = set()
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names.update(n for n in (leaf.get_metadata().get("logical_axes") or ()) if n)
    return {axis for name in names for axis in rules.mesh_axes(name)}


def analytic(
    parts: ModelParts,
    reference_params: int,
    batch: Any,
    mesh: jax.sharding.Mesh,
    rules: sharding.ShardingRules,
) -> dict[str, Any]:
    """The formula of the module docstring: argument bytes per device from parameter counts."""
    b = jnp.dtype(parts.config.param_dtype).itemsize
    frozen_b = max((x.dtype.itemsize for x in jax.tree.leaves(parts.frozen)), default=0)
    s = math.prod(mesh.shape[a] for a in _param_axes(parts.params, rules))
    d = math.prod(mesh.shape[a] for a in rules.mesh_axes("batch"))
    trainable = count(parts.trainable)
    terms = {
        "params_bytes": trainable * b / s,
        "optimizer_bytes": trainable * b * ADAM_MOMENTS / s,
        "reference_bytes": reference_params * b / s,
        "frozen_bytes": count(parts.frozen) * frozen_b / s,
        "batch_bytes": sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(batch))
        / d,
    }
    return {
        "formula": "(P*b*(1+2) + P_ref*b + P_frozen*b_frozen)/S + batch_bytes/D",
        "b": b,
        "S": s,
        "D": d,
        **terms,
        "total_bytes": sum(terms.values()),
    }


def unsplit_params(params: Any, mesh: jax.sharding.Mesh, rules: sharding.ShardingRules) -> int:
    """Parameters in leaves the rules do not split over all the parameter devices (norm
    scales, biases, a dimension an axis does not divide): each device holds more of them than
    the formula's even split."""
    shardings = sharding.param_shardings(params, mesh, rules)
    s = math.prod(mesh.shape[a] for a in _param_axes(params, rules))
    leaves = jax.tree.leaves(params)
    return sum(
        math.prod(x.shape)
        for x, sh in zip(leaves, jax.tree.leaves(shardings), strict=True)
        if math.prod(sh.shard_shape(x.shape)) * s != math.prod(x.shape)
    )


def plan(args: argparse.Namespace, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Compile ``args.algo``'s step for ``mesh`` from shapes and report its memory per device."""
    rules = sharding.RULE_PRESETS[args.rules]
    config = read_config(args.config, algo=args.algo, dtype=args.dtype, remat=args.remat)
    parts = model_parts(config, args.lora_rank, args.lora_base_dtype)
    update, state, batch, reference_params = BUILDERS[args.algo](parts, args)

    state_shardings = sharding.train_state_shardings(state, mesh, rules)
    batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(mesh, rules), batch)
    abstract_state = _with_shardings(state, state_shardings)
    abstract_batch = _with_shardings(batch, batch_shardings)
    options = dict(bench.FAST_COMPILE_CPU_OPTIONS) if args.fast_compile else None
    compiled, compile_s = bench.compile_ahead(
        sharding.on_mesh(update, mesh, rules),  # as rljax.updates.lm.compile_update does
        abstract_state,
        abstract_batch,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=options,
    )
    memory = bench.memory_analysis(compiled)
    if memory is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
    per_device = {
        "arguments": memory["argument_size_in_bytes"],
        "temp": memory["temp_size_in_bytes"],
        "outputs": memory["output_size_in_bytes"],
        "alias": memory["alias_size_in_bytes"],
        "total": memory["total_bytes"],
    }
    formula = analytic(parts, reference_params, batch, mesh, rules)
    exact = shard_bytes(abstract_state) + shard_bytes(abstract_batch)
    frozen = count(parts.frozen)
    return {
        "config": str(args.config),
        "model_type": json.loads(_config_file(args.config).read_text()).get("model_type"),
        "algo": args.algo,
        "mesh": dict(mesh.shape),
        "rules": args.rules,
        "devices": mesh.size,
        "platform": mesh.devices.flat[0].platform,
        "batch": args.batch,
        "seq": args.seq,
        "prompt_len": args.prompt_len if args.algo in ("grpo", "ppo") else None,
        "reference": args.reference if args.algo == "dpo" else None,
        "dtype": args.dtype,
        "param_dtype": config.param_dtype,
        "remat": args.remat,
        "params_total": count(parts.trainable) + frozen,
        "params_trainable": count(parts.trainable),
        "params_reference": reference_params,
        "per_device_bytes": per_device,
        "fits_80gb": per_device["total"] <= FITS_BYTES,
        "compile_s": compile_s,
        "analytic": {
            **formula,
            "exact_bytes": exact,
            "unsplit_params": unsplit_params(parts.params, mesh, rules),
            "arguments_vs_formula": per_device["arguments"] / formula["total_bytes"] - 1,
            "arguments_minus_exact": per_device["arguments"] - exact,
        },
        "jax": jax.__version__,
    }


def _config_file(path) -> pathlib.Path:
    path = pathlib.Path(path)
    return path / "config.json" if path.is_dir() else path


# ------------------------------------------------------------------------------ reporting

GB = 1e9


def _shape(record: dict[str, Any]) -> str:
    b, t, p = record["batch"], record["seq"], record["prompt_len"]
    if record["algo"] in ("dpo", "reward"):
        return f"{b} pairs x {t}"
    return f"{b} x ({p} + {t - p})"


def results_table(records: list[dict[str, Any]]) -> str:
    """The markdown table of ``benchmarks/RESULTS.md``: one row per record, by step, model,
    full fine-tuning before LoRA, remat off before on."""
    order = lambda r: (
        ALGOS.index(r["algo"]), r["reference"] == "model", pathlib.Path(r["config"]).stem,
        r["params_trainable"] != r["params_total"], r["remat"],
    )  # fmt: skip
    rows = []
    for r in sorted(records, key=order):
        m = r["per_device_bytes"]
        rows.append(
            {
                "model": pathlib.Path(r["config"]).stem,
                "algo": r["algo"] + (" (reference model)" if r["reference"] == "model" else ""),
                "training": "full" if r["params_trainable"] == r["params_total"] else "LoRA",
                "remat": "on" if r["remat"] else "off",
                "shape": _shape(r),
                "params": f"{r['params_total'] / 1e9:.2f}B",
                "args": f"{m['arguments'] / GB:.1f}",
                "formula": f"{r['analytic']['total_bytes'] / GB:.1f}",
                "temp": f"{m['temp'] / GB:.1f}",
                "total": f"{m['total'] / GB:.1f}",
                "fits": "yes" if r["fits_80gb"] else "no",
                "compile": f"{r['compile_s']:.0f}",
            }
        )
    columns = [
        ("model", "model"),
        ("algo", "step"),
        ("training", "training"),
        ("remat", "remat"),
        ("shape", "batch (per step)"),
        ("params", "params"),
        ("args", "args GB"),
        ("formula", "formula GB"),
        ("temp", "temp GB"),
        ("total", "total GB"),
        ("fits", "fits 8 x 80 GB"),
        ("compile", "compile s"),
    ]
    return bench.markdown_table(rows, columns)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a Hugging Face config.json (or its folder)")
    parser.add_argument("--algo", choices=ALGOS, help="the update step to compile")
    parser.add_argument("--mesh", default="fsdp=8", help="device mesh, e.g. fsdp=8 (default)")
    parser.add_argument("--rules", default="default", choices=sorted(sharding.RULE_PRESETS))
    parser.add_argument("--remat", action="store_true", help="rematerialise layer activations")
    parser.add_argument("--batch", type=int, default=8, help="pairs (dpo, reward) or rows; 8")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence; 2048")
    parser.add_argument(
        "--prompt-len", type=int, help="prompt tokens of --seq (grpo, ppo); --seq // 4"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--reference",
        default="precomputed",
        choices=["precomputed", "model"],
        help="dpo: reference log-probs in the batch, or a frozen model in the state",
    )
    parser.add_argument(
        "--fast-compile", action="store_true", help="XLA:CPU options that compile faster"
    )
    parser.add_argument(
        "--lora-rank", type=int, default=0, help="LoRA adapters of this rank; 0 = full (default)"
    )
    parser.add_argument(
        "--lora-base-dtype",
        default=None,
        choices=["bfloat16", "float32"],
        help="with --lora-rank: the frozen base's dtype; bfloat16 (default)",
    )
    parser.add_argument("--json", help="write the report here")
    parser.add_argument(
        "--results-table",
        metavar="FOLDER",
        help="print the RESULTS.md table of the JSON reports in FOLDER and exit",
    )
    args = parser.parse_args(argv)
    if args.results_table:
        return args
    if not args.config or not args.algo:
        parser.error("--config and --algo are required (or --results-table FOLDER)")
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    if args.lora_base_dtype is not None and not args.lora_rank:
        parser.error("--lora-base-dtype is read only with --lora-rank > 0")
    args.lora_base_dtype = args.lora_base_dtype or "bfloat16"
    for flag in ("batch", "seq"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.prompt_len is None:
        args.prompt_len = max(args.seq // 4, 1)
    if args.algo in ("grpo", "ppo") and not 0 < args.prompt_len < args.seq:
        parser.error(f"--prompt-len {args.prompt_len} must be in (0, --seq {args.seq})")
    try:
        sizes = sharding.parse_mesh_spec(args.mesh)
    except ValueError as error:
        parser.error(f"--mesh: {error}")
    if any(size == -1 for size in sizes.values()):
        parser.error(f"--mesh {args.mesh!r}: give every axis a size (no -1) to plan for")
    args.devices = math.prod(sizes.values())
    rules = sharding.RULE_PRESETS[args.rules]
    shards = math.prod(sizes[a] for a in rules.mesh_axes("batch"))
    if args.batch % shards:
        parser.error(
            f"--batch {args.batch} is not divisible by the batch axes of --mesh {args.mesh} "
            f"({shards} devices); make it a multiple of {shards}"
        )
    return args


def main(argv=None) -> dict[str, Any] | str:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.results_table:
        files = pathlib.Path(args.results_table).glob("*.json")
        records = [json.loads(f.read_text()) for f in files]
        order = lambda r: (
            ALGOS.index(r["algo"]),
            r["reference"] == "model",
            r["config"],
            r["remat"],
        )
        table = results_table(sorted(records, key=order))
        print(table)
        return table
    devices = jax.devices()
    if len(devices) < args.devices:
        sys.exit(
            f"--mesh {args.mesh} needs {args.devices} devices, {len(devices)} visible: run it as "
            f"a script (it simulates CPU devices) or set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={args.devices} before jax is imported"
        )
    mesh = sharding.make_mesh(args.mesh, devices=devices[: args.devices])
    record = plan(args, mesh)
    m, a = record["per_device_bytes"], record["analytic"]
    print(
        f"{record['config']} {args.algo} on {args.mesh} ({record['platform']}), "
        f"{record['params_total'] / 1e9:.2f}B params, compiled in {record['compile_s']:.1f} s; "
        f"per device: arguments {m['arguments'] / GB:.2f} GB (formula "
        f"{a['total_bytes'] / GB:.2f} GB, {a['arguments_vs_formula']:+.2%}), temp "
        f"{m['temp'] / GB:.2f} GB, outputs {m['outputs'] / GB:.2f} GB, total "
        f"{m['total'] / GB:.2f} GB; fits 80 GB: {record['fits_80gb']}"
    )
    if args.json:
        _common.write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
