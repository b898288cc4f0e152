"""`agent`: reverse-mode gradients equal finite differences in float64."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

import attn


def test_gradients_match_finite_differences():
    """Gradients w.r.t. x [1, 5, 8] and every parameter (2 agents, MQA) equal central differences in float64
    (tolerance 1e-3: agent computes a stage in float32 whatever the dtype)."""
    with jax.enable_x64(True):
        layer = attn.build(
            "agent", num_heads=2, head_dim=4, num_agents=2, num_kv_heads=1, dtype=jnp.float64, param_dtype=jnp.float64
        )
        x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 5, 8)))
        params = {"params": layer.init(jax.random.key(1), x)["params"]}
        forward = jax.jit(lambda x, p: layer.apply(p, x))
        check_grads(forward, (x, params), order=1, modes=("rev",), eps=1e-3, atol=1e-3, rtol=1e-3)
