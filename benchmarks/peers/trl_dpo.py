"""Peer benchmark: seconds per DPO step of TRL's ``DPOTrainer`` on CPU (torch, float32).

Not part of rljax and never imported by it. Run in a throwaway virtual environment; torch must
be the CPU build of exactly 2.13.0 (an unpinned torch pulls a multi-GB CUDA build), installed
first in its own pip command::

    python3 -m venv /tmp/trl
    /tmp/trl/bin/pip install torch==2.13.0
    /tmp/trl/bin/pip install trl datasets
    /tmp/trl/bin/python benchmarks/peers/trl_dpo.py --json /tmp/trl_dpo.json

What it measures: ``DPOTrainer.train()`` on a randomly initialised
``transformers.LlamaForCausalLM`` (hidden 256, 4 layers, 4 heads, 4 KV heads, MLP width 688,
vocab 2048, untied LM head as in ``LlamaConfig``'s default, float32, ``bf16=False``) with
TRL's default reference model (a frozen copy of the policy, run on every batch), sigmoid loss,
beta 0.1, AdamW, batch 8 pairs, every sequence exactly 128 tokens (64 prompt + 63 completion
+ the EOS TRL appends), no evaluation, no reporting, ``dataloader_num_workers=0``,
``torch.set_num_threads(--threads)`` (2 by default). TRL's defaults otherwise, except
``gradient_checkpointing``, which TRL turns on by default and which is off here unless
``--gradient-checkpointing`` is given (rljax's side does not recompute activations either).

The data: prompts and completions are random token ids written as text for a word-level
tokenizer whose vocabulary is the strings ``"0" .. "2046"`` plus ``"</s>"`` (id 2047, EOS and
pad), so every id maps to exactly one token and TRL tokenises exactly what is generated.

A ``TrainerCallback`` records the wall time of every optimizer step (``on_step_begin`` to
``on_step_end``, which covers forward and backward of policy and reference and the AdamW
step, not the data loading between steps). The first ``--warmup`` steps are dropped; the
median, 10th and 90th percentiles over the rest are reported. Tokens/s counts the chosen and
the rejected sequence of every pair: ``2 * batch * 128 / seconds_per_step``. Prints one JSON
line (and writes it to ``--json`` if given).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import numpy as np
from _peer_common import (
    build_tokenizer,
    cpu_training_args,
    emit_result,
    library_versions,
    llama_config,
)


def build_dataset(num_pairs: int, prompt_len: int, completion_len: int, vocab_size: int, seed=0):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    words = lambda ids: "".join(f"{i} " for i in ids)  # trailing space: the EOS stays separate
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(num_pairs):
        rows["prompt"].append(words(rng.integers(0, vocab_size - 1, prompt_len)))
        rows["chosen"].append(words(rng.integers(0, vocab_size - 1, completion_len)))
        rows["rejected"].append(words(rng.integers(0, vocab_size - 1, completion_len)))
    return Dataset.from_dict(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence, all told")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--precompute-ref",
        action="store_true",
        help="TRL's precompute_ref_log_probs=True: reference log-probs computed once before "
        "training, no reference forward pass in the step",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = 2048
    model = LlamaForCausalLM(llama_config(vocab, args.intermediate_size)).to(torch.float32)
    tokenizer = build_tokenizer(vocab)
    total_steps = args.warmup + args.steps
    completion_len = args.seq - args.prompt_len - 1  # TRL appends EOS to each completion
    dataset = build_dataset(args.batch * total_steps, args.prompt_len, completion_len, vocab)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, *a, **k):
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimer()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out_dir:
        dpo_args = DPOConfig(
            **cpu_training_args(
                output_dir=out_dir,
                per_device_train_batch_size=args.batch,
                max_length=args.seq,
                loss_type=["sigmoid"],
                beta=0.1,
                learning_rate=1e-6,
                max_steps=total_steps,
                num_train_epochs=1,
                gradient_checkpointing=args.gradient_checkpointing,
                precompute_ref_log_probs=args.precompute_ref,
            )
        )
        # TRL's default reference (ref_model=None) reloads the policy from its hub/disk path; a
        # model built in memory has none, so pass the same thing TRL would build: a frozen copy.
        ref_model = copy.deepcopy(model).eval()
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=dpo_args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        # Every sequence must be exactly --seq tokens: check the collated first batch.
        batch = next(iter(trainer.get_train_dataloader()))
        shape = tuple(batch["input_ids"].shape)
        assert shape == (2 * args.batch, args.seq), shape
        trainer.train()

    timed = timer.times[args.warmup :]
    median = statistics.median(timed)
    tokens_per_step = 2 * args.batch * args.seq
    result = {
        "system": "trl",
        "batch_pairs": args.batch,
        "seq": args.seq,
        "gradient_checkpointing": args.gradient_checkpointing,
        "precompute_ref_log_probs": args.precompute_ref,
        "threads": args.threads,
        "params": sum(p.numel() for p in model.parameters()),
        "steps_timed": len(timed),
        "median_s": median,
        "p10_s": float(np.percentile(timed, 10)),
        "p90_s": float(np.percentile(timed, 90)),
        "min_s": min(timed),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / median,
        "step_times_s": timed,
        "load_avg_1min": [load_before, os.getloadavg()[0]],  # other processes on the machine
        **library_versions(),
    }
    return emit_result(result, args.json)


if __name__ == "__main__":
    main()
