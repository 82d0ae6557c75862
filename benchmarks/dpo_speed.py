"""Speed and memory of one rljax DPO update step, on the configuration of the TRL peer
(``benchmarks/peers/trl_dpo.py``).

The model: ``TransformerConfig.llama(vocab_size=2048, hidden_size=256, num_layers=4,
num_heads=4, intermediate_size=688, tie_word_embeddings=False)`` in float32 (the layout of
``transformers.LlamaConfig`` with those sizes: untied LM head, RMSNorm eps 1e-6, RoPE theta
1e4), random init. The step: ``rljax.updates.make_dpo_update`` with ``DPOConfig(beta=0.1,
loss_type="sigmoid", reference="model")``, i.e. a forward pass of the frozen reference
parameters on every batch, as TRL's default reference model does; AdamW (lr 1e-6, TRL's
default). The batch: 8 pairs, every sequence 128 tokens (64 prompt + 64 completion, the
completion tokens in the loss mask), random token ids.

The step is compiled ahead of time (``rljax.bench.compile_ahead``, state donated) and the
compile time reported apart; step time is the median (10th-90th percentile) over ``--steps``
synchronised calls after warm-up, the state carried from call to call. Tokens/s counts the
chosen and the rejected sequence of every pair: ``2 * batch * seq / seconds_per_step``, as the
peer script does.

``--reference precomputed`` times the library steps with the reference log-probs computed
once beforehand (``DPOConfig(reference="precomputed")``, TRL's ``precompute_ref_log_probs``);
``--share-prompt`` adds the step on the shared-prompt layout (:func:`rljax.data.share_prompts`:
each pair's 64-token prompt runs once and the LM head only at completion positions, 192 token
positions per pair instead of 256). Tokens/s always counts the standard layout's ``2 * 128``
tokens per pair, so the rows compare the same work for the user.

Memory: XLA's compiled memory analysis (temporary bytes) of the update with chunked log-probs
(``--chunk-size`` rows of ``[rows, vocab]`` logits at a time, the library's path) and of the
same update computing full ``[2B, T, V]`` logits (``--full-logits`` times that variant too;
it is otherwise only compiled, for the memory comparison), at the benchmark's vocabulary and,
compiled but not timed, at ``--memory-vocab`` (32000, Llama-2's, by default), where the
logits dominate.

Run: ``python benchmarks/dpo_speed.py`` (``--quick`` for a tiny smoke run); prints a markdown
table and writes JSON (``--json PATH``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the benchmarks' shared helpers (_common.py)
    sys.path.insert(0, str(_HERE))

import _common  # noqa: E402

from rljax import bench, data  # noqa: E402
from rljax.dpo import dpo_loss  # noqa: E402
from rljax.logprobs import masked_sum_and_count, token_logprobs  # noqa: E402
from rljax.models.transformer import Transformer  # noqa: E402
from rljax.updates import DPOConfig, DPOState, init_dpo_state, lm, make_dpo_update  # noqa: E402


def make_batch(args, vocab_size: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq)
    loss_mask = np.zeros(shape, bool)
    loss_mask[:, args.prompt_len :] = True
    batch = {}
    for side in ("chosen", "rejected"):
        prompt = rng.integers(0, vocab_size, (args.batch, args.prompt_len))
        completion = rng.integers(0, vocab_size, (args.batch, args.seq - args.prompt_len))
        batch[f"{side}_tokens"] = jnp.asarray(np.concatenate([prompt, completion], 1), jnp.int32)
        batch[f"{side}_mask"] = jnp.ones(shape, bool)
        batch[f"{side}_loss_mask"] = jnp.asarray(loss_mask)
    prompt = batch["chosen_tokens"][:, : args.prompt_len]  # a pair shares its prompt
    batch["rejected_tokens"] = batch["rejected_tokens"].at[:, : args.prompt_len].set(prompt)
    return batch


def make_full_logits_update(graphdef, optimizer, beta: float):
    """The same DPO step as ``make_dpo_update(..., DPOConfig(reference="model"))`` but with the
    full ``[2B, T, V]`` logits (``model(tokens)`` then ``token_logprobs``): the unchunked
    baseline for the memory comparison."""

    def seq_logps(params, batch):
        cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], 0)
        tokens, mask, loss_mask = cat("tokens"), cat("mask"), cat("loss_mask")
        logits = nnx.merge(graphdef, params, copy=True)(tokens, mask)
        logps = token_logprobs(logits[:, :-1], tokens[:, 1:])
        counted = loss_mask[:, 1:] & mask[:, 1:]
        total, _ = masked_sum_and_count(logps, counted, axis=-1)
        b = batch["chosen_tokens"].shape[0]
        return total[:b], total[b:]

    def loss_fn(params, ref, batch):
        chosen, rejected = seq_logps(params, batch)
        loss, metrics = dpo_loss(chosen, rejected, *ref, beta=beta, loss_type="sigmoid")
        return loss, {"loss": loss, **metrics}

    def update(state: DPOState, batch):
        ref = jax.lax.stop_gradient(seq_logps(jax.lax.stop_gradient(state.ref_params), batch))
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, ref, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return DPOState(params, opt_state, state.step + 1, state.ref_params), metrics

    return update


def run_variant(name, update, graphdef, params, optimizer, batch, args, *, timed: bool):
    load_before = os.getloadavg()[0]
    fresh = jax.tree.map(jnp.copy, params)  # the step donates its state; keep the caller's
    state = init_dpo_state(fresh, optimizer, ref_params=jax.tree.map(jnp.copy, params))
    compiled, compile_s = bench.compile_ahead(update, state, batch, donate_argnums=0)
    row = {
        "variant": name,
        "compile_s": compile_s,
        "memory": bench.memory_analysis(compiled),
    }
    row["temp_bytes"] = None if row["memory"] is None else row["memory"]["temp_size_in_bytes"]
    if timed:
        timing = bench.time_calls(
            (lambda s: compiled(s, batch)[0], state),
            steps=args.steps,
            warmup=args.warmup,
            carry=True,
        )
        tokens_per_step = 2 * args.batch * args.seq
        row.update(timing.summary())
        row["min_s"] = min(timing.times)
        row["step_times_s"] = list(timing.times)
        row["tokens_per_step"] = tokens_per_step
        row["tokens_per_s"] = tokens_per_step / timing.median
    row["load_avg_1min"] = [load_before, os.getloadavg()[0]]  # other processes on the machine
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--prompt-len", type=int, default=64)
    _common.add_model_size_args(parser)
    parser.add_argument("--chunk-size", type=int, default=1024, help="DPOConfig.chunk_size")
    parser.add_argument(
        "--full-logits", action="store_true", help="also time the unchunked-logits step"
    )
    parser.add_argument(
        "--memory-vocab",
        type=int,
        default=32000,
        help="also compile (not time) both variants at this vocabulary size for the memory "
        "comparison (0: skip)",
    )
    parser.add_argument(
        "--reference",
        choices=("model", "precomputed"),
        default="model",
        help="reference log-probs of the timed library steps: a frozen reference forward pass "
        "per batch (TRL's default) or precomputed once (TRL's precompute_ref_log_probs=True)",
    )
    parser.add_argument(
        "--share-prompt",
        action="store_true",
        help="also time the step on the shared-prompt layout (rljax.data.share_prompts: each "
        "pair's prompt runs once)",
    )
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny config, 3 steps")
    parser.add_argument("--json", default="benchmarks/dpo_speed_results.json")
    args = parser.parse_args(argv)
    if args.quick:
        _common.use_quick_model_sizes(args)
        args.batch, args.seq, args.prompt_len, args.steps, args.warmup = 2, 32, 16, 3, 1
        args.chunk_size, args.memory_vocab = min(args.chunk_size, 16), 0

    config = _common.model_config(args)
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    optimizer = optax.adamw(1e-6, weight_decay=0.0)
    batch = make_batch(args, config.vocab_size)
    env = bench.environment()
    print(f"{config.num_params / 1e6:.2f}M parameters on {env['device']}")

    dpo = DPOConfig(
        beta=0.1, loss_type="sigmoid", reference=args.reference, chunk_size=args.chunk_size
    )
    if args.reference == "precomputed":  # the initial policy is the reference
        batch.update(lm.reference_logps(graphdef, params, batch, chunk_size=args.chunk_size))
    library = [(f"chunked ({args.chunk_size} rows)", batch)]
    if args.share_prompt:
        shared = {k: jnp.asarray(v) for k, v in data.share_prompts(jax.device_get(batch)).items()}
        library.append((f"shared prompt, chunked ({args.chunk_size} rows)", shared))
    rows = [
        run_variant(
            name,
            make_dpo_update(graphdef, optimizer, dpo),
            graphdef,
            params,
            optimizer,
            variant_batch,
            args,
            timed=True,
        )
        for name, variant_batch in library
    ]
    rows += [
        run_variant(
            "full logits",
            make_full_logits_update(graphdef, optimizer, 0.1),
            graphdef,
            params,
            optimizer,
            batch,
            args,
            timed=args.full_logits,
        ),
    ]
    for row in rows:
        row.update(batch_pairs=args.batch, seq=args.seq, vocab=args.vocab)
        row["reference"] = "model" if row["variant"] == "full logits" else args.reference
        row["params"] = config.num_params
    if args.memory_vocab:
        big = argparse.Namespace(**{**vars(args), "vocab": args.memory_vocab})
        big_config = _common.model_config(big)
        big_graphdef, big_params = nnx.split(Transformer(big_config, rngs=nnx.Rngs(0)), nnx.Param)
        big_batch = make_batch(big, args.memory_vocab)
        for name, update in [
            (
                f"chunked ({args.chunk_size} rows)",
                make_dpo_update(
                    big_graphdef, optimizer, dataclasses.replace(dpo, reference="model")
                ),
            ),
            ("full logits", make_full_logits_update(big_graphdef, optimizer, 0.1)),
        ]:
            row = run_variant(
                name, update, big_graphdef, big_params, optimizer, big_batch, args, timed=False
            )
            row.update(batch_pairs=args.batch, seq=args.seq, vocab=args.memory_vocab)
            row["params"] = big_config.num_params
            rows.append(row)
    columns = [
        ("variant", "log-probs"),
        ("vocab", "vocab"),
        ("compile_s", "compile s"),
        ("median_s", "s/step (median)"),
        ("p10_s", "p10"),
        ("p90_s", "p90"),
        ("tokens_per_s", "tokens/s"),
        ("temp_bytes", "XLA temp bytes"),
    ]
    print(bench.markdown_table(rows, columns))
    _common.write_json(args.json, {"environment": env, "args": vars(args), "results": rows})
    return rows


if __name__ == "__main__":
    main()
