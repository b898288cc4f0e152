"""The `generalized_neighborhood` layer [125] (GNA): equals its dense-masked reference for strided, dilated and
causal windows in 1-D/2-D/3-D; stride 1 is `neighborhood`; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from local_reference import dense_attention, layer_reference, loop_mask, normal, random_params

import attn


@pytest.mark.parametrize(
    "spatial, kernel, stride, dilation, causal",
    [
        ((10,), 4, 3, 2, False),
        ((7, 6), (4, 3), (2, 3), (1, 2), (False, True)),
        ((5, 4, 3), (3, 2, 3), (3, 2, 2), 1, (True, False, False)),
    ],
    ids=["1d", "2d", "3d"],
)
def test_layer_equals_dense_masked_reference(spatial, kernel, stride, dilation, causal):
    layer = attn.build(
        "generalized_neighborhood",
        num_heads=4,
        head_dim=8,
        num_kv_heads=2,
        kernel_size=kernel,
        stride=stride,
        dilation=dilation,
        causal=causal,
    )
    x = normal((2, *spatial, 16))
    params = random_params(layer, x)
    assert "rpb" not in params["params"]  # GNA has no positional bias by default
    out = jax.jit(layer.apply)(params, x)
    mask = loop_mask(spatial, kernel, dilation, stride, causal)
    ref = layer_reference(params, x, lambda q, k, v, p: dense_attention(q, k, v, mask))
    np.testing.assert_allclose(out, ref, atol=3e-5, rtol=1e-5)


def test_stride_one_is_neighborhood():
    x = normal((1, 5, 6, 8))
    gna = attn.build("generalized_neighborhood", num_heads=2, head_dim=4, kernel_size=(3, 4), rpb=True)
    na = attn.build("neighborhood", num_heads=2, head_dim=4, kernel_size=(3, 4))
    params = random_params(na, x)
    np.testing.assert_allclose(jax.jit(gna.apply)(params, x), jax.jit(na.apply)(params, x), atol=1e-6)


def test_gradients_match_finite_differences():
    """Reverse-mode gradients w.r.t. x and every parameter equal central differences in float64 (tolerance 1e-3:
    the layer computes a stage in float32 whatever the dtype)."""
    with jax.enable_x64(True):
        layer = attn.build(
            "generalized_neighborhood",
            num_heads=2,
            head_dim=4,
            kernel_size=4,
            stride=2,
            causal=True,
            dtype=jnp.float64,
            param_dtype=jnp.float64,
        )
        x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 6, 8)))
        params = {"params": layer.init(jax.random.key(1), x)["params"]}
        check_grads(
            jax.jit(lambda x, p: layer.apply(p, x)),
            (x, params),
            order=1,
            modes=("rev",),
            eps=1e-3,
            atol=1e-3,
            rtol=1e-3,
        )


def test_errors():
    x = normal((1, 6, 6, 8))
    layer = attn.build("generalized_neighborhood", num_heads=2, head_dim=4, kernel_size=3, stride=(4, 1))
    with pytest.raises(ValueError, match=r"stride=\(4, 1\) must be <= kernel_size=\(3, 3\) on every axis"):
        layer.init(jax.random.key(0), x)
    layer = attn.build("generalized_neighborhood", num_heads=2, head_dim=4, kernel_size=3, stride=(1, 1, 1))
    with pytest.raises(ValueError, match=r"stride=\(1, 1, 1\) has 3 entries but the input has 2 spatial axes"):
        layer.init(jax.random.key(0), x)
