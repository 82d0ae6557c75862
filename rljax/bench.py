"""Measurement helpers shared by the benchmark scripts: timing of compiled functions, model
FLOPs, device peaks, memory and bandwidth.

Conventions: compile time is measured (ahead of time, ``jit(f).lower(...).compile()``) and
reported apart from step time; every timed call is synchronised with ``block_until_ready``;
step time is the median over many calls after warm-up, with the 10th/90th percentiles as the
spread.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FAST_COMPILE_CPU_OPTIONS",
    "Timing",
    "compile_ahead",
    "compile_lowered",
    "device_peak_flops",
    "environment",
    "markdown_table",
    "measure_bandwidth",
    "memory_analysis",
    "peak_memory_bytes",
    "time_calls",
    "transformer_flops_per_token",
]

# Dense bfloat16 peak FLOP/s per device by `device_kind` substring (vendor data sheets: H100 SXM
# and H200 989.4 TFLOP/s, H100 PCIe 756, A100 312, L4 121, TPU v4 275, v5e 197, v5p 459).
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall times in seconds of repeated synchronised calls."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p10(self) -> float:
        return float(np.percentile(self.times, 10))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.times, 90))

    def summary(self) -> dict[str, float]:
        return {
            "median_s": self.median,
            "p10_s": self.p10,
            "p90_s": self.p90,
            "calls": len(self.times),
        }


def compile_ahead(
    fn: Callable, *args, compiler_options: dict | None = None, **jit_kwargs
) -> tuple[Any, float]:
    """``jax.jit(fn, **jit_kwargs).lower(*args).compile()`` and the seconds it took.

    ``fn`` may already be jitted (``jax.jit(f, in_shardings=...)``, as
    :func:`rljax.updates.lm.compile_update` returns); it is then lowered as it is.
    ``compiler_options`` go to ``.compile`` (see :func:`compile_lowered`).
    """
    start = time.perf_counter()
    jitted = fn if hasattr(fn, "lower") and not jit_kwargs else jax.jit(fn, **jit_kwargs)
    compiled = compile_lowered(jitted.lower(*args), compiler_options)
    return compiled, time.perf_counter() - start


#: XLA:CPU options that compile several times faster (LLVM optimisation level 0, the classic
#: LLVM IR emitters) and run slower: for smoke runs (``--quick``), never for timing figures.
FAST_COMPILE_CPU_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
}


def compile_lowered(lowered, compiler_options: dict | None = None):
    """``lowered.compile(compiler_options=...)``; an XLA build that does not know one of the
    options compiles with the defaults instead."""
    if not compiler_options:
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=dict(compiler_options))
    except jax.errors.JaxRuntimeError as error:
        if "No such compile option" not in str(error):
            raise
        return lowered.compile()


def time_calls(
    call: Callable[[], Any], *, steps: int, warmup: int = 2, carry: bool = False
) -> Timing:
    """Time ``steps`` calls of ``call()`` after ``warmup`` untimed ones.

    With ``carry=True`` the call takes and returns its own state (``state = call(state)``),
    as an update step with donated buffers must: pass ``call`` as ``(fn, state)``.
    """
    if carry:
        fn, state = call
        for _ in range(warmup):
            state = jax.block_until_ready(fn(state))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state = jax.block_until_ready(fn(state))
            times.append(time.perf_counter() - start)
        return Timing(tuple(times))
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


def transformer_flops_per_token(config, seq_len: int, *, backward: bool = True) -> float:
    """Model FLOPs per token of a decoder LM: ``2 N`` per token forward (``6 N`` with the
    backward pass) over the matmul parameters ``N`` (the unembedding included, the embedding
    lookup not), plus attention's ``2 L T N_h H`` forward per token for scores and values
    (x2 for the two matmuls; x3 with the backward pass), as in PaLM's appendix B (Chowdhery et
    al., 2022), causal masking not discounted."""
    c = config
    d, n, k, h, f = c.hidden_size, c.num_heads, c.kv_heads, c.dim_per_head, c.mlp_size
    per_layer = d * h * (n + 2 * k) + n * h * d + (2 if c.family == "gpt2" else 3) * d * f
    matmul_params = c.num_layers * per_layer + (d * c.vocab_size if c.lm_head else d)
    attention = 2 * 2 * c.num_layers * seq_len * n * h
    factor = 3 if backward else 1
    return factor * (2 * matmul_params + attention)


def device_peak_flops(device=None) -> float | None:
    """Dense bfloat16 peak FLOP/s of ``device`` if known (GPUs/TPUs), else None (CPUs)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in kind:
            return flops
    return None


def memory_analysis(compiled) -> dict[str, int] | None:
    """Argument, output, temporary and generated-code bytes from XLA's compiled memory
    analysis (per device), or None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # backends without it raise NotImplementedError or similar
        return None
    if m is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    out = {f: int(getattr(m, f, 0)) for f in fields}
    out["alias_size_in_bytes"] = int(getattr(m, "alias_size_in_bytes", 0))
    out["total_bytes"] = (
        out["argument_size_in_bytes"]
        + out["output_size_in_bytes"]
        + out["temp_size_in_bytes"]
        - out["alias_size_in_bytes"]
    )
    return out


def peak_memory_bytes(device=None) -> int | None:
    """Peak bytes in use on ``device`` since start (GPU/TPU allocators), else None."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices have no allocator statistics
        return None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def measure_bandwidth(num_bytes: int = 256 * 2**20, steps: int = 10) -> float:
    """Achieved memory bandwidth in bytes/s of a jitted elementwise pass over a
    ``num_bytes`` float32 array (read once, written once)."""
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    fn = jax.jit(lambda a: a * 1.0001 + 1.0)
    jax.block_until_ready(fn(x))
    timing = time_calls(lambda: fn(x), steps=steps, warmup=1)
    return 2 * num_bytes / timing.median


def environment() -> dict[str, Any]:
    """Device and versions, for the record."""
    import flax
    import optax

    device = jax.devices()[0]
    return {
        "device": getattr(device, "device_kind", str(device)),
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``(key, header)`` columns; floats get 4 significant
    digits, missing values a dash."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])
