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

Run: ``python benchmarks/generate_speed.py --json benchmarks/generate_speed.json``
(``--quick``: a tiny model and few tokens, a smoke run). Prints a markdown table.
"""

from __future__ import annotations

import argparse
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

from rljax.models import generate as gen  # noqa: E402
from rljax.models import hf  # noqa: E402

QUICK = dict(
    vocab=131, hidden=32, layers=2, heads=4, kv_heads=2, intermediate_size=48, prompt_len=8,
    new_tokens=8, greedy_batch=4, group_prompts=2, group_size=4, repeats=2,
)  # fmt: skip


def build_models(args, folder: pathlib.Path):
    """The HF model (random weights, seed 0) of the model-size flags and the same weights as
    rljax's ``(graphdef, params)``."""
    import dataclasses

    import torch
    import transformers

    config = dataclasses.replace(
        _common.model_config(args),
        num_kv_heads=args.kv_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens,
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


def run_case(name, calls, rows, args) -> list[dict]:
    times = time_side_by_side(calls, args.repeats)
    hf_s = statistics.median(times["hf"])
    out = []
    for side, seconds in times.items():
        median = statistics.median(seconds)
        out.append(
            {
                "case": name,
                "side": side,
                "rows": rows,
                "new_tokens": args.new_tokens,
                "median_s": median,
                "times_s": seconds,
                "tokens_per_s": rows * args.new_tokens / median,
                "vs_hf": hf_s / median,
            }
        )
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
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        for field, value in QUICK.items():
            setattr(args, field, value)
    for field in ("greedy_batch", "group_prompts", "group_size", "repeats", "new_tokens"):
        if getattr(args, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be >= 1, got {getattr(args, field)}")
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as folder:
        model, (graphdef, params) = build_models(args, pathlib.Path(folder))
    prompts = rng.integers(1, args.vocab, (args.greedy_batch, args.prompt_len)).astype(np.int32)
    group_prompts = rng.integers(1, args.vocab, (args.group_prompts, args.prompt_len))
    group_prompts = group_prompts.astype(np.int32)
    g, n = args.group_size, args.new_tokens
    rows = run_case(
        "greedy",
        {
            "hf": _hf_call(model, prompts, new_tokens=n, sample=False, group=1),
            "rljax": _rljax_call(graphdef, params, prompts, new_tokens=n, sample=False, group=1),
        },
        args.greedy_batch,
        args,
    )
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
        },
        args.group_prompts * g,
        args,
    )
    print("| case | side | rows | tokens/s | median s | vs HF |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['side']} | {r['rows']} | {r['tokens_per_s']:.0f} | "
            f"{r['median_s']:.3f} | {r['vs_hf']:.2f}x |"
        )
    import torch

    sizes = [dest for dest, _, _ in _common.MODEL_SIZE_FLAGS] + ["kv_heads"]
    record = {
        "model": {k: getattr(args, k) for k in sizes},
        "prompt_len": args.prompt_len,
        "new_tokens": n,
        "repeats": args.repeats,
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
