"""rljax.sharding on 8 simulated CPU devices (tests/conftest.py): mesh parsing, logical-axis
rules, parameter specs of tiny Llama and GPT-2 models, and sharded forward/backward passes and
optimizer steps that must equal the 1-device results."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_gpt2, tiny_llama
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rljax import sharding
from rljax.logprobs import masked_mean, token_logprobs
from rljax.models.transformer import Transformer

CONFIGS = {
    "llama": tiny_llama(),
    # 8 query heads so that tensor=8 splits them; the 2 key/value heads stay replicated.
    "llama8": tiny_llama(num_heads=8),
    "gpt2": tiny_gpt2(intermediate_size=64, max_position_embeddings=16),
}


def abstract_params(name):
    """Shapes and metadata only (``nnx.eval_shape``): all a spec needs."""
    abstract = nnx.eval_shape(lambda: Transformer(CONFIGS[name], rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param, ...)[1]


# Backend optimisation level 0 halves XLA:CPU compile times; the SPMD partitioning under test
# is the same at every level.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_fast(jitted, *args):
    return jitted.lower(*args).compile(compiler_options=FAST_COMPILE)


_INITS = {}


def split(name):
    """``nnx.split(model, nnx.Param, ...)`` of a fresh model, initialised in one compiled call
    (eager initialisation compiles one small program per parameter shape)."""
    config = CONFIGS[name]
    if name not in _INITS:
        init = jax.jit(lambda: nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param, ...)[1:])
        _INITS[name] = compile_fast(init)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef = nnx.split(abstract, nnx.Param, ...)[0]
    params, rest = _INITS[name]()
    return graphdef, params, rest


def specs_by_path(specs):
    flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    return {sharding._path_str(path): spec for path, spec in flat}


def test_jax_sees_eight_devices():
    assert jax.device_count() == 8


# ---------------------------------------------------------------------------- meshes


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("data=2,fsdp=2,tensor=2", {"data": 2, "fsdp": 2, "tensor": 2}),
        ("tensor=4, data=2", {"data": 2, "fsdp": 1, "tensor": 4}),
        ("fsdp=-1", {"data": 1, "fsdp": -1, "tensor": 1}),
    ],
)
def test_parse_mesh_spec(spec, expected):
    parsed = sharding.parse_mesh_spec(spec)
    assert parsed == expected
    assert list(parsed) == ["data", "fsdp", "tensor"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("data2", r"part 'data2'.*axis=size"),
        ("data=2,pipe=4", r"part 'pipe=4'.*unknown mesh axis 'pipe'"),
        ("data=two", r"part 'data=two'.*'two' is not an integer"),
        ("data=2,data=4", r"part 'data=4'.*given twice"),
        ("data=0", r"part 'data=0'.*>= 1 or -1"),
        ("data=-1,fsdp=-1", r"at most one axis may be -1"),
        ("data=2,", r"part ''"),
        ("", r"empty"),
    ],
)
def test_parse_mesh_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh_spec(spec)


def test_make_mesh():
    mesh = sharding.make_mesh("tensor=2,fsdp=2,data=2")
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(sharding.make_mesh({"data": 2, "fsdp": -1}).shape) == {
        "data": 2,
        "fsdp": 4,
        "tensor": 1,
    }
    one = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    assert one.devices.size == 1
    with pytest.raises(ValueError, match=r"needs 4 devices but 8 are given"):
        sharding.make_mesh("data=2,fsdp=2")
    with pytest.raises(ValueError, match=r"do not divide the 8 devices"):
        sharding.make_mesh("data=3,fsdp=-1")
    with pytest.raises(ValueError, match=r"unknown mesh axis 'model'"):
        sharding.make_mesh({"model": 8})


# ---------------------------------------------------------------------------- rules


def test_rules_are_small_frozen_data():
    rules = sharding.DEFAULT_RULES
    assert rules.mesh_axes("batch") == ("data", "fsdp")
    assert rules.mesh_axes("embed") == ("fsdp",)
    assert rules.mesh_axes("layers") == ()
    assert hash(rules) == hash(sharding.ShardingRules(rules.rules))
    assert rules.override(vocab=None).mesh_axes("vocab") == ()
    assert rules.mesh_axes("vocab") == ("tensor",)  # the original is unchanged
    assert rules.mesh_axes("experts") == ("fsdp",)  # mixture-of-experts weights
    with pytest.raises(ValueError, match=r"no sharding rule for logical axis 'channels'"):
        rules.mesh_axes("channels")
    with pytest.raises(ValueError, match=r"'embed' has two rules"):
        sharding.ShardingRules((("embed", "fsdp"), ("embed", None)))


def test_logical_to_spec_drops_indivisible_and_never_reuses_an_axis():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), rules) == P(
        None, "fsdp", "tensor", None
    )
    # 3 heads: tensor=2 does not divide them, so they stay replicated.
    spec = sharding.logical_to_spec(("embed", "heads"), rules, mesh, shape=(32, 3))
    assert spec == P("fsdp", None)
    # batch -> (data, fsdp): a leading size of 2 keeps data only.
    assert sharding.logical_to_spec(("batch",), rules, mesh, shape=(2,)) == P("data")
    assert sharding.logical_to_spec(("batch",), rules, mesh, shape=(8,)) == P(("data", "fsdp"))
    # vocab claims fsdp first, so embed may not use it again.
    greedy = rules.override(vocab=("tensor", "fsdp"))
    assert sharding.logical_to_spec(("vocab", "embed"), greedy, mesh, (64, 32)) == P(
        ("tensor", "fsdp"), None
    )
    with pytest.raises(ValueError, match=r"mesh has no axis 'model'"):
        sharding.logical_to_spec(("embed",), rules.override(embed="model"), mesh)
    with pytest.raises(ValueError, match=r"do not match shape"):
        sharding.logical_to_spec(("embed",), rules, mesh, shape=(4, 4))


# ---------------------------------------------------------------------------- parameter specs


def test_llama_specs_fsdp_and_tensor():
    params = abstract_params("llama")
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    specs = specs_by_path(sharding.param_specs(params, sharding.DEFAULT_RULES, mesh))
    assert specs == {
        "embed": P("tensor", "fsdp"),
        "final_norm_scale": P(None),
        "layers/attn_norm_scale": P(None, None),
        "layers/mlp_norm_scale": P(None, None),
        "layers/q": P(None, "fsdp", "tensor", None),
        "layers/k": P(None, "fsdp", "tensor", None),
        "layers/v": P(None, "fsdp", "tensor", None),
        "layers/o": P(None, "tensor", None, "fsdp"),
        "layers/gate": P(None, "fsdp", "tensor"),
        "layers/up": P(None, "fsdp", "tensor"),
        "layers/down": P(None, "tensor", "fsdp"),
    }
    # Pure FSDP over 8 devices: D = 32 splits 8 ways; nothing uses tensor.
    fsdp = specs_by_path(
        sharding.param_specs(params, sharding.FSDP_RULES, sharding.make_mesh("fsdp=8"))
    )
    assert fsdp["layers/q"] == P(None, "fsdp", None, None)
    assert fsdp["layers/down"] == P(None, None, "fsdp")
    assert fsdp["embed"] == P(None, "fsdp")
    # Tensor parallelism over 8: 4 query heads and 2 kv heads do not divide, MLP and vocab do.
    tensor = specs_by_path(
        sharding.param_specs(params, sharding.TENSOR_RULES, sharding.make_mesh("tensor=8"))
    )
    assert tensor["layers/q"] == P(None, None, None, None)
    assert tensor["layers/k"] == P(None, None, None, None)
    assert tensor["layers/up"] == P(None, None, "tensor")
    assert tensor["embed"] == P("tensor", None)
    params8 = abstract_params("llama8")
    tensor8 = specs_by_path(
        sharding.param_specs(params8, sharding.TENSOR_RULES, sharding.make_mesh("tensor=8"))
    )
    assert tensor8["layers/q"] == P(None, None, "tensor", None)
    assert tensor8["layers/o"] == P(None, "tensor", None, None)
    assert tensor8["layers/k"] == P(None, None, None, None)


def test_gpt2_specs():
    params = abstract_params("gpt2")
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    specs = specs_by_path(sharding.param_specs(params, sharding.DEFAULT_RULES, mesh))
    assert specs["pos_embed"] == P(None, "fsdp")
    assert specs["final_norm_bias"] == P(None)
    assert specs["layers/q_bias"] == P(None, "tensor", None)
    assert specs["layers/up_bias"] == P(None, "tensor")
    assert specs["layers/o_bias"] == P(None, "fsdp")
    assert specs["layers/attn_norm_bias"] == P(None, None)
    assert "gate" not in specs and "lm_head" not in specs
    shardings = sharding.param_shardings(params, mesh)
    assert shardings["layers"]["q"] == NamedSharding(mesh, P(None, "fsdp", "tensor", None))


def test_param_without_logical_axes():
    state = nnx.State({"w": nnx.Param(jnp.zeros((4, 4)))})
    mesh = sharding.make_mesh("fsdp=8")
    with pytest.raises(ValueError, match=r"parameter 'w' has no logical_axes"):
        sharding.param_specs(state, sharding.DEFAULT_RULES, mesh)
    specs = sharding.param_specs(state, sharding.DEFAULT_RULES, mesh, allow_missing=True)
    assert specs["w"] == P()
    bad = nnx.State({"w": nnx.Param(jnp.zeros((4, 4)), logical_axes=("embed",))})
    with pytest.raises(ValueError, match=r"parameter 'w': logical axes"):
        sharding.param_specs(bad, sharding.DEFAULT_RULES, mesh)


# ---------------------------------------------------------------------------- batches


def test_shard_batch():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    batch = {"tokens": jnp.arange(24).reshape(8, 3), "temperature": jnp.float32(1.0)}
    placed = sharding.shard_batch(batch, mesh)
    assert placed["tokens"].sharding == sharding.batch_sharding(mesh)
    assert placed["tokens"].sharding.spec == P(("data", "fsdp"))
    assert placed["tokens"].addressable_shards[0].data.shape == (2, 3)
    assert placed["temperature"].sharding == sharding.replicated(mesh)
    np.testing.assert_array_equal(placed["tokens"], batch["tokens"])
    with pytest.raises(ValueError, match=r"'tokens' has leading size 6.*data x fsdp = 4"):
        sharding.shard_batch({"tokens": jnp.zeros((6, 3))}, mesh)
    local = sharding.make_array_from_process_local(batch, mesh)  # one process: same result
    assert local["tokens"].sharding.is_equivalent_to(placed["tokens"].sharding, 2)
    np.testing.assert_array_equal(local["tokens"], batch["tokens"])
    with pytest.raises(ValueError, match=r"'tokens': process 0 has 6 rows"):
        sharding.make_array_from_process_local({"tokens": np.zeros((6, 3))}, mesh)


def test_initialize_distributed_single_process_is_a_no_op():
    sharding.initialize_distributed(None, num_processes=1, process_id=0)
    assert not jax.distributed.is_initialized()
    with pytest.raises(ValueError, match=r"0 <= process_id < num_processes"):
        sharding.initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=2)


# ---------------------------------------------------------------------------- sharded compute


def make_batch(config, batch_size=8, length=9):
    tokens = jax.random.randint(jax.random.key(1), (batch_size, length), 0, config.vocab_size)
    lengths = jnp.array([9, 9, 7, 5, 9, 3, 8, 6])[:batch_size]
    mask = jnp.arange(length)[None, :] < lengths[:, None]  # right padding
    return tokens.astype(jnp.int32), mask


def make_loss(graphdef, rest):
    def loss_fn(params, tokens, mask):
        """Mean negative log-likelihood of the next token over the valid positions."""
        model = nnx.merge(graphdef, params, rest)
        logits = model(tokens[:, :-1], mask[:, :-1])
        logps = token_logprobs(logits, tokens[:, 1:])
        return -masked_mean(logps, mask[:, 1:])

    return loss_fn


_REFERENCES = {}


def reference_value_and_grad(name):
    """Loss and gradients on one device, unsharded (cached per model)."""
    if name not in _REFERENCES:
        graphdef, params, rest = split(name)
        tokens, mask = make_batch(CONFIGS[name])
        fn = compile_fast(
            jax.jit(jax.value_and_grad(make_loss(graphdef, rest))), params, tokens, mask
        )
        _REFERENCES[name] = jax.device_get(fn(params, tokens, mask))
    return _REFERENCES[name]


def assert_sharded_as(tree, shardings):
    flat_specs = jax.tree_util.tree_leaves_with_path(shardings)
    flat_values = jax.tree.leaves(tree)
    assert len(flat_specs) == len(flat_values)
    for (path, expected), value in zip(flat_specs, flat_values, strict=True):
        where = sharding._path_str(path)
        assert value.sharding.spec == expected.spec, where
        assert value.sharding.mesh == expected.mesh, where
        shard_shape = expected.shard_shape(value.shape)
        assert all(s.data.shape == shard_shape for s in value.addressable_shards), where


@pytest.mark.parametrize(
    ("name", "mesh_spec"),
    [
        ("llama8", "data=8"),
        ("llama8", "fsdp=8"),
        ("llama8", "tensor=8"),
        ("llama8", "data=2,fsdp=2,tensor=2"),
        ("llama8", "data=2,fsdp=4"),
        ("gpt2", "data=2,fsdp=2,tensor=2"),
    ],
)
def test_sharded_forward_backward_equals_one_device(name, mesh_spec):
    ref_loss, ref_grads = reference_value_and_grad(name)
    graphdef, params, rest = split(name)
    tokens, mask = make_batch(CONFIGS[name])
    mesh = sharding.make_mesh(mesh_spec)
    shardings = sharding.param_shardings(params, mesh)
    params = sharding.shard_params(params, mesh)
    tokens, mask = sharding.shard_batch((tokens, mask), mesh)
    assert_sharded_as(params, shardings)
    fn = jax.jit(  # traced on the mesh: the activations' batch constraints in force
        sharding.on_mesh(jax.value_and_grad(make_loss(graphdef, rest)), mesh),
        in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.batch_sharding(mesh)),
        out_shardings=(sharding.replicated(mesh), shardings),
    )
    loss, grads = compile_fast(fn, params, tokens, mask)(params, tokens, mask)
    assert_sharded_as(grads, shardings)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(g), r, rtol=1e-5, atol=1e-5, err_msg=sharding._path_str(path)
        )


def test_activations_keep_the_batch_split_only_when_traced_on_a_mesh():
    """:func:`rljax.sharding.on_mesh` makes the model constrain its residual stream to the
    batch axes (data x fsdp) at every layer; outside it, or on a mesh whose batch axes have one
    device, the program has no such constraint."""
    graphdef, params, rest = split("llama8")
    tokens, mask = make_batch(CONFIGS["llama8"])
    loss = make_loss(graphdef, rest)

    def constraints(fn):
        text = jax.jit(fn).lower(params, tokens, mask).as_text()
        return text.count("sharding_constraint"), '{"data", "fsdp"}' in text

    assert constraints(loss) == (0, False)
    count, batch_axes = constraints(sharding.on_mesh(loss, sharding.make_mesh("data=2,fsdp=4")))
    assert count >= 2 and batch_axes  # in and out of the scanned layer
    assert constraints(sharding.on_mesh(loss, sharding.make_mesh("tensor=8")))[0] == 0
    x = jnp.ones((3, 4))  # a leading size the batch axes do not divide: left as it is
    assert sharding.constrain_batch(x) is x


def test_sharded_adam_step_equals_unsharded():
    graphdef, params, rest = split("llama8")
    tokens, mask = make_batch(CONFIGS["llama8"])
    learning_rate = 1e-2
    optimizer = optax.adam(learning_rate)
    loss_fn = make_loss(graphdef, rest)

    def step(state, tokens, mask):
        params, opt_state, count = state
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, count + 1), loss

    state = (params, optimizer.init(params), jnp.zeros((), jnp.int32))
    # The unsharded reference runs first: donating the placed state below may delete the
    # arrays it was placed from.
    reference = compile_fast(jax.jit(step), state, tokens, mask)
    ref_state, ref_losses = state, []
    for _ in range(2):
        ref_state, loss = reference(ref_state, tokens, mask)
        ref_losses.append(loss)
    ref_state = jax.device_get(ref_state)

    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    state_shardings = sharding.train_state_shardings(state, mesh)
    param_shardings = sharding.param_shardings(params, mesh)
    adam_shardings = state_shardings[1][0]
    assert adam_shardings.mu == param_shardings
    assert adam_shardings.nu == param_shardings
    assert adam_shardings.count == sharding.replicated(mesh)
    assert state_shardings[2] == sharding.replicated(mesh)

    placed = sharding.shard_train_state(state, mesh)
    assert_sharded_as(placed, state_shardings)
    batch = sharding.shard_batch((tokens, mask), mesh)
    sharded_step = jax.jit(
        step,
        in_shardings=(
            state_shardings,
            sharding.batch_sharding(mesh),
            sharding.batch_sharding(mesh),
        ),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    sharded_step = compile_fast(sharded_step, placed, *batch)
    losses = []
    for _ in range(2):  # a compiled step rejects inputs sharded otherwise: the output state
        placed, loss = sharded_step(placed, *batch)  # must come back as it went in
        losses.append(loss)
    assert_sharded_as(placed, state_shardings)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    # Adam's moments are smooth functions of the gradients: float32 tolerance. Its step
    # lr * m / (sqrt(v) + eps) is ~lr in size whatever the gradient's size, so a gradient that
    # nearly cancels (float32 reassociation changes its low digits) moves by up to lr times
    # its relative error: the parameters agree to 1e-3 * lr.
    adam, ref_adam = placed[1][0], ref_state[1][0]
    tolerances = [
        (placed[0], ref_state[0], 1e-3 * learning_rate),
        (adam.mu, ref_adam.mu, 1e-6),
        (adam.nu, ref_adam.nu, 1e-9),
    ]
    for tree, ref_tree, atol in tolerances:
        for (path, x), r in zip(
            jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(ref_tree), strict=True
        ):
            np.testing.assert_allclose(
                np.asarray(x), r, rtol=1e-5, atol=atol, err_msg=sharding._path_str(path)
            )
    assert int(adam.count) == int(placed[2]) == 2
