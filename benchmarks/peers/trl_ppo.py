"""Peer benchmark: per-phase time of one RLHF iteration of TRL's ``PPOTrainer`` on CPU (torch,
float32), the configuration of ``benchmarks/rlhf_speed.py``.

Not part of rljax and never imported by it. TRL 1.13 and later have no PPO trainer; TRL 1.12.0
is the newest release that still ships it (as ``trl.experimental.ppo.PPOTrainer``). Run in a
throwaway virtual environment; torch must be the CPU build of exactly 2.13.0 (an unpinned torch
pulls a multi-GB CUDA build), installed first in its own pip command::

    python3 -m venv /tmp/trl_ppo
    /tmp/trl_ppo/bin/pip install torch==2.13.0
    /tmp/trl_ppo/bin/pip install trl==1.12.0 transformers==5.24.0 accelerate datasets
    /tmp/trl_ppo/bin/python benchmarks/peers/trl_ppo.py --json /tmp/trl_ppo.json

What it measures: ``PPOTrainer.train()`` with randomly initialised models of the rljax side's
configuration (hidden 256, 4 layers, 4 heads, 4 KV heads, MLP width 688, vocab 2048, untied LM
head, float32, ``bf16=False``): the policy and a frozen copy as the reference
(``LlamaForCausalLM``), the value model and the reward model
(``LlamaForSequenceClassification``, one label: TRL's separate critic and reward model).
``--batch`` 16 prompts of ``--prompt-len`` 64 random token ids, ``response_length`` 64,
temperature 1 (TRL's default is 0.7; 1 as on the rljax side), no stop token (every response
has the full length), TRL's defaults otherwise: 4 PPO epochs of 1 minibatch
(``per_device_train_batch_size=16``, no gradient accumulation), KL coefficient 0.05, AdamW lr
3e-6; ``gradient_checkpointing`` off (rljax does not recompute activations either), no
evaluation, no sample generations, no reporting, ``torch.set_num_threads(--threads)`` (2).

The phases are timed by wrapping the module-level functions the trainer calls (all inside
``torch.no_grad`` during the rollout, as TRL runs them):

* ``generation``: ``batch_generation`` (HF ``generate`` with ``output_scores``; TRL takes the
  policy's log-probs from those scores, so it has no separate policy forward pass);
* ``reference_forward``: ``forward(ref_model, ...)`` during the rollout;
* ``value_forward`` / ``scoring``: ``get_reward`` on the value model / the reward model;
* ``shaping``: from the end of the rollout's last model call to the first training forward
  pass (EOS handling, KL-penalised rewards, the GAE loop, whitening);
* ``ppo_update``: from the first training forward pass to the end of the last
  ``optimizer.step()`` of the iteration (4 x forward of policy and critic, backward, AdamW,
  TRL's per-step statistics);
* ``iteration``: wall time between successive ``on_step_end`` callbacks (everything,
  including data loading, logging and TRL's ``gc.collect()`` calls).

The first ``--warmup`` iterations are dropped; median, 10th and 90th percentiles over the rest.
Afterwards, outside the trainer, a 1-token ``generate`` is timed so that the decode step time
is ``(generation - prefill) / (N - 1)``, as on the rljax side. Prints one JSON line (and
writes it to ``--json`` if given).
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# The helpers the peers share (_peer_common.py, next to this file): the word-level tokenizer
# (every id one token), the model's LlamaConfig, the trainer settings and the JSON output.
from _peer_common import (
    build_tokenizer,
    cpu_training_args,
    emit_result,
    library_versions,
    llama_config,
)


def summary(times):
    return {
        "median_s": statistics.median(times),
        "p10_s": float(np.percentile(times, 10)),
        "p90_s": float(np.percentile(times, 90)),
        "calls": len(times),
        "times_s": list(times),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from transformers import (
        GenerationConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = 2048
    pad = vocab - 1
    config = llama_config(vocab, args.intermediate_size, num_labels=1)
    policy = LlamaForCausalLM(config).to(torch.float32)
    ref_model = copy.deepcopy(policy).eval()
    value_model = LlamaForSequenceClassification(config).to(torch.float32)
    reward_model = LlamaForSequenceClassification(config).to(torch.float32).eval()
    tokenizer = build_tokenizer(vocab)
    total = args.warmup + args.iterations
    rng = np.random.default_rng(0)
    # Token ids below the pad id (TRL masks every pad id as padding).
    ids = rng.integers(0, pad, (args.batch * total, args.prompt_len)).tolist()
    dataset = Dataset.from_dict({"input_ids": ids})

    # --- phase timers around the functions the trainer calls
    marks = {"events": []}  # (phase, start, end) in call order
    orig_generation, orig_forward, orig_reward = (
        ppo_module.batch_generation,
        ppo_module.forward,
        ppo_module.get_reward,
    )
    shapes = {}

    def timed(phase, fn, *a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        marks["events"].append((phase, start, time.perf_counter()))
        return out

    def batch_generation(*a, **k):
        out = timed("generation", orig_generation, *a, **k)
        shapes["query_responses"] = tuple(out[0].shape)
        return out

    def forward(model, *a, **k):
        phase = "reference_forward" if model is ref_model else "train_forward"
        return timed(phase, orig_forward, model, *a, **k)

    def get_reward(model, *a, **k):
        phase = "scoring" if model is reward_model else "value_forward"
        return timed(phase, orig_reward, model, *a, **k)

    ppo_module.batch_generation = batch_generation
    ppo_module.forward = forward
    ppo_module.get_reward = get_reward

    iterations = []

    class IterationTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            iterations.append((self.last, now))
            self.last = now

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as out_dir:
        ppo_args = PPOConfig(
            **cpu_training_args(
                output_dir=out_dir,
                per_device_train_batch_size=args.batch,
                gradient_accumulation_steps=1,
                num_mini_batches=1,
                num_ppo_epochs=4,
                local_rollout_forward_batch_size=args.batch,
                total_episodes=args.batch * total,
                response_length=args.new_tokens,
                temperature=1.0,
                stop_token=None,
                missing_eos_penalty=None,
                kl_coef=0.05,
                learning_rate=3e-6,
                num_sample_generations=0,
            )
        )
        trainer = PPOTrainer(
            args=ppo_args,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_model,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=dataset,
            callbacks=[IterationTimer()],
        )
        orig_step = trainer.optimizer.step

        def optimizer_step(*a, **k):
            return timed("optimizer_step", orig_step, *a, **k)

        trainer.optimizer.step = optimizer_step
        trainer.train()
    load_after = os.getloadavg()

    expected = (args.batch, args.prompt_len + args.new_tokens)
    assert shapes["query_responses"] == expected, (shapes, expected)
    assert len(iterations) == total, (len(iterations), total)
    phases = {
        p: []
        for p in (
            "generation",
            "reference_forward",
            "value_forward",
            "scoring",
            "shaping",
            "ppo_update",
            "iteration",
        )
    }
    for i, (begin, end) in enumerate(iterations):
        if i < args.warmup:
            continue
        events = [e for e in marks["events"] if begin <= e[1] and e[2] <= end]
        for phase in ("generation", "reference_forward", "value_forward", "scoring"):
            phases[phase].append(sum(e[2] - e[1] for e in events if e[0] == phase))
        rollout_end = max(e[2] for e in events if e[0] in ("scoring", "value_forward"))
        train = [e for e in events if e[0] in ("train_forward", "optimizer_step")]
        phases["shaping"].append(min(e[1] for e in train) - rollout_end)
        phases["ppo_update"].append(
            max(e[2] for e in train if e[0] == "optimizer_step") - min(e[1] for e in train)
        )
        phases["iteration"].append(end - begin)
        steps = sum(e[0] == "optimizer_step" for e in events)
        assert steps == 4, steps  # 4 epochs x 1 minibatch x 1 micro-batch

    # Prefill alone (a 1-token generate), outside the trainer, for the decode step time.
    queries = torch.tensor(ids[: args.batch])
    prefill_config = GenerationConfig(
        max_new_tokens=1, temperature=1.0, top_k=0, top_p=1.0, do_sample=True
    )
    prefill_times = []
    with torch.no_grad():
        for i in range(args.warmup + 5):
            start = time.perf_counter()
            orig_generation(policy, queries, args.batch, pad, prefill_config)
            if i >= args.warmup:
                prefill_times.append(time.perf_counter() - start)

    result = {
        "system": "trl",
        "trainer": "trl.experimental.ppo.PPOTrainer",
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "epochs": 4,
        "minibatches": 1,
        "threads": args.threads,
        "params": {
            "policy": sum(p.numel() for p in policy.parameters()),
            "value": sum(p.numel() for p in value_model.parameters()),
        },
        "phases": {p: summary(t) for p, t in phases.items()},
        "prefill": summary(prefill_times),
        "load_avg": {"before": list(load_before), "after": list(load_after)},
        **library_versions(),
    }
    gen_s = result["phases"]["generation"]["median_s"]
    decode_step = (gen_s - result["prefill"]["median_s"]) / (args.new_tokens - 1)
    t = args.prompt_len + args.new_tokens
    result["decode_step_s"] = decode_step
    result["tokens_per_s"] = {
        "generation": args.batch * args.new_tokens / gen_s,
        "reference_forward": args.batch * t / result["phases"]["reference_forward"]["median_s"],
        "value_forward": args.batch * t / result["phases"]["value_forward"]["median_s"],
        "scoring": args.batch * t / result["phases"]["scoring"]["median_s"],
        "ppo_update": 4 * args.batch * t / result["phases"]["ppo_update"]["median_s"],
        "iteration": args.batch * args.new_tokens / result["phases"]["iteration"]["median_s"],
    }
    return emit_result(result, args.json)


if __name__ == "__main__":
    main()
