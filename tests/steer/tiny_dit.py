"""A tiny DiT with parameters moved off their initialisation, shared by the diffusion steering tests."""

import functools

import jax
import jax.numpy as jnp

from attn.models import DiT

B, S, L = 2, 8, 5
NOISE = jax.random.normal(jax.random.key(0), (B, S, S, 3))
TIMES = jnp.array([0.25, 0.8])
CAPTIONS = jnp.array([[1, 5, 8, 2, 6], [3, 4, 8, 1, 7]], jnp.int32)  # "red circle left green square" etc.
CONCEPTS = [(0, 1), (3, 4)]


def tiny_dit(**fields) -> DiT:
    base = dict(vocab_size=9, num_layers=1, d_model=16, num_heads=2, mlp_dim=32, patch_size=4, max_caption_len=L)
    return DiT(**{**base, "caption_layers": 0, **fields})


@jax.jit
def _perturb(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


@functools.lru_cache(maxsize=4)
def init_params(model: DiT):
    """Parameters (no "params" wrapper) off the adaLN-zero start, so attention reaches the output."""
    return _perturb(jax.jit(model.init)(jax.random.key(1), NOISE, TIMES, CAPTIONS)["params"])
