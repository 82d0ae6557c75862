"""Peer benchmark: TRL's ``GRPOTrainer`` on CPU (torch, float32) on rljax's GRPO task, the
built-in arithmetic word problems, for ``benchmarks/grpo_vs_trl.py``.

Not part of rljax and never imported by it; it never imports jax either. Run in a throwaway
virtual environment; torch must be the CPU build of exactly 2.13.0 (an unpinned torch pulls a
multi-GB CUDA build), installed first in its own pip command::

    python3 -m venv /work/peer-venv-trl
    /work/peer-venv-trl/bin/pip install torch==2.13.0
    /work/peer-venv-trl/bin/pip install trl==1.16.0 'transformers>=5' accelerate datasets

The driver writes the prompts (``--train``, ``--heldout``: JSONL rows ``{"prompt", "answer"}``,
exactly the rows rljax trains and evaluates on) and passes every setting as a flag. The reward
functions are rljax's own (``rljax/tasks/arithmetic.py``: ``accuracy_reward`` weight 1,
``format_reward`` weight 0.1), loaded from the source file by :func:`load_task_module` without
running ``rljax/__init__.py`` (which imports jax); TRL calls them itself.

What it runs: ``GRPOTrainer.train()`` from the shipped base model (``--model``, a Hugging Face
Llama folder, loaded with ``AutoModelForCausalLM`` in float32), the prompts in file order
(``shuffle_dataset=False``, as rljax cycles them in order), ``--batch-size`` prompts x
``--group-size`` completions per generation (``num_generations``), ``--num-minibatches``
optimizer steps per generation (``steps_per_generation``, ``per_device_train_batch_size`` =
rows / minibatches, no gradient accumulation), ``--epochs`` passes (``num_iterations``), the
loss ``--loss-type`` with ``--beta``, ``--clip-eps``, advantages scaled by ``--scale-rewards``
(group: group mean/std, as rljax's grpo estimator), temperature ``--temperature``, no top-k/top-p, Adam with a
constant learning rate (AdamW, weight decay 0, ``lr_scheduler_type="constant"``), gradient
clipping at 1, ``bf16=False``, ``gradient_checkpointing=False``, no evaluation or saving,
``torch.set_num_threads(--threads)``.

Timing: an iteration (one generation and its ``num_minibatches x epochs`` optimizer steps) is
the wall time between the ``on_step_end`` callbacks that close it (the first from
``on_train_begin``); ``rollout`` is the time in ``_generate_and_score_completions``
(sampling, the policy's old log-probs, the rewards, advantages). The first iteration is
reported apart; ``steady`` is over the rest. Accuracy: greedy decoding with ``generate`` on the
held-out prompts (left-padded, ``--max-new-tokens``), the completions scored by the same
``accuracy_reward``/``format_reward``, before and after training, and for each
``--also-evaluate`` folder (the driver passes rljax's final policy, so both models are also
scored by this one evaluator). Prints one JSON line (and writes it to ``--json``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import os
import pathlib
import sys
import tempfile
import time
import types

from _peer_common import cpu_training_args, emit_result, library_versions, nearest_rank_summary

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_task_module(root: str | os.PathLike = ROOT) -> types.ModuleType:
    """``rljax.tasks.arithmetic`` imported from ``root`` without running ``rljax/__init__.py``
    or ``rljax/tasks/__init__.py`` (they import jax): the two packages are registered as empty
    namespace modules over their folders, so only the task files themselves run. Raises if
    jax got imported anyway."""
    root = pathlib.Path(root)
    for name, folder in (("rljax", root / "rljax"), ("rljax.tasks", root / "rljax" / "tasks")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    module = importlib.import_module("rljax.tasks.arithmetic")
    if "jax" in sys.modules:
        raise ImportError("importing rljax/tasks/arithmetic.py imported jax; the peer cannot")
    return module


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def greedy_eval(model, tokenizer, rows, task, max_new_tokens: int, batch_size: int) -> dict:
    """Greedy completions of the held-out prompts with ``generate`` (left padding), scored by
    the task's reward functions: ``{"accuracy", "format", "completions"}``."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    was_training = model.training
    model.eval()
    completions = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            prompts = [r["prompt"] for r in rows[start : start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
            out = model.generate(**enc, generation_config=config)
            new = out[:, enc["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train(was_training)
    prompts = [r["prompt"] for r in rows]
    accuracy = task.accuracy_reward(prompts, completions, answer=[r["answer"] for r in rows])
    formats = task.format_reward(prompts, completions)
    return {
        "accuracy": sum(accuracy) / len(rows),
        "format": sum(formats) / len(rows),
        "completions": completions[:4],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face folder of the base model")
    parser.add_argument("--train", required=True, help="JSONL of {prompt, answer}, in order")
    parser.add_argument("--heldout", required=True, help="JSONL of {prompt, answer}")
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="prompts per generation")
    parser.add_argument("--group-size", type=int, required=True, help="num_generations")
    parser.add_argument("--num-minibatches", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=1, help="num_iterations")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--temperature", type=float, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--loss-type", required=True)
    parser.add_argument("--importance-sampling-level", default="token")
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--clip-eps", type=float, required=True)
    parser.add_argument("--clip-eps-high", type=float, default=None)
    parser.add_argument("--scale-rewards", default="group", choices=("group", "batch", "none"))
    parser.add_argument("--mask-truncated-completions", action="store_true")
    parser.add_argument("--reward-weights", type=float, nargs=2, default=(1.0, 0.1))
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--also-evaluate", nargs="*", default=[], help="more model folders")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    task = load_task_module()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start_time = time.perf_counter()
    rows_per_generation = args.batch_size * args.group_size
    if rows_per_generation % args.num_minibatches:
        raise SystemExit(
            f"--num-minibatches {args.num_minibatches} must divide the {rows_per_generation} rows"
        )
    train_rows = read_jsonl(args.train)
    heldout = read_jsonl(args.heldout)
    if len(train_rows) < args.iterations * args.batch_size:
        raise SystemExit(
            f"--train has {len(train_rows)} rows; {args.iterations} iterations x "
            f"{args.batch_size} prompts need {args.iterations * args.batch_size}"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    evaluate = functools.partial(
        greedy_eval,
        tokenizer=tokenizer,
        rows=heldout,
        task=task,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.eval_batch,
    )
    load_before = os.getloadavg()
    before = evaluate(model)

    scored = {"samples": 0, "first_prompt": None}

    def counted(fn):
        @functools.wraps(fn)  # TRL names the reward after __name__
        def wrapper(prompts, completions, **columns):
            if fn is task.accuracy_reward:
                scored["samples"] += len(completions)
                scored["first_prompt"] = scored["first_prompt"] or prompts[0]
            return fn(prompts, completions, **columns)

        return wrapper

    steps_per_iteration = args.num_minibatches * args.epochs
    step_ends, rollouts = [], []

    class IterationTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            step_ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            **cpu_training_args(
                output_dir=out_dir,
                per_device_train_batch_size=rows_per_generation // args.num_minibatches,
                gradient_accumulation_steps=1,
                steps_per_generation=args.num_minibatches,
                num_iterations=args.epochs,
                num_generations=args.group_size,
                max_completion_length=args.max_new_tokens,
                max_steps=args.iterations * steps_per_iteration,
                shuffle_dataset=False,
                temperature=args.temperature,
                top_p=1.0,
                top_k=0,
                learning_rate=args.learning_rate,
                lr_scheduler_type="constant",
                warmup_steps=0,
                weight_decay=0.0,
                max_grad_norm=args.max_grad_norm,
                loss_type=args.loss_type,
                importance_sampling_level=args.importance_sampling_level,
                beta=args.beta,
                epsilon=args.clip_eps,
                epsilon_high=args.clip_eps_high,
                scale_rewards=args.scale_rewards,
                reward_weights=list(args.reward_weights),
                mask_truncated_completions=args.mask_truncated_completions,
                logging_strategy="steps",
                logging_steps=steps_per_iteration,
                seed=args.seed,
            )
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[counted(task.accuracy_reward), counted(task.format_reward)],
            args=config,
            train_dataset=Dataset.from_list(train_rows),
            processing_class=tokenizer,
            callbacks=[IterationTimer()],
        )
        generate_and_score = trainer._generate_and_score_completions

        def timed_rollout(*a, **k):
            begin = time.perf_counter()
            out = generate_and_score(*a, **k)
            rollouts.append(time.perf_counter() - begin)
            return out

        trainer._generate_and_score_completions = timed_rollout
        setup_s = time.perf_counter() - start_time
        trainer.train()
        train_s = step_ends[-1] - step_ends[0]
        history = [
            {
                k: v
                for k, v in row.items()
                if k in ("step", "reward", "kl", "completions/mean_length")
            }
            for row in trainer.state.log_history
            if "reward" in row
        ]
    load_after_train = os.getloadavg()
    after = evaluate(trainer.model)
    others = {}
    for folder in args.also_evaluate:
        other = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        others[folder] = evaluate(other)

    ends = step_ends[::steps_per_iteration]
    iterations = [b - a for a, b in itertools.pairwise(ends)]
    if len(iterations) != args.iterations or len(rollouts) != args.iterations:
        raise RuntimeError(
            f"expected {args.iterations} iterations, timed {len(iterations)} "
            f"({len(step_ends) - 1} steps, {len(rollouts)} rollouts)"
        )
    expected = args.iterations * rows_per_generation
    if scored["samples"] != expected:
        raise RuntimeError(f"TRL scored {scored['samples']} samples, expected {expected}")
    if scored["first_prompt"] != train_rows[0]["prompt"]:
        raise RuntimeError(
            f"TRL's first prompt {scored['first_prompt']!r} is not the file's first row"
        )
    result = {
        "system": "trl",
        "trainer": "trl.GRPOTrainer",
        "versions": {**library_versions(), "python": sys.version.split()[0]},
        "threads": args.threads,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "also_evaluate")},
        "params": sum(p.numel() for p in model.parameters()),
        "samples_seen": scored["samples"],
        "setup_s": setup_s,
        "train_s": train_s,
        "first_iteration_s": iterations[0],
        "steady_iteration": nearest_rank_summary(iterations[1:]),
        "iteration_times_s": iterations,
        "rollout_times_s": rollouts,
        "steady_rollout": nearest_rank_summary(rollouts[1:]),
        "heldout_problems": len(heldout),
        "heldout_accuracy_before": before["accuracy"],
        "heldout_accuracy_after": after["accuracy"],
        "heldout_format_before": before["format"],
        "heldout_format_after": after["format"],
        "sample_completions_after": after["completions"],
        "also_evaluated": {
            k: {"accuracy": v["accuracy"], "format": v["format"]} for k, v in others.items()
        },
        "reward_history": history,
        "load_avg": {
            "before": list(load_before),
            "after_train": list(load_after_train),
            "after": list(os.getloadavg()),
        },
        "wall_s": time.perf_counter() - start_time,
    }
    return emit_result(result, args.json)


if __name__ == "__main__":
    main()
