"""Speed of the language-model stack: a training step and KV-cache decoding.

For a named model size (``rljax.models.transformer.PRESETS``: tiny, small, 125m, 1b):

* **train**: one compiled step of next-token cross-entropy, forward + backward + AdamW
  (float32 master weights and optimizer state, compute in ``--dtype``). Reports compile time,
  median step time (10th-90th percentile), tokens/s, model FLOPs per step (6N per token plus
  attention, PaLM's count), MFU against the device's bfloat16 peak where known, and XLA's
  compiled memory analysis. ``--remat`` recomputes layer activations in the backward pass.
* **decode**: greedy generation of ``--new-tokens`` tokens for ``--decode-batch`` prompts of
  ``--prompt-len`` tokens (``rljax.models.generate``), decode tokens/s, and the memory-bandwidth
  bound: every decode step reads all parameters and the KV cache written so far, so the step
  cannot beat ``(parameter bytes + mean KV-cache bytes) / bandwidth``, with the bandwidth
  measured on this device by an elementwise pass over a large array.

Run: ``python benchmarks/lm_speed.py --preset 125m --dtype bfloat16`` (``--quick`` for a tiny
smoke run); prints a markdown table and writes JSON (``--json PATH``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the benchmarks' shared helpers (_common.py)
    sys.path.insert(0, str(_HERE))

import _common  # noqa: E402

from rljax import bench  # noqa: E402
from rljax.logprobs import token_logprobs  # noqa: E402
from rljax.models import generate as gen  # noqa: E402
from rljax.models.transformer import Transformer, preset  # noqa: E402


def build(args):
    config = preset(args.preset, dtype=args.dtype, param_dtype="float32", remat=args.remat)
    model = Transformer(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    return config, model, graphdef, params


def train_batch(config, batch: int, seq: int) -> tuple[jax.Array, jax.Array]:
    """Random ``tokens`` and an all-ones ``mask``, ``[batch, seq + 1]`` (inputs plus the
    shifted targets)."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq + 1)), jnp.int32)
    return tokens, jnp.ones_like(tokens, bool)


def make_train_step(graphdef, optimizer):
    """``step((params, opt_state), tokens, mask) -> ((params, opt_state), loss)``: one optax
    step on the mean next-token cross-entropy over the valid target tokens."""

    def loss_fn(p, tokens, mask):
        model = nnx.merge(graphdef, p)
        logits = model(tokens[:, :-1], mask[:, :-1])
        valid = mask[:, 1:]
        return -jnp.sum(token_logprobs(logits, tokens[:, 1:]) * valid) / jnp.sum(valid)

    def step(state, tokens, mask):
        p, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens, mask)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    return step


def train_benchmark(args, config, graphdef, params):
    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    tokens, mask = train_batch(config, args.batch, args.seq)
    step = make_train_step(graphdef, optimizer)

    params = jax.tree.map(jnp.copy, params)  # the step donates its state; keep the caller's
    state = (params, optimizer.init(params))
    compiled, compile_s = bench.compile_ahead(step, state, tokens, mask, donate_argnums=0)
    timing = bench.time_calls(
        (lambda s: compiled(s, tokens, mask)[0], state), steps=args.steps, warmup=2, carry=True
    )
    tokens_per_step = args.batch * args.seq
    flops = bench.transformer_flops_per_token(config, args.seq) * tokens_per_step
    peak = bench.device_peak_flops()
    return {
        "phase": "train",
        "preset": args.preset,
        "dtype": args.dtype,
        "remat": args.remat,
        "batch": args.batch,
        "seq": args.seq,
        "params": config.num_params,
        "compile_s": compile_s,
        **timing.summary(),
        "tokens_per_s": tokens_per_step / timing.median,
        "model_flops_per_step": flops,
        "achieved_tflops": flops / timing.median / 1e12,
        "mfu": None if peak is None else flops / timing.median / peak,
        "memory": bench.memory_analysis(compiled),
        "peak_memory_bytes": bench.peak_memory_bytes(),
    }


def decode_benchmark(args, config, graphdef, params):
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(
        rng.integers(0, config.vocab_size, (args.decode_batch, args.prompt_len)), jnp.int32
    )
    prompt_mask = jnp.ones_like(prompts, bool)
    sampling = gen.SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    fn = gen.make_generate_fn(graphdef, sampling)
    key = jax.random.key(0)
    start = time.perf_counter()
    jax.block_until_ready(fn(params, prompts, prompt_mask, key))
    first_call_s = time.perf_counter() - start
    timing = bench.time_calls(
        lambda: fn(params, prompts, prompt_mask, key), steps=args.decode_steps, warmup=1
    )
    # Prefill is inside the timed call; measure it alone to separate the decode loop.
    prefill = gen.SamplingConfig(max_new_tokens=1, temperature=0.0)
    prefill_fn = gen.make_generate_fn(graphdef, prefill)
    jax.block_until_ready(prefill_fn(params, prompts, prompt_mask, key))
    prefill_timing = bench.time_calls(
        lambda: prefill_fn(params, prompts, prompt_mask, key), steps=args.decode_steps, warmup=1
    )
    decode_s = max(timing.median - prefill_timing.median, 1e-9)
    steps = args.new_tokens - 1
    param_bytes, kv_bytes = _common.decode_step_bytes(
        config, args.decode_batch, args.prompt_len, args.new_tokens
    )
    bandwidth = bench.measure_bandwidth()
    bound_step_s = (param_bytes + kv_bytes) / bandwidth
    step_s = decode_s / max(steps, 1)
    return {
        "phase": "decode",
        "preset": args.preset,
        "dtype": args.dtype,
        "batch": args.decode_batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "params": config.num_params,
        "compile_s": first_call_s - timing.median,
        **timing.summary(),
        "prefill_s": prefill_timing.median,
        "decode_step_s": step_s,
        "tokens_per_s": args.decode_batch * steps / decode_s,
        "bandwidth_gb_s": bandwidth / 1e9,
        "bound_step_s": bound_step_s,
        "fraction_of_bound": bound_step_s / step_s,
        "peak_memory_bytes": bench.peak_memory_bytes(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=5)
    parser.add_argument("--phases", default="train,decode")
    parser.add_argument("--quick", action="store_true", help="tiny preset, few steps")
    parser.add_argument("--json", default="benchmarks/lm_speed_results.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.seq, args.steps = "tiny", 2, 32, 3
        args.decode_batch, args.prompt_len, args.new_tokens, args.decode_steps = 2, 8, 8, 2
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - {"train", "decode"})
    if unknown:
        parser.error(f"--phases: unknown {unknown}; choose from train, decode")

    config, _, graphdef, params = build(args)
    env = bench.environment()
    print(f"{args.preset}: {config.num_params / 1e6:.1f}M parameters on {env['device']}")
    rows = []
    if "train" in phases:
        rows.append(train_benchmark(args, config, graphdef, params))
    if "decode" in phases:
        rows.append(decode_benchmark(args, config, graphdef, params))
    columns = [
        ("phase", "phase"),
        ("preset", "preset"),
        ("dtype", "dtype"),
        ("batch", "batch"),
        ("compile_s", "compile s"),
        ("median_s", "call s (median)"),
        ("tokens_per_s", "tokens/s"),
        ("achieved_tflops", "TFLOP/s"),
        ("mfu", "MFU"),
        ("fraction_of_bound", "of bandwidth bound"),
    ]
    print(bench.markdown_table(rows, columns))
    _common.write_json(args.json, {"environment": env, "results": rows})
    return rows


if __name__ == "__main__":
    main()
