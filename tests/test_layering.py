"""The package's layers (rljax/__init__.py states them) hold: a module imports only from its own
layer or the layers below it, and the objectives import no model code, no optimizer and no
other part of the library. The test reads every import statement of every module (including
imports inside functions), so a lazy import cannot hide a leak."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "rljax"

# Lowest first. A name is a top-level module or subpackage of rljax.
LAYERS = {
    "objectives": {
        "logprobs",
        "advantages",
        "distributions",
        "ppo",
        "trpo",
        "dpo",
        "reward",
        "rlhf",
        "sft",
    },
    "infrastructure": {
        "checks",
        "finite",
        "sharding",
        "checkpoint",
        "runs",
        "cli",
        "launch",
        "bench",
    },
    "models and data": {"models", "lora", "data", "envs", "tasks", "rewards"},
    "updates": {"updates"},
    "drivers": {"experiment", "classic", "rl"},
}
ORDER = {name: i for i, name in enumerate(LAYERS)}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}
# What an objective may import besides the standard library and other objectives.
OBJECTIVE_THIRD_PARTY = {"jax", "numpy", "chex"}
# Infrastructure sits beside the objectives, not above them: neither imports the other.
SIBLINGS = {("infrastructure", "objectives"), ("objectives", "infrastructure")}


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts == ("__init__",):
            continue  # the package's lazy loader names every submodule
        yield parts[0], path


def imports(path: pathlib.Path):
    """``(line, top-level package, rljax member or None)`` of every import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                yield (
                    node.lineno,
                    parts[0],
                    parts[1] if parts[0] == "rljax" and len(parts) > 1 else None,
                )
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "rljax" and len(parts) == 1:
                for alias in node.names:
                    yield node.lineno, "rljax", alias.name
            else:
                yield node.lineno, parts[0], parts[1] if parts[0] == "rljax" else None


def test_every_module_has_a_layer():
    unknown = sorted({top for top, _ in modules()} - set(LAYER_OF))
    assert not unknown, f"rljax modules in no layer (add them to LAYERS): {unknown}"


def violations(layer: str, path: pathlib.Path) -> list[str]:
    """The imports of ``path`` (a module of ``layer``) that break the layering."""
    problems = []
    for line, package, member in imports(path):
        where = f"{path.name}:{line}"
        if package == "rljax" and member is not None and member in LAYER_OF:
            other = LAYER_OF[member]
            if ORDER[other] > ORDER[layer] or (layer, other) in SIBLINGS:
                problems.append(f"{where}: {layer} imports rljax.{member} ({other})")
        if layer == "objectives":
            if package == "rljax" and member not in LAYERS["objectives"]:
                problems.append(f"{where}: an objective imports rljax.{member}")
            elif package not in ("rljax", *OBJECTIVE_THIRD_PARTY) and _third_party(package):
                problems.append(f"{where}: an objective imports {package}")
    return problems


@pytest.mark.parametrize("top,path", list(modules()), ids=lambda x: str(x))
def test_imports_point_down_or_sideways(top, path):
    problems = violations(LAYER_OF[top], path)
    assert not problems, "\n".join(problems)


def _third_party(package: str) -> bool:
    import sys

    return package not in sys.stdlib_module_names and package != "__future__"


def test_the_check_catches_planted_leaks(tmp_path):
    """An objective importing flax.nnx or model code (even lazily), an objective importing
    the infrastructure, and a model module importing a driver all fail the check."""
    leak = tmp_path / "leaky.py"
    leak.write_text(
        "import functools\nimport jax\nfrom rljax.logprobs import token_logprobs\n"
        "def f():\n    from flax import nnx\n    from rljax.models import hf\n"
        "    from rljax import finite\n"
    )
    problems = violations("objectives", leak)
    assert {p.split(":")[1] for p in problems} == {"5", "6", "7"}, problems  # not 1-3
    assert any("imports flax" in p for p in problems)
    assert any("rljax.models (models and data)" in p for p in problems)
    assert any("rljax.finite" in p for p in problems)
    driver = tmp_path / "upward.py"
    driver.write_text("from rljax import rl\nfrom rljax.updates import lm\n")
    assert len(violations("models and data", driver)) == 2
    assert violations("drivers", driver) == []
