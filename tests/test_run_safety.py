"""Runs that survive faults (issue 15): a resume with other settings is refused naming each
changed field (or allowed with --allow-config-change, recording both), one run per folder (a
lock with the owner's pid and host; a stale lock of a dead process is taken over), damaged
checkpoints are skipped for the newest one that restores (real orbax checkpoints, damaged four
ways), and a half-written last line of metrics.jsonl is dropped with a warning."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, load_experiment

from rljax import experiment, rl, runs
from rljax.checkpoint import Checkpointer, CheckpointError, abstract_like

CONFIG = {"learning_rate": 1e-3, "batch_size": 32, "steps": 300, "log_every": 25, "out": "a"}


def saved_progress(folder, step=3):
    """A step folder under folder/checkpoints: what RunFolder takes as saved progress."""
    (pathlib.Path(folder) / "checkpoints" / str(step)).mkdir(parents=True)


# ---------------------------------------------------------------------------- configuration


def test_resume_with_changed_settings_is_refused_naming_each_field(tmp_path):
    with runs.RunFolder(tmp_path, CONFIG, length_field="steps"):
        pass
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored == {"config": CONFIG}
    # Without saved progress nothing is reused: new settings replace the stored ones.
    changed = {**CONFIG, "learning_rate": 2e-3}
    with runs.RunFolder(tmp_path, changed, length_field="steps"):
        pass
    with runs.RunFolder(tmp_path, CONFIG, length_field="steps"):
        pass
    saved_progress(tmp_path)
    # Logging cadence and the output path may change; learning rate and batch size may not.
    new = {**CONFIG, "learning_rate": 2e-3, "batch_size": 16, "log_every": 1, "out": "b"}
    with pytest.raises(runs.ConfigChangedError) as err:
        with runs.RunFolder(tmp_path, new, length_field="steps"):
            pass
    message = str(err.value)
    assert "learning_rate (--learning-rate): 0.001 -> 0.002" in message
    assert "batch_size (--batch-size): 32 -> 16" in message
    assert "log_every" not in message and "--allow-config-change" in message
    assert not (tmp_path / "run.lock").exists()  # released after the refusal
    with runs.RunFolder(tmp_path, {**CONFIG, "log_every": 1}, length_field="steps"):
        pass  # only safe fields changed


def test_allowed_change_records_both_configurations(tmp_path):
    with runs.RunFolder(tmp_path, CONFIG):
        pass
    saved_progress(tmp_path, 3)
    new = {**CONFIG, "learning_rate": 2e-3, "steps": 600}
    with pytest.warns(UserWarning, match="learning_rate"):
        with runs.RunFolder(tmp_path, new, allow_change=True, length_field="steps") as folder:
            assert set(folder.changes) == {"learning_rate", "steps"}
    record = runs.config_record(tmp_path)
    assert record["original_config"] == CONFIG
    assert record["config_changes"] == [
        {"resumed_at": 3, "changed": {"learning_rate": [1e-3, 2e-3], "steps": [300, 600]}}
    ]
    assert json.loads((tmp_path / "config.json").read_text())["config"] == new
    with runs.RunFolder(tmp_path, new, length_field="steps"):
        pass  # the new settings are now the stored ones; the original stays recorded
    assert runs.config_record(tmp_path)["original_config"] == CONFIG


def test_resume_cannot_shrink_a_run_below_its_progress(tmp_path):
    with runs.RunFolder(tmp_path, CONFIG):
        pass
    saved_progress(tmp_path, 300)
    with pytest.raises(runs.ConfigChangedError, match=r"up to steps 300, past --steps 200"):
        with runs.RunFolder(
            tmp_path, {**CONFIG, "steps": 200}, allow_change=True, length_field="steps"
        ):
            pass
    assert json.loads((tmp_path / "config.json").read_text())["config"] == CONFIG


def test_drivers_refuse_a_changed_resume_before_any_work(tmp_path):
    """experiments/dpo.py and the RLHF driver check the stored settings first (milliseconds:
    no model, data or compilation)."""
    dpo = load_experiment("dpo")
    out = str(tmp_path / "dpo")
    with runs.RunFolder(out, dataclasses.asdict(dpo.Config(out=out))):
        pass
    saved_progress(out, 300)
    with pytest.raises(runs.ConfigChangedError, match="learning_rate"):
        dpo.main(dpo.Config(out=out, learning_rate=2e-3))
    with pytest.raises(runs.ConfigChangedError, match="past --steps 200"):
        dpo.main(dpo.Config(out=out, steps=200, allow_config_change=True))

    out = str(tmp_path / "ppo")
    config = rl.rlhf.PPORunConfig(out=out)
    with runs.RunFolder(out, dataclasses.asdict(config)):
        pass
    saved_progress(out, 50)
    with pytest.raises(runs.ConfigChangedError, match=r"kl_coef \(--kl-coef\): 0.05 -> 0.1"):
        rl.rlhf.run(dataclasses.replace(config, kl_coef=0.1))


# ---------------------------------------------------------------------------- lock


def test_second_run_on_a_locked_folder_fails_at_once_naming_the_owner(tmp_path):
    with runs.RunLock(tmp_path):
        owner = json.loads((tmp_path / "run.lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        start = time.perf_counter()
        with pytest.raises(runs.RunFolderBusyError, match=f"pid {os.getpid()} on host"):
            runs.RunLock(tmp_path).acquire()
        with pytest.raises(runs.RunFolderBusyError, match="in use by another run"):
            runs.RunFolder(tmp_path, CONFIG).open()
        assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "run.lock").exists()
    with pytest.raises(RuntimeError, match="boom"):  # released on an exception too
        with runs.RunFolder(tmp_path, CONFIG):
            raise RuntimeError("boom")
    assert not (tmp_path / "run.lock").exists()


def test_stale_lock_is_taken_over_and_foreign_lock_is_explained(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid is no longer running
    stale = {"pid": dead.pid, "host": socket.gethostname(), "started": "x", "command": "old"}
    (tmp_path / "run.lock").write_text(json.dumps(stale))
    with pytest.warns(UserWarning, match=f"stale lock of pid {dead.pid}"):
        lock = runs.RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()

    other = {"pid": 1, "host": "elsewhere", "started": "x", "command": "other"}
    (tmp_path / "run.lock").write_text(json.dumps(other))
    with pytest.raises(runs.RunFolderBusyError, match="another host") as err:
        runs.RunLock(tmp_path).acquire()
    assert f"delete {tmp_path / 'run.lock'}" in str(err.value)
    assert json.loads((tmp_path / "run.lock").read_text()) == other  # left alone


def test_experiment_script_on_a_busy_folder_fails_fast(tmp_path):
    """A real `python experiments/dpo.py` against a folder this test holds."""
    with runs.RunLock(tmp_path):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "experiments" / "dpo.py"), "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "RunFolderBusyError" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert elapsed < 30, elapsed
    assert not (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------- checkpoints

# Random (incompressible) values: the largest file of a step folder is then array data.
STATE = {"a": jnp.asarray(np.random.default_rng(0).normal(size=4096)), "b": jnp.ones(3)}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """An orbax checkpoint folder with steps 1 and 2 (copied per test, then damaged)."""
    folder = tmp_path_factory.mktemp("ckpt") / "template"
    with Checkpointer(folder, max_to_keep=None) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"a": STATE["a"] + step, "b": STATE["b"]}, {"data": step}, force=True)
    return folder


def truncate_array_file(step_dir):
    files = sorted(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)
    with open(files[-1], "r+b") as f:  # the largest: array data
        f.truncate(os.path.getsize(files[-1]) // 2)


def garbage_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_text("garbage{")


def missing_extra(step_dir):
    shutil.rmtree(step_dir / "extra")


DAMAGE = {"truncated": truncate_array_file, "metadata": garbage_metadata, "extra": missing_extra}


# TensorStore leaves an unawaited read of the truncated file behind; it is not ours to await.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [*DAMAGE, "empty"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(two_steps, tmp_path, damage):
    folder = tmp_path / "ckpt"
    shutil.copytree(two_steps, folder)
    if damage == "empty":  # a newest step folder with nothing in it
        (folder / "3").mkdir()
        bad, good = 3, 2
    else:
        DAMAGE[damage](folder / "2")
        bad, good = 2, 1
    ckpt = Checkpointer(folder, max_to_keep=None)
    with pytest.warns(UserWarning) as caught:
        step, state, extra = ckpt.restore_latest(abstract_like(STATE))
    assert [str(w.message).split(" (")[0] for w in caught] == [
        f"checkpoint {folder / str(bad)} is damaged",
        f"moved the damaged checkpoint {folder / str(bad)} to {folder / str(bad)}.damaged",
    ]
    assert (step, extra) == (good, {"data": good})
    np.testing.assert_array_equal(state["a"], STATE["a"] + good)
    # Set aside: orbax no longer lists it, and the run can save that step again.
    assert (folder / f"{bad}.damaged").is_dir() and ckpt.all_steps()[-1] == good
    ckpt.save(bad, state, {"data": bad}, force=True)
    ckpt.close()
    with Checkpointer(folder) as again:
        assert again.restore(abstract_state=abstract_like(STATE))[1] == {"data": bad}


def test_no_valid_checkpoint_names_the_folder(two_steps, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(two_steps, folder)
    garbage_metadata(folder / "2")
    with pytest.raises(CheckpointError, match=f"checkpoint {folder / '2'} cannot be restored"):
        with Checkpointer(folder) as ckpt:
            ckpt.restore(2, abstract_state=abstract_like(STATE))
    missing_extra(folder / "1")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as err:
        with Checkpointer(folder) as ckpt:
            ckpt.restore_latest(abstract_like(STATE))
    message = str(err.value)
    assert f"no checkpoint in {folder} can be restored" in message
    assert str(folder / "2") in message and str(folder / "1") in message
    assert not list(folder.glob("*.damaged"))  # nothing set aside when nothing restored


def test_driver_resume_refuses_a_checkpoint_past_the_run_length(two_steps, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(two_steps, folder)
    with Checkpointer(folder) as ckpt:
        position, _, extra = experiment.resume(ckpt, STATE, 5, "iteration")
    assert (position, extra) == (2, {"data": 2})
    with pytest.raises(ValueError, match=r"holds step 2, past --steps 1: use --steps 2 or more"):
        experiment.resume(Checkpointer(folder), STATE, 1)  # closes it
    with Checkpointer(tmp_path / "none") as ckpt:
        assert experiment.resume(ckpt, STATE, 1) == (0, STATE, None)


# ---------------------------------------------------------------------------- metrics.jsonl


def test_torn_last_metrics_line_is_dropped_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match="dropped line 4, a half-written last line"):
        log = runs.MetricsLog(path, "test", 10, resume_step=3)
    assert log.rows() == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left
    log.log(4, {"loss": 0.25}, print_line=False)
    assert [r["step"] for r in log.rows()] == [1, 2, 3, 4]

    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON object"):
        runs.MetricsLog(path, "test", 10, resume_step=3)
