"""Every ``rljax`` name the README and docs/ (the API reference) mention exists, reached as
they write it.

Names are collected two ways from ``README.md`` and ``docs/**/*.md``:

* every dotted ``rljax.a.b`` anywhere in the text (prose, tables, code);
* in ```` ```python ```` blocks, the names of ``from rljax.x import a, b`` and the attribute
  chains on what those imports bind (``from rljax import rlhf`` ... ``rlhf.policy_loss``).

(Bare names in prose, such as a table row's `` `make_update` ``, are not checked: prose uses
backticks for field names, flags and methods too.)

They are resolved in a fresh interpreter after nothing but ``import rljax``, by attribute
access (``rljax.classic.train_ppo``), so a name the package does not expose that way (a
submodule that needs its own import) fails as it would in a reader's script.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOTTED = re.compile(r"(?<![\w./-])rljax(?:\.[A-Za-z_]\w*)+")
FENCE = re.compile(r"^```(\w*)\s*$")


def documents() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, source)`` of each fenced python block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line.strip())
        if current is None and match and match.group(1) in ("python", "py"):
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _chain(node) -> list[str] | None:
    """``a.b.c`` of an attribute chain rooted at a plain name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def names_in_code(source: str, first_line: int) -> list[tuple[str, int]]:
    """Names that a python block imports from rljax or reads off what it imported."""
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return []
    aliases = {"rljax": "rljax"}  # local name -> dotted rljax path
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rljax":
            for alias in node.names:
                path = f"{node.module}.{alias.name}"
                aliases[alias.asname or alias.name] = path
                found.append((path, first_line + node.lineno - 1))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "rljax":
                    aliases[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else "rljax"
                    )
                    found.append((alias.name, first_line + node.lineno - 1))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (chain := _chain(node)) and chain[0] in aliases:
            if chain[0] != "rljax" or len(chain) > 1:
                path = ".".join([aliases[chain[0]], *chain[1:]])
                found.append((path, first_line + node.lineno - 1))
    return found


def mentioned_names() -> dict[str, list[str]]:
    """Dotted name -> the ``file:line`` places that mention it."""
    places: dict[str, list[str]] = {}
    for path in documents():
        text = path.read_text()
        found = []
        for number, line in enumerate(text.splitlines(), 1):
            found += [(m.group(0), number) for m in DOTTED.finditer(line)]
        for start, source in python_blocks(text):
            found += names_in_code(source, start)
        for name, number in found:
            places.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{number}")
    return places


RESOLVE = """
import importlib, json, sys
import rljax
failures = {}
for name in json.load(sys.stdin):
    obj = rljax
    for depth, part in enumerate(name.split(".")[1:], 2):
        try:
            obj = getattr(obj, part)
        except Exception as err:  # AttributeError, or an import error inside a submodule
            failures[name] = f"{'.'.join(name.split('.')[:depth])}: {type(err).__name__}: {err}"
            break
print(json.dumps(failures))
"""


def test_extraction_finds_the_kinds_of_mention():
    """The collector itself: dotted names, imports and the attribute chains on them."""
    text = textwrap.dedent(
        """\
        Call `rljax.dpo.dpo_loss` (not rljax_extra.x or runs/rljax.json).

        ```python
        from rljax import rlhf
        from rljax.models import hf as hub
        x = rlhf.policy_loss(a)
        model = hub.load_model(folder).cast
        ```

        | `rljax.logprobs` | `entropy` |
        """
    )
    dotted = [m.group(0) for m in DOTTED.finditer(text)]
    assert dotted == ["rljax.dpo.dpo_loss", "rljax.models", "rljax.logprobs"]
    (start, source), *_ = python_blocks(text)
    code = {name for name, _ in names_in_code(source, start)}
    assert code == {
        "rljax.rlhf",
        "rljax.models.hf",
        "rljax.rlhf.policy_loss",
        "rljax.models.hf.load_model",
    }


def test_the_api_reference_in_docs_is_scanned():
    """The reference moved from the README to docs/: each page is collected, and the names it
    documents are found there (so a page that stopped being scanned would fail here)."""
    places = mentioned_names()
    pages = {place.split(":")[0] for where in places.values() for place in where}
    expected = {"README.md", *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))}
    quiet = {"docs/development.md", "docs/frontier.md"}  # name no rljax API (frontier.md: a table)
    assert expected - quiet <= pages, sorted(expected - quiet - pages)
    for name, page in [
        ("rljax.dpo.dpo_loss", "docs/objectives.md"),
        ("rljax.trpo.fisher_vector_product", "docs/objectives.md"),
        ("rljax.updates.make_dpo_update", "docs/preference.md"),
        ("rljax.models.hf.load_model", "docs/language_models.md"),
        ("rljax.rl.ALGORITHMS", "docs/rl.md"),
        ("rljax.classic.train_ppo", "docs/classic_control.md"),
        ("rljax.cli.save_config", "docs/experiments.md"),
        ("rljax.runs.MetricsLog", "docs/operations.md"),
    ]:
        assert any(p.startswith(page + ":") for p in places.get(name, [])), (name, page)


def test_every_rljax_name_in_the_readme_resolves_after_import_rljax():
    places = mentioned_names()
    assert len(places) > 50, sorted(places)  # the collector found the README's names
    result = subprocess.run(
        [sys.executable, "-c", RESOLVE],
        input=json.dumps(sorted(places)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    report = "\n".join(
        f"{name} ({', '.join(places[name][:3])}): {why}" for name, why in sorted(failures.items())
    )
    assert not failures, f"names the docs mention that do not resolve:\n{report}"


def test_import_rljax_is_light():
    """``import rljax`` imports no submodule and not JAX; attribute access imports on demand."""
    code = (
        "import sys, rljax\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')"
        " or m.startswith('rljax.') and m != 'rljax.models')\n"
        "assert not heavy, heavy\n"
        "assert callable(rljax.classic.train_ppo) and callable(rljax.models.hf.load_model)\n"
        "assert 'rljax.classic' in sys.modules\n"
        "try:\n"
        "    rljax.no_such_module\n"
        "except AttributeError as err:\n"
        "    assert 'no_such_module' in str(err) and 'envs' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
