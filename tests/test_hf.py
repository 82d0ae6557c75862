"""rljax.models.hf against transformers' PyTorch models: tiny random checkpoints of every
supported family, saved with save_pretrained and loaded by rljax, must give the same logits
(no padding, right padding, left padding); rljax's save_model must load back into transformers
with no missing or unexpected keys; sharded and bfloat16 checkpoints; the reward head; Qwen3's
per-head query/key norms (tied and untied, with and without biases, cached decoding); sliding
windows (Mistral, Qwen2, Qwen3) and Gemma 2 / Gemma 3 on rows longer than the window; errors."""

import copy
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from helpers import HF_TINY_LLAMA, assert_greedy_matches_transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from rljax.models import hf  # noqa: E402

VOCAB, BATCH, TIME, ATOL = 64, 3, 12, 1e-4


def _randomize(model, seed):
    """Every parameter random (norm scales around 1, biases non-zero), so each mapping row
    matters and logits are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


LLAMA_SHAPE = dict(HF_TINY_LLAMA, vocab_size=VOCAB)


def _causal_lm(family, kv_heads, rope, **settings):
    """transformers' ``<family>ForCausalLM`` of :data:`LLAMA_SHAPE` with ``kv_heads`` key/value
    heads and ``rope`` as its ``rope_parameters``."""
    config = getattr(transformers, f"{family}Config")(
        **LLAMA_SHAPE, num_key_value_heads=kv_heads, rope_parameters=rope, **settings
    )
    return getattr(transformers, f"{family}ForCausalLM")(config)


# Qwen3: odd sizes, multi-query, head_dim 24 != hidden 48 / 3 heads (q/k/v/o follow head_dim).
QWEN3_SHAPE = dict(
    LLAMA_SHAPE,  # two layers, 64 positions, eager attention
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=24,
    rope_parameters=dict(rope_type="default", rope_theta=1e6),
)


def _qwen3(**settings):
    """transformers' ``Qwen3ForCausalLM`` of :data:`QWEN3_SHAPE`."""
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3_SHAPE, **settings))


def _scaled_rope(rope_type, **factors):
    """RoPE scaling ``rope_type`` (theta 1e4) from an original context of 16 positions."""
    return dict(
        rope_type=rope_type, rope_theta=10000.0, **factors, original_max_position_embeddings=16
    )


FAMILIES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
    ),
    # GQA, untied embeddings, llama3 RoPE scaling, biases on every projection.
    "llama": lambda: _causal_lm(
        "Llama",
        kv_heads=2,
        rope=_scaled_rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
    ),
    # GQA, tied embeddings, q/k/v biases, YaRN RoPE scaling.
    "qwen2": lambda: _causal_lm(
        "Qwen2", kv_heads=2, rope=_scaled_rope("yarn", factor=4.0), tie_word_embeddings=True
    ),
    # Multi-query attention, head_dim != hidden_size / heads, rope_theta 1e6, no window.
    "mistral": lambda: _causal_lm(
        "Mistral",
        kv_heads=1,
        rope=dict(rope_type="default", rope_theta=1e6),
        head_dim=16,
        sliding_window=None,
    ),
    # Per-head q/k RMSNorm, head_dim != hidden_size / heads, tied embeddings, no biases (the
    # released models' settings).
    "qwen3": lambda: _qwen3(tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (HF model, its save_pretrained folder, the rljax model loaded from it)."""
    out = {}
    for k, (family, build) in enumerate(FAMILIES.items()):
        torch.manual_seed(k)
        model = _randomize(build(), seed=k)
        folder = str(tmp_path_factory.mktemp(family))
        model.save_pretrained(folder)
        out[family] = (model, folder, hf.load_model(folder))
    return out


def _batch(padding, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (BATCH, TIME))  # id 0 is the pad token
    mask = np.ones((BATCH, TIME), bool)
    lengths = (TIME, TIME - 5, TIME - 2)
    for row, n in enumerate(lengths):
        if padding == "right":
            mask[row, n:] = False
        elif padding == "left":
            mask[row, : TIME - n] = False
    tokens = np.where(mask, tokens, 0)
    return tokens, mask


def _hf_logits(model, tokens, mask, **kwargs):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # what rljax derives from the mask
    with torch.no_grad():
        out = model(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
            **kwargs,
        )
    return out.logits.float().numpy()


def _ours(model, tokens, mask):
    return np.asarray(model(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)))


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(checkpoints, family, padding):
    hf_model, _, ours = checkpoints[family]
    tokens, mask = _batch(padding)
    want = _hf_logits(hf_model, tokens, mask)
    got = _ours(ours, tokens, mask)
    assert np.abs(want).max() > 0.5  # weights are not near zero: the check has teeth
    np.testing.assert_allclose(got[mask], want[mask], atol=ATOL, rtol=0)


def test_config_mapping(checkpoints):
    llama = checkpoints["llama"][2].config
    assert (llama.num_kv_heads, llama.tie_word_embeddings, llama.rope_type) == (2, False, "llama3")
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias
    assert dict(llama.rope_scaling)["original_max_position_embeddings"] == 16
    qwen = checkpoints["qwen2"][2].config
    assert qwen.qkv_bias and not qwen.o_bias and qwen.tie_word_embeddings
    assert qwen.rope_type == "yarn" and dict(qwen.rope_scaling)["factor"] == 4.0
    mistral = checkpoints["mistral"][2].config
    assert (mistral.num_kv_heads, mistral.head_dim, mistral.rope_theta) == (1, 16, 1e6)
    assert not (mistral.qk_norm or qwen.qk_norm or llama.qk_norm)
    qwen3 = checkpoints["qwen3"][2].config
    assert qwen3.qk_norm and qwen3.tie_word_embeddings and qwen3.family == "llama"
    assert (qwen3.num_heads, qwen3.num_kv_heads, qwen3.head_dim, qwen3.hidden_size) == (
        3,
        1,
        24,
        48,
    )
    assert not (qwen3.qkv_bias or qwen3.o_bias or qwen3.mlp_bias) and qwen3.rope_theta == 1e6
    assert checkpoints["qwen3"][2].layers["q_norm_scale"][...].shape == (2, 24)
    gpt2 = checkpoints["gpt2"][2].config
    assert gpt2.family == "gpt2" and gpt2.max_position_embeddings == 32
    assert checkpoints["gpt2"][2].lm_head is None and checkpoints["llama"][2].lm_head is not None
    legacy = hf.config_from_hf(  # a config.json dict in the pre-transformers-5 layout
        dict(
            model_type="llama",
            **{k: v for k, v in LLAMA_SHAPE.items() if k != "attn_implementation"},
            rope_theta=5e5,
            rope_scaling=dict(rope_type="linear", factor=2.0),
        )
    )
    assert (legacy.rope_theta, legacy.rope_type, legacy.rope_scaling) == (
        5e5,
        "linear",
        (("factor", 2.0),),
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_model_round_trip_through_transformers(checkpoints, family, tmp_path):
    hf_model, _, ours = checkpoints[family]
    # A Llama-family model does not remember which HF class it came from: say so.
    hf.save_model(ours, tmp_path, model_type=None if family == "gpt2" else family)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert type(back) is type(hf_model)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens, mask = _batch("left")
    np.testing.assert_allclose(
        _hf_logits(back.eval(), tokens, mask)[mask],
        _hf_logits(hf_model, tokens, mask)[mask],
        atol=ATOL,
        rtol=0,
    )
    again = hf.load_model(tmp_path)  # and back into rljax
    assert again.config == ours.config


def test_sharded_checkpoints_both_ways(checkpoints, tmp_path):
    hf_model, _, ours = checkpoints["llama"]
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 1
    tokens, mask = _batch("right")
    sharded = hf.load_model(tmp_path / "hf")
    np.testing.assert_array_equal(_ours(sharded, tokens, mask), _ours(ours, tokens, mask))

    hf.save_model(ours, tmp_path / "ours", max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path / "ours"))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_allclose(
        _hf_logits(back.eval(), tokens, mask)[mask],
        _hf_logits(hf_model, tokens, mask)[mask],
        atol=ATOL,
        rtol=0,
    )
    hf.save_model(ours, tmp_path / "ours")  # unsharded again: the stale shards are removed
    assert sorted(f for f in os.listdir(tmp_path / "ours") if "safetensors" in f) == [
        "model.safetensors"
    ]


def test_bfloat16_checkpoint(checkpoints, tmp_path):
    hf_model, _, _ = checkpoints["qwen2"]
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path)
    rounded = copy.deepcopy(hf_model)  # float32 model with the bf16-rounded weights
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert stored["model.embed_tokens.weight"].dtype == jnp.bfloat16
    tokens, mask = _batch("left")

    ours = hf.load_model(tmp_path)  # float32 parameters by default
    assert ours.layers["q"][...].dtype == jnp.float32
    np.testing.assert_allclose(
        _ours(ours, tokens, mask)[mask], _hf_logits(rounded, tokens, mask)[mask], atol=ATOL
    )
    half = hf.load_model(tmp_path, param_dtype="bfloat16", dtype="float32")
    assert half.layers["q"][...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(half.embed[...], np.float32), np.asarray(ours.embed[...])
    )


def test_reward_head_matches_sequence_classification(tmp_path):
    torch.manual_seed(7)
    config = transformers.LlamaConfig(**LLAMA_SHAPE, num_key_value_heads=2, pad_token_id=0)
    config.num_labels = 1
    model = _randomize(transformers.LlamaForSequenceClassification(config), seed=7)
    model.save_pretrained(tmp_path / "rm")
    tokens, mask = _batch("right", seed=3)
    with torch.no_grad():  # HF pools at the last token that is not pad_token_id
        want = model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(int)))
    want = want.logits[:, 0].numpy()

    rm = hf.load_model(tmp_path / "rm", head="reward")
    assert rm.lm_head is None and not rm.config.lm_head and rm.config.head == "reward"
    got = np.asarray(rm.rewards(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)

    hf.save_model(rm, tmp_path / "back", pad_token_id=0)
    back, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "back", output_loading_info=True, attn_implementation="eager"
    )
    assert type(back) is transformers.LlamaForSequenceClassification
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        again = back.eval()(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(int)))
    np.testing.assert_allclose(again.logits[:, 0].numpy(), want, atol=ATOL, rtol=0)

    with pytest.raises(ValueError, match=r"ForSequenceClassification.*pass head='reward'"):
        hf.load_model(tmp_path / "rm")  # a reward checkpoint read as a plain LM


def test_value_head_is_fresh_and_the_lm_unchanged(checkpoints):
    _, folder, plain = checkpoints["qwen2"]
    critic = hf.load_model(folder, head="value")
    tokens, mask = _batch("right")
    np.testing.assert_array_equal(_ours(critic, tokens, mask), _ours(plain, tokens, mask))
    values = critic.values(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    assert values.shape == (BATCH, TIME) and np.all(np.isfinite(values))
    assert float(critic.score_bias[...]) == 0.0 and np.std(critic.score[...]) > 0
    with pytest.raises(ValueError, match=r"score\.weight.*is missing.*head='value'"):
        hf.load_model(folder, head="reward")  # a causal LM has no reward head


def test_save_model_choices_and_value_head_warning(checkpoints, tmp_path):
    configs = {family: checkpoints[family][2].config for family in FAMILIES}
    assert hf.hf_config_from(configs["qwen2"]).model_type == "qwen2"  # q/k/v biases only
    assert hf.hf_config_from(configs["llama"]).model_type == "llama"
    assert hf.hf_config_from(configs["mistral"]).model_type == "llama"  # the same network
    assert hf.hf_config_from(configs["mistral"], model_type="mistral").sliding_window is None
    assert hf.hf_config_from(configs["qwen3"]).model_type == "qwen3"  # qk_norm
    for other in ("llama", "qwen2", "mistral"):  # none of them has per-head q/k norms
        with pytest.raises(ValueError, match=rf"cannot save as '{other}'.*qk_norm=True"):
            hf.hf_config_from(configs["qwen3"], model_type=other)
    with pytest.raises(ValueError, match=r"cannot save as 'qwen3'.*qk_norm=False"):
        hf.hf_config_from(configs["mistral"], model_type="qwen3")
    with pytest.raises(ValueError, match="cannot save as 'qwen2'"):
        hf.hf_config_from(configs["llama"], model_type="qwen2")  # o_proj has a bias
    critic = hf.load_model(checkpoints["gpt2"][1], head="value")
    with pytest.warns(UserWarning, match=r"\['score', 'score_bias'\].*not saved"):
        hf.save_model(critic, tmp_path)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_gpt2_base_model_without_prefix_and_ignorable_buffers(checkpoints, tmp_path):
    hf_model, _, ours = checkpoints["gpt2"]
    hf_model.transformer.save_pretrained(tmp_path)  # GPT2Model: names without "transformer."
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    assert "wte.weight" in tensors and not any(n.startswith("transformer.") for n in tensors)
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))  # old buffers
    tensors["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"].copy()  # a tied copy, stored twice
    save_file(tensors, file)
    base = hf.load_model(tmp_path)
    tokens, mask = _batch("left")
    np.testing.assert_allclose(_ours(base, tokens, mask), _ours(ours, tokens, mask), atol=1e-6)
    tensors["lm_head.weight"] = tensors["wte.weight"] + 1.0
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"tie_word_embeddings=true but .* differs"):
        hf.load_model(tmp_path)


# ---------------------------------------------------------------------------- Qwen3


def _max_relative_difference(got, want):
    """``max |got - want| / max |want|``: the logits' error relative to their scale."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def _odd_batch(seed=0, vocab=97, padding="left"):
    """Left-padded (or ``padding``) rows of unequal lengths over the whole of Qwen3's odd
    vocabulary."""
    tokens, mask = _batch(padding, seed)
    tokens = np.random.default_rng(seed).integers(1, vocab, tokens.shape)
    return np.where(mask, tokens, 0), mask


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_matches_transformers_and_round_trips(tied, tmp_path):
    """Untied with biases on q/k/v/o (attention_bias=True) or tied without: the logits, and
    save_model's folder back in transformers as a Qwen3ForCausalLM with no missing keys."""
    torch.manual_seed(11)
    hf_model = _randomize(_qwen3(tie_word_embeddings=tied, attention_bias=not tied), seed=11)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = hf.load_model(tmp_path / "hf")
    c = ours.config
    assert c.qk_norm and c.tie_word_embeddings == tied and (ours.lm_head is None) == tied
    assert c.qkv_bias == c.o_bias == (not tied) and not c.mlp_bias
    assert ours.layers["q"][...].shape == (2, 48, 3, 24)
    assert ours.layers["o"][...].shape == (2, 3, 24, 48)
    assert c.num_params == sum(p.numel() for p in hf_model.parameters())  # q_norm/k_norm counted
    tokens, mask = _odd_batch()
    want = _hf_logits(hf_model, tokens, mask)[mask]
    got = _ours(ours, tokens, mask)[mask]
    assert np.abs(want).max() > 0.5
    assert _max_relative_difference(got, want) < 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    hf.save_model(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "qwen3" and saved["architectures"] == ["Qwen3ForCausalLM"]
    assert saved["head_dim"] == 24 and saved["attention_bias"] == (not tied)
    assert saved["use_sliding_window"] is False and saved["tie_word_embeddings"] == tied
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", output_loading_info=True, attn_implementation="eager"
    )
    assert type(back) is transformers.Qwen3ForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    again = _hf_logits(back.eval(), tokens, mask)[mask]
    assert _max_relative_difference(again, want) < 1e-6  # the same float32 weights
    assert hf.load_model(tmp_path / "ours").config == c


def test_qwen3_cached_decoding_equals_the_full_forward(checkpoints):
    """Prompt then one token at a time through the KV cache (the keys stored after k_norm and
    RoPE) gives the full forward pass's logits; greedy generation matches transformers'."""

    hf_model, _, ours = checkpoints["qwen3"]
    tokens, mask = _odd_batch(seed=5)
    prompt, steps = 7, TIME - 7
    full = _ours(ours, tokens, mask)
    cache = ours.init_cache(batch_size=BATCH, max_length=TIME)
    hidden, cache = ours.decode(
        jnp.asarray(tokens[:, :prompt], jnp.int32), jnp.asarray(mask[:, :prompt]), cache=cache
    )
    pieces = [np.asarray(ours.logits(hidden))]
    for j in range(prompt, TIME):
        hidden, cache = ours.decode(
            jnp.asarray(tokens[:, j : j + 1], jnp.int32),
            jnp.asarray(mask[:, j : j + 1]),
            cache=cache,
        )
        pieces.append(np.asarray(ours.logits(hidden)))
    cached = np.concatenate(pieces, axis=1)
    assert cached.shape == full.shape and steps > 1
    np.testing.assert_allclose(cached[mask], full[mask], atol=2e-5 * np.abs(full).max(), rtol=0)

    assert_greedy_matches_transformers(ours, hf_model, tokens, mask, 6)


def test_qwen3_sliding_window_config():
    config = transformers.Qwen3Config(
        **QWEN3_SHAPE, use_sliding_window=True, sliding_window=16, max_window_layers=1
    )
    assert config.layer_types == ["full_attention", "sliding_attention"]
    ours = hf.config_from_hf(config)
    assert ours.qk_norm and ours.sliding_window == 16 and ours.max_position_embeddings == 64
    assert ours.layer_windows == (2**30, 16)  # layer 0 global, layer 1 slides
    # The released models' settings: use_sliding_window false (sliding_window, if any, unused).
    off = dict(QWEN3_SHAPE, use_sliding_window=False, sliding_window=16, max_window_layers=0)
    assert hf.config_from_hf(transformers.Qwen3Config(**off)).max_position_embeddings == 64
    raw = {k: v for k, v in off.items() if k not in ("attn_implementation", "rope_parameters")}
    as_json = hf.config_from_hf(dict(raw, model_type="qwen3", rope_theta=1e6))  # a config.json
    assert (as_json.head_dim, as_json.qk_norm, as_json.rope_theta) == (24, True, 1e6)


# ---------------------------------------------------------------------------- windows, Gemma

WINDOW = 5  # shorter than the 12-token rows of _odd_batch


def _gemma3_rope(sliding_type="default"):
    """Gemma 3's two RoPEs: a local base of 10 on the sliding layers, a global base of 1e4
    with linear scaling (factor 2) on the others."""
    local = dict(rope_type=sliding_type, rope_theta=10.0)
    if sliding_type != "default":
        local["factor"] = 2.0
    return dict(
        sliding_attention=local,
        full_attention=dict(rope_type="linear", factor=2.0, rope_theta=1e4),
    )


# Odd sizes (QWEN3_SHAPE: hidden 48, 3 query heads sharing 1 key/value head of width 24,
# vocabulary 97, two layers) with windows of 5 tokens.
WINDOWED = {
    # Every layer slides; untied embeddings.
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**QWEN3_SHAPE, sliding_window=WINDOW)
    ),
    # Layer 1 slides (max_window_layers=1), layer 0 global; q/k/v biases; tied embeddings.
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            **QWEN3_SHAPE,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
            tie_word_embeddings=True,
        )
    ),
    # Layer 0 slides, layer 1 global (explicit layer_types); q/k norms.
    "qwen3": lambda: _qwen3(
        use_sliding_window=True,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # Gemma 2: sliding then global layers, attention and final soft-caps that bind, attention
    # scale 20 ** -0.5 (not head_dim's), tied embeddings.
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            **QWEN3_SHAPE,
            sliding_window=WINDOW,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        )
    ),
    # Gemma 3: q/k norms, local and global RoPE, final soft-cap, biases, untied embeddings.
    "gemma3": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(
            **{**QWEN3_SHAPE, "rope_parameters": _gemma3_rope()},
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=20,
            final_logit_softcapping=3.0,
            attention_bias=True,
            tie_word_embeddings=False,
        )
    ),
}


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """family -> (HF model, its save_pretrained folder, the rljax model loaded from it)."""
    out = {}
    for k, (family, build) in enumerate(WINDOWED.items()):
        torch.manual_seed(20 + k)
        model = _randomize(build(), seed=20 + k)
        folder = str(tmp_path_factory.mktemp(family))
        model.save_pretrained(folder)
        out[family] = (model, folder, hf.load_model(folder))
    return out


@pytest.mark.parametrize("family", list(WINDOWED))
def test_windowed_families_match_transformers_and_round_trip(windowed, family, tmp_path):
    """Rows longer than the window (left-padded): the logits, within 1e-4 of their scale;
    with the window switched off they differ (the window binds). save_model's folder loads
    back into transformers as the same class with no missing keys and the same logits."""
    hf_model, folder, ours = windowed[family]
    c = ours.config
    assert c.sliding_window == WINDOW and any(c.sliding_layers)
    assert c.num_params == sum(p.numel() for p in hf_model.parameters())
    tokens, mask = _odd_batch(seed=2)
    want = _hf_logits(hf_model, tokens, mask)[mask]
    got = _ours(ours, tokens, mask)[mask]
    assert np.abs(want).max() > 0.5
    assert _max_relative_difference(got, want) < 1e-4
    unwindowed = _ours(hf.load_model(folder, sliding_window=10**6), tokens, mask)[mask]
    assert _max_relative_difference(unwindowed, want) > 1e-2
    for padding in ("none", "right"):
        other_tokens, other_mask = _odd_batch(seed=3, padding=padding)
        other = _hf_logits(hf_model, other_tokens, other_mask)[other_mask]
        got = _ours(ours, other_tokens, other_mask)[other_mask]
        assert _max_relative_difference(got, other) < 1e-4, padding

    hf.save_model(ours, tmp_path)  # the model type is inferred from the config
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert type(back) is type(hf_model)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert back.config.sliding_window == WINDOW
    if family != "mistral":  # Mistral has no layer_types: every layer slides
        assert back.config.layer_types == hf_model.config.layer_types
    again = _hf_logits(back.eval(), tokens, mask)[mask]
    assert _max_relative_difference(again, want) < 1e-6  # the same float32 weights
    assert hf.load_model(tmp_path).config == c


def test_gemma_config_mapping(windowed):
    gemma2, gemma3 = windowed["gemma2"][2].config, windowed["gemma3"][2].config
    assert gemma2.family == gemma3.family == "gemma"
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (2.0, 3.0)
    assert gemma2.query_pre_attn_scalar == 20.0 and gemma2.hidden_act == "gelu_pytorch_tanh"
    assert gemma2.layer_types == ("sliding_attention", "full_attention")
    assert gemma2.tie_word_embeddings and not gemma2.qk_norm and gemma2.rope_local_theta is None
    assert gemma3.qk_norm and gemma3.qkv_bias and gemma3.o_bias and not gemma3.tie_word_embeddings
    assert gemma3.attn_logit_softcap is None and gemma3.final_logit_softcap == 3.0
    assert (gemma3.rope_local_theta, gemma3.rope_theta, gemma3.rope_type) == (10.0, 1e4, "linear")
    norms = ("attn_norm_scale", "post_attn_norm_scale", "mlp_norm_scale", "post_mlp_norm_scale")
    for name in norms:
        assert windowed["gemma3"][2].layers[name][...].shape == (2, 48)


def test_windowed_generation_matches_transformers(windowed):
    """Gemma 3's greedy generation after prompts longer than the window (prefill, then one
    token at a time through the KV cache) gives transformers' tokens, whose sliding layers
    keep only the window in their cache. (Cached decoding == the full forward for every
    windowed config: tests/test_transformer.py.)"""

    hf_model, _, ours = windowed["gemma3"]
    tokens, mask = _odd_batch(seed=7)
    assert_greedy_matches_transformers(ours, hf_model, tokens, mask, 6)


def test_gemma_options_refused_or_ignored():
    shape = dict(QWEN3_SHAPE, sliding_window=WINDOW)
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        hf.config_from_hf(transformers.Gemma3TextConfig(**shape, use_bidirectional_attention=True))
    local = {**shape, "rope_parameters": _gemma3_rope("linear")}
    with pytest.raises(ValueError, match=r"rope_parameters\['sliding_attention'\]"):
        hf.config_from_hf(transformers.Gemma3TextConfig(**local))
    with pytest.warns(UserWarning, match=r"attn_logit_softcapping=5\.0 is ignored"):
        ours = hf.config_from_hf(transformers.Gemma3TextConfig(**shape, attn_logit_softcapping=5.0))
    assert ours.attn_logit_softcap is None  # transformers' Gemma 3 never applies it
    gemma2 = hf.config_from_hf(transformers.Gemma2Config(**shape))
    with pytest.raises(ValueError, match=r"cannot save as 'gemma3_text': Gemma 3 has q/k norms"):
        hf.hf_config_from(gemma2, model_type="gemma3_text")
    with pytest.raises(ValueError, match=r"cannot save as 'qwen2'"):
        hf.hf_config_from(gemma2, model_type="qwen2")


# ---------------------------------------------------------------------------- errors


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_error_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"'bert' is not supported; supported: \('gpt2'"):
        hf.load_model(tmp_path)


def test_error_missing_config_and_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        hf.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        hf.load_model(tmp_path / "nope")


def test_error_pickle_only_folder(checkpoints, tmp_path):
    folder = _copy(checkpoints["llama"][1], tmp_path)
    os.remove(folder / "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(FileNotFoundError, match=r"pickle weights \(pytorch_model\.bin\).*safe"):
        hf.load_model(folder)


def _edit(folder, change):
    file = str(folder / "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)


def test_error_missing_tensor(checkpoints, tmp_path):
    folder = _copy(checkpoints["llama"][1], tmp_path)
    _edit(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing from model\.safe"
    ):
        hf.load_model(folder)


def test_error_misshaped_tensor(checkpoints, tmp_path):
    folder = _copy(checkpoints["llama"][1], tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit(folder, lambda t: t.update({name: np.zeros((32, 32), np.float32)}))
    with pytest.raises(ValueError, match=r"k_proj\.weight.*shape \(32, 32\), expected \(16, 32\)"):
        hf.load_model(folder)


def test_error_unexpected_tensor_and_ignorable_inv_freq(checkpoints, tmp_path):
    folder = _copy(checkpoints["mistral"][1], tmp_path)
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _edit(folder, lambda t: t.update({buffer: np.ones(8, np.float32)}))
    hf.load_model(folder)  # a rotary buffer is not a parameter: ignored
    _edit(folder, lambda t: t.update({"model.layers.0.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(ValueError, match=r"does not use: 'model\.layers\.0\.extra\.weight'"):
        hf.load_model(folder)


def test_error_unsupported_configs():
    def llama(**kw):
        return transformers.LlamaConfig(**LLAMA_SHAPE, **kw)

    for rope_type in ("dynamic", "longrope"):
        params = dict(rope_type=rope_type, rope_theta=1e4, factor=2.0)
        if rope_type == "longrope":
            params.update(short_factor=[1.0] * 4, long_factor=[2.0] * 4)
        config = llama()
        config.rope_parameters = params
        with pytest.raises(ValueError, match=f"rope_type '{rope_type}' is not supported"):
            hf.config_from_hf(config)

    window = transformers.MistralConfig(**LLAMA_SHAPE, num_key_value_heads=2, sliding_window=16)
    assert hf.config_from_hf(window).layer_windows == (16, 16)  # Mistral: every layer slides
    kv = dict(num_key_value_heads=2)
    qwen = transformers.Qwen2Config(**LLAMA_SHAPE, **kv, use_sliding_window=True, sliding_window=8)
    qwen.layer_types = ["full_attention", "sliding_attention"]
    assert hf.config_from_hf(qwen).layer_windows == (2**30, 8)
    plain = hf.config_from_hf(transformers.Qwen2Config(**LLAMA_SHAPE, **kv))  # no window
    assert plain.qkv_bias and plain.sliding_window is None and plain.layer_windows is None
    with pytest.raises(ValueError, match=r"cannot save as 'llama': sliding_window=16"):
        hf.hf_config_from(hf.config_from_hf(window), model_type="llama")

    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, **{option: True})
        with pytest.raises(ValueError, match=f"GPT-2 option {option}=True"):
            hf.config_from_hf(gpt2)
    with pytest.raises(TypeError, match="unknown TransformerConfig field"):
        hf.config_from_hf(llama(), num_layer=3)


def test_tokenizer_saved_alongside_and_loaded(checkpoints, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>"
    )
    hf.save_model(checkpoints["mistral"][2], tmp_path, tokenizer=tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["pad_token_id"], config["eos_token_id"], config["bos_token_id"]) == (0, 1, None)
    loaded = hf.load_tokenizer(tmp_path)
    assert loaded("w5 w7")["input_ids"] == [5, 7] and loaded.pad_token_id == 0
