"""benchmarks/step_speed.py: the --quick path in-process (a smoke test: structure of the report,
positive finite timings, the FSDP memory cut; no timing asserts)."""

import importlib.util
import json
import math
import pathlib
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "step_speed", ROOT / "benchmarks" / "step_speed.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_speed"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_step_speed_quick(tmp_path):
    step_speed = _load()
    out, md = tmp_path / "steps.json", tmp_path / "RESULTS.md"
    step_speed.main(["--quick", "--json", str(out), "--results-md", str(md)])
    record = json.loads(out.read_text())

    assert [r["step"] for r in record["results"]] == list(step_speed.STEPS)
    assert set(record["skipped"]) == set(step_speed.UNAVAILABLE)
    for row in record["results"]:
        name = row["step"]
        for key in ("compile_s", "median_s", "p10_s", "p90_s", "throughput", "units_per_step"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert row["p10_s"] <= row["median_s"] <= row["p90_s"], name
        assert row["calls"] == 3 and len(row["call_times_s"]) == 3, name
        assert row["unit"] in ("tokens", "new tokens", "env-steps"), name
        assert row["mfu"] is None  # CPU: no known peak
        if row["unit"] != "env-steps":
            assert row["model_flops_per_step"] > 0, name
        assert row["memory"] is None or row["memory"]["argument_size_in_bytes"] > 0, name
    by_name = {r["step"]: r for r in record["results"]}
    assert by_name["fvp"]["x_grad"] > 0 and by_name["fvp_cg"]["steps_per_call"] == 10

    fsdp = record["memory"]["fsdp"]
    one, eight = fsdp["1 device"], fsdp["fsdp=8"]
    assert one["state_bytes_per_device"] > 4 * eight["state_bytes_per_device"]
    assert fsdp["state_ratio"] > 4  # ~8x: only the norm scales stay replicated
    if "argument_ratio" in fsdp:
        assert fsdp["argument_ratio"] > 4
    off, on = record["memory"]["remat"]
    assert (off["remat"], on["remat"]) == (False, True)
    if off["memory"] is not None:
        assert on["memory"]["temp_size_in_bytes"] <= off["memory"]["temp_size_in_bytes"]

    text = md.read_text()
    assert text.count("## Step-speed harness (CPU)") == 1
    assert all(f"| {name} |" in text for name in step_speed.STEPS)
    assert "FSDP" in text and "Rematerialisation" in text


def test_step_speed_mesh_quick(tmp_path):
    # The DPO step on an 8-device FSDP mesh (rljax.updates.lm.compile_update): the state (params, two
    # AdamW moments, the reference) is sharded, so XLA's per-device argument bytes are well
    # under the unsharded state's.
    step_speed = _load()
    argv = ["--quick", "--steps", "dpo", "--batch", "8", "--memory", "none", "--mesh", "fsdp=8"]
    row = step_speed.main([*argv, "--json", str(tmp_path / "mesh.json")])["results"][0]
    assert row["devices"] == 8 and math.isfinite(row["median_s"]) and row["median_s"] > 0
    _, host = step_speed.random_model(step_speed.preset("tiny"))
    state_bytes = 4 * sum(x.nbytes for x in jax.tree.leaves(host))
    if row["memory"] is not None:
        assert row["memory"]["argument_size_in_bytes"] < state_bytes / 4
