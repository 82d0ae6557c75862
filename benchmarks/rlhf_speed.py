"""Per-phase time of one rljax RLHF iteration, on the configuration of the TRL peer
(``benchmarks/peers/trl_ppo.py``).

The models: ``TransformerConfig.llama(vocab_size=2048, hidden_size=256, num_layers=4,
num_heads=4, intermediate_size=688, tie_word_embeddings=False)`` in float32 (the layout of
``transformers.LlamaConfig`` with those sizes, as ``benchmarks/dpo_speed.py``), random weights
(``benchmarks/step_speed.py``'s :func:`random_model`): the policy; the reference, a frozen model
of the same architecture; a value model (the same backbone with a value head and no LM head,
TRL's separate critic) and a reward model (a reward head, no LM head, TRL's
``AutoModelForSequenceClassification``); for the ``head`` PPO variant a policy with a value
head on it (:func:`rljax.models.transformer.with_head`'s layout, one forward pass).

One iteration, every phase compiled ahead of time and timed on its own (synchronised with
``block_until_ready``), in the order of :func:`rljax.rl.rlhf.run`:

* **generation**: ``--batch`` random prompts of ``--prompt-len`` tokens, ``--new-tokens``
  sampled at temperature 1 with a KV cache (the program of
  :func:`rljax.models.generate.make_generate_fn`), ``eos_token_id=None`` so every row has
  the full length. The decode step time is the
  generation time less the prefill's (a 1-token generation, timed apart) over the remaining
  ``N - 1`` steps, against the memory-bandwidth bound as in ``benchmarks/lm_speed.py``: each
  step reads every parameter and the KV cache written so far, so it cannot beat
  ``(parameter bytes + mean KV-cache bytes) / bandwidth``, the bandwidth measured here by an
  elementwise pass over a large array (:func:`rljax.bench.measure_bandwidth`).
* **policy / reference / value forward**: :func:`rljax.updates.completion_outputs` (chunked
  log-probs and entropies of the completion tokens) of the policy and of the reference over
  the ``P + N`` tokens, and the critic's values (the value model; with ``head``, the policy's
  own head in the same pass, timed as its own row).
* **scoring**: the reward model's score at the last token (``Transformer.rewards``).
* **shaping**: :func:`rljax.rl.rlhf.make_shaping_fn` (per-token KL penalty, token GAE).
* **update**: :func:`rljax.updates.make_rlhf_ppo_update`, ``--epochs`` (4) passes of
  ``--minibatches`` (1) minibatches, TRL's ``num_ppo_epochs`` and ``num_mini_batches``
  defaults, AdamW lr 3e-6 (TRL's), with the separate critic (``critic="separate"``, TRL's
  layout) and with the value head (``critic="head"``); and
  :func:`rljax.updates.make_rlhf_trpo_update` with the separate critic (10 CG iterations, 4 critic
  passes of 2 minibatches). Model FLOPs: :func:`rljax.bench.transformer_flops_per_token`
  (6N per token with the backward pass plus attention, PaLM's count, every position counted)
  times the tokens each optimizer step sees; for TRPO an estimate (as ``step_speed.py``).
  GFLOP/s = FLOPs / median time; MFU against the device's bfloat16 peak where known (not on
  CPU).
* **fused rollout**: :func:`rljax.rl.rollout.make_rollout_fn` with ``sampler="static"``
  (generation and the policy, reference and critic passes in one jit), for comparison with
  the sum of its parts. The experiments sample through the continuous-batching engine by
  default (``sampler="engine"``, a host loop, so not compiled ahead of time here); on this
  benchmark's fixed-length rows its decode step costs what ``generate``'s does
  (``benchmarks/generate_speed.py``).

Each phase's compile time is reported apart. The loop runs ``--warmup`` untimed and
``--iterations`` timed iterations; the PPO state (separate critic) is carried, so every
iteration samples from the updated policy; the other update variants carry their own states
on the same batches. Per phase: median and 10th-90th percentile over the timed iterations;
the iteration total is the per-iteration sum of generation, the three forward passes,
scoring, shaping and the PPO update (separate critic). Tokens/s: new tokens for generation,
``batch x (P + N)`` for a forward pass, times the epochs for the PPO update.

Run: ``python benchmarks/rlhf_speed.py`` (``--phases core`` skips the value-head PPO update,
the TRPO update and the fused rollout; ``--quick`` is a tiny smoke run with fast-compile XLA
options); prints a markdown table and writes JSON (``--json PATH``). Figures and the TRL
side-by-side: ``benchmarks/RESULTS.md``, "RLHF iteration speed vs TRL (CPU)".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the sibling benchmark scripts, whose builders are reused
    sys.path.insert(0, str(_HERE))

import _common  # noqa: E402
import step_speed  # noqa: E402

from rljax import bench, rl, updates  # noqa: E402
from rljax.models import generate as gen  # noqa: E402
from rljax.updates import lm  # noqa: E402

PHASES = (
    "generation",
    "prefill",
    "policy_forward",
    "policy_value_head_forward",
    "reference_forward",
    "value_forward",
    "scoring",
    "shaping",
    "ppo_update_separate",
    "ppo_update_head",
    "trpo_update",
    "fused_rollout",
)
#: The phases whose per-iteration sum is the iteration total (TRL's PPO layout).
ITERATION = (
    "generation",
    "policy_forward",
    "reference_forward",
    "value_forward",
    "scoring",
    "shaping",
    "ppo_update_separate",
)
#: The phases of ``--phases core``: the iteration of TRL's PPO layout, and the prefill for the
#: decode step time (in the order of :data:`PHASES`).
CORE = tuple(p for p in PHASES if p in ITERATION or p == "prefill")


def build_models(args) -> dict:
    """``{name: (config, graphdef, params)}`` of the policy, reference, value model, reward
    model and value-head policy, random weights as device arrays."""
    base = _common.model_config(args)
    variants = {
        "policy": base,
        "reference": base,
        "value": dataclasses.replace(base, head="value", lm_head=False),
        "reward": dataclasses.replace(base, head="reward", lm_head=False),
        "policy_value_head": dataclasses.replace(base, head="value", lm_head=True),
    }
    models = {}
    for i, (name, config) in enumerate(variants.items()):
        graphdef, host = step_speed.random_model(config, seed=i)
        models[name] = (config, graphdef, jax.tree.map(jnp.asarray, host))
    return models


def make_phases(args, models, sampling, prefill_sampling, shaping_config):
    """``{phase: (fn, example_args, donate)}`` of the jittable phase functions."""
    n = args.new_tokens
    pg = models["policy"][1]
    hg = models["policy_value_head"][1]
    vg = models["value"][1]
    rg = models["reward"][1]
    chunk = args.chunk_size

    def forward(graphdef, values):
        return lambda p, tokens, mask: updates.completion_outputs(
            graphdef, p, tokens, mask, n, chunk_size=chunk, values=values
        )

    def value_forward(p, tokens, mask):
        hidden, _ = lm.merge(vg, p).decode(tokens, mask)
        return lm.merge(vg, p).scores(hidden[:, -n - 1 : -1])

    def scoring(p, tokens, mask):
        return lm.merge(rg, p).rewards(tokens, mask)

    def generation(config):
        return lambda p, prompts, mask, key: gen.generate((pg, p), prompts, mask, key, config)

    optimizer = optax.adamw(args.learning_rate, weight_decay=0.0)
    ppo_config = updates.PPOConfig(
        value_coef=0.1, num_epochs=args.epochs, num_minibatches=args.minibatches
    )
    ppo_update = lambda graphdef, critic, value_graphdef=None: updates.make_rlhf_ppo_update(
        graphdef, optimizer, ppo_config, value_graphdef, critic=critic, chunk_size=chunk
    )
    value_optimizer = optax.adam(1e-3)
    trpo_config = updates.TRPOConfig(
        cg_iters=args.cg_iters, n_critic_updates=4, critic_minibatches=2
    )
    return {
        "generation": generation(sampling),
        "prefill": generation(prefill_sampling),
        "policy_forward": forward(pg, False),
        "reference_forward": forward(pg, False),
        "policy_value_head_forward": forward(hg, True),
        "value_forward": value_forward,
        "scoring": scoring,
        "shaping": rl.rlhf.make_shaping_fn(shaping_config),
        "ppo_update_separate": ppo_update(pg, "separate", vg),
        "ppo_update_head": ppo_update(hg, "head"),
        "trpo_update": updates.make_rlhf_trpo_update(pg, value_optimizer, trpo_config, vg),
        "fused_rollout": functools.partial(
            rl.rollout.make_rollout_fn(
                pg,
                sampling,
                critic="separate",
                value_graphdef=vg,
                chunk_size=chunk,
                sampler="static",  # one program: compiled ahead of time like the phases
            ),
            temp=1.0,
        ),
    }, {"optimizer": optimizer, "value_optimizer": value_optimizer, "trpo": trpo_config}


def flops(args, models, trpo_config) -> dict[str, float]:
    """Model FLOPs per call of the forward phases and the updates."""
    t = args.prompt_len + args.new_tokens
    rows_tokens = args.batch * t
    per = lambda name, backward: bench.transformer_flops_per_token(
        models[name][0], t, backward=backward
    )
    epochs = args.epochs * rows_tokens
    policy_passes = 1 + 3 + 2 + 3 * trpo_config.cg_iters + 1  # as step_speed's rlhf_trpo
    return {
        "policy_forward": rows_tokens * per("policy", False),
        "reference_forward": rows_tokens * per("reference", False),
        "policy_value_head_forward": rows_tokens * per("policy_value_head", False),
        "value_forward": rows_tokens * per("value", False),
        "scoring": rows_tokens * per("reward", False),
        "ppo_update_separate": epochs * (per("policy", True) + per("value", True)),
        "ppo_update_head": epochs * per("policy_value_head", True),
        "trpo_update": rows_tokens
        * (
            policy_passes * per("policy", False)
            + trpo_config.n_critic_updates * per("value", True)
            + per("value", False)
        ),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="prompts (rows) per iteration")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    _common.add_model_size_args(parser)
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs (TRL num_ppo_epochs)")
    parser.add_argument("--minibatches", type=int, default=1, help="TRL num_mini_batches")
    parser.add_argument("--learning-rate", type=float, default=3e-6)
    parser.add_argument("--cg-iters", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--phases",
        choices=("all", "core"),
        default="all",
        help="core: only the iteration's phases and the prefill (no value-head PPO, TRPO or "
        "fused rollout)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny config, 2 iterations")
    parser.add_argument("--json", default="benchmarks/rlhf_speed_results.json")
    args = parser.parse_args(argv)
    compiler_options = None
    if args.quick:
        _common.use_quick_model_sizes(args)
        args.batch, args.prompt_len, args.new_tokens = 4, 8, 8
        args.iterations, args.warmup, args.cg_iters = 2, 1, 3
        compiler_options = bench.FAST_COMPILE_CPU_OPTIONS
    if args.batch % args.minibatches or args.batch % 2:
        parser.error(
            f"--batch {args.batch} must be even (TRPO's 2 critic minibatches) and divide into "
            f"--minibatches {args.minibatches}"
        )
    if args.new_tokens < 2:
        parser.error(
            f"--new-tokens must be >= 2 (prefill plus a decode step), got {args.new_tokens}"
        )

    env = bench.environment()
    models = build_models(args)
    policy_config = models["policy"][0]
    print(
        f"rljax RLHF iteration: {policy_config.num_params / 1e6:.2f}M-parameter models, "
        f"{args.batch} x ({args.prompt_len} + {args.new_tokens}) tokens on {env['device']}"
    )
    sampling = gen.SamplingConfig(
        max_new_tokens=args.new_tokens, temperature=1.0, eos_token_id=None, pad_token_id=0
    )
    prefill_sampling = dataclasses.replace(sampling, max_new_tokens=1)
    shaping_config = rl.rlhf.PPORunConfig(
        batch_size=args.batch,
        max_prompt_length=args.prompt_len,
        max_new_tokens=args.new_tokens,
        critic="separate",
        missing_eos_penalty=None,
        kl_coef=0.05,
    )
    fns, opt = make_phases(args, models, sampling, prefill_sampling, shaping_config)
    params = {name: m[2] for name, m in models.items()}
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.prompt_len)), jnp.int32)
    prompt_mask = jnp.ones_like(prompts, bool)
    key = jax.random.key(0)
    kl_coef = jnp.asarray(0.05, jnp.float32)

    # Shapes of the intermediate inputs for the ahead-of-time compiles (nothing runs).
    example_gen = jax.eval_shape(fns["generation"], params["policy"], prompts, prompt_mask, key)
    tokens, mask = example_gen.tokens, example_gen.mask
    rollout_args = (
        params["policy"],
        params["reference"],
        params["value"],
        prompts,
        prompt_mask,
        key,
    )
    example_rollout = jax.eval_shape(fns["fused_rollout"], *rollout_args)
    # The phased rollout below has no sampler log-probs (it times the phases one by one).
    example_rollout = {k: v for k, v in example_rollout.items() if k != "sampler_logps"}
    scores = jax.ShapeDtypeStruct((args.batch,), jnp.float32)
    example_batch = jax.eval_shape(fns["shaping"], example_rollout, scores, kl_coef)[0]
    states = {
        "ppo_update_separate": updates.init_rlhf_ppo_state(
            copy(params["policy"]), opt["optimizer"], jax.random.key(1), copy(params["value"])
        ),
        "ppo_update_head": updates.init_rlhf_ppo_state(
            copy(params["policy_value_head"]), opt["optimizer"], jax.random.key(2)
        ),
        "trpo_update": updates.init_trpo_state(
            copy(params["policy"]),
            copy(params["value"]),
            opt["value_optimizer"],
            jax.random.key(3),
        ),
    }
    example_args = {
        "generation": (params["policy"], prompts, prompt_mask, key),
        "prefill": (params["policy"], prompts, prompt_mask, key),
        "policy_forward": (params["policy"], tokens, mask),
        "reference_forward": (params["reference"], tokens, mask),
        "policy_value_head_forward": (params["policy_value_head"], tokens, mask),
        "value_forward": (params["value"], tokens, mask),
        "scoring": (params["reward"], tokens, mask),
        "shaping": (example_rollout, scores, kl_coef),
        "fused_rollout": rollout_args,
    }
    phases = PHASES if args.phases == "all" else CORE
    compiled, compile_s = {}, {}
    for phase in phases:
        if phase == "reference_forward":  # the policy's program (same architecture)
            compiled[phase], compile_s[phase] = compiled["policy_forward"], None
            continue
        if phase in states:
            call_args, kw = (states[phase], example_batch), {"donate_argnums": 0}
        else:
            call_args, kw = example_args[phase], {}
        compiled[phase], compile_s[phase] = bench.compile_ahead(
            fns[phase], *call_args, compiler_options=compiler_options, **kw
        )
        print(f"  compiled {phase} in {compile_s[phase]:.1f}s", flush=True)

    bandwidth = bench.measure_bandwidth(
        num_bytes=(32 if args.quick else 256) * 2**20, steps=3 if args.quick else 10
    )
    load_before = os.getloadavg()
    times = {phase: [] for phase in phases}

    def timed(phase, *call_args):
        if phase not in compiled:
            return None, None
        start = time.perf_counter()
        out = jax.block_until_ready(compiled[phase](*call_args))
        return out, time.perf_counter() - start

    def masked(cmask, x):
        return jnp.where(cmask, x, 0.0)

    for it in range(args.warmup + args.iterations):
        record = it >= args.warmup
        k = jax.random.fold_in(key, it)
        policy_p = states["ppo_update_separate"].params["policy"]
        value_p = states["ppo_update_separate"].params["value"]
        step = {}
        out, step["generation"] = timed("generation", policy_p, prompts, prompt_mask, k)
        tokens, mask = out.tokens, out.mask
        policy, step["policy_forward"] = timed("policy_forward", policy_p, tokens, mask)
        ref, step["reference_forward"] = timed(
            "reference_forward", params["reference"], tokens, mask
        )
        values, step["value_forward"] = timed("value_forward", value_p, tokens, mask)
        scores, step["scoring"] = timed("scoring", params["reward"], tokens, mask)
        cmask = out.completion_mask
        zero = functools.partial(masked, cmask)
        rollout = {
            "tokens": tokens,
            "mask": mask,
            "completion_mask": cmask,
            "finished": out.finished,
            "old_logps": zero(policy["logps"]),
            "ref_logps": zero(ref["logps"]),
            "entropy": zero(policy["entropy"]),
            "old_values": zero(values),
        }
        (batch, _, _), step["shaping"] = timed("shaping", rollout, scores, kl_coef)
        # The alternatives, on the same inputs (before the update donates the policy's buffers).
        _, step["prefill"] = timed("prefill", policy_p, prompts, prompt_mask, k)
        _, step["fused_rollout"] = timed(
            "fused_rollout", policy_p, params["reference"], value_p, prompts, prompt_mask, k
        )
        (states["ppo_update_separate"], _), step["ppo_update_separate"] = timed(
            "ppo_update_separate", states["ppo_update_separate"], batch
        )
        _, step["policy_value_head_forward"] = timed(
            "policy_value_head_forward", params["policy_value_head"], tokens, mask
        )
        for phase in ("ppo_update_head", "trpo_update"):
            if phase in compiled:
                (states[phase], _), step[phase] = timed(phase, states[phase], batch)
        step = {phase: seconds for phase, seconds in step.items() if seconds is not None}
        if record:
            for phase, seconds in step.items():
                times[phase].append(seconds)
        total = sum(step[p] for p in ITERATION)
        parts = ", ".join(f"{p} {s:.2f}" for p, s in step.items())
        print(
            f"  iteration {it}{'' if record else ' (warm-up)'}: {total:.2f}s ({parts})",
            flush=True,
        )
    load_after = os.getloadavg()

    t = args.prompt_len + args.new_tokens
    n_flops = flops(args, models, opt["trpo"])
    peak = bench.device_peak_flops()
    rows = []
    for phase in phases:
        timing = bench.Timing(tuple(times[phase]))
        row = {"phase": phase, "compile_s": compile_s[phase], **timing.summary()}
        if phase in ("generation", "fused_rollout"):
            units = args.batch * args.new_tokens
        elif phase == "prefill":
            units = args.batch * args.prompt_len
        elif phase.startswith("ppo_update"):
            units = args.batch * t * args.epochs
        elif phase == "shaping":
            units = None
        else:
            units = args.batch * t
        row["tokens_per_call"] = units
        row["tokens_per_s"] = None if units is None else units / timing.median
        if phase in n_flops:
            row["model_flops"] = n_flops[phase]
            row["gflops_per_s"] = n_flops[phase] / timing.median / 1e9
            row["mfu"] = None if peak is None else n_flops[phase] / timing.median / peak
            row["flops_estimate"] = phase == "trpo_update"
        row["times_s"] = list(timing.times)
        rows.append(row)
    by_phase = {r["phase"]: r for r in rows}

    # Decode step vs the memory-bandwidth bound.
    gen_row, prefill_row = by_phase["generation"], by_phase["prefill"]
    decode_s = max(gen_row["median_s"] - prefill_row["median_s"], 1e-9)
    param_bytes, kv_bytes = _common.decode_step_bytes(
        policy_config, args.batch, args.prompt_len, args.new_tokens
    )
    bound_step_s = (param_bytes + kv_bytes) / bandwidth
    step_s = decode_s / (args.new_tokens - 1)
    gen_row.update(
        decode_step_s=step_s,
        decode_tokens_per_s=args.batch / step_s,
        bandwidth_gb_s=bandwidth / 1e9,
        param_bytes=param_bytes,
        mean_kv_bytes=kv_bytes,
        bound_step_s=bound_step_s,
        fraction_of_bound=bound_step_s / step_s,
    )
    totals = [sum(times[p][i] for p in ITERATION) for i in range(args.iterations)]
    iteration = {
        "phases": list(ITERATION),
        **bench.Timing(tuple(totals)).summary(),
        "new_tokens_per_s": args.batch * args.new_tokens / bench.Timing(tuple(totals)).median,
        "times_s": totals,
    }
    rows.append(
        {
            "phase": "iteration (sum)",
            "median_s": iteration["median_s"],
            "p10_s": iteration["p10_s"],
            "p90_s": iteration["p90_s"],
            "compile_s": sum(compile_s[p] or 0.0 for p in ITERATION),
            "tokens_per_call": args.batch * args.new_tokens,
            "tokens_per_s": iteration["new_tokens_per_s"],
        }
    )
    columns = [
        ("phase", "phase"),
        ("compile_s", "compile s"),
        ("median_s", "s (median)"),
        ("p10_s", "p10"),
        ("p90_s", "p90"),
        ("tokens_per_s", "tokens/s"),
        ("gflops_per_s", "GFLOP/s"),
    ]
    print(bench.markdown_table(rows, columns))
    print(
        f"decode step {step_s * 1e3:.3f} ms vs bandwidth bound {bound_step_s * 1e3:.3f} ms "
        f"({bandwidth / 1e9:.1f} GB/s measured): {gen_row['fraction_of_bound']:.1%} of the bound"
    )
    record = {
        "system": "rljax",
        "environment": env,
        "args": vars(args),
        "params": {name: m[0].num_params for name, m in models.items()},
        "shape": {
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "epochs": args.epochs,
            "minibatches": args.minibatches,
        },
        "phases": args.phases,
        "results": rows,
        "iteration": iteration,
        "load_avg": {"before": list(load_before), "after": list(load_after)},
    }
    _common.write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
