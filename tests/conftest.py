"""Test configuration: 8 simulated CPU devices, float64 available, a persistent compile cache.

XLA_FLAGS must be set before jax is imported anywhere, which is why this lives in conftest.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Tests run tiny programs whose time is mostly XLA:CPU compilation: compile without backend
# optimisation (rljax.bench.FAST_COMPILE_CPU_OPTIONS, as the benchmarks' --quick smoke runs
# do). Measured on three test files: 178 s -> 55 s. Numerics are unchanged in kind (float32
# and float64 results agree with the references at the same tolerances); subprocesses the
# tests start inherit the flags, so bitwise comparisons between runs compare like with like.
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if _flag.split("=")[0] not in _flags:
        _flags = f"{_flags} {_flag}"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "RLJAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rljax-jax")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Deterministic, bounded property tests: no deadline (compilation is slow), no flakiness.
settings.register_profile(
    "rljax",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("rljax")
