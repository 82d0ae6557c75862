"""Input checks: range errors that name the flag, the value and the range; data errors that
name the row of the user's file; clear errors for empty, too-small and missing inputs; counts
of unknown tokens. Configs and tiny files only (no model, no training)."""

import functools
import json
import time

import pytest
from helpers import load_experiment

from rljax import checks, classic, cli, data, experiment, rl, updates
from rljax.models import hf
from rljax.rl import rlhf as rx
from rljax.tasks import sorting


def experiment_config(name):
    def make(**kw):
        return load_experiment(name).Config(**kw)

    make.__name__ = f"{name}.Config"
    return make


def classic_preset(algorithm):
    """A classic-control preset (CartPole-v1's) with settings by flag name, nested ones too."""

    def make(**kw):
        return classic.preset("CartPole-v1", algorithm, **kw)

    make.__name__ = f"classic.preset({algorithm!r})"
    return make


# ----------------------------------------------------------------------------- range checks

P, D = experiment.PreferenceRunConfig, experiment.DPORunConfig
# Run configurations by flag name (a nested update config's fields too), as the scripts see them.
PPO_RUN = functools.partial(rl.config, "ppo")
TRPO_RUN = functools.partial(rl.config, "trpo")
PPO_CLASSIC = classic_preset("ppo")
TRPO_CLASSIC = classic_preset("trpo")

CASES = [
    # preference runs (dpo.py, reward_model.py, iterative_dpo.py)
    (P, "learning_rate", 0.0, "--learning-rate must be > 0, got 0.0"),
    (P, "learning_rate", -1e-3, "--learning-rate must be > 0, got -0.001"),
    (P, "learning_rate", float("nan"), "--learning-rate must be > 0, got nan"),
    (P, "steps", 0, "--steps must be >= 1, got 0"),
    (P, "batch_size", 0, "--batch-size must be >= 1, got 0"),
    (P, "log_every", 0, "--log-every must be >= 1, got 0"),
    (P, "checkpoint_every", 0, "--checkpoint-every must be >= 1, got 0"),
    (P, "eval_every", -1, "--eval-every must be >= 0, got -1"),
    (P, "max_length", 1, "--max-length must be >= 2, got 1"),
    (P, "max_prompt_length", 0, "--max-prompt-length must be >= 1, got 0"),
    (P, "train_pairs", 0, "--train-pairs must be >= 1, got 0"),
    (P, "seed", -1, "--seed must be >= 0, got -1"),
    (P, "overflow", "cut", "--overflow must be one of ['truncate', 'drop'], got 'cut'"),
    (D, "beta", 0.0, "DPOConfig.beta must be > 0, got 0.0 (--beta)"),
    (D, "beta", -0.1, "DPOConfig.beta must be > 0, got -0.1 (--beta)"),
    (D, "rpo_alpha", -1.0, "DPOConfig.rpo_alpha must be >= 0 or none, got -1.0 (--rpo-alpha)"),
    (D, "win_rate_prompts", 0, "--win-rate-prompts must be >= 1, got 0"),
    (D, "loss_weights", "1,x", "--loss-weights '1,x': expected numbers"),
    (updates.DPOConfig, "discopop_tau", 0.0, "DPOConfig.discopop_tau must be > 0"),
    (updates.RewardConfig, "center_rewards_coefficient", -0.1, "must be >= 0 or none, got -0.1"),
    (experiment_config("reward_model"), "center_rewards_coefficient", -1.0, "(--center-rewards"),
    (experiment_config("iterative_dpo"), "rounds", 0, "--rounds must be >= 1, got 0"),
    (experiment_config("iterative_dpo"), "samples_per_prompt", 1, "--samples-per-prompt must be"),
    # RLHF runs (ppo_rlhf.py, trpo_rlhf.py)
    (PPO_RUN, "gamma", 0.0, "--gamma must be in (0, 1], got 0.0"),
    (PPO_RUN, "gamma", 1.5, "--gamma must be in (0, 1], got 1.5"),
    (PPO_RUN, "lam", -0.1, "--lam must be in [0, 1], got -0.1"),
    (PPO_RUN, "lam", 1.1, "--lam must be in [0, 1], got 1.1"),
    (PPO_RUN, "learning_rate", 0.0, "--learning-rate must be > 0, got 0.0"),
    (PPO_RUN, "kl_coef", -0.5, "--kl-coef must be >= 0, got -0.5"),
    (PPO_RUN, "kl_target", 0.0, "--kl-target must be > 0 or none, got 0.0"),
    (PPO_RUN, "kl_horizon", 0.0, "--kl-horizon must be > 0, got 0.0"),
    (PPO_RUN, "temperature", 0.0, "--temperature must be > 0, got 0.0"),
    (PPO_RUN, "max_new_tokens", 0, "--max-new-tokens must be >= 1 or none, got 0"),
    (PPO_RUN, "missing_eos_penalty", -1.0, "--missing-eos-penalty must be >= 0 or none"),
    (PPO_RUN, "chunk_size", 0, "--chunk-size must be >= 1, got 0"),
    (PPO_RUN, "iterations", 0, "--iterations must be >= 1, got 0"),
    (PPO_RUN, "log_every", 0, "--log-every must be >= 1, got 0"),
    (PPO_RUN, "checkpoint_every", 0, "--checkpoint-every must be >= 1, got 0"),
    (PPO_RUN, "eval_every", -1, "--eval-every must be >= 0, got -1"),
    (PPO_RUN, "clip_eps", -0.2, "PPOConfig.clip_eps must be >= 0, got -0.2 (--clip-eps)"),
    (PPO_RUN, "value_clip_eps", -0.2, "PPOConfig.value_clip_eps must be >= 0 or none"),
    (PPO_RUN, "value_coef", -1.0, "PPOConfig.value_coef must be >= 0, got -1.0 (--value-coef)"),
    (PPO_RUN, "entropy_coef", -0.1, "PPOConfig.entropy_coef must be >= 0"),
    (PPO_RUN, "target_kl", 0.0, "PPOConfig.target_kl must be > 0 or none, got 0.0 (--target-kl)"),
    (PPO_RUN, "num_epochs", 0, "PPOConfig.num_epochs must be >= 1, got 0 (--num-epochs)"),
    (TRPO_RUN, "max_kl", 0.0, "TRPOConfig.max_kl must be > 0, got 0.0 (--max-kl)"),
    (TRPO_RUN, "cg_iters", 0, "TRPOConfig.cg_iters must be >= 1, got 0 (--cg-iters)"),
    (TRPO_RUN, "cg_damping", -0.1, "TRPOConfig.cg_damping must be >= 0, got -0.1"),
    (TRPO_RUN, "fvp_subsample", 0, "TRPOConfig.fvp_subsample must be >= 1, got 0"),
    (TRPO_RUN, "n_critic_updates", -1, "TRPOConfig.n_critic_updates must be >= 0, got -1"),
    (TRPO_RUN, "value_learning_rate", 0.0, "--value-learning-rate must be > 0, got 0.0"),
    (updates.TRPOConfig, "backtrack_coeff", 1.0, "TRPOConfig.backtrack_coeff must be in (0, 1)"),
    (updates.TRPOConfig, "cg_tol", -1.0, "TRPOConfig.cg_tol must be >= 0, got -1.0 (--cg-tol)"),
    (updates.PPOConfig, "num_minibatches", 0, "PPOConfig.num_minibatches must be >= 1, got 0"),
    # GRPO (grpo.py)
    (rl.grpo.GRPORunConfig, "seed", -1, "--seed must be >= 0, got -1"),
    (rl.grpo.GRPORunConfig, "learning_rate", 0.0, "--learning-rate: must be > 0, got 0.0"),
    (rl.grpo.GRPORunConfig, "log_every", 0, "--log-every: must be >= 1, got 0"),
    (rl.grpo.GRPORunConfig, "eval_every", -1, "--eval-every: must be >= 0, got -1"),
    (updates.GRPOConfig, "clip_eps", 0.0, "--clip-eps: must be > 0, got 0.0"),
    (updates.GRPOConfig, "beta", -0.1, "--beta: must be >= 0, got -0.1"),
    # classic control (ppo_classic.py, trpo_classic.py)
    (PPO_CLASSIC, "gamma", 0.0, "PPOClassicConfig.gamma must be in (0, 1], got 0.0 (--gamma)"),
    (PPO_CLASSIC, "gamma", 1.01, "PPOClassicConfig.gamma must be in (0, 1], got 1.01 (--gamma)"),
    (PPO_CLASSIC, "lam", -0.5, "PPOClassicConfig.lam must be in [0, 1], got -0.5 (--lam)"),
    (PPO_CLASSIC, "learning_rate", -1.0, "PPOClassicConfig.learning_rate must be > 0, got -1.0"),
    (PPO_CLASSIC, "max_grad_norm", 0.0, "PPOClassicConfig.max_grad_norm must be > 0, got 0.0"),
    (PPO_CLASSIC, "num_steps", 0, "PPOClassicConfig.num_steps must be > 0, got 0 (--num-steps)"),
    (PPO_CLASSIC, "value_coef", -1.0, "PPOConfig.value_coef must be >= 0, got -1.0 (--value-coef)"),
    (PPO_CLASSIC, "target_kl", 0.0, "PPOConfig.target_kl must be > 0 or none, got 0.0"),
    (PPO_CLASSIC, "entropy_coef", -0.1, "PPOConfig.entropy_coef must be >= 0, got -0.1"),
    (PPO_CLASSIC, "num_minibatches", 3, "num_minibatches=3 (--num-minibatches) must divide"),
    (TRPO_CLASSIC, "cg_damping", -1.0, "TRPOConfig.cg_damping must be >= 0, got -1.0"),
    (TRPO_CLASSIC, "max_kl", 0.0, "TRPOConfig.max_kl must be > 0, got 0.0 (--max-kl)"),
    (TRPO_CLASSIC, "value_learning_rate", 0.0, "TRPOClassicConfig.value_learning_rate must be > 0"),
    (TRPO_CLASSIC, "critic_minibatches", 7, "critic_minibatches=7 (--critic-minibatches) must"),
]


@pytest.mark.parametrize(
    ("make", "field", "bad", "message"),
    CASES,
    ids=[f"{getattr(c[0], '__name__', 'config')}-{c[1]}={c[2]}" for c in CASES],
)
def test_range_errors_name_the_flag_value_and_range(make, field, bad, message):
    with pytest.raises(ValueError) as error:
        make(**{field: bad})
    assert message in str(error.value)


def test_good_values_pass_and_a_script_flag_fails_at_parse_time(capsys):
    """The defaults and the edges of each range pass; a bad flag is a usage error."""
    P(eval_every=0, learning_rate=1e-6)
    PPO_RUN(gamma=1.0, lam=0.0, kl_coef=0.0, kl_target=None, value_clip_eps=None)
    classic.preset("CartPole-v1", "ppo", gamma=1.0, lam=0.0, value_clip_eps=None, target_kl=None)
    assert checks.satisfies(1.0, "in (0, 1]") and not checks.satisfies(0.0, "in (0, 1]")
    with pytest.raises(SystemExit):
        cli.parse(D, ["--learning-rate", "-0.001"])
    assert "--learning-rate must be > 0, got -0.001" in capsys.readouterr().err


def test_missing_folders_fail_at_once(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"--reward-model 'gpt2' is not a folder"):
        rx.run(PPO_RUN(reward_model="gpt2", out=str(tmp_path / "run")))
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder '.*nowhere' is missing"):
        hf.load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: the tokenizer files are missing"):
        hf.load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"--model 'gpt2' is not a folder"):
        experiment.resolve_model(D(model="gpt2"))
    assert time.perf_counter() - start < 5  # no Hub look-up


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def tokenizer():
    return sorting.build_tokenizer()


def pair(word="cab"):
    return {
        "prompt": f"sort: {word} ->",
        "chosen": " " + "".join(sorted(word)),
        "rejected": " " + word,
    }


def write_jsonl(path, rows, blank_after=()):
    lines = []
    for i, row in enumerate(rows):
        lines.append(json.dumps(row))
        if i in blank_after:
            lines.append("")  # blank lines hold no row but count as lines
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def config(path, **kw):
    return P(data=path, max_length=24, max_prompt_length=16, out="unused", **kw)


@pytest.mark.parametrize("bad_index", [3, 17])  # lands in the held-out or the training split
def test_carved_split_errors_name_the_line_of_the_file(tmp_path, tokenizer, bad_index):
    rows = [pair() for _ in range(20)]
    rows[bad_index] = {**pair(), "chosen": ""}
    path = write_jsonl(tmp_path / "pairs.jsonl", rows, blank_after={0, 1})
    line = bad_index + 1 + 2  # 1-based, after two blank lines
    with pytest.raises(ValueError, match=rf"pairs.jsonl line {line} \(1-based\): field 'chosen'"):
        experiment.load_preference_arrays(config(path), tokenizer)


def test_json_array_errors_name_the_0_based_row(tmp_path, tokenizer):
    rows = [pair() for _ in range(12)]
    rows[9] = {"prompt": "sort: ab ->", "chosen": " ab"}
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"pairs.json row 9 \(0-based\): field 'rejected'"):
        experiment.load_preference_arrays(config(str(tmp_path / "pairs.json")), tokenizer)


def test_all_invalid_with_skip_prints_the_report_before_the_error(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [{**pair(), "rejected": pair()["chosen"]}] * 10)
    with pytest.raises(ValueError, match=r"train data .*bad.jsonl\): no pairs left of 9 rows"):
        experiment.load_preference_arrays(config(path, skip_invalid=True), tokenizer)
    out = capsys.readouterr().out
    assert "train data" in out and "eval data" in out  # both reports, then the error
    assert "kept 0 of 9 rows, skipped 9: identical_completions: 9 (lines" in out


def test_empty_and_one_row_files(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"--data .*empty.jsonl: the file holds 0 rows"):
        experiment.load_preference_arrays(config(str(tmp_path / "empty.jsonl")), tokenizer)
    one = write_jsonl(tmp_path / "one.jsonl", [pair()])
    with pytest.raises(ValueError, match=r"one.jsonl: the file holds 1 row, too few to split"):
        experiment.load_preference_arrays(config(one), tokenizer)
    with pytest.raises(ValueError, match=r"--eval-data .*empty.jsonl: the file holds 0 rows"):
        experiment.load_preference_arrays(
            config(one, eval_data=str(tmp_path / "empty.jsonl")), tokenizer
        )
    grpo_config = rl.grpo.GRPORunConfig(data=one, reward=("m:f",))
    with pytest.raises(ValueError, match=r"one.jsonl': the file holds 1 row, too few to split"):
        rl.grpo.load_prompts(grpo_config, tokenizer)


def test_unknown_characters_are_counted(tmp_path, tokenizer, capsys):
    rows = [pair() for _ in range(10)]
    rows[2] = {**pair(), "prompt": "sort: cAb ->"}  # 'A' is outside the vocabulary
    rows[5] = {**pair(), "rejected": " <unk>éZ"}  # the literal <unk> is not counted
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    _, _, report = experiment.load_preference_arrays(config(path, seed=1), tokenizer)
    counts = [report[s]["unknown_tokens"] for s in ("train", "eval")]
    assert (
        sum(counts) == 3
        and sum(report[s]["unknown_token_rows"] for s in report if s != "source") == 2
    )
    assert "unknown tokens (outside the vocabulary)" in capsys.readouterr().out
    _, tokenization = data.tokenize_preferences(rows, tokenizer, max_length=24)
    assert (tokenization.unknown_tokens, tokenization.unknown_first_rows) == (3, [2, 5])


def test_grpo_prompt_errors_name_the_row_of_the_file(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i}", "answer": "1"} for i in range(30)]
    rows[21] = {"question": "q21", "answer": "1"}
    path = write_jsonl(tmp_path / "prompts.jsonl", rows, blank_after={4})
    config = rl.grpo.GRPORunConfig(data=path, reward=("m:f",))
    with pytest.raises(ValueError, match=r"prompts.jsonl \(\w[\w ]*\) line 23 \(1-based\): field"):
        rl.grpo.load_prompts(config, tokenizer)


def test_numbering_follows_selection_and_reports_name_file_rows(tmp_path, tokenizer):
    rows = [pair("ba"), pair(), {**pair(), "chosen": " "}, pair("zyxwvu")]  # 15, 17, -, 23 tokens
    path = write_jsonl(tmp_path / "p.jsonl", rows, blank_after={0})
    loaded, numbering = data.load_numbered_rows(path)
    assert numbering.numbers == (1, 3, 4, 5) and numbering.unit == "line"
    valid, validation = data.validate_preferences(loaded, skip_invalid=True, numbering=numbering)
    assert validation.first_rows == {"empty_field": [4]} and "lines 4 (1-based)" in str(validation)
    kept = numbering.take(validation.kept_rows)
    _, tokenization = data.tokenize_preferences(
        valid, tokenizer, max_length=18, overflow="drop", numbering=kept
    )
    assert tokenization.dropped_rows == [5] and "lines 5 (1-based)" in str(tokenization)
    _, plain = data.validate_preferences(loaded, skip_invalid=True)  # a list: 0-based indices
    assert plain.first_rows == {"empty_field": [2]}
