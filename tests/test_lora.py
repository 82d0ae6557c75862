"""LoRA adapters (rljax.models.lora; Hu et al., 2021): the forward with fresh adapters equals
the base model, merge() folds them in exactly, the updates (DPO with two loss types, KTO, SFT,
the reward model, PPO, TRPO and GRPO on language models) differentiate and keep optimizer
state for the adapters only and leave the frozen base bitwise unchanged, the DPO reference with
the adapters switched off is the base model; and Hugging Face peft parity: a peft adapter
loaded by load_peft gives peft's logits, save_peft's folder loads in peft with the same logits,
merge() equals peft's merge_and_unload, and save_model of the merged model loads into
transformers."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import (
    HF_TINY_LLAMA,
    one_layer_llama,
    preference_batch,
    rl_update_batch,
    tiny_gpt2,
    tiny_llama,
)

from rljax import updates
from rljax.models import lora
from rljax.models.transformer import Transformer, with_head
from rljax.updates import lm

VOCAB, PAIRS, TIME = 64, 4, 10


def lora_model(config=None, rank=4, seed=0, random_b=0.0, **kwargs):
    """A tiny model with adapters; ``random_b`` > 0 gives B that standard deviation (else 0)."""
    model = Transformer(tiny_llama() if config is None else config, rngs=nnx.Rngs(seed))
    lora.apply(model, rank, rngs=nnx.Rngs(seed + 1), **kwargs)
    if random_b:
        for i, name in enumerate(model.lora.targets):
            var = model.layers[f"{name}_lora_b"]
            var.set_value(random_b * jax.random.normal(jax.random.key(i), var.shape))
    return model


def tokens(seed=0, shape=(2, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


def leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def leaves_differ(a, b) -> bool:
    return all(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("config", [tiny_llama(), tiny_gpt2()], ids=["llama", "gpt2"])
def test_fresh_adapters_are_the_base_model_and_merge_folds_them_in(config):
    base = Transformer(config, rngs=nnx.Rngs(0))
    x = tokens()
    want = np.asarray(base(x))
    model = lora_model(config)
    assert model.lora.targets == tuple(t for t in lora.TARGETS if t in base.layers)
    np.testing.assert_array_equal(np.asarray(model(x)), want)  # B = 0: exactly the base
    model = lora_model(config, random_b=0.3, alpha=8, rslora=True)
    assert model.lora.scale == pytest.approx(8 / math.sqrt(4))
    adapted = np.asarray(model(x))
    assert np.abs(adapted - want).max() > 1e-2
    merged = lora.merge(model)
    assert merged.lora is None and not any("_lora_" in k for k in merged.layers)
    assert "q_lora_a" in model.layers  # merge copies
    np.testing.assert_allclose(np.asarray(merged(x)), adapted, rtol=1e-5, atol=1e-5)


def test_split_counts_and_the_disabled_adapters():
    model = lora_model(random_b=0.3, targets=("q_proj", "v"))
    assert model.lora.targets == ("q", "v")
    graphdef, params = lora.split(model)
    assert isinstance(params, lora.LoRAParams)
    c = model.config
    r, layers = 4, c.num_layers
    adapter_size = layers * r * ((c.hidden_size + c.num_heads * c.dim_per_head)
                                 + (c.hidden_size + c.kv_heads * c.dim_per_head))  # fmt: skip
    assert lora.trainable_count(model) == adapter_size
    assert lora.total_count(model) == c.num_params + adapter_size
    assert lora.trainable(params) is params.trainable
    nested = lora.combine({"policy": params.trainable}, {"policy": params})["policy"]
    assert isinstance(nested, lora.LoRAParams) and leaves_equal(nested, params)
    assert lora.trainable({"policy": params, "value": {}})["policy"] is params.trainable
    base = Transformer(tiny_llama(), rngs=nnx.Rngs(0))
    off = lm.merge(graphdef, lora.disabled(params))
    np.testing.assert_array_equal(np.asarray(off(tokens())), np.asarray(base(tokens())))
    # Without adapters every helper is the identity, and split is nnx.split.
    _, plain = lora.split(base)
    assert lora.trainable(plain) is plain and lora.combine(plain, plain) is plain
    assert lora.trainable_count(base) == lora.total_count(base) == c.num_params


def test_bfloat16_base_with_float32_adapters_and_a_checkpoint_round_trip(tmp_path):
    from rljax.checkpoint import Checkpointer, abstract_like

    base = Transformer(tiny_llama(), rngs=nnx.Rngs(0))
    model = lora.apply(with_head(base, "value", rngs=nnx.Rngs(1), lm_head=True), 4,
                       base_dtype="bfloat16")  # fmt: skip
    _, params = lora.split(model)
    assert {x.dtype for x in jax.tree.leaves(params.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(params.trainable)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(np.asarray(model(tokens()))).all()
    merged = lora.merge(model)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(merged))} == {jnp.dtype(jnp.float32)}
    # A train state with LoRA parameters saves and restores with its structure and dtypes.
    state = updates.init_sft_state(params, optax.adam(1e-3))
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, state)
    ckpt.wait()
    restored, _ = ckpt.restore(1, abstract_state=abstract_like(state))
    ckpt.close()
    assert isinstance(restored.params, lora.LoRAParams)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert leaves_equal(restored, state)


def test_errors_name_the_argument(tmp_path):
    base = lambda: Transformer(tiny_llama(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank: must be an int >= 1"):
        lora.apply(base(), 0)
    with pytest.raises(ValueError, match="alpha: must be > 0"):
        lora.apply(base(), 2, alpha=-1.0)
    with pytest.raises(ValueError, match=r"dropout: must be in \[0, 1\)"):
        lora.apply(base(), 2, dropout=1.0)
    with pytest.raises(ValueError, match="targets: 'qkv' is not a projection"):
        lora.apply(base(), 2, targets=["qkv"])
    with pytest.raises(ValueError, match="base_dtype"):
        lora.apply(base(), 2, base_dtype="int4")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply(lora_model(), 2)
    with pytest.raises(ValueError, match="has no LoRA adapters to merge"):
        lora.merge(base())
    with pytest.raises(TypeError, match="must be a Transformer"):
        lora.apply(object(), 2)
    from rljax.models import hf

    with pytest.raises(ValueError, match=r"lora\.merge"):
        hf.save_model(lora_model(), tmp_path / "x")
    with pytest.raises(ValueError, match="GPT-2"):
        lora.save_peft(lora_model(tiny_gpt2()), tmp_path / "gpt2")
    lora.save_peft(lora_model(), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lora.load_peft(base(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match="does not fit"):
        lora.load_peft(base(), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        lora.load_peft(base(), tmp_path)


# ------------------------------------------------------------------------------ updates


def pref_batch(seed=0):
    return preference_batch(np.random.default_rng(seed), PAIRS, TIME, VOCAB)


def check_only_adapters_moved(before, after, opt_state):
    """The frozen base bitwise unchanged, every adapter B moved, and the optimizer state's
    arrays no bigger than two copies of the trainable parameters (Adam's moments; ``None``:
    no optimizer moves these parameters)."""
    assert isinstance(after, lora.LoRAParams)
    assert leaves_equal(before.frozen, after.frozen)
    b_before = {k: v for k, v in nnx.to_flat_state(before.trainable) if "_lora_b" in str(k)}
    b_after = dict(nnx.to_flat_state(after.trainable))
    assert all(not np.array_equal(v[...], b_after[k][...]) for k, v in b_before.items())
    if opt_state is None:
        return
    trainable = lora.trainable_count(before)
    state_size = sum(np.size(x) for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0)
    assert 0 < state_size <= 2 * trainable


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_with_the_reference_switched_off(loss_type):
    graphdef, params = lora.split(lora_model())
    optimizer = optax.adam(1e-2)
    config = updates.DPOConfig(loss_type=loss_type, reference="model", chunk_size=8)
    step = jax.jit(updates.make_dpo_update(graphdef, optimizer, config))
    state = updates.init_dpo_state(params, optimizer)
    assert state.ref_params is None
    # Adam's moments mirror the adapters only.
    assert jax.tree.structure(state.opt_state[0].mu) == jax.tree.structure(params.trainable)
    batch = pref_batch()
    state, metrics = step(state, batch)
    if loss_type == "sigmoid":  # policy == reference at B = 0: the loss is log 2
        assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    for _ in range(2):
        state, metrics = step(state, batch)
    check_only_adapters_moved(params, state.params, state.opt_state)
    assert float(metrics["rewards/margins"]) != 0.0
    # The reference (adapters off) is still exactly the base model.
    base_graphdef, base_params = nnx.split(Transformer(tiny_llama(), rngs=nnx.Rngs(0)))
    want = lm.pair_sequence_logps(base_graphdef, base_params, batch)
    got = lm.pair_sequence_logps(graphdef, lora.disabled(state.params), batch)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_kto_and_sft_steps_move_only_adapters():
    graphdef, params = lora.split(lora_model())
    optimizer = optax.adam(1e-2)
    batch = pref_batch(1)
    sft_batch = {k.removeprefix("chosen_"): v for k, v in batch.items() if "chosen" in k}
    step = jax.jit(updates.make_sft_update(graphdef, optimizer, updates.SFTConfig()))
    state = updates.init_sft_state(params, optimizer)
    for _ in range(2):
        state, _ = step(state, sft_batch)
    check_only_adapters_moved(params, state.params, state.opt_state)

    kto_batch = {
        "tokens": np.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]]),
        "mask": np.concatenate([batch["chosen_mask"], batch["rejected_mask"]]),
        "loss_mask": np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]]),
        "desirable": np.array([True] * PAIRS + [False] * PAIRS),
    }
    config = updates.KTOConfig(reference="model", loss_type="apo_zero_unpaired")
    step = jax.jit(updates.make_kto_update(graphdef, optimizer, config))
    state = updates.init_dpo_state(params, optimizer)
    for _ in range(2):
        state, _ = step(state, kto_batch)
    check_only_adapters_moved(params, state.params, state.opt_state)


def test_reward_model_trains_adapters_and_the_head():
    base = Transformer(tiny_llama(), rngs=nnx.Rngs(0))
    model = lora.apply(with_head(base, "reward", rngs=nnx.Rngs(1)), 4, targets="q,v")
    graphdef, params = lora.split(model)
    assert {str(k[0]) for k, _ in nnx.to_flat_state(params.trainable)} == {"layers", "score"}
    optimizer = optax.adam(1e-2)
    step = jax.jit(updates.make_reward_update(graphdef, optimizer))
    state = updates.init_reward_state(params, optimizer)
    for _ in range(2):
        state, metrics = step(state, pref_batch(2))
    check_only_adapters_moved(params, state.params, state.opt_state)
    assert not np.array_equal(state.params.trainable["score"][...], params.trainable["score"][...])
    assert np.isfinite(float(metrics["loss"]))


P, N, B = 3, 4, 4


def rollout_batch(seed, critic=True):
    rng = np.random.default_rng(seed)
    prompt_mask = np.arange(P)[None, :] >= (P - rng.integers(1, P + 1, B))[:, None]
    cmask = np.arange(N)[None, :] < rng.integers(1, N + 1, B)[:, None]
    return rl_update_batch(rng, prompt_mask, cmask, VOCAB, critic=critic, old_logp_mean=-4)


def rl_policy(head=None, dropout=0.0):
    base = Transformer(one_layer_llama(VOCAB), rngs=nnx.Rngs(0))
    if head:
        base = with_head(base, head, rngs=nnx.Rngs(1), lm_head=True)
    return lora.split(lora.apply(base, 2, alpha=4.0, dropout=dropout, rngs=nnx.Rngs(2)))


def test_rlhf_ppo_with_a_value_head():
    graphdef, params = rl_policy("value")
    optimizer = optax.adam(1e-2)
    config = updates.PPOConfig(num_epochs=2, num_minibatches=2)
    step = jax.jit(updates.make_rlhf_ppo_update(graphdef, optimizer, config, chunk_size=4))
    state = updates.init_rlhf_ppo_state(params, optimizer, jax.random.key(0))
    state, metrics = step(state, rollout_batch(0))
    assert float(metrics["updates"]) == 4
    check_only_adapters_moved(params, state.params["policy"], state.opt_state)


def test_rlhf_trpo_natural_step_moves_only_adapters():
    graphdef, params = rl_policy()
    batch = rollout_batch(1, critic=False)
    policy = lm.merge(graphdef, params)
    hidden, _ = policy.decode(jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))
    logp = jax.nn.log_softmax(policy.logits(hidden[:, P - 1 : P + N - 1]), axis=-1)
    on_policy = jnp.take_along_axis(logp, jnp.asarray(batch["tokens"][:, P:, None]), -1)[..., 0]
    batch["old_logps"] = np.where(batch["completion_mask"], np.asarray(on_policy), 0.0)
    config = updates.TRPOConfig(max_kl=0.01, cg_iters=5)
    step = jax.jit(updates.make_rlhf_trpo_update(graphdef, optax.adam(1e-3), config))
    state = updates.init_trpo_state(params, {}, optax.adam(1e-3), jax.random.key(0))
    state, metrics = step(state, batch)
    assert bool(metrics["accepted"]) and 0 < float(metrics["kl"]) <= 0.01 * (1 + 1e-5)
    # No critic and the policy moves by the natural step: no optimizer state but a count.
    assert all(np.ndim(x) == 0 for x in jax.tree.leaves(state.opt_state))
    check_only_adapters_moved(params, state.params["policy"], None)


def test_grpo_with_the_reference_from_the_switched_off_adapters():
    graphdef, params = rl_policy()
    batch = rollout_batch(2, critic=False)
    batch["advantages"] = np.random.default_rng(0).normal(size=B).astype(np.float32)
    ref = updates.completion_outputs(
        graphdef, lora.disabled(params), batch["tokens"], batch["mask"], N
    )["logps"]
    batch["ref_logps"] = np.asarray(ref)
    optimizer = optax.adam(1e-2)
    config = updates.GRPOConfig(beta=0.04, num_minibatches=2)
    step = jax.jit(updates.make_grpo_update(graphdef, optimizer, config))
    state = updates.init_grpo_state(params, optimizer, jax.random.key(0))
    for _ in range(2):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss/policy"]))
    check_only_adapters_moved(params, state.params["policy"], state.opt_state)


def test_compile_update_places_a_lora_state():
    from rljax import sharding

    graphdef, params = lora.split(lora_model())
    optimizer = optax.adam(1e-2)
    config = updates.DPOConfig(reference="model", chunk_size=8)
    state = updates.init_dpo_state(params, optimizer)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # 8 simulated devices
    update = updates.make_dpo_update(graphdef, optimizer, config)
    frozen = jax.tree.map(np.array, params.frozen)  # the step donates the placed state
    placed, step, batch_shardings = lm.compile_update(update, state, pref_batch(), mesh)
    q_a = placed.params.trainable["layers"]["q_lora_a"][...]
    assert q_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    # Adam's moments of the adapters are sharded like the adapters.
    mu = placed.opt_state[0].mu["layers"]["q_lora_b"][...]
    assert mu.sharding.spec == placed.params.trainable["layers"]["q_lora_b"][...].sharding.spec
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    placed, metrics = step(placed, jax.device_put(pref_batch(), batch_shardings))
    assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert leaves_equal(placed.params.frozen, frozen)
    # The policy-gradient states hold the LoRA parameters inside a dict ({"policy": ...}):
    # their Adam moments are sharded like the adapters too, not replicated.
    grpo_state = updates.init_grpo_state(params, optimizer, jax.random.key(0))
    shardings = sharding.train_state_shardings(grpo_state, mesh)
    mu = shardings.opt_state[0].mu["policy"]["layers"]["q_lora_b"]
    assert mu.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)


def test_adapter_dropout_only_in_gradient_passes():
    model = lora_model(random_b=0.3, dropout=0.5)
    graphdef, params = lora.split(model)
    assert lora.has_dropout(params) and lora.has_dropout({"policy": params})
    assert lora.total_count(model) == lora.total_count(lora.merge(model)) + lora.trainable_count(
        model
    )  # the dropout keys are not parameters
    x = tokens()
    evaluate = lambda p: np.asarray(lm.merge(graphdef, p)(x))
    plain = evaluate(params)
    np.testing.assert_array_equal(evaluate(lora.combine(params.trainable, params)), plain)
    np.testing.assert_allclose(np.asarray(lora.merge(model)(x)), plain, rtol=1e-5, atol=1e-5)
    key = jax.random.key(3)
    dropped = evaluate(lora.combine(params.trainable, params, key))
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(evaluate(lora.combine(params.trainable, params, key)), dropped)
    other = evaluate(lora.combine(params.trainable, params, jax.random.key(4)))
    assert np.abs(other - dropped).max() > 1e-3
    # Adapters off: dropout cannot change anything.
    off = lora.disabled(lora.combine(params.trainable, params, key))
    base = Transformer(tiny_llama(), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(evaluate(off), np.asarray(base(x)))


def test_dropout_in_the_optax_and_minibatch_updates_and_refused_by_trpo():
    graphdef, params = lora.split(lora_model(dropout=0.2))
    optimizer = optax.adam(1e-2)
    batch = pref_batch(3)
    sft_batch = {k.removeprefix("chosen_"): v for k, v in batch.items() if "chosen" in k}
    step = jax.jit(updates.make_sft_update(graphdef, optimizer, updates.SFTConfig()))
    state = updates.init_sft_state(params, optimizer)
    state, first = step(state, sft_batch)
    eval_loss = jax.jit(updates.make_sft_eval(graphdef, updates.SFTConfig()))(state, sft_batch)
    state, _ = step(state, sft_batch)
    check_only_adapters_moved(params, state.params, state.opt_state)
    assert float(first["loss"]) != pytest.approx(float(eval_loss["loss"]), abs=1e-7)

    graphdef, params = rl_policy(dropout=0.2)
    batch = rollout_batch(4, critic=False)
    batch["advantages"] = np.random.default_rng(1).normal(size=B).astype(np.float32)
    step = jax.jit(updates.make_grpo_update(graphdef, optimizer, updates.GRPOConfig()))
    state = updates.init_grpo_state(params, optimizer, jax.random.key(0))
    state, metrics = step(state, batch)
    # Dropout in the gradient pass: the ratio to the (dropout-free) old log-probs is not 1.
    assert np.isfinite(float(metrics["loss/policy"]))
    check_only_adapters_moved(params, state.params["policy"], state.opt_state)
    trpo = updates.make_rlhf_trpo_update(graphdef, optax.adam(1e-3))
    state = updates.init_trpo_state(params, {}, optax.adam(1e-3), jax.random.key(0))
    with pytest.raises(ValueError, match="LoRA dropout is not supported with TRPO"):
        trpo(state, rollout_batch(4, critic=False))


# ------------------------------------------------------------------------------ peft parity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HF_SHAPE = dict(HF_TINY_LLAMA, vocab_size=VOCAB, num_key_value_heads=2, tie_word_embeddings=False)


def relative_error(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """A tiny random transformers Llama (its folder), and a peft adapter on it with random
    non-zero B (its folder), and the adapted model's logits on a batch."""
    from rljax.models import hf  # noqa: F401  (import before torch work: same as test_hf)

    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_SHAPE)).eval()
    base.save_pretrained(root / "base")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "gate_proj"],
        lora_dropout=0.1,  # training only: peft's eval mode and rljax's forward skip it
        task_type="CAUSAL_LM",
    )
    adapted = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape))
    adapted.eval().save_pretrained(root / "adapter")
    x = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
    with torch.no_grad():
        want = adapted(torch.tensor(x)).logits.numpy()
        merged = adapted.merge_and_unload()(torch.tensor(x)).logits.numpy()
    return root, x, want, merged


def test_load_peft_matches_peft_and_save_peft_loads_in_peft(peft_pair, tmp_path):
    from rljax.models import hf

    root, x, want, _ = peft_pair
    model = lora.load_peft(hf.load_model(root / "base"), root / "adapter")
    assert model.lora == lora.LoRASettings(4, 8.0, ("q", "v", "o", "gate", "down"), dropout=0.1)
    assert relative_error(model(jnp.asarray(x)), want) < 1e-4
    lora.save_peft(model, tmp_path / "ours", base_model_name_or_path=str(root / "base"))
    base = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    back = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        got = back(torch.tensor(x)).logits.numpy()
    assert relative_error(got, want) < 1e-5  # the same float32 adapters (measured 3e-7)


def test_merge_equals_merge_and_unload_and_saves_as_a_plain_checkpoint(peft_pair, tmp_path):
    from rljax.models import hf

    root, x, _, merged_want = peft_pair
    model = lora.load_peft(hf.load_model(root / "base"), root / "adapter")
    merged = lora.merge(model)
    assert relative_error(merged(jnp.asarray(x)), merged_want) < 1e-4
    hf.save_model(merged, tmp_path / "merged")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        got = back.eval()(torch.tensor(x)).logits.numpy()
    assert relative_error(got, merged_want) < 1e-4


# ------------------------------------------------------------------------------ scripts


def test_readme_lora_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's LoRA command (on its DPO pairs, with the shipped base model where it names
    the model; flags appended only to shrink the run) and its loading snippet: the run counts
    its parameters, its reference is the base, the merged policy equals the peft adapter
    loaded onto the base, and it trained."""
    import runpy
    import shlex
    import shutil
    import sys

    from test_readme import ROOT, readme_block

    from rljax.models import hf
    from rljax.tasks import sorting

    (tmp_path / "pairs.jsonl").write_text(readme_block("dpo-quickstart-data"))
    argv = shlex.split(readme_block("lora-quickstart-run").replace("\\\n", " "))
    assert argv[:2] == ["python", "experiments/dpo.py"] and "--lora-rank" in argv, argv
    shutil.copytree(sorting.default_base_model(), tmp_path / argv[argv.index("--model") + 1])
    shrink = ["--steps", "2", "--batch-size", "2", "--max-length", "64"]
    shrink += ["--max-prompt-length", "32", "--log-every", "1", "--lora-targets", "q,v,up"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [argv[1], *argv[2:], *shrink])
    runpy.run_path(str(ROOT / argv[1]), run_name="__main__")
    assert "[DPO] LoRA rank 16 on q,v,up: " in capsys.readouterr().out

    out = tmp_path / argv[argv.index("--out") + 1]
    summary = json.loads((out / "summary.json").read_text())
    params = summary["parameters"]
    assert params["lora"] == {"rank": 16, "alpha": 32.0, "targets": ["q", "v", "up"],
                              "rslora": False, "dropout": 0.0}  # fmt: skip
    assert 0 < params["trainable"] < params["total"] / 5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The reference is the base: at B = 0 the policy equals it (zero margin at step 1).
    assert abs(next(r for r in rows if "loss" in r)["rewards/margins"]) < 1e-4

    namespace: dict = {}
    exec(compile(readme_block("lora-quickstart-load"), "README.md", "exec"), namespace)
    merged, adapted = hf.load_model(out / "policy"), namespace["model"]
    assert merged.lora is None and adapted.lora.rank == 16
    x = tokens(shape=(2, 8)) % merged.config.vocab_size
    np.testing.assert_allclose(np.asarray(adapted(x)), np.asarray(merged(x)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(namespace["merged"](x)), np.asarray(merged(x)), rtol=1e-5, atol=1e-5
    )
    base = hf.load_model(sorting.default_base_model())
    assert not np.allclose(np.asarray(base(x)), np.asarray(merged(x)))  # it trained


def test_run_settings_refuse_unread_lora_flags():
    from rljax import experiment, rl

    with pytest.raises(ValueError, match=r"--lora-alpha: set to 8\.0, but --lora-rank is 0"):
        experiment.DPORunConfig(lora_alpha=8.0)
    with pytest.raises(ValueError, match="--lora-targets: set to 'q', but --lora-rank is 0"):
        experiment.SFTRunConfig(lora_targets="q")
    with pytest.raises(ValueError, match="--lora-dropout"):
        experiment.DPORunConfig(lora_dropout=0.1)  # without --lora-rank
    with pytest.raises(ValueError, match="--lora-dropout: TRPO"):
        rl.config("trpo", lora_rank=4, lora_dropout=0.1)
    assert experiment.DPORunConfig(lora_rank=4, lora_dropout=0.1).lora_dropout == 0.1
    with pytest.raises(ValueError, match=r"--lora-targets: .*'qk' is not a projection"):
        experiment.RewardModelRunConfig(lora_rank=4, lora_targets="qk")
    with pytest.raises(ValueError, match="--lora-rank: iterative DPO"):
        experiment._check_iterative(experiment.IterativeDPORunConfig(lora_rank=2))
    with pytest.raises(ValueError, match="--ref-update-every: with --lora-rank"):
        rl.config("online_dpo", lora_rank=4, ref_update_every=2)
    with pytest.raises(ValueError, match="--lora-base-dtype: set"):
        rl.config("ppo", lora_base_dtype="bfloat16")
    assert rl.config("grpo", lora_rank=8).lora_rank == 8


def test_rl_runs_with_lora_ppo_head_critic_and_grpo(tmp_path):
    """PPO-RLHF with a value-head critic and GRPO, one iteration each with --lora-rank: the
    runs record their parameter counts and save the merged policy and its peft adapters."""
    from rljax import rl
    from rljax.models import hf

    ppo = rl.rlhf.PPORunConfig(
        out=str(tmp_path / "ppo"), iterations=1, batch_size=8, samples_per_prompt=2,
        eval_every=0, eval_prompts=8, log_every=1, lora_rank=2, lora_targets="q,v",
    )  # fmt: skip
    grpo = rl.config(
        "grpo", out=str(tmp_path / "grpo"), iterations=1, batch_size=2, group_size=2,
        eval_prompts=4, max_new_tokens=8, log_every=1, lora_rank=2, compilation_cache=None,
    )  # fmt: skip
    for config, run in ((ppo, rl.rlhf.run), (grpo, rl.grpo.run)):
        summary = run(config)
        out = pathlib.Path(config.out)
        assert summary["parameters"]["lora"]["rank"] == 2
        assert 0 < summary["parameters"]["trainable"] < summary["parameters"]["total"] / 10
        merged = hf.load_model(out / "policy")
        adapted = lora.load_peft(hf.load_model(summary["model"]), out / "policy_adapter")
        x = tokens(shape=(2, 6)) % merged.config.vocab_size
        np.testing.assert_allclose(
            np.asarray(adapted(x)), np.asarray(merged(x)), rtol=1e-4, atol=1e-4
        )
