"""Start a multi-process JAX run on one machine: what a multi-host GPU/TPU run does, on CPUs.

::

    python -m rljax.launch --processes 2 --devices-per-process 4 -- \\
        python experiments/dpo.py --mesh data=2,fsdp=2,tensor=2 --out runs/dpo_2x4

starts the command once per process with these environment variables, which
:func:`rljax.sharding.initialize_from_env` (the experiments' first call) reads to join JAX's
multi-controller runtime (``jax.distributed.initialize``, gloo collectives on CPU):

- ``RLJAX_COORDINATOR``: ``host:port`` of process 0's coordination service (``--host``,
  ``--port``; a free port by default);
- ``RLJAX_NUM_PROCESSES`` and ``RLJAX_PROCESS_ID`` (the rank, 0 ... N-1);
- with ``--platform cpu`` (the default): ``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS`` with
  ``--xla_force_host_platform_device_count=<devices-per-process>``, so that N processes of D
  simulated devices form one global mesh of N x D devices, like N hosts of D accelerators.
  ``--platform none`` sets neither (for processes that each own real accelerators).

Every line a process prints is echoed with a ``[rank i]`` prefix (its stdout to stdout, its
stderr to stderr); with ``--log-dir`` each rank's output also goes to ``<log-dir>/rank<i>.log``. The launcher waits for
all processes; when one exits with a non-zero code (or a signal) it stops the others
(SIGTERM, then SIGKILL after ``--grace`` seconds) and exits with that code, naming the rank.
``--timeout`` stops everything after that many seconds (exit code 124); so do Ctrl-C and
SIGTERM to the launcher.

On a real cluster the launcher is not needed: run the same script once per host with the three
variables set, or with ``RLJAX_COORDINATOR=auto`` where ``jax.distributed.initialize()`` detects
the cluster itself (Cloud TPU pod slices, SLURM, Open MPI); see README, "Multi-host runs".
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from rljax.sharding import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

__all__ = ["child_environment", "free_port", "launch", "main"]

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_environment(
    rank: int,
    processes: int,
    coordinator: str,
    *,
    devices_per_process: int | None,
    platform: str = "cpu",
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of process ``rank``: ``base`` (default ``os.environ``) plus the
    ``RLJAX_*`` variables and, for ``platform="cpu"``, ``JAX_PLATFORMS`` and, given
    ``devices_per_process``, the device count in ``XLA_FLAGS`` (replacing one already there)."""
    env = dict(os.environ if base is None else base)
    env[COORDINATOR_ENV] = coordinator
    env[NUM_PROCESSES_ENV] = str(processes)
    env[PROCESS_ID_ENV] = str(rank)
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        if devices_per_process is not None:
            flags = _DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).split()
            flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
            env["XLA_FLAGS"] = " ".join(flags)
    return env


def _pump(rank: int, stream, target, log_file, lock: threading.Lock) -> None:
    """Copy ``stream`` line by line to ``target`` (``sys.stdout`` or ``sys.stderr``) with the
    rank prefix, and to ``log_file``."""
    prefix = f"[rank {rank}] "
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with lock:
            target.write(prefix + line + "\n")
            target.flush()
            if log_file is not None:
                log_file.write(line + "\n")
                log_file.flush()
    stream.close()


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM the process group of every child still running, SIGKILL after ``grace``."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through launch(), which stops the ranks


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _check_arguments(command, processes, devices_per_process, platform) -> None:
    """Raise for arguments :func:`launch` cannot run with (the port is checked later)."""
    if not command:
        raise ValueError("no command to run: put it after --, e.g. -- python experiments/dpo.py")
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"devices_per_process must be >= 1, got {devices_per_process}")
    if platform not in ("cpu", "none"):
        raise ValueError(f"platform must be 'cpu' or 'none', got {platform!r}")


def _start_ranks(
    command: Sequence[str],
    processes: int,
    coordinator: str,
    *,
    devices_per_process: int | None,
    platform: str,
    log_dir: str | None,
    procs: list[subprocess.Popen],
    pumps: list[threading.Thread],
    logs: list,
) -> None:
    """Start every rank in its own process group, with threads echoing its output; appends to
    ``procs``, ``pumps`` and ``logs`` as it goes, so that the caller can stop what started."""
    lock = threading.Lock()
    for rank in range(processes):
        env = child_environment(
            rank,
            processes,
            coordinator,
            devices_per_process=devices_per_process,
            platform=platform,
        )
        log_file = None
        if log_dir is not None:
            log_file = open(os.path.join(log_dir, f"rank{rank}.log"), "w")
            logs.append(log_file)
        proc = subprocess.Popen(
            list(command),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, stopped as a whole
        )
        procs.append(proc)
        for stream, target in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            pump = threading.Thread(
                target=_pump, args=(rank, stream, target, log_file, lock), daemon=True
            )
            pump.start()
            pumps.append(pump)


def _supervise(
    procs: Sequence[subprocess.Popen],
    pumps: Sequence[threading.Thread],
    *,
    start: float,
    timeout: float | None,
    grace: float,
) -> int:
    """Wait for the ranks: 0 when all exit with 0; else stop the others and return the first
    failure's exit code (124 on ``timeout`` seconds after ``start``), naming it on stderr."""
    failure: tuple[int, int] | None = None
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            failure = failed[0]
            break
        if all(c == 0 for c in codes):
            break
        if timeout is not None and time.monotonic() - start > timeout:
            running = [r for r, c in enumerate(codes) if c is None]
            _stop(procs, grace)
            for pump in pumps:
                pump.join(timeout=5)
            print(
                f"rljax.launch: timed out after {timeout:g}s; stopped rank(s) "
                f"{', '.join(map(str, running))}",
                file=sys.stderr,
                flush=True,
            )
            return 124
        time.sleep(0.05)
    if failure is not None:
        _stop(procs, grace)
    for pump in pumps:
        pump.join(timeout=5)
    if failure is not None:
        rank, code = failure
        print(
            f"rljax.launch: rank {rank} {_describe(code)}; stopped the other processes",
            file=sys.stderr,
            flush=True,
        )
        return code if code > 0 else 128 - code
    return 0


def launch(
    command: Sequence[str],
    processes: int,
    *,
    devices_per_process: int | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    platform: str = "cpu",
    timeout: float | None = None,
    grace: float = 10.0,
    log_dir: str | None = None,
) -> int:
    """Run ``command`` as ``processes`` ranks of one JAX multi-process run and wait.

    Returns 0 when every rank exits with 0. Otherwise stops the other ranks and returns the
    first failing rank's exit code (128 + N for signal N, 124 on ``timeout``), after printing
    which rank failed and how to stderr.
    """
    _check_arguments(command, processes, devices_per_process, platform)
    port = free_port(host) if port is None else port
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    coordinator = f"{host}:{port}"
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    logs = []
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
    print(
        f"rljax.launch: {processes} process(es), coordinator {coordinator}: {' '.join(command)}",
        file=sys.stderr,
        flush=True,
    )
    start = time.monotonic()
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:  # signal handlers can only be set there
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        _start_ranks(
            command,
            processes,
            coordinator,
            devices_per_process=devices_per_process,
            platform=platform,
            log_dir=log_dir,
            procs=procs,
            pumps=pumps,
            logs=logs,
        )
        return _supervise(procs, pumps, start=start, timeout=timeout, grace=grace)
    except BaseException:
        _stop(procs, grace)  # Ctrl-C, SIGTERM or an error in the launcher: leave nothing running
        raise
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        for log_file in logs:
            log_file.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rljax.launch",
        description=(
            "Run a command as N processes of one JAX multi-process run on this machine "
            "(jax.distributed over gloo CPU collectives), for testing multi-host code."
        ),
        usage="%(prog)s --processes N [--devices-per-process D] [options] -- command ...",
    )
    parser.add_argument("--processes", type=int, required=True, help="number of processes")
    parser.add_argument(
        "--devices-per-process",
        type=int,
        default=None,
        help="simulated CPU devices per process (XLA_FLAGS); default: leave XLA_FLAGS alone",
    )
    parser.add_argument("--host", default="127.0.0.1", help="coordinator host (process 0)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument(
        "--platform",
        choices=("cpu", "none"),
        default="cpu",
        help="cpu: set JAX_PLATFORMS=cpu and the device count; none: set neither",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="stop all processes after this many seconds"
    )
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL"
    )
    parser.add_argument("--log-dir", default=None, help="also write rank<i>.log files here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (``[options] -- command ...``), launch, and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if "--" in argv:
        split = argv.index("--")
        options, command = argv[:split], argv[split + 1 :]
    else:
        options, command = argv, []
    args = parser.parse_args(options)
    try:
        return launch(
            command,
            args.processes,
            devices_per_process=args.devices_per_process,
            host=args.host,
            port=args.port,
            platform=args.platform,
            timeout=args.timeout,
            grace=args.grace,
            log_dir=args.log_dir,
        )
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main())
