"""Generation speed: rljax's KV-cache sampler against Hugging Face ``generate``, side by side.

One process, one set of weights: a random Llama-shaped ``transformers`` model (default: hidden
256, 4 layers, 8 heads, 2 KV heads, vocabulary 4099: the shape of the rollout-engine issue) is
saved once and loaded into rljax (``rljax.models.hf.load_model``), so both sides decode the same
network in float32 on the same CPU threads. Every row generates exactly ``--new-tokens`` tokens
(no EOS: HF gets ``min_new_tokens``, rljax ``eos_token_id=None``), so tokens/s is
``rows * new_tokens / seconds`` on both sides. The two sides alternate call by call
(``--repeats`` timed calls each, after one untimed warm-up call that compiles rljax's program),
so a change in the machine's load hits both; the median is reported.

Cases:

* ``greedy``: ``--greedy-batch`` prompts of ``--prompt-len`` tokens, greedy.
* ``groups``: GRPO-style groups, ``--group-prompts`` prompts x ``--group-size`` samples at
  temperature 1. rljax runs it twice: with prefix sharing (``group_size=G``: each prompt
  prefilled once, its KV cache copied to its G rows) and with the prompts repeated G times
  (what the RL loop did before). HF: ``num_return_sequences=G`` (it repeats the prompts).
  Both cases also run ``rljax_engine``, :class:`rljax.models.engine.Engine` with a slot per
  row (what the RL rollouts sample with: the prompts prefilled in one call, each once for its
  group, then the slots decoded together).
* ``tail``: continuous against static batching on a long-tailed length mix. ``--tail-prompts``
  prompts of 16..``--prompt-len`` tokens (uniform), sampled at temperature 1; prompt ``i``'s
  completion is ``L_i`` tokens long, ``L_i`` log-normal (median ``--tail-median``, sigma
  ``--tail-sigma``) rounded and clipped to ``[1, --tail-max]``, all seeded. The lengths are
  imposed, not left to a random model's EOS: the rljax sides pass them as per-prompt limits
  (``max_new_tokens=[L_i]``: a row stops there as at an EOS), HF gets a logits processor that
  forces its EOS at token ``L_i`` and forbids it before. Static batching (``hf`` and
  ``rljax_static``, :func:`rljax.models.generate.make_generate_fn`): the prompts in batches
  of ``--slots`` rows, each batch decoding until its longest row ends; continuous
  (``rljax_continuous``, :class:`rljax.models.engine.Engine`): ``--slots`` decode slots
  refilled as rows end (one side per ``--steps-per-call`` value). Tokens/s counts the
  ``sum(L_i)`` useful tokens on every side.

Run: ``python benchmarks/generate_speed.py --json benchmarks/generate_speed.json``
(``--quick``: a tiny model and few tokens, a smoke run; ``--cases tail``: one case). Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the benchmarks' shared helpers (_common.py)
    sys.path.insert(0, str(_HERE))

import _common  # noqa: E402
from flax import nnx  # noqa: E402

from rljax.models import engine as engine_lib  # noqa: E402
from rljax.models import generate as gen  # noqa: E402
from rljax.models import hf  # noqa: E402

QUICK = dict(
    vocab=131, hidden=32, layers=2, heads=4, kv_heads=2, intermediate_size=48, prompt_len=8,
    new_tokens=8, greedy_batch=4, group_prompts=2, group_size=4, repeats=2, tail_prompts=4,
    slots=2, tail_median=3, tail_max=8,
)  # fmt: skip
CASES = ("greedy", "groups", "tail")
MIN_TAIL_PROMPT = 16


def build_models(args, folder: pathlib.Path):
    """The HF model (random weights, seed 0) of the model-size flags and the same weights as
    rljax's ``(graphdef, params)``."""
    import torch
    import transformers

    config = dataclasses.replace(
        _common.model_config(args),
        num_kv_heads=args.kv_heads,
        max_position_embeddings=args.prompt_len + max(args.new_tokens, args.tail_max),
    )
    torch.manual_seed(0)
    hf_config = hf.hf_config_from(config, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    model.save_pretrained(folder)
    ours = hf.load_model(str(folder), dtype="float32")
    return model, nnx.split(ours)


def _hf_call(model, prompts: np.ndarray, *, new_tokens: int, sample: bool, group: int):
    import torch

    tokens = torch.as_tensor(prompts, dtype=torch.long)
    settings = dict(  # every row exactly new_tokens long, as rljax's eos_token_id=None does
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sample,
        num_return_sequences=group, pad_token_id=0,
    )  # fmt: skip
    if sample:
        settings.update(temperature=1.0, top_k=0, top_p=1.0)

    def call():
        with torch.no_grad():
            out = model.generate(tokens, attention_mask=torch.ones_like(tokens), **settings)
        assert out.shape == (len(prompts) * group, prompts.shape[1] + new_tokens), out.shape
        return out

    return call


def _rljax_call(graphdef, params, prompts: np.ndarray, *, new_tokens: int, sample: bool, group):
    config = gen.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0 if sample else 0.0)
    fn = gen.make_generate_fn(graphdef, config)
    mask = np.ones(prompts.shape, bool)
    calls = {"n": 0}

    def call():
        calls["n"] += 1
        out = fn(params, prompts, mask, jax.random.key(calls["n"]), group_size=group)
        return jax.block_until_ready(out.tokens)

    return call


def _rljax_engine_call(graphdef, params, prompts: np.ndarray, *, new_tokens, sample, group):
    """The continuous-batching engine (what the RL rollouts sample with), one slot per row:
    the prompts prefilled in one call, each once for its group."""
    config = gen.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0 if sample else 0.0)
    engine = engine_lib.Engine(
        graphdef, config, slots=len(prompts) * group, max_prompt_len=prompts.shape[1]
    )
    return _engine_call(engine, params, prompts, new_tokens, group_size=group)


def _engine_call(engine, params, prompts, lengths, **generate_kwargs):
    """A timed call of ``engine.generate`` (a new key each call) that checks every row
    generated its imposed length (``lengths``: one int, or one per row)."""
    calls = {"n": 0}

    def call():
        calls["n"] += 1
        key = jax.random.key(calls["n"])
        out = engine.generate(params, prompts, key, **generate_kwargs)
        assert (out.lengths == lengths).all(), "engine: a row's length differs from the imposed one"

    call.engine = engine
    return call


def tail_workload(args, rng) -> tuple[list[np.ndarray], np.ndarray]:
    """The long-tailed mix: prompts (token arrays of 16..``--prompt-len`` tokens; shorter
    with ``--quick``) and their completion lengths ``L_i``."""
    low = min(MIN_TAIL_PROMPT, args.prompt_len)
    sizes = rng.integers(low, args.prompt_len + 1, args.tail_prompts)
    prompts = [rng.integers(1, args.vocab - 1, size).astype(np.int32) for size in sizes]
    draws = np.exp(rng.normal(np.log(args.tail_median), args.tail_sigma, args.tail_prompts))
    lengths = np.clip(np.rint(draws), 1, args.tail_max).astype(np.int32)
    return prompts, lengths


def _hf_static_tail(model, prompts, lengths, *, slots: int, eos: int):
    """HF ``generate`` in batches of ``slots`` left-padded prompts, EOS forced at ``L_i``."""
    import torch
    import transformers

    class ForceLength(transformers.LogitsProcessor):
        def __init__(self, limits, prompt_width):
            self.limits, self.prompt_width = torch.as_tensor(limits), prompt_width

        def __call__(self, input_ids, scores):
            made = input_ids.shape[1] - self.prompt_width  # tokens generated so far
            stop = made + 1 >= self.limits
            eos_score = torch.where(stop, 0.0, -torch.inf)
            scores = torch.where(stop[:, None], -torch.inf, scores)
            scores[:, eos] = eos_score
            return scores

    batches = []
    for start in range(0, len(prompts), slots):
        tokens, mask = gen.left_pad(prompts[start : start + slots], pad_id=0)
        batches.append((tokens, mask, lengths[start : start + slots]))

    def call():
        with torch.no_grad():
            for tokens, mask, limits in batches:
                model.generate(
                    torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    logits_processor=transformers.LogitsProcessorList(
                        [ForceLength(limits, tokens.shape[1])]
                    ),
                    max_new_tokens=int(limits.max()), do_sample=True, temperature=1.0,
                    top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=0,
                )  # fmt: skip

    return call


def _rljax_static_tail(graphdef, params, prompts, lengths, *, slots: int, max_new: int):
    """rljax's static sampler in batches of ``slots`` prompts (left-padded to the longest of
    all, one compiled shape), rows stopped at ``L_i`` by per-prompt limits."""
    config = gen.SamplingConfig(max_new_tokens=max_new, temperature=1.0)
    fn = gen.make_generate_fn(graphdef, config)
    width = max(len(p) for p in prompts)
    batches = []
    for start in range(0, len(prompts), slots):
        tokens, mask = gen.left_pad(prompts[start : start + slots], pad_id=0, length=width)
        batches.append((tokens, mask, lengths[start : start + slots]))
    calls = {"n": 0}

    def call():
        calls["n"] += 1
        made = []
        for i, (tokens, mask, limits) in enumerate(batches):
            key = jax.random.fold_in(jax.random.key(calls["n"]), i)
            made.append(fn(params, tokens, mask, key, max_new_tokens=limits).lengths)
        made = np.concatenate(jax.device_get(made))
        assert (made == lengths).all(), "static batching: lengths differ from the schedule"

    return call


def _rljax_continuous_tail(graphdef, params, prompts, lengths, *, slots, max_new, steps):
    """The continuous-batching engine, ``slots`` slots, the same limits."""
    config = gen.SamplingConfig(max_new_tokens=max_new, temperature=1.0)
    width = max(len(p) for p in prompts)
    engine = engine_lib.Engine(
        graphdef, config, slots=slots, max_prompt_len=width, steps_per_call=steps
    )
    return _engine_call(engine, params, prompts, lengths, max_new_tokens=lengths)


def time_side_by_side(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each named zero-argument call, alternating the calls."""
    for call in calls.values():
        call()  # warm-up (rljax compiles here)
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def run_case(name, calls, rows, args, tokens=None) -> list[dict]:
    """Time ``calls`` side by side; ``tokens`` generated per call (default ``rows *
    new_tokens``)."""
    times = time_side_by_side(calls, args.repeats)
    hf_s = statistics.median(times["hf"]) if "hf" in times else None
    tokens = rows * args.new_tokens if tokens is None else int(tokens)
    out = []
    for side, seconds in times.items():
        median = statistics.median(seconds)
        out.append(
            {
                "case": name,
                "side": side,
                "rows": rows,
                "new_tokens": args.new_tokens if name != "tail" else args.tail_max,
                "tokens": tokens,
                "median_s": median,
                "times_s": seconds,
                "tokens_per_s": tokens / median,
                "vs_hf": None if hf_s is None else hf_s / median,
            }
        )
    if name == "tail":  # continuous against rljax's static batching
        static_s = statistics.median(times["rljax_static"])
        for row in out:
            row["vs_static"] = static_s / row["median_s"]
            engine = getattr(calls[row["side"]], "engine", None)
            if engine is not None:
                row["engine"] = dataclasses.asdict(engine.stats)
                row["steps_per_call"] = engine.steps_per_call
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_model_size_args(parser)  # --vocab --hidden --layers --heads --intermediate-size
    parser.set_defaults(vocab=4099, heads=8)  # the rollout-engine issue's model
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--greedy-batch", type=int, default=16)
    parser.add_argument("--group-prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--tail-prompts", type=int, default=128)
    parser.add_argument(
        "--tail-no-hf",
        action="store_true",
        help="tail: leave HF out (its static batching costs what rljax's does, several times)",
    )
    parser.add_argument("--slots", type=int, default=16, help="tail: batch rows / decode slots")
    parser.add_argument("--tail-median", type=float, default=24.0)
    parser.add_argument("--tail-sigma", type=float, default=1.0)
    parser.add_argument("--tail-max", type=int, default=256, help="tail: max_new_tokens")
    parser.add_argument(
        "--steps-per-call",
        type=int,
        nargs="+",
        default=[engine_lib.DEFAULT_STEPS_PER_CALL],
        help="tail: the engine's steps_per_call (one continuous side per value)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        for field, value in QUICK.items():
            setattr(args, field, value)
    for field in (
        "greedy_batch", "group_prompts", "group_size", "repeats", "new_tokens", "tail_prompts",
        "slots", "tail_max",
    ):  # fmt: skip
        if getattr(args, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be >= 1, got {getattr(args, field)}")
    load_before = os.getloadavg()  # the machine's load: a shared CPU slows every side
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as folder:
        model, (graphdef, params) = build_models(args, pathlib.Path(folder))
    prompts = rng.integers(1, args.vocab, (args.greedy_batch, args.prompt_len)).astype(np.int32)
    group_prompts = rng.integers(1, args.vocab, (args.group_prompts, args.prompt_len))
    group_prompts = group_prompts.astype(np.int32)
    tail_prompts, tail_lengths = tail_workload(args, rng)
    g, n = args.group_size, args.new_tokens
    rows = []
    if "greedy" in args.cases:
        rows += run_case(
            "greedy",
            {
                "hf": _hf_call(model, prompts, new_tokens=n, sample=False, group=1),
                "rljax": _rljax_call(
                    graphdef, params, prompts, new_tokens=n, sample=False, group=1
                ),
                "rljax_engine": _rljax_engine_call(
                    graphdef, params, prompts, new_tokens=n, sample=False, group=1
                ),
            },
            args.greedy_batch,
            args,
        )
    if "groups" in args.cases:
        repeated = np.repeat(group_prompts, g, axis=0)
        rows += run_case(
            "groups",
            {
                "hf": _hf_call(model, group_prompts, new_tokens=n, sample=True, group=g),
                "rljax": _rljax_call(
                    graphdef, params, group_prompts, new_tokens=n, sample=True, group=g
                ),
                "rljax_repeated": _rljax_call(
                    graphdef, params, repeated, new_tokens=n, sample=True, group=1
                ),
                "rljax_engine": _rljax_engine_call(
                    graphdef, params, group_prompts, new_tokens=n, sample=True, group=g
                ),
            },
            args.group_prompts * g,
            args,
        )
    if "tail" in args.cases:
        shared = dict(slots=args.slots, max_new=args.tail_max)
        calls = {}
        if not args.tail_no_hf:
            calls["hf"] = _hf_static_tail(
                model, tail_prompts, tail_lengths, slots=args.slots, eos=args.vocab - 1
            )
        calls["rljax_static"] = _rljax_static_tail(
            graphdef, params, tail_prompts, tail_lengths, **shared
        )
        for steps in args.steps_per_call:
            name = "rljax_continuous" + (
                "" if steps == engine_lib.DEFAULT_STEPS_PER_CALL else f"_k{steps}"
            )
            calls[name] = _rljax_continuous_tail(
                graphdef, params, tail_prompts, tail_lengths, steps=steps, **shared
            )
        rows += run_case("tail", calls, args.tail_prompts, args, tokens=tail_lengths.sum())
    print("| case | side | rows | tokens/s | median s | vs HF | vs static |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs_static = f"{r['vs_static']:.2f}x" if "vs_static" in r else ""
        vs_hf = "" if r["vs_hf"] is None else f"{r['vs_hf']:.2f}x"
        print(
            f"| {r['case']} | {r['side']} | {r['rows']} | {r['tokens_per_s']:.0f} | "
            f"{r['median_s']:.3f} | {vs_hf} | {vs_static} |"
        )
    import torch

    sizes = [dest for dest, _, _ in _common.MODEL_SIZE_FLAGS] + ["kv_heads"]
    record = {
        "model": {k: getattr(args, k) for k in sizes},
        "prompt_len": args.prompt_len,
        "new_tokens": n,
        "repeats": args.repeats,
        "load_avg_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "tail": {
            "prompts": args.tail_prompts,
            "slots": args.slots,
            "median": args.tail_median,
            "sigma": args.tail_sigma,
            "max_new_tokens": args.tail_max,
            "lengths": tail_lengths.tolist(),
        }
        if "tail" in args.cases
        else None,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "results": rows,
    }
    if args.json:
        _common.write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
