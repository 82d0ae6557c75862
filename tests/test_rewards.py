"""Reward functions as a protocol (rljax.rewards): specs, TRL's None semantics, errors."""

import math
import sys
import textwrap

import numpy as np
import pytest

from rljax import rewards
from rljax.rewards import RewardError, RewardSet, RewardSpecError, RewardTerm, score_completions

MODULE_SOURCE = textwrap.dedent(
    """
    def length(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    def only_even(prompts, completions, **_):
        return [1.0 if len(c) % 2 == 0 else None for c in completions]

    class Judges:
        @staticmethod
        def matches(prompts, completions, answer, **_):
            return [float(c.strip() == a) for c, a in zip(completions, answer)]

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """``my_rewards.py`` in tmp_path, which is also put on sys.path."""
    path = tmp_path / "my_rewards.py"
    path.write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    return path


def test_parse_module_and_path_specs(reward_module):
    by_module = rewards.parse_reward_spec("my_rewards:length")
    assert (by_module.name, by_module.weight, by_module.spec) == (
        "length",
        1.0,
        "my_rewards:length",
    )
    by_path = rewards.parse_reward_spec(f"{reward_module}:only_even=-0.5")
    assert (by_path.name, by_path.weight) == ("only_even", -0.5)
    assert by_path.fn(["p", "p"], ["ab", "a"]) == [1.0, None]
    nested = rewards.parse_reward_spec("my_rewards:Judges.matches=2")
    assert nested.name == "matches" and nested.weight == 2.0
    builtin = rewards.parse_reward_spec("rljax.tasks.arithmetic:accuracy_reward")
    assert isinstance(builtin.fn, rewards.RewardFn)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("my_rewards.length", "missing ':'"),
        ("no_such_module_xyz:length", "no module named 'no_such_module_xyz'"),
        ("missing_file_xyz.py:length", "no file"),
        ("my_rewards:nope", "has no attribute 'nope'"),
        ("my_rewards:NOT_CALLABLE", "not callable"),
        ("my_rewards:length=heavy", "weight 'heavy'"),
        ("my_rewards:length=nan", "weight 'nan'"),
        (":length", "non-empty"),
    ],
)
def test_bad_specs_name_the_spec(reward_module, spec, message):
    with pytest.raises(RewardSpecError) as info:
        rewards.parse_reward_spec(spec)
    assert repr(spec) in str(info.value) and message in str(info.value)


def test_weights_and_none_semantics_by_hand():
    """TRL: None -> NaN, reward = nansum_k w_k S_ik; rows no function scored are unscorable."""
    a = lambda prompts, completions, **_: [1.0, None, 0.5, None]
    b = lambda prompts, completions, **_: [2.0, 3.0, None, None]
    scores = score_completions([(a, 0.5), RewardTerm(b, 2.0, name="b")], "pppp", "cccc")
    np.testing.assert_allclose(scores.rewards, [0.5 * 1 + 2 * 2, 2 * 3, 0.5 * 0.5, 0.0])
    assert scores.valid.tolist() == [True, True, True, False]
    assert scores.num_unscorable == 1 and scores.num_errors == 0
    assert scores.names == ("<lambda>", "b")
    metrics = scores.metrics()
    assert metrics["rewards/<lambda>/mean"] == pytest.approx(0.75)  # over rows it scored
    assert metrics["rewards/b/mean"] == pytest.approx(2.5)
    assert metrics["reward"] == pytest.approx(np.mean([4.5, 6.0, 0.25]))
    assert np.isnan(scores.per_function[3]).all()


def test_columns_reach_functions_and_are_checked(reward_module):
    reward_set = RewardSet.from_specs(["my_rewards:Judges.matches", "my_rewards:length=0.1"])
    scores = reward_set.score(["q1", "q2"], [" 7", "8"], {"answer": ["7", "9"]})
    np.testing.assert_allclose(scores.rewards, [1 + 0.2, 0 + 0.1], rtol=1e-6)
    assert reward_set([" 7", "8"], [" 7", "8"], answer=["7", "9"]) == pytest.approx([1.2, 0.1])
    with pytest.raises(ValueError, match="column 'answer': expected 2"):
        reward_set.score(["q1", "q2"], ["a", "b"], {"answer": ["7"]})
    duplicate = RewardSet.of(["my_rewards:length", f"{reward_module}:length"])
    assert duplicate.names == ("length", "length_1")


def _raises_on_row_2(prompts, completions, **_):
    if "boom" in completions:
        raise KeyError("boom")
    return [1.0] * len(completions)


def _wrong_length(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)


def _string_at_row_1(prompts, completions, **_):
    return [1.0, "1.0", 1.0, 1.0]


def _nan_at_row_3(prompts, completions, **_):
    return [1.0, 1.0, 1.0, math.nan]


def _inf_at_row_0(prompts, completions, **_):
    return [math.inf, 1.0, 1.0, 1.0]


def _not_a_list(prompts, completions, **_):
    return 1.0


ERROR_CASES = [
    (_raises_on_row_2, 2, "KeyError('boom')"),
    (_wrong_length, 3, "returned 3 rewards for 4 rows"),
    (_string_at_row_1, 1, "not a number"),
    (_nan_at_row_3, 3, "nan"),
    (_inf_at_row_0, 0, "inf"),
    (_not_a_list, None, "not a list"),
]


@pytest.mark.parametrize("fn, row, text", ERROR_CASES)
def test_errors_name_function_and_row(fn, row, text):
    completions = ["a", "b", "boom", "d"]
    with pytest.raises(RewardError) as info:
        score_completions([fn], ["p"] * 4, completions)
    message = str(info.value)
    assert fn.__name__ in message and text in message
    assert info.value.row == row and fn.__name__ in info.value.function
    if row is not None:
        assert f"row {row}" in message


@pytest.mark.parametrize("fn, row, text", ERROR_CASES)
def test_mask_marks_and_counts_failures(fn, row, text):
    ok = lambda prompts, completions, **_: [0.5] * len(completions)
    scores = score_completions([ok, fn], ["p"] * 4, ["a", "b", "boom", "d"], on_error="mask")
    if fn in (_wrong_length, _not_a_list):  # no row's value can be trusted
        assert scores.num_errors == 4 and not scores.valid.any()
    else:
        assert scores.num_errors == 1
        assert scores.valid.tolist() == [i != row for i in range(4)]
        assert scores.rewards[row] == 0.0
        assert all(scores.rewards[i] == 1.5 for i in range(4) if i != row)
    assert len(scores.errors) == 1 and fn.__name__ in scores.errors[0]
    assert scores.metrics()["reward_errors"] == scores.num_errors


def test_spec_appears_in_errors(reward_module):
    term = rewards.parse_reward_spec("my_rewards:Judges.matches")
    with pytest.raises(RewardError, match=r"'my_rewards:Judges.matches'.*row 0"):
        score_completions([term], ["p"], ["c"])  # no 'answer' column: TypeError on every row


def test_sorting_oracle_is_a_reward_function():
    from rljax.tasks import sorting

    assert isinstance(rewards.sorting_reward, rewards.RewardFn)
    prompts = ["sort: dbca ->", "sort: dbca ->", "Tom has 3 pens. How many?"]
    out = rewards.sorting_reward(prompts, [" abcd", " abdc", " 3"])
    assert out == [1.0, sorting.score(prompts[1], " abdc"), None]
    scores = rewards.parse_reward_spec("rljax.rewards:sorting_reward").fn(prompts[:1], [" dcba"])
    assert scores == [0.0]
    mixed = score_completions(
        ["rljax.rewards:sorting_reward", "rljax.tasks.arithmetic:accuracy_reward"],
        prompts,
        [" abcd", " abdc", " 3\n#### 3"],
        {"answer": ["0", "0", "3"]},
    )
    np.testing.assert_allclose(mixed.rewards, [1.0, 5 / 6, 1.0], rtol=1e-6)


def test_keyword_call_like_trl():
    """TRL calls reward functions by keyword: ``def f(completions, **kwargs)`` must work."""

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(c)) for c in completions]

    pair = (RewardTerm(reward_len, 3.0), 0.5)  # a (term, weight) pair overrides the weight
    scores = score_completions([pair], ["a prompt"] * 2, ["x" * 20, "x" * 18])
    np.testing.assert_allclose(scores.rewards, [0.0, -1.0])
