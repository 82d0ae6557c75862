"""Tests of :mod:`rljax.checkpoint`: round trips of a sharded train state with a typed RNG key
and a JSON dict, retention, save intervals, interrupted saves, and restoring into shardings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_llama

from rljax import sharding
from rljax.checkpoint import Checkpointer, abstract_like
from rljax.models.transformer import Transformer


def sharded_state(mesh, seed=0):
    """(params, adam state, step) of a tiny Llama with random (incompressible) moments, placed
    on ``mesh``, plus a typed RNG key."""
    config = tiny_llama(intermediate_size=None)  # MLP width 4 x 32
    _, params = nnx.split(Transformer(config, rngs=nnx.Rngs(seed)))
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    leaves, treedef = jax.tree.flatten(opt_state)
    rng = np.random.default_rng(seed)
    opt_state = treedef.unflatten(
        [jnp.asarray(rng.normal(size=np.shape(x)), x.dtype) for x in leaves]
    )
    state = (params, opt_state, jnp.asarray(7 + seed, jnp.int32))
    state = jax.device_put(state, sharding.train_state_shardings(state, mesh))
    return {"train": state, "key": jax.random.key(seed)}


def assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh("data=2,fsdp=2,tensor=2")


def test_round_trip_restores_values_shardings_key_and_extra(tmp_path, mesh):
    state = sharded_state(mesh)
    extra = {"data_position": 1234, "config": {"beta": 0.1, "loss_type": ["sigmoid"]}, "seed": 3}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(5, state, extra)
        ckpt.wait()
        assert ckpt.latest_step() == 5
        restored, restored_extra = ckpt.restore(abstract_state=abstract_like(state))
    assert restored_extra == extra
    assert_same(restored, state)
    assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    q, q_restored = state["train"][0]["layers"]["q"], restored["train"][0]["layers"]["q"]
    assert q_restored.sharding == q.sharding
    assert "fsdp" in str(q.sharding.spec)
    pairs = zip(jax.tree.leaves(state["train"]), jax.tree.leaves(restored["train"]), strict=True)
    for x, y in pairs:
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim)
    # A fresh Checkpointer on the same directory resumes from it.
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.latest_step() == 5
    again, _ = ckpt.restore(5, abstract_state=abstract_like(state))
    assert_same(again, state)
    ckpt.close()


def test_restore_into_other_shardings(tmp_path, mesh):
    state = sharded_state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), state
        )
        restored, extra = ckpt.restore(abstract_state=abstract)
    assert extra == {}
    assert_same(restored, state)
    assert all(x.sharding == one_device for x in jax.tree.leaves(restored["train"]))


def test_max_to_keep_and_save_interval(tmp_path, mesh):
    state = sharded_state(mesh)
    with Checkpointer(tmp_path / "keep", max_to_keep=2) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, state, {"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.restore(3, abstract_like(state))[1] == {"step": 3}
        with pytest.raises(FileNotFoundError, match="steps on disk"):
            ckpt.restore(1, abstract_like(state))
    with Checkpointer(tmp_path / "interval", save_interval_steps=2) as ckpt:
        assert ckpt.save(2, state)
        assert not ckpt.save(3, state)
        assert ckpt.save(3, state, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
    with Checkpointer(tmp_path / "empty") as ckpt, pytest.raises(FileNotFoundError):
        ckpt.restore()
    with Checkpointer(tmp_path / "bad") as ckpt, pytest.raises(TypeError, match="JSON"):
        ckpt.save(1, state, {"array": np.zeros(2)})


def test_unfinished_save_is_ignored(tmp_path, mesh):
    state = sharded_state(mesh)
    directory = tmp_path / "ckpt"
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, state, {"data_position": 10})
    # What a save killed midway leaves behind: a temporary folder, never renamed.
    (directory / "2.orbax-checkpoint-tmp-1700000000").mkdir()
    (directory / "2.orbax-checkpoint-tmp-1700000000" / "state").mkdir()
    with Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() == 1
        restored, extra = ckpt.restore(abstract_state=abstract_like(state))
    assert extra == {"data_position": 10}
    assert_same(restored, state)


_KILLED_SAVE = textwrap.dedent(
    """
    import sys, numpy as np, jax, jax.numpy as jnp
    from rljax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    small = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64,)))}
    ckpt.save(1, small, {"position": 1})
    ckpt.wait()
    big = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(64, 1024, 1024)))}
    ckpt.save(2, big, {"position": 2})  # asynchronous: returns before the files are written
    print("saving", flush=True)
    ckpt.wait()
    print("done", flush=True)
    """
)


def test_killed_save_leaves_previous_step_restorable(tmp_path):
    directory = tmp_path / "killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "saving"
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with Checkpointer(directory) as ckpt:
        if ckpt.latest_step() == 2:
            pytest.skip("the 512 MB save finished before the kill arrived")
        assert ckpt.latest_step() == 1
        abstract = {"w": jax.ShapeDtypeStruct((64,), jnp.float32)}
        restored, extra = ckpt.restore(abstract_state=abstract)
    assert extra == {"position": 1}
    np.testing.assert_array_equal(
        restored["w"], np.random.default_rng(0).normal(size=(64,)).astype(np.float32)
    )
