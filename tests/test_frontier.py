"""experiments/frontier.py: the statistics (Student-t intervals, Pareto frontiers, the best
score within a KL budget) against hand-computed values, the table the README quotes, and the
`--quick` sweep end to end (every method, one seed, resumed without retraining)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from helpers import load_experiment

from rljax.models import hf

frontier = load_experiment("frontier")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_interval_is_the_student_t_95_percent_half_width():
    mean, half = frontier.interval([1.0, 2.0, 4.0])
    # t_{0.975, 2} = 4.302652729911275 (tables); sample sd of (1, 2, 4) = sqrt(7/3).
    assert mean == pytest.approx(7 / 3, rel=1e-12)
    assert half == pytest.approx(4.302652729911275 * np.sqrt(7 / 3) / np.sqrt(3), rel=1e-9)
    assert frontier.interval([0.5]) == (0.5, 0.0)


def setting(method, coef, score, kl):
    return {"method": method, "coef": coef, "score": score, "kl": kl, "score_ci": 0.01}


def test_pareto_keeps_the_upper_envelope_over_kl():
    settings = [
        setting("PPO", 0.3, 0.40, 0.5),
        setting("PPO", 0.1, 0.38, 1.0),  # lower score at higher KL: dominated
        setting("PPO", 0.03, 0.55, 1.5),
        setting("PPO", 0.01, 0.50, 3.6),  # dominated
        setting("PPO", 0.02, 0.60, 2.4),
    ]
    assert [s["coef"] for s in frontier.pareto(settings)] == [0.3, 0.03, 0.02]
    assert frontier.best_within(settings, 1.0)["coef"] == 0.3
    assert frontier.best_within(settings, 2.0)["coef"] == 0.03
    assert frontier.best_within(settings, 4.0)["coef"] == 0.02
    assert frontier.best_within(settings, 0.1) is None


def test_aggregate_means_each_setting_over_its_seeds():
    points = [{"method": "reference", "coef": None, "score": 0.3, "kl": 0.0}] + [
        {"method": "DPO", "coef": 0.1, "seed": s, "score": x, "kl": k, "eos_rate": 1.0,
         "valid_rate": 0.9, "samples": 100}
        for s, (x, k) in enumerate([(0.5, 1.0), (0.6, 2.0), (0.7, 3.0)])
    ]  # fmt: skip
    (entry,) = frontier.aggregate(points)
    assert entry["seeds"] == 3
    assert entry["score"] == pytest.approx(0.6) and entry["kl"] == pytest.approx(2.0)
    assert entry["kl_ci"] == pytest.approx(4.302652729911275 * 1.0 / np.sqrt(3), rel=1e-9)
    assert entry["valid_rate_ci"] == 0.0


def test_bad_settings_are_refused_naming_the_flag():
    with pytest.raises(ValueError, match="no arms"):
        frontier.arms(
            frontier.Config(dpo_betas="", ipo_betas="", ppo_kl_coefs="", trpo_kl_coefs="",
                            grpo_betas="")
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"--ppo-kl-coefs: every value must be > 0"):
        frontier.arms(frontier.Config(ppo_kl_coefs="0.1,-1"))
    with pytest.raises(ValueError, match=r"--grpo-betas: '0\.1,0\.1' repeats"):
        frontier.arms(frontier.Config(grpo_betas="0.1,0.1"))
    with pytest.raises(ValueError, match="--seeds: '0,0' repeats"):
        frontier.Config(seeds="0,0")
    with pytest.raises(ValueError, match="--dpo-betas: expected comma-separated numbers"):
        frontier.arms(frontier.Config(dpo_betas="0.1,x"))
    with pytest.raises(ValueError, match="--workers"):
        frontier.Config(workers=0)
    # --quick shrinks only what was left at its default.
    quick = frontier.Config(quick=True, iterations=3).resolved()
    assert quick.iterations == 3 and quick.seeds == "0,1" and quick.dpo_steps == 4


def test_readme_quotes_the_recorded_table():
    summary = json.loads((ROOT / "docs" / "frontier.json").read_text())
    table = frontier.markdown_table(summary)
    assert table == (ROOT / "docs" / "frontier.md").read_text()
    assert table in (ROOT / "README.md").read_text()
    config = summary["config"]
    assert len(config["seeds"].split(",")) >= 3
    for method, spec in frontier.METHODS.items():
        assert len(config[spec.field].split(",")) >= 5, method


def test_quick_sweep_end_to_end_and_resumed_without_retraining(tmp_path, capsys):
    # one seed (the quick default is two): aggregating over seeds is tested above
    config = frontier.Config(out=str(tmp_path / "f"), quick=True, seeds="0")
    summary = frontier.main(config)
    assert [(p["method"], p["seed"]) for p in summary["points"]] == [
        (m, 0) for m in frontier.METHODS
    ]
    assert summary["reference"]["kl"] == pytest.approx(0.0, abs=1e-5)
    for p in summary["points"]:  # trained a little: finite, valid rates, not the reference
        assert np.isfinite(p["score"]) and np.isfinite(p["kl"]) and p["kl"] != 0
        assert 0 <= p["valid_rate"] <= 1 and 0 <= p["eos_rate"] <= 1
        assert p["samples"] == (4 * 32 * 2 if p["method"] in ("DPO", "IPO") else 2 * 64)
    assert {s["method"]: s["seeds"] for s in summary["settings"]} == dict.fromkeys(
        frontier.METHODS, 1
    )
    assert set(summary["frontiers"]) == set(frontier.METHODS)
    out = tmp_path / "f"
    assert (out / "frontier.png").exists()
    assert (out / "frontier.md").read_text() == frontier.markdown_table(summary)
    # Every arm saved a plain language model (the PPO arm's value head is not in it).
    assert hf.load_model(str(out / "ppo_0.05_seed0" / "policy")).score is None
    stamps = {f: f.stat().st_mtime_ns for f in out.glob("*/summary.json")}
    assert len(stamps) == 5
    capsys.readouterr()
    again = frontier.main(config)
    assert "5 arms finished before, not trained again" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in out.glob("*/summary.json")} == stamps
    assert [p["score"] for p in again["points"]] == [p["score"] for p in summary["points"]]
