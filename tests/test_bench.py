"""rljax.bench: the FLOP count against XLA's own cost analysis, timing and table helpers."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import load_script

from rljax import bench
from rljax.models.transformer import Transformer, TransformerConfig, preset


def _xla_flops(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return analysis["flops"]


@pytest.mark.parametrize(
    "config",
    [
        preset("small", num_layers=1, vocab_size=1024),
        TransformerConfig.gpt2(
            vocab_size=1024, hidden_size=256, num_layers=1, num_heads=8, max_position_embeddings=128
        ),
    ],
    ids=["llama", "gpt2"],
)
def test_flops_per_token_matches_xla_cost_analysis(config):
    # One layer: XLA's cost analysis counts a scanned (while-loop) body once, not per trip.
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jnp.zeros((2, 128), jnp.int32)
    forward = lambda p, t: nnx.merge(graphdef, p)(t)
    loss = lambda p, t: jnp.sum(forward(p, t).astype(jnp.float32))
    ours_forward = bench.transformer_flops_per_token(config, 128, backward=False) * tokens.size
    ours_train = bench.transformer_flops_per_token(config, 128) * tokens.size
    assert _xla_flops(forward, params, tokens) == pytest.approx(ours_forward, rel=0.03)
    # The backward pass needs no input gradient below the first layer: a little under 3x.
    assert _xla_flops(jax.grad(loss), params, tokens) == pytest.approx(ours_train, rel=0.1)


def test_timing_memory_and_table():
    x = jnp.ones((64, 64), jnp.float32)
    fn = jax.jit(lambda a: a @ a)
    compiled, seconds = bench.compile_ahead(lambda a: a @ a, x)
    assert seconds > 0
    timing = bench.time_calls(lambda: fn(x), steps=5, warmup=1)
    assert len(timing.times) == 5 and timing.p10 <= timing.median <= timing.p90
    carried = bench.time_calls((lambda s: s + 1, jnp.zeros(())), steps=3, warmup=1, carry=True)
    assert len(carried.times) == 3
    memory = bench.memory_analysis(compiled)
    assert memory is None or memory["argument_size_in_bytes"] == 64 * 64 * 4
    assert bench.device_peak_flops() is None  # CPU: no known peak
    assert bench.measure_bandwidth(num_bytes=4 * 2**20, steps=2) > 0
    table = bench.markdown_table([{"a": 1.23456, "b": None}], [("a", "A"), ("b", "B")])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1.235 | - |"]


def test_lm_speed_quick_smoke(tmp_path):
    lm_speed = load_script("benchmarks/lm_speed.py")
    out = tmp_path / "lm.json"
    rows = lm_speed.main(["--quick", "--dtype", "float32", "--json", str(out)])
    assert [r["phase"] for r in rows] == ["train", "decode"]
    train, decode = rows
    assert train["tokens_per_s"] > 0 and train["model_flops_per_step"] > 0
    assert train["memory"] is None or train["memory"]["argument_size_in_bytes"] > 0
    assert decode["tokens_per_s"] > 0 and 0 < decode["fraction_of_bound"]
    assert json.loads(out.read_text())["results"][0]["preset"] == "tiny"


def test_dpo_speed_quick_smoke(tmp_path):
    dpo_speed = load_script("benchmarks/dpo_speed.py")
    out = tmp_path / "dpo.json"
    rows = dpo_speed.main(["--quick", "--json", str(out)])
    chunked, full = rows
    assert chunked["tokens_per_s"] > 0 and chunked["compile_s"] > 0
    assert chunked["calls"] == 3 and "median_s" not in full  # full logits: compiled, not timed
    assert full["temp_bytes"] is None or full["temp_bytes"] > 0
    assert json.loads(out.read_text())["args"]["quick"] is True


def test_generate_speed_quick_smoke(tmp_path):
    """The side-by-side generation benchmark runs both samplers on the same weights and
    writes one row per case and side (the speed figures themselves are benchmarks, not
    asserted here)."""
    generate_speed = load_script("benchmarks/generate_speed.py")
    out = tmp_path / "generate.json"
    record = generate_speed.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text())["results"] == record["results"]
    sides = {(r["case"], r["side"]) for r in record["results"]}
    assert sides == {
        ("greedy", "hf"), ("greedy", "rljax"), ("greedy", "rljax_engine"),
        ("groups", "hf"), ("groups", "rljax"), ("groups", "rljax_repeated"),
        ("groups", "rljax_engine"),
        ("tail", "hf"), ("tail", "rljax_static"), ("tail", "rljax_continuous"),
    }  # fmt: skip
    for row in record["results"]:
        assert row["tokens_per_s"] > 0 and len(row["times_s"]) == 2
    tail = [r for r in record["results"] if r["case"] == "tail"]
    assert {r["tokens"] for r in tail} == {sum(record["tail"]["lengths"])}
    assert tail[-1]["engine"]["tokens"] == sum(record["tail"]["lengths"])
