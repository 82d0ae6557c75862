"""Smoke runs of the experiment and benchmark scripts, on tiny settings."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_trust_region_experiment_writes_figure_and_respects_kl(tmp_path):
    trust_region = load(pathlib.Path("experiments/trust_region.py"))
    from rljax import cli

    config = cli.parse(
        trust_region.Config,
        [
            "--num-envs",
            "4",
            "--num-steps",
            "64",
            "--warmup-iterations",
            "1",
            "--num-points",
            "9",
            "--out",
            str(tmp_path),
        ],
    )
    summary = trust_region.main(config)
    for name in ("trust_region.png", "curves.json", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert len(curves["scale"]) == 9 and curves["natural_kl"][0] == pytest.approx(0.0, abs=1e-7)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    if summary["line_search_accepted"]:
        assert summary["accepted_kl"] <= config.trpo.max_kl
        assert summary["accepted_surrogate_gain"] > 0


def test_cli_rejects_bad_values(capsys):
    trust_region = load(pathlib.Path("experiments/trust_region.py"))
    from rljax import cli

    with pytest.raises(SystemExit):
        cli.parse(trust_region.Config, ["--num-envs", "four"])
    assert "invalid int value" in capsys.readouterr().err
    config = cli.parse(trust_region.Config, ["--max-kl", "0.02", "--fvp-method", "hessian"])
    assert config.trpo.max_kl == 0.02 and config.trpo.fvp_method == "hessian"
    assert config.trpo.n_critic_updates == 5  # the figure's critic fit, kept


def test_fvp_benchmark_quick(tmp_path):
    fvp = load(pathlib.Path("benchmarks/fvp.py"))
    results = fvp.main(["--quick", "--out", str(tmp_path / "fvp.json")])
    assert json.loads((tmp_path / "fvp.json").read_text()) == results
    for rows in results["cases"].values():
        assert set(rows) == {
            "grad",
            "gauss_newton",
            "gauss_newton (in CG)",
            "hessian",
            "hessian (in CG)",
        }
        assert all(row["ms"] > 0 for row in rows.values())
