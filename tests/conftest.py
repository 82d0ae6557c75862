"""Test configuration: 8 simulated CPU devices, float64 available, a persistent compile cache.

XLA_FLAGS must be set before jax is imported anywhere, which is why this lives in conftest.
"""

import faulthandler
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Tests run tiny programs whose time is mostly XLA:CPU compilation: compile without backend
# optimisation (rljax.bench.FAST_COMPILE_CPU_OPTIONS, as the benchmarks' --quick smoke runs
# do). Measured on three test files: 178 s -> 55 s. Numerics are unchanged in kind (float32
# and float64 results agree with the references at the same tolerances); subprocesses the
# tests start inherit the flags, so bitwise comparisons between runs compare like with like.
# One LLVM module per program (XLA:CPU splits a program's code into modules compiled on a
# thread pool): tiny programs on 2 cores compile faster unsplit (measured on four test files:
# 51 -> 40 s and 51 -> 47 s of wall time).
for _flag in (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
):
    if _flag.split("=")[0] not in _flags:
        _flags = f"{_flags} {_flag}"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import pytest  # noqa: E402
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

# A native crash (a segfault or abort inside XLA) kills an xdist worker, and pytest then
# reports only "worker crashed"; the interpreter's own stack dump goes to the worker's stderr,
# mixed into the output. Each worker writes that dump (every thread's Python stack) to its own
# file instead, and the session's summary prints the crashing thread's stack at the end of the
# output, where a CI log keeps it. Without xdist the dump stays on stderr (pytest's default):
# the crashing process is the one that would print the summary.
if "RLJAX_TEST_CRASH_DIR" not in os.environ:  # set once, by the controller; workers inherit it
    os.environ["RLJAX_TEST_CRASH_DIR"] = tempfile.mkdtemp(prefix="rljax-test-crashes-")
_CRASH_DIR = os.environ["RLJAX_TEST_CRASH_DIR"]
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # None in the controller or a plain session
# frames of the test runner itself, left out of a crash report
_RUNNER_FRAMES = ("/_pytest/", "/pluggy/", "/xdist/", "/execnet/", '"<string>"')


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    # after pytest's faulthandler plugin, which points the handler at stderr
    if _WORKER:
        global _crash_file
        _crash_file = open(os.path.join(_CRASH_DIR, f"{_WORKER}-{os.getpid()}.log"), "w")
        faulthandler.enable(file=_crash_file, all_threads=True)


def crash_reports(folder: str, lines: int = 30) -> list[str]:
    """The non-empty stack dumps under ``folder``: each one's file name, first line (the
    signal) and the crashing thread's stack (``Current thread``, most recent call first),
    without the test runner's own frames, at most ``lines`` frames. A crash on a thread that
    Python does not run (one of XLA's) has no current thread: every thread's stack is kept."""
    reports = []
    for path in sorted(pathlib.Path(folder).glob("*.log")):
        text = path.read_text(errors="replace").splitlines()
        if not text:
            continue
        heads = [i for i, line in enumerate(text) if line.startswith("Current thread")]
        if not heads:
            heads = [i for i, line in enumerate(text) if line.startswith("Thread 0x")]
        kept = [path.name, text[0]]
        for start in heads:
            block = text[start:]
            end = next((i for i, line in enumerate(block[1:], 1) if not line.strip()), len(block))
            frames = [f for f in block[1:end] if not any(s in f for s in _RUNNER_FRAMES)]
            kept += [block[0], *frames[:lines]]
        reports.append("\n".join(kept))
    return reports


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if _WORKER:
        return
    for report in crash_reports(_CRASH_DIR):
        terminalreporter.section("native crash (stack of the crashing thread)", sep="-")
        terminalreporter.write_line(report)


def pytest_unconfigure(config):
    if not _WORKER and not crash_reports(_CRASH_DIR):
        shutil.rmtree(_CRASH_DIR, ignore_errors=True)
