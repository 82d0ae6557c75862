"""Every script in examples/ runs as a user runs it (a fresh ``python examples/<name>.py``) and
prints the result it promises; each prints a JSON summary as its last line.

The scripts inherit this session's environment (conftest.py: CPU, 8 simulated devices, the
tests' compiler flags), as a user's shell would pass theirs.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


def run_example(name: str) -> tuple[str, dict]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, (
        f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    last = result.stdout.strip().splitlines()[-1]
    return result.stdout, (json.loads(last) if last.startswith("{") else {})


def test_every_example_is_tested_and_short():
    tested = {"quickstart.py", *CHECKS}
    assert set(EXAMPLES) == tested, "add a check for each new example below"
    for name in EXAMPLES:
        lines = (ROOT / "examples" / name).read_text().splitlines()
        assert name == "quickstart.py" or len(lines) < 80, (name, len(lines))


def check_custom_dpo_variant(out, summary):
    assert summary["loss_last"] < summary["loss_first"] - 0.1  # cDPO loss went down from log 2
    assert abs(summary["loss_first"] - 0.6931) < 1e-3
    assert summary["accuracy"] > 0.8 and summary["p_token0"] > 0.5
    assert "hardest pairs" in out


def check_trpo_own_policy(out, summary):
    assert summary["max_kl_seen"] <= summary["max_kl"]  # every step inside the trust region
    assert summary["accepted"] == 1.0
    assert summary["reward_last"] > summary["reward_first"] + 0.3


def check_ppo_gae_own_loop(out, summary):
    assert summary["length_last"] > 2 * summary["length_first"]  # CartPole returns rose


def check_sharded_pytree(out, summary):
    assert summary["devices"] == 8
    assert summary["w1_shard"] == [8, 32]  # [16, 64] split over fsdp=2 and tensor=2
    assert summary["max_diff"] < 1e-5  # the mesh computes what one device computes
    assert summary["loss_last"] < 0.5 * summary["loss_first"]


CHECKS = {
    "custom_dpo_variant.py": check_custom_dpo_variant,
    "trpo_own_policy.py": check_trpo_own_policy,
    "ppo_gae_own_loop.py": check_ppo_gae_own_loop,
    "sharded_pytree.py": check_sharded_pytree,
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_prints_what_it_promises(name):
    out, summary = run_example(name)
    CHECKS[name](out, summary)


def test_quickstart_runs():
    out, _ = run_example("quickstart.py")
    assert out.strip().endswith("done.")
    assert (
        "PPO loss gradient equals minus the TRPO surrogate gradient at the old policy: True" in out
    )
