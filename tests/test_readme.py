"""The README does what it says: its order and size, its quick starts run as written, and every
relative link in it and in docs/ reaches a file and a heading that exist.

A quick start is the fenced block right after an HTML comment marker (``<!-- name -->``); the
tests read the block from the README, so the README and the tests cannot drift apart. The GRPO
quick start (``grpo-quickstart-*``, ``rl-registry-quickstart``) is run by tests/test_rl_loop.py
and tests/test_rl_registry.py; every marker is checked to be read by some test.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import runpy
import shlex
import shutil
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- ([\w-]+) -->\s*$", re.MULTILINE)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def readme_block(marker: str) -> str:
    """The fenced block right after ``<!-- marker -->`` (as tests/test_rl_loop.py reads it)."""
    text = README.read_text()
    after = text[text.index(f"<!-- {marker} -->") :]
    return after.split("```", 2)[1].split("\n", 1)[1]


def command_argv(block: str) -> list[str]:
    """A one-command bash block as argv (backslash line continuations joined)."""
    return shlex.split(block.replace("\\\n", " "))


def readme_block_after(text: str, heading: str) -> str:
    """The first fenced block after a heading."""
    return text[text.index(heading) :].split("```", 2)[1]


def test_readme_is_short_and_in_the_promised_order():
    text = README.read_text()
    assert len(README.read_bytes()) < 20_000, "README.md must stay under 20 KB; move it to docs/"
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert headings == ["Install", "Run", "Quick starts", "Results", "Layout"], headings
    assert "![" in text.split("## Install")[0], "a figure before the install section"
    install = readme_block_after(text, "## Install")
    for line in ("pip install -e .", "pip install -e '.[gpu]'", 'pip install -e . "jax[tpu]"'):
        assert line in install, line


def test_the_main_job_is_the_grpo_recipe_and_its_figure_is_small():
    argv = command_argv(readme_block("main-job").split("&&")[-1])
    assert argv == ["python", "experiments/grpo.py"], argv  # no flags: the built-in recipe
    assert (ROOT / argv[1]).exists()
    figure = ROOT / "docs" / "images" / "grpo_training.png"
    assert figure.exists() and figure.stat().st_size < 100_000


def test_the_test_command_is_the_one_ci_runs():
    block = readme_block("test-command").strip()
    assert block.startswith("python3 -m venv .venv && . .venv/bin/activate")
    assert "ruff check ." in block and "python -m pytest" in block


def test_every_readme_marker_is_read_by_a_test():
    """A marked block nobody runs could rot; each marker must be extracted somewhere in tests/."""
    markers = MARKER.findall(README.read_text())
    assert {"loss-quickstart", "dpo-quickstart-run", "grpo-quickstart-run"} <= set(markers)
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    unread = [m for m in markers if f'"{m}"' not in sources and f"<!-- {m} -->" not in sources]
    assert not unread, f"README markers no test reads: {unread}"


def test_quick_start_1_a_loss_in_your_own_loop(capsys):
    namespace: dict = {}
    exec(compile(readme_block("loss-quickstart"), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and printed[0].startswith("step   0  loss 0.693"), printed
    assert float(namespace["loss"]) < 0.3  # from log 2 at the reference
    assert float(namespace["metrics"]["rewards/accuracies"]) == 1.0


def test_quick_start_2_dpo_on_your_data_and_model(tmp_path, monkeypatch):
    """The README's pairs and command, with a small Hugging Face folder (the built-in task's
    shipped base model) where the command names the model; flags appended only to shrink the
    run (argparse keeps the last value of a flag)."""
    from rljax.tasks import sorting

    (tmp_path / "pairs.jsonl").write_text(readme_block("dpo-quickstart-data"))
    argv = command_argv(readme_block("dpo-quickstart-run"))
    assert argv[:2] == ["python", "experiments/dpo.py"], argv
    model = argv[argv.index("--model") + 1]
    shutil.copytree(sorting.default_base_model(), tmp_path / model)
    shrink = ["--steps", "2", "--batch-size", "2", "--max-length", "64"]
    shrink += ["--max-prompt-length", "32", "--log-every", "1"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [argv[1], *argv[2:], *shrink])
    runpy.run_path(str(ROOT / argv[1]), run_name="__main__")

    out = tmp_path / argv[argv.index("--out") + 1]
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["eval"]["loss"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert (out / "policy" / "config.json").exists() and (out / "training.png").exists()


def test_quick_start_6_the_rollout_engine(capsys):
    namespace: dict = {}
    exec(compile(readme_block("engine-quickstart"), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    stats, out = namespace["engine"].stats, namespace["out"]
    assert (stats.requests, stats.prefills, stats.inserts) == (32, 8, 32), stats
    assert out.tokens.shape[0] == 32 and printed[-1].startswith("EngineStats(requests=32")
    assert out.completion_mask.sum() == stats.tokens and out.completion_mask[0].any()


PIPELINE_SHRINK = {  # flags appended to each stage only to shrink it (argparse keeps the last)
    "experiments/sft.py": "--steps 2 --batch-size 4 --train-examples 16 --eval-examples 8 "
    "--eval-every 0 --log-every 1",
    "experiments/online_dpo.py": "--iterations 1 --batch-size 2 --group-size 2 "
    "--eval-prompts 4 --max-new-tokens 12 --log-every 1 --compilation-cache none",
    "experiments/grpo.py": "--iterations 1 --batch-size 2 --group-size 2 --eval-prompts 4 "
    "--max-new-tokens 12 --num-minibatches 1 --log-every 1 --compilation-cache none",
}


def test_quick_start_4_the_pipeline_chains_its_stages(tmp_path, monkeypatch):
    """The README's SFT -> online DPO -> GRPO commands, each stage reading the folder the
    previous one wrote (shrunk by PIPELINE_SHRINK)."""
    lines = [line for line in readme_block("pipeline-quickstart").splitlines() if line.strip()]
    assert [shlex.split(line)[1] for line in lines] == list(PIPELINE_SHRINK)
    monkeypatch.chdir(tmp_path)
    for line in lines:
        argv = command_argv(line)
        monkeypatch.setattr(sys, "argv", [argv[1], *argv[2:], *PIPELINE_SHRINK[argv[1]].split()])
        runpy.run_path(str(ROOT / argv[1]), run_name="__main__")
        out = tmp_path / argv[argv.index("--out") + 1]
        assert json.loads((out / "summary.json").read_text())["model"], out
    summaries = [
        json.loads((tmp_path / "runs" / "pipeline" / stage / "summary.json").read_text())
        for stage in ("online_dpo", "grpo")
    ]
    assert summaries[0]["model"] == "runs/pipeline/sft/model"
    assert summaries[1]["model"] == "runs/pipeline/online_dpo/policy"
    assert (tmp_path / "runs" / "pipeline" / "grpo" / "policy" / "config.json").exists()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    found, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"^#{1,6} (.+)$", line)):
            base = slug(match.group(1))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_files_and_headings(document):
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition("#")
        path = (document.parent / file_part).resolve() if file_part else document
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)


def test_slug_matches_githubs_anchors():
    assert slug("GRPO recipe on the arithmetic task (`experiments/grpo.py`)") == (
        "grpo-recipe-on-the-arithmetic-task-experimentsgrpopy"
    )
    assert slug("Shared prompts: each pair's prompt runs once") == (
        "shared-prompts-each-pairs-prompt-runs-once"
    )
