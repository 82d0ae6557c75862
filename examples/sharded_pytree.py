"""Your own parameter pytree, sharded on a device mesh with rljax.sharding's rules.

Give each array dimension a logical name; ``logical_to_spec`` maps the names to mesh axes
(FSDP over ``fsdp``, Megatron-style over ``tensor``), and plain ``jax.jit`` with those
shardings runs the step. Without 8 devices, 8 CPU devices are simulated (set before jax loads).
Run: ``python examples/sharded_pytree.py`` (seconds). The last line is a JSON summary.
"""

import json
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax
import jax.numpy as jnp
from flax import struct

from rljax import sharding


@struct.dataclass
class MLP:  # any pytree works; a dataclass names its parts
    w1: jax.Array  # [in, hidden]
    b1: jax.Array  # [hidden]
    w2: jax.Array  # [hidden, out]

    def __call__(self, x):
        return jnp.tanh(x @ self.w1 + self.b1) @ self.w2


AXES = MLP(w1=("embed", "mlp"), b1=("mlp",), w2=("mlp", "embed"))  # logical names per dimension
keys = jax.random.split(jax.random.key(0), 4)
params = MLP(jax.random.normal(keys[0], (16, 64)) * 0.25, jnp.zeros(64), jnp.zeros((64, 16)))
x = jax.random.normal(keys[1], (32, 16))
y = jnp.sin(x)
batch = {"x": x, "y": y}

mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
specs = jax.tree.map(
    lambda axes, leaf: sharding.logical_to_spec(axes, sharding.DEFAULT_RULES, mesh, leaf.shape),
    AXES,
    params,
    is_leaf=lambda node: isinstance(node, tuple),
)
shardings = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), specs)


def step(params, batch):  # plain SGD on the squared error; jit partitions it over the mesh
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((p(batch["x"]) - batch["y"]) ** 2))(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss


sharded_step = jax.jit(
    step,
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
)
one_device_step = jax.jit(step)
sharded, single = jax.device_put(params, shardings), params
batch_on_mesh = sharding.shard_batch(batch, mesh)
losses = []
for _ in range(50):
    sharded, loss = sharded_step(sharded, batch_on_mesh)
    single, _ = one_device_step(single, batch)
    losses.append(float(loss))
print(f"mesh {dict(mesh.shape)}; w1 {params.w1.shape} as {specs.w1}, one shard ", end="")
print(f"{sharded.w1.addressable_shards[0].data.shape}; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
diff = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True)
)
print(f"largest difference from the one-device run: {diff:.2e}")
summary = {"devices": mesh.size, "w1_shard": list(sharded.w1.addressable_shards[0].data.shape)}
summary.update(loss_first=losses[0], loss_last=losses[-1], max_diff=diff)
print(json.dumps(summary))
