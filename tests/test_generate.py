"""rljax.models.generate: cached sampling against full forward passes, numpy references of the
filtered distribution, Hugging Face's greedy `generate`, and trace counting."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TINY, np_log_softmax, tiny_gpt2, tiny_llama

import rljax.models.generate as gen
from rljax.models.generate import (
    SamplingConfig,
    filter_logits,
    left_pad,
    make_generate_fn,
    to_left_padded,
)
from rljax.models.transformer import Transformer

VOCAB = TINY["vocab_size"]
PROMPTS = [[5, 17, 3, 40, 22], [9, 31, 12], [50]]  # different lengths, left-padded together


@functools.cache
def tiny_model(family):
    spread = dict(initializer_range=0.1)  # logits spread enough that greedy has no near-ties
    if family == "llama":  # MLP width 4 x 32
        config = tiny_llama(**spread, intermediate_size=None, tie_word_embeddings=False)
    else:
        config = tiny_gpt2(**spread, max_position_embeddings=64)
    return Transformer(config, rngs=nnx.Rngs(0))


@functools.cache
def full_forward(family):
    """Jitted full (cache-free) forward pass ``(tokens, mask) -> float32 logits``."""
    graphdef, params = nnx.split(tiny_model(family))
    fn = jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, m).astype(jnp.float32))
    return functools.partial(fn, params)


@functools.cache
def greedy_fn(family, max_new_tokens=8, eos=None):
    graphdef, _ = nnx.split(tiny_model(family))
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos)
    return make_generate_fn(graphdef, config)


def run(fn, family, tokens, mask, seed=0, **kwargs):
    params = nnx.split(tiny_model(family))[1]
    out = fn(params, tokens, mask, jax.random.key(seed), **kwargs)
    return jax.tree.map(np.asarray, out)


def np_filtered(logits, temperature, top_k, top_p):
    """Float64 numpy reference: temperature, then top-k, then top-p (smallest most-likely set
    with mass >= top_p, the top token always kept). Returns filtered logits (-inf = removed)."""
    z = np.asarray(logits, np.float64) / temperature
    out = np.full_like(z, -np.inf)
    for idx in np.ndindex(z.shape[:-1]):
        row = z[idx]
        order = np.argsort(-row, kind="stable")
        keep = order[: top_k if top_k else len(row)]
        if top_p < 1:
            probs = np.exp(row[keep] - row[keep].max())
            probs /= probs.sum()
            mass_before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
            keep = keep[mass_before < top_p]
        out[idx][keep] = row[keep]
    return out


# ---------------------------------------------------------------------------- config, helpers


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("eos_token_id", -3),
        ("eos_token_id", ()),
        ("eos_token_id", "2"),
        ("pad_token_id", None),
        ("cache_dtype", "int32"),
        ("cache_dtype", "no_such_dtype"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
        SamplingConfig(**{field: value})


def test_config_normalises_eos_and_is_hashable():
    assert SamplingConfig(eos_token_id=2).eos_ids == (2,)
    assert SamplingConfig(eos_token_id=[2, 7]).eos_token_id == (2, 7)
    assert SamplingConfig().eos_ids == ()
    hash(SamplingConfig(eos_token_id=[2, 7], top_p=0.9))


def test_vocabulary_and_override_checks():
    graphdef, params = nnx.split(tiny_model("llama"))
    tokens, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match="eos_token_id"):
        gen.generate((graphdef, params), tokens, mask, jax.random.key(0),
                     SamplingConfig(eos_token_id=VOCAB))  # fmt: skip
    with pytest.raises(ValueError, match="top_p override"):
        make_generate_fn(graphdef, SamplingConfig())(
            params, tokens, mask, jax.random.key(0), top_p=0.5
        )
    with pytest.raises(ValueError, match="temperature override"):
        make_generate_fn(graphdef, SamplingConfig(temperature=0))(
            params, tokens, mask, jax.random.key(0), temperature=0.5
        )


def test_left_pad_and_to_left_padded():
    tokens, mask = left_pad([[1, 2, 3], [4], []], pad_id=9)
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [9, 9, 4], [9, 9, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 0, 0]])
    assert tokens.dtype == np.int32 and mask.dtype == bool
    assert left_pad([[1]], length=3)[0].tolist() == [[0, 0, 1]]
    with pytest.raises(ValueError, match="length=2"):
        left_pad([[1, 2, 3]], length=2)

    right = np.array([[1, 2, 3], [4, 0, 0], [5, 6, 0]])
    right_mask = right > 0
    left, left_mask = jax.jit(functools.partial(to_left_padded, pad_id=7))(right, right_mask)
    np.testing.assert_array_equal(left, [[1, 2, 3], [7, 7, 4], [7, 5, 6]])
    np.testing.assert_array_equal(left_mask, [[1, 1, 1], [0, 0, 1], [0, 1, 1]])


@pytest.mark.parametrize("top_k, top_p", [(0, 0.7), (5, 1.0), (8, 0.6), (1, 0.3), (100, 0.95)])
def test_filter_logits_matches_numpy_reference(top_k, top_p):
    logits = jax.random.normal(jax.random.key(top_k), (6, 40)) * 2.0
    fn = jax.jit(filter_logits, static_argnames="top_k")  # top_p traced
    got = fn(logits, top_k=top_k, top_p=top_p if top_p < 1 else None)
    want = np_filtered(np.asarray(logits), 1.0, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    kept = np.isfinite(want)
    np.testing.assert_allclose(np.asarray(got)[kept], np.asarray(logits)[kept])
    assert np.all(kept.sum(-1) >= 1)
    # top_p >= 1 keeps everything, even through the traced nucleus path
    assert np.all(np.isfinite(fn(logits, top_p=jnp.float32(1.0))))


# ---------------------------------------------------------------------------- greedy decoding


def reference_greedy(family, tokens, mask, steps):
    """Greedy decoding by a full forward pass over the whole sequence at every step."""
    forward = full_forward(family)
    b, p = tokens.shape
    seq = np.concatenate([tokens, np.zeros((b, steps), np.int32)], axis=1)
    seq_mask = np.concatenate([mask, np.zeros((b, steps), bool)], axis=1)
    policy_logps = np.zeros((b, steps))
    for j in range(steps):
        logits = np.asarray(forward(seq, seq_mask))[:, p - 1 + j]
        seq[:, p + j] = logits.argmax(-1)
        seq_mask[:, p + j] = True
        policy_logps[:, j] = np_log_softmax(logits.astype(np.float64))[np.arange(b), seq[:, p + j]]
    return seq[:, p:], policy_logps


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_greedy_equals_full_forward_and_single_rows(family):
    tokens, mask = left_pad(PROMPTS)
    out = run(greedy_fn(family), family, tokens, mask)
    want, want_logps = reference_greedy(family, tokens, mask, 8)
    np.testing.assert_array_equal(out.completions, want)
    np.testing.assert_array_equal(out.tokens[:, :5], tokens)
    np.testing.assert_array_equal(out.mask, np.concatenate([mask, np.ones((3, 8), bool)], 1))
    assert out.completion_mask.all() and (out.lengths == 8).all() and not out.finished.any()
    np.testing.assert_allclose(out.policy_logprobs, want_logps, atol=2e-5)
    np.testing.assert_array_equal(out.logprobs, 0.0)  # greedy: a point mass
    assert len(set(out.completions.ravel().tolist())) > 3  # not a degenerate model

    # every row alone, unpadded, gives the same completion as inside the padded batch
    rows = [1] if family == "llama" else [2]
    for row in rows:
        alone = np.asarray([PROMPTS[row]], np.int32)
        single = run(greedy_fn(family), family, alone, np.ones_like(alone, bool))
        np.testing.assert_array_equal(single.completions[0], out.completions[row])

    if family == "llama":  # right padding works too (slots in the middle are masked)
        right = np.zeros_like(tokens)
        for row, prompt in enumerate(PROMPTS):
            right[row, : len(prompt)] = prompt
        other = run(greedy_fn(family), family, right, right > 0)
        np.testing.assert_array_equal(other.completions, out.completions)
        left, left_mask = to_left_padded(right, right > 0)
        np.testing.assert_array_equal(left, tokens)
        np.testing.assert_array_equal(left_mask, mask)


def test_eos_stops_a_row_and_masks_the_rest():
    tokens, mask = left_pad(PROMPTS)
    free = run(greedy_fn("llama"), "llama", tokens, mask).completions
    eos = (int(free[0, 2]), int(free[1, 5]))
    out = run(greedy_fn("llama", eos=eos), "llama", tokens, mask)
    for row in range(3):
        hits = [j for j, t in enumerate(free[row]) if t in eos]
        length = hits[0] + 1 if hits else 8
        assert out.lengths[row] == length and out.finished[row] == bool(hits)
        np.testing.assert_array_equal(out.completions[row, :length], free[row, :length])
        np.testing.assert_array_equal(out.completions[row, length:], 0)  # pad_token_id
        np.testing.assert_array_equal(out.completion_mask[row], np.arange(8) < length)
        assert np.all(out.policy_logprobs[row, length:] == 0)
        assert np.all(out.policy_logprobs[row, :length] < 0)
    assert out.finished[0] and out.lengths[0] <= 3


def test_per_prompt_limits_stop_rows_like_an_eos_without_recompiling():
    """``max_new_tokens=[L_i]`` (traced) stops row ``i`` after ``L_i`` tokens: the first ``L_i``
    tokens of the unlimited run, masked after, ``finished`` False; per prompt under groups."""
    tokens, mask = left_pad(PROMPTS)
    fn = greedy_fn("llama")
    free = run(fn, "llama", tokens, mask)
    for limits, group in (([2, 8, 5], 1), ([1, 3, 8], 2)):
        out = run(fn, "llama", tokens, mask, max_new_tokens=np.array(limits), group_size=group)
        want = np.repeat(limits, group)
        np.testing.assert_array_equal(out.lengths, want)
        np.testing.assert_array_equal(out.completion_mask, np.arange(8) < want[:, None])
        np.testing.assert_array_equal(
            np.where(out.completion_mask, out.completions, -1),
            np.where(out.completion_mask, np.repeat(free.completions, group, 0), -1),
        )
        assert not out.finished.any() and (out.policy_logprobs[~out.completion_mask] == 0).all()
    compiled = fn.jitted._cache_size()
    run(fn, "llama", tokens, mask, max_new_tokens=np.array([8, 1, 1]))
    assert fn.jitted._cache_size() == compiled  # other limits: no retrace
    for bad in ([0, 1, 1], [1, 9, 1], [1, 2]):
        with pytest.raises(ValueError, match="max_new_tokens"):
            run(fn, "llama", tokens, mask, max_new_tokens=np.array(bad))


def test_top_k_one_equals_greedy_through_pure_generate():
    tokens, mask = left_pad(PROMPTS)
    graphdef, params = nnx.split(tiny_model("gpt2"))
    config = SamplingConfig(max_new_tokens=8, temperature=1.3, top_k=1)
    # the pure function under the caller's own jit, model passed as (graphdef, params)
    fn = jax.jit(lambda p, t, m, k: gen.generate((graphdef, p), t, m, k, config))
    sampled = jax.tree.map(np.asarray, fn(params, tokens, mask, jax.random.key(3)))
    greedy = run(greedy_fn("gpt2"), "gpt2", tokens, mask)
    np.testing.assert_array_equal(sampled.tokens, greedy.tokens)
    np.testing.assert_allclose(sampled.logprobs, 0.0, atol=1e-6)  # one allowed token
    np.testing.assert_allclose(sampled.policy_logprobs, greedy.policy_logprobs, atol=1e-6)


# ---------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_group_sampling_shares_the_prefill_and_equals_repeated_prompts(temperature):
    """``group_size=G`` prefills each prompt once and copies its cache to G rows: the same
    tokens and log-probs as the prompts repeated G times (same key), and one compile per G."""
    family, group = "llama", 4
    graphdef, _ = nnx.split(tiny_model(family))
    config = SamplingConfig(max_new_tokens=6, temperature=temperature, eos_token_id=7)
    fn = make_generate_fn(graphdef, config)
    tokens, mask = left_pad(PROMPTS)
    grouped = run(fn, family, tokens, mask, seed=3, group_size=group)
    repeated = run(fn, family, np.repeat(tokens, group, 0), np.repeat(mask, group, 0), seed=3)
    assert grouped.tokens.shape == (len(PROMPTS) * group, tokens.shape[1] + 6)
    np.testing.assert_array_equal(grouped.tokens, repeated.tokens)
    np.testing.assert_array_equal(grouped.mask, repeated.mask)
    np.testing.assert_allclose(grouped.policy_logprobs, repeated.policy_logprobs, atol=1e-6)
    np.testing.assert_allclose(grouped.logprobs, repeated.logprobs, atol=1e-6)
    if temperature:  # a group's samples differ from one another
        assert len({tuple(r) for r in grouped.completions[:group]}) > 1
    with pytest.raises(ValueError, match="group_size must be an int >= 1, got 0"):
        run(fn, family, tokens, mask, group_size=0)


def test_bfloat16_kv_cache_decodes_what_the_float32_cache_does(monkeypatch):
    """``cache_dtype="bfloat16"`` stores keys and values in bfloat16 (the cache the model is
    given says so) and changes the log-probs by bfloat16 rounding only."""
    family = "llama"
    model = tiny_model(family)
    graphdef, _ = nnx.split(model)
    dtypes = []
    original = Transformer.init_cache
    monkeypatch.setattr(
        Transformer,
        "init_cache",
        lambda self, *a, **kw: dtypes.append(kw.get("dtype")) or original(self, *a, **kw),
    )
    tokens, mask = left_pad(PROMPTS)
    outs = {}
    for dtype in (None, "bfloat16"):
        config = SamplingConfig(max_new_tokens=6, temperature=0.0, cache_dtype=dtype)
        outs[dtype] = run(make_generate_fn(graphdef, config), family, tokens, mask)
    assert dtypes == [None, "bfloat16"]
    np.testing.assert_array_equal(outs["bfloat16"].completions[:, 0], outs[None].completions[:, 0])
    np.testing.assert_allclose(
        outs["bfloat16"].policy_logprobs[:, 0], outs[None].policy_logprobs[:, 0], atol=0.05
    )


def check_samples(family, out, temperature, top_k, top_p, prompt_len):
    """Every sampled token is allowed by the numpy-filtered distribution of a full forward
    pass, and the returned log-probs are its log-softmax (and the raw policy's)."""
    logits = np.asarray(full_forward(family)(out.tokens, out.mask), np.float64)
    n = out.completion_mask.shape[1]
    logits = logits[:, prompt_len - 1 : prompt_len - 1 + n]
    filtered = np_filtered(logits, temperature, top_k, top_p)
    rows, steps = np.nonzero(out.completion_mask)
    picked = out.completions[rows, steps]
    assert np.all(np.isfinite(filtered[rows, steps, picked])), "token outside the allowed set"
    want = np_log_softmax(filtered)[rows, steps, picked]
    np.testing.assert_allclose(out.logprobs[rows, steps], want, atol=1e-4)
    want_policy = np_log_softmax(logits)[rows, steps, picked]
    np.testing.assert_allclose(out.policy_logprobs[rows, steps], want_policy, atol=1e-4)
    return np.exp(np_log_softmax(filtered[0, 0]))  # every row has the same first distribution


def chi_square_ok(samples, probs):
    counts = np.bincount(samples, minlength=len(probs))
    assert np.all(counts[probs == 0] == 0)
    support = probs > 0
    expected = probs[support] * len(samples)
    stat = np.sum((counts[support] - expected) ** 2 / expected)
    df = support.sum() - 1
    assert stat < df + 6 * np.sqrt(2 * df) + 10, (stat, df)  # loose: ~4 sigma
    return df


def test_sampling_follows_filtered_distribution_without_recompiling(monkeypatch):
    traces = []
    original = gen._generate
    monkeypatch.setattr(gen, "_generate", lambda *a: traces.append(1) or original(*a))
    family, rows, steps = "llama", 1000, 4
    tokens, mask = left_pad([PROMPTS[1]] * rows, length=4)
    graphdef, params = nnx.split(tiny_model(family))

    # (top_k, config top_p) compiled; (temperature, top_p) swept per call, traced
    sweeps = {
        (0, 0.9): [(0.7, 0.9), (1.5, 0.5), (1.0, 1.0)],  # nucleus alone, then no filter
        (6, 0.7): [(0.8, 0.7), (1.2, 1.0)],  # top-k then top-p, then top-k alone
    }
    for (top_k, config_top_p), values in sweeps.items():
        config = SamplingConfig(max_new_tokens=steps, top_k=top_k, top_p=config_top_p)
        fn = make_generate_fn(graphdef, config)
        for seed, (temperature, top_p) in enumerate(values):
            out = run(fn, family, tokens, mask, seed, temperature=temperature, top_p=top_p)
            probs = check_samples(family, out, temperature, top_k, top_p, 4)
            support = chi_square_ok(out.completions[:, 0], probs) + 1
            if top_p < 1 or top_k:
                assert 2 < support <= (top_k or VOCAB - 1)  # the filters removed tokens
        assert fn.jitted._cache_size() == 1
    assert len(traces) == 2  # one per compiled function, none per sweep value
    # same shapes, new parameter values: still no retrace
    params2 = jax.tree.map(lambda x: x * 1.01, params)
    fn(params2, tokens, mask, jax.random.key(9), temperature=0.9)
    assert len(traces) == 2


# ---------------------------------------------------------------------------- Hugging Face


def hf_tiny_model(family, folder):
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(folder)
    model.generation_config.eos_token_id = None  # stop only where the test says
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate(family, tmp_path):
    torch = pytest.importorskip("torch")
    hf_model = hf_tiny_model(family, tmp_path)
    from rljax.models.hf import load_model

    model = load_model(tmp_path)
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    steps = 8

    def hf_greedy(eos):
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=torch.from_numpy(tokens.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=eos,
            )  # fmt: skip
        completions = out[:, tokens.shape[1] :].numpy()
        return np.pad(completions, ((0, 0), (0, steps - completions.shape[1])))  # early stop

    graphdef, params = nnx.split(model)
    free = hf_greedy(None)
    assert len(set(free.ravel().tolist())) > 3  # not a degenerate model
    eos = int(free[0, 4])  # a token the model emits: exercises stopping and padding
    want = hf_greedy(eos)
    fn = make_generate_fn(graphdef, SamplingConfig(steps, temperature=0.0, eos_token_id=eos))
    out = jax.tree.map(np.asarray, fn(params, tokens, mask, jax.random.key(0)))
    np.testing.assert_array_equal(out.completions, want)
    hit = want == eos
    assert hit[0].any()
    np.testing.assert_array_equal(out.lengths, np.where(hit.any(1), hit.argmax(1) + 1, steps))


def test_stop_strings_end_each_row_at_the_first_stop():
    """Against a linear scan: the mask keeps the tokens up to the first one whose prefix text
    holds a stop string; rows without one, and the padding, are unchanged."""
    rng = np.random.default_rng(0)
    alphabet = "ab\n#"
    decode = lambda ids: "".join(alphabet[i] if i < 4 else "<x>" for i in ids)
    tokens = rng.integers(0, 5, (64, 12))
    lengths = rng.integers(1, 13, 64)
    mask = np.arange(12)[None] < lengths[:, None]
    stops = ["\n#", "bbb", "<x>a"]
    new_mask, stopped = gen.stop_at_strings(tokens, mask, decode, stops)
    for row in range(64):
        cut = next(
            (
                k
                for k in range(1, lengths[row] + 1)
                if any(s in decode(tokens[row, :k]) for s in stops)
            ),
            None,
        )
        want = mask[row].copy() if cut is None else np.arange(12) < cut
        np.testing.assert_array_equal(new_mask[row], want, err_msg=str(row))
        assert stopped[row] == (cut is not None)
    assert 0 < stopped.sum() < 64  # the draw has rows of both kinds
    same, none = gen.stop_at_strings(tokens, mask, decode, [])
    np.testing.assert_array_equal(same, mask)
    assert not none.any()
    with pytest.raises(ValueError, match="non-empty strings"):
        gen.stop_at_strings(tokens, mask, decode, ["ok", ""])
    with pytest.raises(ValueError, match="must both be"):
        gen.stop_at_strings(tokens[:, :3], mask, decode, ["a"])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_inverse_cdf_draw_is_the_searchsorted_of_its_uniform(jit):
    """The sampler's draw (one uniform ``u`` per row, the first index whose cumulative
    probability exceeds ``u * total``; its cumulative sum in blocks) against numpy float64 on
    random rows of 300 entries (3 blocks, the last one partial) with zeros at the start, the
    middle, a block's edge and the end (the filtered tokens); rows where ``u * total`` falls
    within 1e-5 of a cumulative boundary (where float32 summation order could decide) are
    left out and counted."""
    assert gen._CDF_BLOCK == 128
    zeros = [0, 5, 127, 128, 299]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(300, 0.7), size=4000)
    probs[:, zeros] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    key = jax.random.key(1)
    draw = jax.jit(gen._inverse_cdf_sample) if jit else gen._inverse_cdf_sample
    got = np.asarray(draw(key, jnp.asarray(probs, jnp.float32)))
    cdf = np.cumsum(probs.astype(np.float32).astype(np.float64), axis=1)
    u = np.asarray(jax.random.uniform(key, (len(probs),), jnp.float32), np.float64)
    target = u * cdf[:, -1]
    want = np.array([np.searchsorted(c, t, side="right") for c, t in zip(cdf, target, strict=True)])
    clear = np.abs(cdf - target[:, None]).min(axis=1) > 1e-5
    assert clear.sum() > 3900
    np.testing.assert_array_equal(got[clear], want[clear])
    assert not np.isin(got, zeros).any()  # zero probability: never drawn


def test_inverse_cdf_draws_follow_the_probabilities():
    """200,000 draws from one row of unnormalised weights (zeros included): the counts pass
    a chi-square test against the probabilities, and no zero is drawn."""
    p = np.array([0.0, 0.5, 0.0, 0.25, 0.125, 0.0625, 0.0625, 0.0], np.float32)
    n = 200_000
    probs = jnp.broadcast_to(jnp.asarray(p * 3.7), (n, len(p)))
    got = np.asarray(jax.jit(gen._inverse_cdf_sample)(jax.random.key(2), probs))
    counts = np.bincount(got, minlength=len(p))
    support = p > 0
    assert counts[~support].sum() == 0
    expected = p[support] * n
    stat = np.sum((counts[support] - expected) ** 2 / expected)
    assert stat < 4 + 6 * np.sqrt(8) + 10, (stat, counts)


def test_inverse_cdf_never_returns_a_zero_weight_at_any_boundary():
    """A Qwen-sized vocabulary (151,936 entries: 1,187 blocks) with top-k-like sparsity (50
    positive entries, some sharing a block, none in most blocks), and ``u`` placed on every
    cumulative boundary and one float32 step either side of it, plus 0 and the largest float
    under 1: every index returned has positive weight (XLA may sum a cumulative sum in any
    order, so it can move across a zero entry) and lies in range; a row of zeros gives 0."""
    vocab = 151_936
    rng = np.random.default_rng(3)
    where = np.sort(rng.choice(vocab, 50, replace=False))
    where[:3] = [0, 1, vocab - 1]  # the first block's edge and the last, partial, block
    weights = np.zeros(vocab, np.float32)
    weights[where] = rng.exponential(size=50).astype(np.float32)
    total = weights.sum(dtype=np.float64)
    upper = np.cumsum(weights.astype(np.float64))[where] / total
    bounds = upper.astype(np.float32)
    one = np.float32(1.0)
    below_one = np.nextafter(one, np.float32(0))
    edges = [bounds, np.nextafter(bounds, np.float32(0)), np.nextafter(bounds, one)]
    middles = (upper - weights[where] / total / 2).astype(np.float32)  # inside each interval
    u = np.concatenate([*edges, middles, [0.0, below_one]]).astype(np.float32)
    u = np.clip(u, np.float32(0), below_one)
    rows = jnp.broadcast_to(jnp.asarray(weights), (len(u), vocab))
    index = np.asarray(jax.jit(gen._inverse_cdf_index)(jnp.asarray(u), rows))
    assert ((index >= 0) & (index < vocab)).all()
    assert (weights[index] > 0).all(), sorted(set(index[weights[index] == 0].tolist()))
    np.testing.assert_array_equal(index[3 * 50 : 4 * 50], where)  # each interval's middle
    zero = gen._inverse_cdf_index(jnp.asarray([0.5], jnp.float32), jnp.zeros((1, 300)))
    assert int(zero[0]) == 0


def test_sampling_takes_raw_uint32_keys():
    """``jax.random.PRNGKey`` data (``uint32 [2]``) as the key of ``generate`` and of the
    sampler's draw: the same tokens as the typed key it holds."""
    model = tiny_model("llama")
    graphdef, params = nnx.split(model)
    tokens, mask = left_pad(PROMPTS, length=8)
    config = SamplingConfig(max_new_tokens=4, temperature=1.0)
    fn = make_generate_fn(graphdef, config)
    raw = jax.random.PRNGKey(5)
    typed = fn(params, tokens, mask, jax.random.wrap_key_data(raw))
    np.testing.assert_array_equal(fn(params, tokens, mask, raw).tokens, typed.tokens)
    weights = jnp.ones((3, 10))
    np.testing.assert_array_equal(
        gen._inverse_cdf_sample(raw, weights),
        gen._inverse_cdf_sample(jax.random.wrap_key_data(raw), weights),
    )
