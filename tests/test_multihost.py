"""Multi-process runs on one machine (rljax.launch + jax.distributed over gloo CPU collectives):
DPO in 2 processes x 4 devices gives the losses and the trained model of 1 process x 8
devices, with one metrics log and one set of checkpoints; the launcher's argument errors,
failure propagation and timeout; the multi-host helpers of rljax.sharding on one process.

Every multi-process run is a subprocess with a timeout (a dead rank otherwise blocks the
others until the distributed runtime's heartbeat timeout)."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from rljax import launch, runs, sharding
from rljax.models import hf
from rljax.models.transformer import Transformer
from rljax.tasks import sorting

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 400  # seconds per launched run; generous for 2 busy cores


# Quicker XLA:CPU compiles for the launched runs (both sides of a comparison use them).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def start_launch(args):
    """``python -m rljax.launch ARGS`` started from the repository root (a Popen whose output
    goes to temporary files, so a quiet wait on another run never blocks it on a full pipe)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLJAX_")}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rljax.launch", *args], cwd=ROOT, env=env, stdout=out, stderr=err
    )
    proc.outputs = out, err
    return proc


def finish(proc, timeout=TIMEOUT):
    """Wait for a :func:`start_launch` process (killed after ``timeout``); ``(code, out, err)``."""
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # the launcher's own --timeout should have fired first
        timed_out = True
        proc.terminate()  # the launcher stops its ranks on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    texts = []
    for f in proc.outputs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    if timed_out:
        pytest.fail(
            f"rljax.launch did not finish in {timeout}s:\n{texts[0][-3000:]}\n{texts[1][-3000:]}"
        )
    return proc.returncode, *texts


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A randomly initialised built-in-task model saved as a Hugging Face folder and a small
    preference data set (train and held-out files, so no oracle sampling runs)."""
    folder = tmp_path_factory.mktemp("multihost")
    tokenizer = sorting.build_tokenizer()
    model = Transformer(sorting.base_model_config(len(tokenizer)), rngs=nnx.Rngs(0))
    hf.save_model(model, folder / "model", tokenizer=tokenizer)
    paths = sorting.write_dataset(folder / "data", 48, 16, seed=0)
    return str(folder / "model"), paths


def _rows(folder):
    path = pathlib.Path(folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_dpo_two_processes_equal_one_process(tiny_setup, tmp_path):
    model, paths = tiny_setup
    flags = [
        "--model", model, "--data", paths["train"], "--eval-data", paths["test"],
        "--mesh", "data=2,fsdp=2,tensor=2", "--steps", "3", "--batch-size", "8",
        "--log-every", "1", "--eval-every", "0", "--checkpoint-every", "2",
    ]  # fmt: skip
    started = {}
    for processes, devices in ((2, 4), (1, 8)):  # both at once: compiles are mostly 1 thread
        argv = [
            "--processes", str(processes), "--devices-per-process", str(devices),
            "--timeout", str(TIMEOUT - 20), "--", sys.executable, "experiments/dpo.py", *flags,
            "--out", str(tmp_path / f"{processes}x{devices}"),
        ]  # fmt: skip
        started[processes] = start_launch(argv)
    results = {processes: finish(proc) for processes, proc in started.items()}
    for code, out, err in results.values():
        assert code == 0, out[-4000:] + err[-4000:]
    multi, single, multi_stdout = tmp_path / "2x4", tmp_path / "1x8", results[2][1]

    # The same losses step by step (the global batch and the mesh are the same).
    a, b = _rows(single), _rows(multi)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]  # logged once
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, err_msg=f"{key} {ra['step']}")
        np.testing.assert_allclose(rb["rewards/margins"], ra["rewards/margins"], atol=1e-6)
    np.testing.assert_allclose(b[-1]["eval/loss"], a[-1]["eval/loss"], rtol=1e-5)

    # One set of checkpoints, one summary, one exported model, written by process 0.
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 8
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["2", "3"]
    for step in ("2", "3"):
        assert (multi / "checkpoints" / step / "commit_success.txt").exists()
    assert "[rank 0] [DPO] step 3/3" in multi_stdout
    assert "[rank 1] [DPO] step" not in multi_stdout  # progress lines from process 0 only
    # The parameters gathered from both processes equal the one-process result.
    _, p_multi = nnx.split(hf.load_model(str(multi / "policy")))
    _, p_single = nnx.split(hf.load_model(str(single / "policy")))
    for x, y in zip(jax.tree.leaves(p_multi), jax.tree.leaves(p_single), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


HELPERS = textwrap.dedent(
    """
    import json
    import numpy as np
    import jax
    from rljax import sharding

    assert sharding.initialize_from_env()
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    batch = {"x": np.arange(24.0).reshape(8, 3), "scale": np.float32(2.0)}
    placed = sharding.shard_global_batch(batch, mesh)
    total = jax.jit(lambda b: (b["x"] * b["scale"]).sum(axis=1))(placed)
    rows = sharding.process_rows(8, mesh)
    print(json.dumps({
        "rank": jax.process_index(), "rows": [rows.start, rows.stop],
        "x": sharding.to_host(placed["x"]).tolist(), "total": sharding.to_host(total).tolist(),
        "primary": sharding.is_primary(),
    }))
    """
)


def test_helpers_across_two_processes():
    argv = ["--processes", "2", "--devices-per-process", "4", "--timeout", "200", "--"]
    code, out, err = finish(start_launch([*argv, sys.executable, "-c", HELPERS]), timeout=240)
    assert code == 0, out[-4000:] + err[-4000:]
    reports = {}
    for line in out.splitlines():
        prefix, _, rest = line.partition("] ")
        if rest.startswith("{"):
            reports[int(prefix.removeprefix("[rank "))] = json.loads(rest)
    assert sorted(reports) == [0, 1]
    assert reports[0]["rows"] == [0, 4] and reports[1]["rows"] == [4, 8]
    assert reports[0]["primary"] and not reports[1]["primary"]
    expected = np.arange(24.0).reshape(8, 3)
    for report in reports.values():  # every process sees the whole global array
        np.testing.assert_array_equal(report["x"], expected)
        np.testing.assert_array_equal(report["total"], (2 * expected).sum(axis=1))


# ---------------------------------------------------------------------------- the launcher


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--processes", "0", "--", "true"], "processes must be >= 1"),
        (["--processes", "2"], "no command to run"),
        (["--processes", "2", "--devices-per-process", "0", "--", "true"], "devices_per_process"),
        (["--processes", "2", "--port", "70000", "--", "true"], "port must be in 1..65535"),
        (["--", "true"], "--processes"),
    ],
)
def test_launch_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        launch.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_launch_runs_every_rank_with_prefixed_output(tmp_path, capsys):
    code = (
        "import os, sys; e = os.environ; print(e['RLJAX_PROCESS_ID'], e['RLJAX_NUM_PROCESSES'], "
        "e['RLJAX_COORDINATOR'], e['JAX_PLATFORMS'], e['XLA_FLAGS']); "
        "print('to stderr', file=sys.stderr)"
    )
    port = launch.free_port()
    code_ = launch.main(
        ["--processes", "3", "--devices-per-process", "2", "--port", str(port),
         "--log-dir", str(tmp_path), "--timeout", "100", "--", sys.executable, "-c", code]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code_ == 0, err
    for rank in range(3):
        line = next(x for x in out.splitlines() if x.startswith(f"[rank {rank}] {rank}"))
        assert f"{rank} 3 127.0.0.1:{port} cpu" in line
        assert line.count("--xla_force_host_platform_device_count") == 1  # replaced, not added
        assert line.endswith("--xla_force_host_platform_device_count=2")
        assert f"[rank {rank}] to stderr" in err
        assert "to stderr" in (tmp_path / f"rank{rank}.log").read_text()


def test_launch_failure_stops_the_others_and_names_the_rank(capsys):
    code = (
        "import os, sys, time; rank = os.environ['RLJAX_PROCESS_ID']; "
        "time.sleep(300 if rank == '0' else 0.1); sys.exit(3)"
    )
    argv = ["--processes", "2", "--grace", "2", "--timeout", "100", "--"]
    assert launch.main([*argv, sys.executable, "-c", code]) == 3  # not the timeout's 124
    assert "rank 1 exited with code 3; stopped the other processes" in capsys.readouterr().err


def test_launch_timeout(capsys):
    argv = ["--processes", "2", "--timeout", "1", "--grace", "2", "--"]
    assert launch.main([*argv, sys.executable, "-c", "import time; time.sleep(300)"]) == 124
    assert "timed out after 1s; stopped rank(s) 0, 1" in capsys.readouterr().err


def test_child_environment():
    env = launch.child_environment(
        1, 4, "10.0.0.1:1234", devices_per_process=8, base={"XLA_FLAGS": "--a=1"}
    )
    assert env["RLJAX_PROCESS_ID"] == "1" and env["RLJAX_NUM_PROCESSES"] == "4"
    assert env["RLJAX_COORDINATOR"] == "10.0.0.1:1234" and env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=8"
    plain = launch.child_environment(
        0, 2, "h:1", devices_per_process=None, platform="none", base={"XLA_FLAGS": "--b"}
    )
    assert plain["XLA_FLAGS"] == "--b" and "JAX_PLATFORMS" not in plain


# ---------------------------------------------------------------------------- one process


def test_initialize_from_env_errors_and_no_op():
    assert sharding.initialize_from_env({}) is False  # no variables: one process
    single = {"RLJAX_COORDINATOR": "h:1", "RLJAX_NUM_PROCESSES": "1", "RLJAX_PROCESS_ID": "0"}
    assert sharding.initialize_from_env(single) is False
    with pytest.raises(ValueError, match="RLJAX_NUM_PROCESSES, RLJAX_PROCESS_ID not"):
        sharding.initialize_from_env({"RLJAX_COORDINATOR": "h:1"})
    with pytest.raises(ValueError, match="RLJAX_PROCESS_ID='x' is not an integer"):
        sharding.initialize_from_env({**single, "RLJAX_PROCESS_ID": "x"})
    with pytest.raises(ValueError, match="not host:port"):
        sharding.initialize_from_env({**single, "RLJAX_COORDINATOR": "nohost"})
    with pytest.raises(ValueError, match="process_id < num_processes"):
        sharding.initialize_from_env({**single, "RLJAX_PROCESS_ID": "2"})


def test_one_process_helpers_equal_the_plain_ones(tmp_path):
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    batch = {"x": np.arange(16.0).reshape(8, 2), "n": np.int32(3)}
    assert sharding.process_rows(8, mesh) == slice(0, 8)
    placed = sharding.shard_global_batch(batch, mesh)
    assert placed["x"].sharding == sharding.batch_sharding(mesh)
    host = sharding.to_host(placed)
    np.testing.assert_array_equal(host["x"], batch["x"])
    assert int(host["n"]) == 3 and sharding.is_primary()
    sharding.barrier("one process: a no-op")

    log = runs.MetricsLog(tmp_path / "sub" / "metrics.jsonl", "x", 2, write=False)
    log.log(1, {"loss": 1.0})
    assert log.rows() == [{"step": 1, "loss": 1.0}]
    assert not (tmp_path / "sub").exists()  # a non-primary process writes nothing
