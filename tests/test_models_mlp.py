import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.models.mlp import Actor, Critic, pure


def test_actor_categorical_and_gaussian_shapes_and_pure_equals_module():
    obs = jax.random.normal(jax.random.key(0), (5, 3, 4))
    actor = Actor(4, 2, hidden=(8, 8), rngs=nnx.Rngs(0))
    fn, params = pure(actor)
    np.testing.assert_allclose(jax.jit(fn)(params, obs), actor(obs), rtol=1e-6)
    assert fn(params, obs).shape == (5, 3, 2)

    gaussian = Actor(4, 3, continuous=True, log_std_init=-0.5, rngs=nnx.Rngs(1))
    fn, params = pure(gaussian)
    mean, log_std = fn(params, obs)
    assert mean.shape == (5, 3, 3)
    np.testing.assert_allclose(log_std, [-0.5] * 3)


def test_orthogonal_init_scales():
    actor = Actor(4, 2, hidden=(64, 64), rngs=nnx.Rngs(0))
    w = np.asarray(actor.torso.layers[1].kernel[...])
    np.testing.assert_allclose(w.T @ w, 2.0 * np.eye(64), atol=1e-4)  # orthogonal * sqrt(2)
    head = np.asarray(actor.head.kernel[...])
    np.testing.assert_allclose(head.T @ head, 1e-4 * np.eye(2), atol=1e-7)  # scale 0.01
    assert not np.any(np.asarray(actor.head.bias[...]))


def test_gradients_flow_through_pure_params_only():
    critic = Critic(4, hidden=(8,), rngs=nnx.Rngs(0))
    fn, params = pure(critic)
    obs = jnp.ones((3, 4))
    grads = jax.grad(lambda p: jnp.sum(fn(p, obs) ** 2))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert fn(params, obs).shape == (3,)
