"""Metrics sinks (metrics.jsonl, TensorBoard, Weights & Biases), sample tables and progress
lines of rljax.runs.MetricsLog.

The sinks are read back from their files: TensorBoard event files are parsed as TFRecords
(CRCs checked) with tensorboardX's protos; a W&B offline run is read from its ``.wandb`` file
(a LevelDB-style log of wandb's protobuf records). Nothing is mocked but a missing package.
"""

import json
import math
import socket
import struct
import sys

import numpy as np
import pytest

from rljax import runs

SAMPLES = [
    {"prompt": "3 1 2", "completion": "1 2 3", "reward": 1.0},
    {"prompt": "2 | 1", "completion": "1\n2", "reward": 0.0},
]


def run(
    folder, steps, *, resume_step=None, sinks=("jsonl",), scale=1.0, samples_at=(), config=None
):
    """Log ``loss = scale / step`` (and values of every kind) at ``steps``, as a driver does."""
    with runs.MetricsLog(
        folder / "metrics.jsonl",
        "test",
        5,
        resume_step=resume_step,
        keys=("loss",),
        sinks=sinks,
        config=config,
    ) as log:
        for step in steps:
            metrics = {
                "loss": np.float32(scale / step),
                "correct": np.asarray(step),  # a 0-d array
                "finished": True,
                "nonfinite": float("nan"),
                "note": "text",  # not a scalar: metrics.jsonl only
                "per_token": [1.0, 2.0],  # not a scalar either
            }
            log.log(step, metrics, print_line=False)
            if step in samples_at:
                log.log_samples(step, [dict(row, reward=row["reward"] * scale) for row in SAMPLES])
    return log


def jsonl_steps(path):
    return [row["step"] for _, row in runs.read_jsonl(path)]


# ---------------------------------------------------------------------------- TensorBoard


def tensorboard_events(folder):
    """Every event of every event file in ``folder``, in file-name order (TensorBoard's)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    events = []
    for path in sorted(folder.glob("*tfevents*")):
        data, position = path.read_bytes(), 0
        while position < len(data):
            header = data[position : position + 8]
            (length,) = struct.unpack("<Q", header)
            payload = data[position + 12 : position + 12 + length]
            (header_crc,) = struct.unpack_from("<I", data, position + 8)
            (payload_crc,) = struct.unpack_from("<I", data, position + 12 + length)
            assert (header_crc, payload_crc) == (masked_crc32c(header), masked_crc32c(payload))
            events.append(Event.FromString(payload))
            position += 16 + length
    return events


def tensorboard_values(events):
    """``{tag: [(step, value)]}`` for scalars (floats) and texts (strings)."""
    values = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("tensor"):  # a text, tagged "<name>/text_summary"
                tag, item = value.tag.removesuffix("/text_summary"), value.tensor.string_val[0]
                item = item.decode()
            else:
                tag, item = value.tag, value.simple_value
            values.setdefault(tag, []).append((event.step, item))
    return values


def test_tensorboard_gets_scalars_per_step_sample_tables_and_the_config(tmp_path):
    pytest.importorskip("tensorboardX")
    run(tmp_path, [1, 2, 3], sinks="tensorboard", samples_at=(2,), config={"lr": 0.1})

    values = tensorboard_values(tensorboard_events(tmp_path / "tensorboard"))
    assert set(values) == {"loss", "correct", "finished", "nonfinite", "samples", "config"}
    assert [s for s, _ in values["loss"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in values["loss"]], [1, 1 / 2, 1 / 3], rtol=1e-6)
    assert values["correct"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert values["finished"] == [(1, 1.0), (2, 1.0), (3, 1.0)]
    assert all(math.isnan(v) for _, v in values["nonfinite"])  # NaN is plotted as NaN
    [(step, table)] = values["samples"]
    assert step == 2
    assert table.splitlines() == [
        "| prompt | completion | reward |",
        "| --- | --- | --- |",
        "| 3 1 2 | 1 2 3 | 1.0 |",
        "| 2 \\| 1 | 1<br>2 | 0.0 |",
    ]
    [(step, config)] = values["config"]
    assert step == 0 and '"lr": 0.1' in config

    # metrics.jsonl is unchanged: every value, NaN as null; samples.jsonl one line per row.
    rows = [row for _, row in runs.read_jsonl(tmp_path / "metrics.jsonl")]
    assert rows[0] == {
        "step": 1,
        "loss": 1.0,
        "correct": 1,
        "finished": True,
        "nonfinite": None,
        "note": "text",
        "per_token": [1.0, 2.0],
    }
    samples = [row for _, row in runs.read_jsonl(tmp_path / "samples.jsonl")]
    assert samples == [{"step": 2, **row} for row in SAMPLES]


def test_tensorboard_resume_keeps_each_step_once(tmp_path):
    pytest.importorskip("tensorboardX")
    folder = tmp_path / "tensorboard"
    run(tmp_path, [1, 2, 3, 4], sinks="tensorboard", samples_at=(4,))
    # Resumed from the checkpoint at step 2: steps 3 and 4 are recomputed (here: differently).
    run(tmp_path, [3, 4, 5], resume_step=2, sinks="tensorboard", scale=10.0, samples_at=(4,))

    events = tensorboard_events(folder)
    values = tensorboard_values(events)
    assert [s for s, _ in values["loss"]] == [1, 2, 3, 4, 5]  # in the files, not only as shown
    np.testing.assert_allclose(
        [v for _, v in values["loss"]], [1, 1 / 2, 10 / 3, 10 / 4, 10 / 5], rtol=1e-6
    )
    assert [s for s, _ in values["samples"]] == [4]
    assert "10.0" in values["samples"][0][1]
    # A TensorBoard that showed the old steps 3 and 4 drops them at the purge event.
    purges = [e.step for e in events if e.HasField("session_log")]
    assert purges == [3]
    assert len(list(folder.glob("*tfevents*"))) == 2
    assert jsonl_steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5]
    assert jsonl_steps(tmp_path / "samples.jsonl") == [4, 4]  # two rows of the new step 4

    # A new run in the same folder starts TensorBoard afresh too, with the sink on or off.
    run(tmp_path, [1], sinks="tensorboard")
    values = tensorboard_values(tensorboard_events(folder))
    assert values["loss"] == [(1, 1.0)]
    assert not (tmp_path / "samples.jsonl").read_text()
    run(tmp_path, [1], sinks="jsonl", resume_step=0)  # resume_step 0: nothing to resume
    assert not list(folder.glob("*tfevents*"))


def test_a_sink_turned_on_at_a_resume_gets_the_kept_history(tmp_path):
    pytest.importorskip("tensorboardX")
    run(tmp_path, [1, 2, 3], sinks="jsonl")
    run(tmp_path, [3, 4], resume_step=2, sinks="jsonl,tensorboard", scale=10.0)
    values = tensorboard_values(tensorboard_events(tmp_path / "tensorboard"))
    np.testing.assert_allclose(values["loss"], [(1, 1), (2, 1 / 2), (3, 10 / 3), (4, 10 / 4)])


def test_a_half_written_tensorboard_event_is_dropped_on_resume(tmp_path):
    pytest.importorskip("tensorboardX")
    run(tmp_path, [1, 2], sinks="tensorboard")
    [path] = (tmp_path / "tensorboard").glob("*tfevents*")
    with open(path, "ab") as f:
        f.write(struct.pack("<Q", 500) + b"\x00" * 10)  # a record cut short by a crash
    with pytest.warns(UserWarning, match="half-written last event"):
        run(tmp_path, [2], resume_step=1, sinks="tensorboard", scale=10.0)
    values = tensorboard_values(tensorboard_events(tmp_path / "tensorboard"))
    assert values["loss"] == [(1, 1.0), (2, 5.0)]


# ---------------------------------------------------------------------------- Weights & Biases


def wandb_records(path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version),
    then LevelDB log blocks of 32 KiB, each record in chunks with a 7-byte header (CRC, length,
    type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # block trailer padding
            position += left
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        if kind == 0:
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full, last
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def test_wandb_offline_run_holds_each_step_once_with_the_config(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    # A listening socket stands for the W&B server and every proxy: offline, nobody calls it.
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.setblocking(False)
    url = f"http://127.0.0.1:{trap.getsockname()[1]}"
    wandb_dir = tmp_path / "wandb_files"
    environment = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb_dir),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_BASE_URL": url,
        **{name: url for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    for name in ("NO_PROXY", "no_proxy", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    wandb_dir.mkdir()
    folder = tmp_path / "run"
    try:
        run(folder, [1, 2, 3, 4], sinks="wandb", samples_at=(2,), config={"lr": 0.1})
        first = json.loads((folder / "wandb_run.json").read_text())
        assert first["last_step"] == 4
        # Resumed from step 2: W&B holds steps 3 and 4 already, so only step 5 is new.
        run(folder, [3, 4, 5], resume_step=2, sinks="wandb", scale=10.0, config={"lr": 0.1})
        assert json.loads((folder / "wandb_run.json").read_text()) == {**first, "last_step": 5}
        with pytest.raises(BlockingIOError):  # no connection was attempted
            trap.accept()
    finally:
        wandb.teardown()
        trap.close()

    run_id = first["run_id"]
    files = sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one offline run folder per start, both the same W&B run
    history, configs = [], []
    for path in files:
        for record in wandb_records(path):
            if record.HasField("history"):
                items = record.history.item
                history.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
            if record.HasField("run"):
                configs.append({u.key: json.loads(u.value_json) for u in record.run.config.update})
    assert [row["_step"] for row in history] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([row["loss"] for row in history], [1, 1 / 2, 1 / 3, 1 / 4, 2])
    assert all(row["finished"] == 1 and row["correct"] == row["_step"] for row in history)
    assert not any("note" in row or "per_token" in row for row in history)  # scalars only
    assert history[1]["samples/_type"] == "table-file"
    table = json.loads((files[0].parent / "files" / history[1]["samples/path"]).read_text())
    assert table["columns"] == ["prompt", "completion", "reward"]
    assert table["data"] == [list(row.values()) for row in SAMPLES]
    assert [config["lr"] for config in configs] == [0.1, 0.1]

    run(folder, [1])  # a new run in the folder will not continue this W&B run
    assert not (folder / "wandb_run.json").exists()


# ---------------------------------------------------------------------------- choosing sinks


def test_parse_sinks_names_an_unknown_sink_and_lists_the_valid_ones(tmp_path):
    assert runs.parse_sinks("tensorboard,wandb") == ("jsonl", "tensorboard", "wandb")
    assert runs.parse_sinks(" WandB, jsonl,,wandb ") == ("jsonl", "wandb")
    assert runs.parse_sinks("") == runs.parse_sinks(()) == ("jsonl",)
    assert runs.parse_sinks(["tensorboard"]) == ("jsonl", "tensorboard")
    message = r"unknown metrics sink 'tensorbord' .*: the sinks are jsonl, tensorboard, wandb"
    with pytest.raises(ValueError, match=message):
        runs.parse_sinks("jsonl,tensorbord")
    with pytest.raises(ValueError, match=message):
        runs.MetricsLog(tmp_path / "metrics.jsonl", "test", 3, sinks="tensorbord")
    assert not (tmp_path / "metrics.jsonl").exists()
    assert "log" in runs.SAFE_TO_CHANGE  # a resume may add or drop sinks


@pytest.mark.parametrize(
    ("sink", "module", "extra"),
    [("tensorboard", "tensorboardX", "tensorboard"), ("wandb", "wandb", "wandb")],
)
def test_a_missing_sink_package_names_the_extra_to_install(
    tmp_path, monkeypatch, sink, module, extra
):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    with pytest.raises(
        ImportError, match=rf"needs the {module} package.*pip install 'rljax\[{extra}\]'"
    ):
        runs.MetricsLog(tmp_path / "metrics.jsonl", "test", 3, sinks=sink)
    # A process that writes nothing (not process 0) opens no sink and needs no package.
    log = runs.MetricsLog(tmp_path / "other" / "metrics.jsonl", "test", 3, sinks=sink, write=False)
    log.log(1, {"loss": 1.0})
    log.log_samples(1, SAMPLES)
    assert log.rows() == [{"step": 1, "loss": 1.0}] and not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------- progress and ETA


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0.0s"),
        (8.24, "8.2s"),
        (42.4, "42s"),
        (59.6, "1m00s"),
        (725, "12m05s"),
        (3 * 3600 + 4 * 60 + 10, "3h04m"),
        (2 * 86400 + 3 * 3600, "2d03h"),
        (math.inf, "?"),
        (-1.0, "?"),
    ],
)
def test_format_duration(seconds, text):
    assert runs.format_duration(seconds) == text


def test_format_rate():
    assert runs.format_rate(2.44) == "2.4s/step"
    assert runs.format_rate(0.98) == "1.0s/step"
    assert runs.format_rate(0.08, "iteration") == "12.5 iterations/s"
    assert runs.format_rate(0.001) == "1000 steps/s"
    assert runs.format_rate(math.nan) == "?/step"


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_rate_follows_the_recent_steps_and_gives_the_eta():
    clock = FakeClock()
    progress = runs.Progress(10, window=2, clock=clock)
    clock.now += 30  # step 1 includes the compilation
    assert progress.update(1) == "30s elapsed, 30s/step, ETA 4m30s"
    clock.now += 2  # from then on 2 s per step: the start-up no longer counts
    assert progress.update(2) == "32s elapsed, 2.0s/step, ETA 16s"
    clock.now += 2
    assert progress.update(3) == "34s elapsed, 2.0s/step, ETA 14s"
    clock.now += 1  # faster: the window of 2 updates forgets the older pace
    progress.update(5)
    clock.now += 1
    assert progress.update(7) == "36s elapsed, 2.0 steps/s, ETA 1.5s"  # (7 - 3) / (36 - 34)
    assert progress.update(10).endswith("ETA 0.0s")

    resumed = runs.Progress(10, start=6, clock=clock)
    assert resumed.update(6) == "0.0s elapsed"  # no step done yet: no rate
    clock.now += 8
    assert resumed.update(8) == "8.0s elapsed, 4.0s/step, ETA 8.0s"


def test_progress_lines_show_elapsed_rate_and_eta_as_plain_lines(tmp_path, capsys):
    clock = FakeClock()
    log = runs.MetricsLog(tmp_path / "metrics.jsonl", "test", 4, keys=("loss", "note"))
    log.progress = runs.Progress(4, clock=clock)
    for step in (1, 2, 4):
        clock.now += 30 if step == 1 else 2
        log.log(step, {"loss": 1.0 / step, "note": "x"})
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out  # no carriage-return redraws, no colour codes
    assert out.splitlines() == [
        "[test] step 1/4  loss 1  note x  [30s elapsed, 30s/step, ETA 1m30s]",
        "[test] step 2/4  loss 0.5  note x  [32s elapsed, 2.0s/step, ETA 4.0s]",
        "[test] step 4/4  loss 0.25  note x  [34s elapsed, 1.3s/step, ETA 0.0s]",  # 4 s / 3
    ]
