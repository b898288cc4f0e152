"""The softmax-only decoder's parts (Jha & Reagen 2025): norm "none" is the identity without parameters and the
"linear" MLP is x W_in W_out without an activation."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from attn.models.layers import Mlp, make_norm


def test_norm_none_is_the_identity_without_parameters():
    norm = make_norm("none", dtype=jnp.float32, param_dtype=jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)), jnp.float32)
    variables = norm.init(jax.random.key(0), x)
    assert jax.tree_util.tree_leaves(variables) == []
    np.testing.assert_array_equal(np.asarray(norm.apply(variables, x)), np.asarray(x))


def test_linear_mlp_is_two_matrix_products():
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    mlp = Mlp(8, "linear")
    params = flax.linen.unbox(mlp.init(jax.random.key(0), jnp.asarray(x))["params"])
    expected = np.einsum("bte,em,mf->btf", x, np.asarray(params["wi"]["kernel"]), np.asarray(params["wo"]["kernel"]))
    np.testing.assert_allclose(
        np.asarray(mlp.apply({"params": params}, jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6
    )
