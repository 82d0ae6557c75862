"""rljax.models.engine (continuous batching): greedy output equal to the static sampler for every
prompt, sampled completions independent of the slot count, frequencies against the softmax on a
small vocabulary, no retrace while slots refill, and input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_gpt2, tiny_llama

from rljax.models.engine import Engine, prompt_bucket
from rljax.models.generate import SamplingConfig, left_pad, make_generate_fn
from rljax.models.transformer import Transformer

# more prompts than slots, of different lengths (two prefill buckets: 16 and 32)
PROMPTS = [[5, 17, 3, 40, 22], [9, 31, 12], [50], list(range(3, 23)), [8, 8, 9, 10], [33] * 17]
PROMPTS.append([11, 12, 13, 14, 15, 16, 17])


@functools.cache
def tiny_model(family, **overrides):
    spread = {"initializer_range": 0.1, **overrides}  # logits spread: no near-ties in greedy
    if family == "llama":
        config = tiny_llama(**spread, intermediate_size=None, tie_word_embeddings=False)
    else:
        config = tiny_gpt2(**spread, max_position_embeddings=64)
    return Transformer(config, rngs=nnx.Rngs(0))


def as_numpy(out):
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_the_static_sampler_for_every_prompt(family):
    """Seven prompts of 1-20 tokens through 3 slots, some rows stopped by an EOS and some by
    per-prompt limits: every field of the output equals one static ``generate`` call over the
    left-padded batch (log-probs to float tolerance)."""
    graphdef, params = nnx.split(tiny_model(family))
    free_config = SamplingConfig(max_new_tokens=10, temperature=0.0)
    tokens, mask = left_pad(PROMPTS, pad_id=1)  # the engine pads with pad_token_id
    free = as_numpy(make_generate_fn(graphdef, free_config)(params, tokens, mask, None))
    eos = (int(free.completions[0, 3]), int(free.completions[2, 6]))
    config = SamplingConfig(max_new_tokens=10, temperature=0.0, eos_token_id=eos, pad_token_id=1)
    limits = np.array([10, 4, 10, 1, 7, 10, 2])
    static = make_generate_fn(graphdef, config)(params, tokens, mask, None, max_new_tokens=limits)
    static = as_numpy(static)
    engine = Engine(graphdef, config, slots=3, steps_per_call=4)
    out = engine.generate(params, PROMPTS, jax.random.key(0), max_new_tokens=limits)

    for field in ("tokens", "mask", "completion_mask", "lengths", "finished"):
        np.testing.assert_array_equal(getattr(out, field), getattr(static, field), err_msg=field)
    np.testing.assert_allclose(out.policy_logprobs, static.policy_logprobs, atol=2e-5)
    np.testing.assert_array_equal(out.logprobs, 0.0)
    assert out.finished.any() and not out.finished.all()  # EOS ended some rows, not all
    assert (out.lengths < limits).any() and (out.lengths == limits).any()
    assert engine.stats.requests == 7 and engine.stats.prefills == 7
    assert engine.stats.tokens == out.lengths.sum()

    # an array of prompts with a mask (right-padded here) gives the same rows
    right = np.zeros_like(tokens)
    for row, prompt in enumerate(PROMPTS):
        right[row, : len(prompt)] = prompt
    again = engine.generate(
        params, right, jax.random.key(1), prompt_mask=right > 0, max_new_tokens=limits
    )
    np.testing.assert_array_equal(again.completions, out.completions)


def test_sliding_window_rows_at_different_positions():
    """A sliding-window model (window 4: the per-row query slots in the window mask) with the
    prompts padded to the engine's bucket: the static sampler's tokens."""
    model = Transformer(tiny_llama(initializer_range=0.1, sliding_window=4), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    prompts = [p for p in PROMPTS if len(p) <= 16]
    config = SamplingConfig(max_new_tokens=9, temperature=0.0)
    tokens, mask = left_pad(prompts, length=16)  # the engine's bucket
    static = as_numpy(make_generate_fn(graphdef, config)(params, tokens, mask, None))
    out = Engine(graphdef, config, slots=2).generate(params, prompts, jax.random.key(0))
    np.testing.assert_array_equal(out.completions, static.completions)
    np.testing.assert_allclose(out.policy_logprobs, static.policy_logprobs, atol=2e-5)


def test_sampled_completions_do_not_depend_on_the_slots():
    """Request ``r`` samples with ``fold_in(key, r)``: 1, 2 or 5 slots, checks every step or
    every 64, groups or repeated prompts, the same completions and log-probs."""
    graphdef, params = nnx.split(tiny_model("llama"))
    config = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20, eos_token_id=(4, 9))
    prompts = [p for p in PROMPTS if len(p) <= 16]  # one prefill bucket: fewer compiles
    key = jax.random.key(7)
    engine = Engine(graphdef, config, slots=1)
    base = engine.generate(params, prompts, key, group_size=2)
    assert base.tokens.shape[0] == 10 and len(set(map(tuple, base.completions))) > 7
    assert (base.lengths < 8).any() and (base.logprobs[base.completion_mask] < 0).all()
    others = [
        Engine(graphdef, config, slots=2, steps_per_call=1).generate(
            params, prompts, key, group_size=2
        ),
        Engine(graphdef, config, slots=5, max_prompt_len=16).generate(
            params, [p for p in prompts for _ in range(2)], key
        ),
    ]
    for other in others:
        np.testing.assert_array_equal(other.tokens, base.tokens)
        np.testing.assert_array_equal(other.completion_mask, base.completion_mask)
        np.testing.assert_allclose(other.logprobs, base.logprobs, atol=1e-5)
        np.testing.assert_allclose(other.policy_logprobs, base.policy_logprobs, atol=1e-5)
    different = engine.generate(params, prompts, jax.random.key(8))
    assert (different.completions != base.completions[::2]).any()
    raw = engine.generate(params, prompts, jax.random.key_data(key), group_size=2)
    np.testing.assert_array_equal(raw.tokens, base.tokens)  # a raw uint32 key is the same key


def test_sampled_frequencies_follow_the_softmax_on_a_small_vocabulary():
    """Vocabulary 6, temperature 0.7, 3000 samples of one prompt (32 slots, the prompt
    prefilled once): the first token (sampled at insertion) and the second (sampled in the
    decode step) follow the tempered softmax of a full forward pass; the log-probs are those
    of the full pass."""
    model = tiny_model("llama", vocab_size=6, initializer_range=0.3)
    graphdef, params = nnx.split(model)
    temperature, rows, prompt = 0.7, 3000, [1, 4, 2]
    config = SamplingConfig(max_new_tokens=2, temperature=temperature)
    engine = Engine(graphdef, config, slots=32)
    out = engine.generate(params, [prompt], jax.random.key(3), group_size=rows)
    assert engine.stats.prefills == 1 and engine.stats.inserts == rows
    first, second = out.completions[:, 0], out.completions[:, 1]
    full = jax.jit(lambda t: jax.nn.log_softmax(model(t).astype(jnp.float32), axis=-1))

    def chi_square_ok(samples, logits):
        probs = np.asarray(jax.nn.softmax(logits / temperature))
        counts = np.bincount(samples, minlength=len(probs))
        expected = probs * len(samples)
        stat = np.sum((counts - expected) ** 2 / expected)
        df = len(probs) - 1
        assert stat < df + 6 * np.sqrt(2 * df) + 10, (stat, counts, expected)

    logps = np.asarray(full(np.asarray([prompt])))[0, -1]
    chi_square_ok(first, logps)
    np.testing.assert_allclose(out.policy_logprobs[:, 0], logps[first], atol=1e-5)
    common = np.bincount(first).argmax()
    logps2 = np.asarray(full(np.asarray([[*prompt, common]])))[0, -1]
    chi_square_ok(second[first == common], logps2)
    np.testing.assert_allclose(
        out.policy_logprobs[first == common, 1], logps2[second[first == common]], atol=1e-5
    )
    sampling = jax.nn.log_softmax(logps2 / temperature)
    np.testing.assert_allclose(
        out.logprobs[first == common, 1], sampling[second[first == common]], atol=1e-5
    )


def test_refilling_slots_compiles_nothing():
    """One trace of the decode step per engine; prefill and insert once per (prompt bucket,
    power-of-two count) class, however many prompts pass through the slots; and an RL-shaped
    call (every request in a slot, new parameters, key and temperature each time) compiles
    nothing after the first."""
    graphdef, params = nnx.split(tiny_model("llama"))
    config = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_token_id=3)
    engine = Engine(graphdef, config, slots=2, max_prompt_len=32)
    engine.generate(params, PROMPTS, jax.random.key(0))
    assert engine.stats.inserts == 7 and engine.stats.decode_calls > 3
    engine.generate(params, PROMPTS[::-1] * 2, jax.random.key(1), max_new_tokens=3, temperature=0.5)
    engine.generate(jax.tree.map(lambda x: x * 1.01, params), [[3, 4]], jax.random.key(2))
    # buckets {16, 32} x prompt counts {1, 2} (x request counts {1, 2} for insert)
    assert engine.traces["decode"] == 1
    assert 2 <= engine.traces["prefill"] <= 4 and 2 <= engine.traces["insert"] <= 8
    assert [prompt_bucket(n, 32) for n in (1, 16, 17, 32)] == [16, 16, 32, 32]
    assert prompt_bucket(40, 48) == 48

    tokens, mask = left_pad([p for p in PROMPTS if len(p) <= 16][:3], length=16)
    rl = Engine(graphdef, config, slots=12, max_prompt_len=16)
    for i in range(3):
        rl.generate(
            jax.tree.map(lambda x, i=i: x * (1 + 0.01 * i), params), tokens, jax.random.key(i),
            prompt_mask=mask, group_size=4, temperature=1.0 - 0.2 * i,
        )  # fmt: skip
        assert rl.traces == {"prefill": 1, "insert": 1, "decode": 1}
        assert (rl.stats.prefills, rl.stats.inserts) == (3, 12)  # each prompt prefilled once


def test_bad_inputs_are_errors():
    graphdef, params = nnx.split(tiny_model("llama"))
    greedy = SamplingConfig(max_new_tokens=4, temperature=0.0)
    for kwargs, message in [
        (dict(slots=0), "slots must be an int >= 1"),
        (dict(slots=2.0), "slots must be an int >= 1"),
        (dict(slots=2, steps_per_call=0), "steps_per_call must be an int >= 1"),
        (dict(slots=2, max_prompt_len=0), "max_prompt_len must be None or an int >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            Engine(graphdef, greedy, **kwargs)
    with pytest.raises(TypeError, match="SamplingConfig"):
        Engine(graphdef, {"max_new_tokens": 4}, slots=2)
    engine = Engine(graphdef, greedy, slots=2, max_prompt_len=8)
    key = jax.random.key(0)
    for call, message in [
        (lambda: engine.generate(params, [], key), "no prompts"),
        (lambda: engine.generate(params, [[3], []], key), r"prompts \[1\] have no tokens"),
        (lambda: engine.generate(params, [list(range(9))], key), "more than max_prompt_len=8"),
        (lambda: engine.generate(params, [[3]], key, group_size=0), "group_size must be"),
        (lambda: engine.generate(params, [[3]], key, max_new_tokens=5), r"in \[1, 4\]"),
        (lambda: engine.generate(params, [[3]], key, max_new_tokens=[0]), r"in \[1, 4\]"),
        (lambda: engine.generate(params, [[3]], key, temperature=1.0), "greedy decoding"),
        (lambda: engine.generate(params, [[3]], key, top_p=0.9), "nucleus"),
        (
            lambda: engine.generate(params, np.ones((2, 3)), key, prompt_mask=np.ones((2, 4))),
            r"must both be \[B, P\]",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
    outside = SamplingConfig(max_new_tokens=4, temperature=0.0, eos_token_id=1000)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Engine(graphdef, outside, slots=1).generate(params, [[3]], key)
