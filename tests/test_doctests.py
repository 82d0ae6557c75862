"""The examples in the main public docstrings run as written (doctest), and each of those
docstrings keeps its example."""

from __future__ import annotations

import doctest
import importlib

import pytest

# module -> the functions whose docstrings must carry a runnable example
EXAMPLES = {
    "rljax.dpo": ["dpo_loss"],
    "rljax.rlhf": ["policy_loss"],
    "rljax.advantages": ["gae"],
    "rljax.ppo": ["clipped_surrogate_loss"],
    "rljax.trpo": ["conjugate_gradient"],
    "rljax.rl": ["config"],
}


@pytest.mark.parametrize("module_name", list(EXAMPLES))
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder()
    tests = {t.name.rsplit(".", 1)[-1]: t for t in finder.find(module) if t.examples}
    missing = [name for name in EXAMPLES[module_name] if name not in tests]
    assert not missing, f"{module_name}: no docstring example in {missing}"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for test in tests.values():
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{module_name}: {result.failed} docstring example(s) failed"
    assert result.attempted >= 3 * len(EXAMPLES[module_name])  # the examples really ran


def test_a_wrong_example_fails():
    """The runner reports a mismatch (the check above is not vacuous)."""
    parser = doctest.DocTestParser()
    test = parser.get_doctest(">>> 1 + 1\n3\n", {}, "planted", "planted.py", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=lambda text: None)
    assert runner.summarize(verbose=False).failed == 1
