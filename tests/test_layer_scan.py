"""The layer scan over 16-bit (bfloat16) stacks, e.g. a LoRA model's frozen base
(``Transformer.decode``): XLA:CPU widens bfloat16 operations to float32, and a plain scan over a
bfloat16 stack let it hoist a float32 copy of the whole stack (and of the residual stream remat
saves) out of the loop, 4.9 GB of a 7B LoRA step's 12.4 GB per device (benchmarks/RESULTS.md,
memory plan). The scan now reads the stacks per layer; the values and gradients are those of
the same weights held in float32, bit for bit, and the compiled gradient step holds no float32
array of a stack's shape outside a fusion."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rljax.models import lora
from rljax.models.transformer import Transformer, TransformerConfig
from rljax.updates.lm import merge

LAYERS, BATCH, TIME, WIDTH, MLP, VOCAB = 3, 2, 24, 64, 96, 128


def lora_model(base_dtype: str, remat: bool = True) -> Transformer:
    """A tiny Llama in bfloat16 compute with rank-4 adapters (nonzero B) on a base stored in
    ``base_dtype`` holding bfloat16 values either way."""
    config = TransformerConfig.llama(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_layers=LAYERS,
        num_heads=4, num_kv_heads=2, dtype="bfloat16", remat=remat,
    )  # fmt: skip
    model = Transformer(config, rngs=nnx.Rngs(0))
    lora.apply(model, 4, rngs=nnx.Rngs(1), base_dtype="bfloat16")
    for i, name in enumerate(model.lora.targets):
        var = model.layers[f"{name}_lora_b"]
        var.set_value(0.1 * jax.random.normal(jax.random.key(i), var.shape, jnp.float32))
    if base_dtype == "float32":
        for var in model.layers.values():
            if var[...].dtype == jnp.bfloat16:
                var.set_value(var[...].astype(jnp.float32))
    return model


def tokens():
    return jax.random.randint(jax.random.key(5), (BATCH, TIME), 0, VOCAB)


@pytest.mark.parametrize("remat", [False, True])
def test_bfloat16_stacks_give_the_float32_values_and_gradients(remat):
    """Logits and the gradient of every layer parameter (the frozen base's too, which goes
    through the scan's per-layer reads) with the base stored in bfloat16 equal those with the
    same values stored in float32 (the scan's plain path): bit for bit."""
    results = {}
    for dtype in ("bfloat16", "float32"):
        graphdef, params = nnx.split(lora_model(dtype, remat))

        def loss(params, graphdef=graphdef):
            logits = merge(graphdef, params)(tokens()).astype(jnp.float32)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * jnp.arange(TIME)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results[dtype] = logits, {k: v[...] for k, v in grads["layers"].items()}
    (logits16, grads16), (logits32, grads32) = results["bfloat16"], results["float32"]
    np.testing.assert_array_equal(logits16, logits32)
    assert grads16.keys() == grads32.keys()
    for name, g in grads16.items():
        assert g.dtype == (jnp.bfloat16 if "_lora_" not in name else jnp.float32), name
        assert np.any(np.asarray(g, np.float32) != 0), name
        np.testing.assert_array_equal(
            np.asarray(g, np.float32), np.asarray(grads32[name], np.float32), err_msg=name
        )


def materialised_shapes(hlo: str) -> list[str]:
    """The result shapes (``f32[3,64,96]``) of the instructions of a compiled module's text
    outside fused computations: the arrays that get buffers of their own."""
    fused = set(re.findall(r"kind=k\w+, calls=%([\w.\-]+)", hlo))
    shapes, computation = [], None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if header and line.rstrip().endswith("{"):
            computation = header.group(1)
        elif computation not in fused:
            result = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\w+\[[\d,]*\])", line)
            if result:
                shapes.append(result.group(1))
    return shapes


def test_the_gradient_step_holds_no_float32_copy_of_a_bfloat16_stack():
    """The adapters' gradient with remat on a bfloat16 base: no float32 array of the MLP
    stacks' or the saved residual stream's shape outside a fusion (before the per-layer reads:
    9 of the stacks and 2 of the residual stream)."""
    graphdef, params = lora.split(lora_model("bfloat16"))

    def loss(train):
        return jnp.mean(merge(graphdef, lora.combine(train, params))(tokens()).astype(jnp.float32))

    hlo = jax.jit(jax.grad(loss)).lower(lora.trainable(params)).compile().as_text()
    shapes = materialised_shapes(hlo)
    assert f"bf16[{LAYERS},{WIDTH},{MLP}]" in shapes  # the parser sees the stacks
    stacks = [f"[{LAYERS},{WIDTH},{MLP}]", f"[{LAYERS},{MLP},{WIDTH}]"]
    for shape in [*stacks, f"[{LAYERS},{BATCH},{TIME},{WIDTH}]"]:
        assert f"f32{shape}" not in shapes, shape
