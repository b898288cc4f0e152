"""The `dilated_neighborhood` layer [131] (DiNA): equals its dense-masked reference, DiNAT's automatic dilation,
dilation 1 is `neighborhood`, errors."""

import jax
import numpy as np
import pytest
from local_reference import dense_attention, layer_reference, loop_mask, loop_relative_bias, normal, random_params

import attn


@pytest.mark.parametrize(
    "spatial, kernel, dilation, expected_dilation, causal",
    [
        ((6, 7), 2, None, (3, 3), False),  # automatic: extent // kernel_size per axis
        ((9, 5), (3, 2), (2, 1), (2, 1), (True, False)),
        ((4, 3, 6), (2, 3, 2), (2, 1, 3), (2, 1, 3), False),
    ],
    ids=["auto", "2d_causal", "3d"],
)
def test_layer_equals_dense_masked_reference(spatial, kernel, dilation, expected_dilation, causal):
    layer = attn.build(
        "dilated_neighborhood", num_heads=2, head_dim=8, kernel_size=kernel, dilation=dilation, causal=causal
    )
    x = normal((2, *spatial, 16))
    params = random_params(layer, x)
    out = jax.jit(layer.apply)(params, x)
    mask = loop_mask(spatial, kernel, expected_dilation, 1, causal)

    def attend(q, k, v, p):
        bias = loop_relative_bias(np.asarray(p["rpb"]), spatial, kernel, expected_dilation, mask)
        return dense_attention(q, k, v, mask, bias)

    np.testing.assert_allclose(out, layer_reference(params, x, attend), atol=3e-5, rtol=1e-5)


def test_dilation_one_is_neighborhood():
    x = normal((1, 6, 5, 8))
    dina = attn.build("dilated_neighborhood", num_heads=2, head_dim=4, kernel_size=3, dilation=1)
    na = attn.build("neighborhood", num_heads=2, head_dim=4, kernel_size=3)
    params = random_params(na, x)
    np.testing.assert_allclose(jax.jit(dina.apply)(params, x), jax.jit(na.apply)(params, x), atol=1e-6)


def test_errors():
    x = normal((1, 6, 6, 8))
    layer = attn.build("dilated_neighborhood", num_heads=2, head_dim=4, kernel_size=3, dilation=(3, 1))
    with pytest.raises(
        ValueError,
        match=r"kernel_size=\(3, 3\) with dilation=\(3, 1\) does not fit spatial_shape=\(6, 6\): axis 0 needs kernel_size \* dilation = 9 <= extent 6",
    ):
        layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"dilation=0 must be None or a positive int or a tuple of them"):
        attn.build("dilated_neighborhood", num_heads=2, head_dim=4, kernel_size=3, dilation=0)
    assert attn.get("dilated_neighborhood").catalog == 131
