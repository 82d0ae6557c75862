"""The built-in sorting task: oracle against brute force, tokenizer, generated data, warm-up."""

import collections
import dataclasses
import itertools
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from rljax.models import hf
from rljax.models.transformer import Transformer
from rljax.tasks import sorting

# ---------------------------------------------------------------------------- references


def reference_score(prompt_letters: str, completion: str) -> float:
    """Brute force: a permutation check by multiset, then an O(k^2) numpy count of ordered pairs."""
    chars = "".join(completion.split())
    if collections.Counter(chars) != collections.Counter(prompt_letters):
        return 0.0
    k = len(chars)
    if k < 2:
        return 1.0
    codes = np.array([ord(c) for c in chars])
    upper = np.triu(np.ones((k, k), bool), 1)  # pairs i < j
    ordered = np.sum((codes[:, None] < codes[None, :]) & upper)
    return float(ordered) / float(np.sum(upper))


# ---------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("letters", ["a", "ba", "cab", "dbca", "ezqab"])
def test_score_matches_brute_force_on_every_permutation(letters):
    prompt = sorting.make_prompt(letters)
    assert sorting.letters_of(prompt) == letters
    ideal = "".join(sorted(letters))
    assert sorting.ideal_completion(prompt) == " " + ideal
    for perm in itertools.permutations(letters):
        completion = " " + "".join(perm)
        s = sorting.score(prompt, completion)
        assert s == pytest.approx(reference_score(letters, completion), abs=1e-12)
        assert 0.0 <= s <= 1.0
        assert (s == 1.0) == ("".join(perm) == ideal)
        assert sorting.is_valid(prompt, completion)
        # Kendall tau: s = (1 + tau) / 2 with tau from the inversion count.
        inversions = sum(a > b for a, b in itertools.combinations(perm, 2))
        if len(letters) > 1:
            pairs = len(letters) * (len(letters) - 1) / 2
            assert s == pytest.approx(1 - inversions / pairs)


def test_score_is_zero_for_non_permutations():
    prompt = "sort: dbca ->"
    for completion in [
        "",
        " abc",  # a letter missing
        " abcde",  # an extra letter
        " aabcd",  # a repeat
        " abce",  # a wrong letter
        " ABCD",  # case matters
        " ab-cd",
        " abc<eos>d",  # text after EOS is ignored
    ]:
        assert sorting.score(prompt, completion) == 0.0, completion
        assert reference_score("dbca", completion.split("<eos>")[0]) == 0.0
        assert not sorting.is_valid(prompt, completion)
    assert sorting.score(prompt, " a b c d") == 1.0  # whitespace is ignored
    assert sorting.score(prompt, " abcd<eos><pad><pad>") == 1.0
    assert sorting.score(prompt, " abcd<eos>zz") == 1.0


def test_score_on_random_strings_matches_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):
        letters = "".join(rng.choice(list("abcdefg"), size=rng.integers(2, 6), replace=False))
        pool = list(letters) + list("xyz")
        completion = " " + "".join(rng.choice(pool, size=rng.integers(1, 8)))
        prompt = sorting.make_prompt(letters)
        assert sorting.score(prompt, completion) == pytest.approx(
            reference_score(letters, completion), abs=1e-12
        )


def test_score_batch_and_conversational_inputs():
    rows = sorting.preference_pairs(20, seed=3)
    prompts = [r["prompt"] for r in rows]
    completions = [r["chosen"] for r in rows]
    assert sorting.score_batch(prompts, completions, ignored_column=[0] * 20) == [
        sorting.score(p, c) for p, c in zip(prompts, completions, strict=True)
    ]
    chat_prompts = [[{"role": "user", "content": p}] for p in prompts]
    chat_completions = [[{"role": "assistant", "content": c}] for c in completions]
    assert sorting.score_batch(chat_prompts, chat_completions) == sorting.score_batch(
        prompts, completions
    )
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        sorting.score_batch(prompts[:2], completions[:1])
    with pytest.raises(ValueError, match="not a sorting prompt"):
        sorting.score("hello", " abc")


def test_prefer_follows_score_and_breaks_ties_deterministically():
    prompt = "sort: dbca ->"
    perms = [" " + "".join(p) for p in itertools.permutations("dbca")]
    for a, b in itertools.product([*perms, " abc", " xyz"], repeat=2):
        sa, sb = sorting.score(prompt, a), sorting.score(prompt, b)
        if sa != sb:
            assert sorting.prefer(prompt, a, b) == (sa > sb)
        if a != b:
            assert sorting.prefer(prompt, a, b) != sorting.prefer(prompt, b, a)
        else:
            assert sorting.prefer(prompt, a, b)
    assert sorting.prefer(prompt, " abdc", " bacd")  # tie (5/6 each): smaller text wins
    assert sorting.prefer(prompt, " abcd", " dcba")


# ---------------------------------------------------------------------------- tokenizer


def task_strings():
    rows = sorting.preference_pairs(50, seed=1) + sorting.sft_corpus(50, seed=1)
    for row in rows:
        yield from row.values()
    yield sorting.TASK_CHARACTERS


def test_tokenizer_round_trip_and_special_tokens(tmp_path):
    tok = sorting.build_tokenizer(tmp_path / "tok")
    assert tok.pad_token_id == 0 and tok.pad_token == "<pad>"
    assert tok.eos_token == "<eos>" and tok.eos_token_id == 1
    assert tok.bos_token_id == 2 and tok.unk_token_id == 3
    assert len(tok) == 4 + len(sorting.TASK_CHARACTERS)
    loaded = hf.load_tokenizer(tmp_path / "tok")
    assert len(set(tok.encode(sorting.TASK_CHARACTERS, add_special_tokens=False))) == len(
        sorting.TASK_CHARACTERS
    )
    for text in task_strings():
        ids = tok(text)["input_ids"]  # default add_special_tokens: nothing is added
        assert len(ids) == len(text)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.decode([*tok.encode(" ab"), 1, 0, 0]) == " ab<eos><pad><pad>"
    assert tok("Q\n")["input_ids"] == [tok.unk_token_id] * 2
    batch = tok(["sort: ab ->", "sort: abcd ->"], padding=True)
    assert batch["input_ids"][0][-2:] == [0, 0]  # right padding with id 0


def test_chat_template_renders_the_standard_form(tmp_path):
    tok = sorting.build_tokenizer(tmp_path)
    loaded = hf.load_tokenizer(tmp_path)
    messages = [
        {"role": "user", "content": "sort: dbca ->"},
        {"role": "assistant", "content": " abcd"},
    ]
    for t in (tok, loaded):
        assert t.apply_chat_template(messages, tokenize=False) == "sort: dbca -> abcd<eos>"
        prompt_only = t.apply_chat_template(
            messages[:1], tokenize=False, add_generation_prompt=True
        )
        assert prompt_only == "sort: dbca ->"


# ---------------------------------------------------------------------------- data


def test_generated_data_is_a_function_of_the_seed():
    assert sorting.prompts(30, 5) == sorting.prompts(30, 5)
    assert sorting.prompts(30, 5) != sorting.prompts(30, 6)
    assert sorting.sft_corpus(30, 5) == sorting.sft_corpus(30, 5)
    assert sorting.preference_pairs(30, 5) == sorting.preference_pairs(30, 5)
    assert sorting.preference_pairs(30, 5) != sorting.preference_pairs(30, 6)
    lengths = set()
    for prompt in sorting.prompts(400, 0):
        letters = sorting.letters_of(prompt)
        assert prompt == f"sort: {letters} ->"
        assert len(set(letters)) == len(letters) and letters.isalpha() and letters.islower()
        lengths.add(len(letters))
    assert lengths == set(range(sorting.MIN_LETTERS, sorting.MAX_LETTERS + 1))
    assert {len(sorting.letters_of(p)) for p in sorting.prompts(50, 0, max_letters=3)} == {3}


def test_sft_completions_are_random_permutations():
    rows = sorting.sft_corpus(400, seed=0)
    scores = [sorting.score(r["prompt"], r["completion"]) for r in rows]
    assert all(set(r) == {"prompt", "completion"} for r in rows)
    assert all(r["completion"].startswith(" ") for r in rows)
    assert all(sorting.is_valid(r["prompt"], r["completion"]) for r in rows)
    assert 0.4 < np.mean(scores) < 0.6  # 1/2 in expectation
    assert np.mean([s == 1.0 for s in scores]) < 0.15  # rarely sorted


def test_preference_pairs_are_labelled_by_the_oracle():
    rows = sorting.preference_pairs(200, seed=0)
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert r["chosen"] != r["rejected"]
        assert sorting.is_valid(r["prompt"], r["chosen"])
        assert sorting.is_valid(r["prompt"], r["rejected"])
        assert sorting.score(r["prompt"], r["chosen"]) > sorting.score(r["prompt"], r["rejected"])
        assert sorting.prefer(r["prompt"], r["chosen"], r["rejected"])


@pytest.mark.parametrize("kind", ["preference", "sft", "prompt"])
def test_write_dataset_loads_back(tmp_path, kind):
    paths = sorting.write_dataset(tmp_path / kind, 40, 10, seed=2, kind=kind)
    assert paths == {
        "train": os.path.join(tmp_path / kind, "train.jsonl"),
        "test": os.path.join(tmp_path / kind, "test.jsonl"),
    }
    splits = {}
    for split, path in paths.items():
        with open(path) as f:
            splits[split] = [json.loads(line) for line in f]
    assert len(splits["train"]) == 40 and len(splits["test"]) == 10
    keys = {
        "preference": {"prompt", "chosen", "rejected"},
        "sft": {"prompt", "completion"},
        "prompt": {"prompt"},
    }[kind]
    assert all(set(row) == keys for rows in splits.values() for row in rows)
    train_prompts = {row["prompt"] for row in splits["train"]}
    assert not train_prompts & {row["prompt"] for row in splits["test"]}
    if kind == "preference":
        assert splits["train"] == sorting.preference_pairs(40, 2)
    again = sorting.write_dataset(tmp_path / "again", 40, 10, seed=2, kind=kind)
    for split in paths:
        with open(paths[split]) as a, open(again[split]) as b:
            assert a.read() == b.read()
    with pytest.raises(ValueError, match="kind"):
        sorting.write_dataset(tmp_path, 1, 1, kind="dpo")


# ---------------------------------------------------------------------------- base model

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
WARMUP = dict(steps=30, seed=0, batch_size=16, learning_rate=1e-2, log_every=10)


def fixed_batch(tok):
    rows = sorting.sft_corpus(64, seed=123)
    return sorting._tokenize_sft(tok, rows, sorting.max_prompt_tokens() + 8)


def test_private_tokenisation_matches_rljax_data():
    from rljax.data import tokenize_completions

    tok = sorting.build_tokenizer()
    rows = sorting.sft_corpus(32, seed=4)
    length = sorting.max_prompt_tokens() + sorting.max_completion_tokens()
    arrays, _ = tokenize_completions(rows, tok, max_length=length, pad_to=length)
    ours = sorting._tokenize_sft(tok, rows, length)
    for name, array in zip(("tokens", "mask", "loss_mask"), ours, strict=True):
        np.testing.assert_array_equal(np.asarray(arrays[name]), array, err_msg=name)


def completion_loss(model, batch):
    graphdef, params = nnx.split(model, nnx.Param)
    return float(jax.jit(sorting._completion_loss_fn(graphdef))(params, *batch))


def test_short_warmup_lowers_the_loss_and_saves_a_loadable_folder(tmp_path, capsys, monkeypatch):
    trained = []  # the in-memory model of the run, to compare with what was saved

    def keep(**kwargs):
        trained.append(warmup_model(**kwargs))
        return trained[-1]

    warmup_model = sorting.warmup_model
    monkeypatch.setattr(sorting, "warmup_model", keep)
    config = sorting.base_model_config(**TINY)
    folder = sorting.warmup_base_model(tmp_path / "base", config=config, eval_prompts=0, **WARMUP)
    out = capsys.readouterr().out
    assert "warmup step 30/30" in out
    info = json.loads((tmp_path / "base" / "warmup.json").read_text())
    assert info["settings"]["steps"] == 30 and info["config"]["hidden_size"] == 32

    tok = hf.load_tokenizer(folder)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    batch = fixed_batch(tok)
    loaded = hf.load_model(folder)
    assert loaded.config.vocab_size == len(tok)
    fresh = Transformer(config, rngs=nnx.Rngs(0))  # the warm-up's initialisation
    before, after = completion_loss(fresh, batch), completion_loss(loaded, batch)
    assert after < before - 0.3, (before, after)

    model = trained[0][0]
    tokens, mask, _ = batch
    np.testing.assert_allclose(
        np.asarray(loaded(tokens, mask)), np.asarray(model(tokens, mask)), rtol=1e-5, atol=1e-5
    )

    result = sorting.evaluate_policy(
        loaded, tok, sorting.prompts(8, 0), key=jax.random.key(0), batch_size=8
    )
    assert len(result["completions"]) == len(result["scores"]) == 8
    assert set(result["metrics"]) == {"validity", "mean_score", "sorted_rate", "eos_rate"}
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())


def test_default_base_model_is_built_once_per_settings(tmp_path, monkeypatch, capsys):
    kwargs = dict(config=sorting.base_model_config(**TINY), steps=2, eval_prompts=0)
    folder = sorting.default_base_model(tmp_path, **kwargs)
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    assert os.listdir(tmp_path) == [os.path.basename(folder)]  # no temporary left behind

    def fail(*args, **kw):
        raise AssertionError("rebuilt a cached base model")

    monkeypatch.setattr(sorting, "warmup_base_model", fail)
    assert sorting.default_base_model(tmp_path, **kwargs) == folder
    with pytest.raises(AssertionError, match="rebuilt"):
        sorting.default_base_model(tmp_path, **{**kwargs, "steps": 3})


def test_default_settings_model_ships_with_the_package(tmp_path, monkeypatch):
    def fail(*args, **kw):
        raise AssertionError("built the base model although it ships with the package")

    monkeypatch.setattr(sorting, "warmup_base_model", fail)
    folder = sorting.default_base_model(tmp_path)
    assert os.path.dirname(folder) == sorting.SHIPPED_MODELS_DIR
    assert os.listdir(tmp_path) == []
    with open(os.path.join(folder, "warmup.json")) as f:
        info = json.load(f)
    assert info["settings"]["steps"] == 1000 and info["settings"]["seed"] == 0
    assert info["config"]["vocab_size"] == len(sorting.build_tokenizer().get_vocab())
    model = hf.load_model(folder)
    assert model.config.num_params == sorting.base_model_config().num_params


def test_the_default_base_model_is_the_shipped_one_whatever_fields_the_config_gains(
    tmp_path, monkeypatch
):
    """With an empty cache the default settings find the model that ships with the package,
    never a rebuild: TransformerConfig fields added after the key was fixed (Qwen3's q/k
    norms, windows, Gemma's options, experts, ...) stay out of the key at their defaults, and
    a non-default value of one changes the key."""
    monkeypatch.setattr(
        sorting, "_build_once", lambda *a: pytest.fail("the shipped base model was not found")
    )
    folder = sorting.default_base_model(cache_dir=tmp_path)
    assert os.path.dirname(folder) == os.fspath(sorting.SHIPPED_MODELS_DIR)
    config = sorting.base_model_config(len(sorting.build_tokenizer().get_vocab()))
    later = [f.name for f in dataclasses.fields(config) if f.name not in sorting._KEY_FIELDS]
    assert "qk_norm" in later
    key = sorting._config_key(config)
    assert set(key) == set(sorting._KEY_FIELDS)
    assert "qk_norm" in sorting._config_key(dataclasses.replace(config, qk_norm=True))
