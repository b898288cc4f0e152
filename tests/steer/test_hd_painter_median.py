"""hd_painter's row median (PAIntA's c = (s - median) / max): equal to numpy's median with ties and odd or even
lengths, its gradient 1/2 on the two middle values, and the gradient of PAIntA's similarity compiles with the batch
tiled unevenly over the test's 8 CPU devices (jnp.median's scatter-add gradient aborts XLA's SPMD partitioner
there, taking the whole process down)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attn.steer.hd_painter import prompt_similarity, row_median


def test_row_median_matches_numpy_and_its_gradient_picks_the_middle():
    rng = np.random.default_rng(0)
    median = jax.jit(row_median)
    for n in (7, 12):
        values = rng.normal(size=(3, n)).astype(np.float32)
        values[0, : (n + 1) // 2] = 0.5  # ties across the middle
        np.testing.assert_allclose(median(values), np.median(values, axis=-1, keepdims=True), rtol=1e-6)
    values = np.array([[4.0, 1.0, 3.0, 2.0], [0.0, 9.0, 5.0, 7.0]], np.float32)
    expected = np.array([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(row_median(v)))(values), expected)


def test_similarity_gradient_compiles_with_an_unevenly_sharded_batch():
    devices = jax.devices()
    assert len(devices) > 2  # conftest's 8 CPU devices: a batch of 2 tiles unevenly
    mesh = Mesh(np.array(devices), ("data",))
    tokens = np.array([[0, 1, 1, 0], [1, 0, 0, 0]], np.float32)

    def loss(weights):
        weights = jax.lax.with_sharding_constraint(weights, NamedSharding(mesh, P("data")))
        return jnp.sum(prompt_similarity(jax.nn.softmax(weights), tokens, (4, 4)))

    weights = jax.random.normal(jax.random.key(0), (2, 2, 16, 4))  # [B, H, N = 4 x 4, L]
    grad = jax.jit(jax.grad(loss))(weights)
    assert grad.shape == weights.shape and np.all(np.isfinite(np.asarray(grad)))
