"""benchmarks/rlhf_speed.py: the --quick path in-process (a smoke test: the phases of the
report, positive finite timings, the FLOP and bandwidth-bound fields; no timing asserts)."""

import json
import math

from helpers import load_script


def test_rlhf_speed_quick(tmp_path):
    rlhf_speed = load_script("benchmarks/rlhf_speed.py")
    out = tmp_path / "rlhf.json"
    # --phases core: the iteration's phases (the value-head and TRPO updates compile in
    # tests/test_step_speed.py's quick run, the fused rollout in tests/test_rlhf_stages.py)
    returned = rlhf_speed.main(["--quick", "--phases", "core", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["results"] == returned["results"]

    assert record["system"] == "rljax"
    assert record["shape"] == {
        "batch": 4,
        "prompt_len": 8,
        "new_tokens": 8,
        "epochs": 4,
        "minibatches": 1,
    }
    assert set(record["params"]) == {
        "policy",
        "reference",
        "value",
        "reward",
        "policy_value_head",
    }
    # The LM head makes the policy bigger than the reward and value models.
    assert record["params"]["policy"] > record["params"]["reward"]
    phases = [r["phase"] for r in record["results"]]
    assert phases == [*rlhf_speed.CORE, "iteration (sum)"]
    by_phase = {r["phase"]: r for r in record["results"]}
    for phase in rlhf_speed.CORE:
        row = by_phase[phase]
        for key in ("median_s", "p10_s", "p90_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (phase, key, row[key])
        assert row["p10_s"] <= row["median_s"] <= row["p90_s"], phase
        assert row["calls"] == 2 and len(row["times_s"]) == 2, phase
        if phase != "reference_forward":  # shares the policy's compiled program
            assert row["compile_s"] > 0, phase
    for phase in ("ppo_update_separate", "policy_forward"):
        row = by_phase[phase]
        assert row["model_flops"] > 0 and row["gflops_per_s"] > 0, phase
        assert row["mfu"] is None  # CPU: no known peak
    # A PPO update sees every token once per epoch.
    assert by_phase["ppo_update_separate"]["tokens_per_call"] == 4 * 4 * 16

    gen = by_phase["generation"]
    assert gen["tokens_per_call"] == 4 * 8
    for key in ("decode_step_s", "bound_step_s", "bandwidth_gb_s", "fraction_of_bound"):
        assert math.isfinite(gen[key]) and gen[key] > 0, key
    assert gen["param_bytes"] == 4 * record["params"]["policy"]  # float32

    iteration = record["iteration"]
    assert iteration["phases"] == list(rlhf_speed.ITERATION)
    assert len(iteration["times_s"]) == 2
    assert iteration["median_s"] >= by_phase["ppo_update_separate"]["p10_s"]
    assert set(record["load_avg"]) == {"before", "after"}
