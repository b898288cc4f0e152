"""The `neighborhood` layer [75]: equals its dense-masked reference (NA mask + NAT relative position bias), reduces
to `softmax` at full extent, captured weights, gradients, errors, and use inside a ViT."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from local_reference import dense_attention, layer_reference, loop_mask, loop_relative_bias, normal, random_params

import attn
from attn.models import ViT

CASES = [
    # spatial, kernel_size, causal, num_kv_heads
    ((5, 6), (3, 4), False, 2),
    ((7,), 3, True, 1),
    ((3, 4, 3), (3, 2, 2), (False, True, False), None),
]


@pytest.mark.parametrize("spatial, kernel, causal, kv_heads", CASES, ids=["2d", "1d_causal", "3d_causal"])
def test_layer_equals_dense_masked_reference(spatial, kernel, causal, kv_heads):
    layer = attn.build(
        "neighborhood", num_heads=4, head_dim=8, num_kv_heads=kv_heads, kernel_size=kernel, causal=causal
    )
    x = normal((2, *spatial, 16))
    params = random_params(layer, x)
    out = jax.jit(layer.apply)(params, x)
    mask = loop_mask(spatial, kernel, 1, 1, causal)

    def attend(q, k, v, p):
        bias = loop_relative_bias(np.asarray(p["rpb"]), spatial, kernel, 1, mask)
        return dense_attention(q, k, v, mask, bias)

    np.testing.assert_allclose(out, layer_reference(params, x, attend), atol=3e-5, rtol=1e-5)


def test_full_extent_without_bias_is_softmax():
    spatial = (3, 5)
    layer = attn.build("neighborhood", num_heads=4, head_dim=8, num_kv_heads=2, kernel_size=spatial, rpb=False)
    softmax = attn.build("softmax", num_heads=4, head_dim=8, num_kv_heads=2, position="none")
    x = normal((2, *spatial, 16))
    params = random_params(layer, x)
    out = jax.jit(layer.apply)(params, x)
    ref = jax.jit(softmax.apply)(params, x.reshape(2, 15, 16)).reshape(out.shape)
    np.testing.assert_allclose(out, ref, atol=3e-5, rtol=1e-5)


def test_captured_weights_follow_the_mask():
    spatial, kernel = (4, 5), (3, 2)
    layer = attn.build("neighborhood", num_heads=2, head_dim=4, kernel_size=kernel, causal=(True, False))
    x = normal((1, *spatial, 8))
    params = random_params(layer, x)
    _, state = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(params, x)
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (1, 2, 20, 20)
    allowed = loop_mask(spatial, kernel, 1, 1, (True, False))
    assert np.all(np.asarray(weights)[..., ~allowed] == 0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


def test_jit_gradients_finite_and_reach_the_bias():
    layer = attn.build("neighborhood", num_heads=2, head_dim=4, kernel_size=3)
    x = normal((2, 5, 5, 8))
    params = random_params(layer, x)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert float(jnp.abs(nn.meta.unbox(grads)["params"]["rpb"]).sum()) > 0


def test_errors():
    layer = attn.build("neighborhood", num_heads=2, head_dim=4, kernel_size=3)
    x = jnp.zeros((1, 4, 4, 8))
    params = random_params(layer, x)
    with pytest.raises(ValueError, match="decode=True is not supported by the spatial layer NeighborhoodAttention"):
        layer.apply(params, x, decode=True)
    with pytest.raises(ValueError, match="mask is not supported by the spatial layer NeighborhoodAttention"):
        layer.apply(params, x, mask=attn.Mask(causal=True))
    with pytest.raises(ValueError, match=r"context is not supported by the spatial layer NeighborhoodAttention"):
        layer.apply(params, x, context=x)
    with pytest.raises(
        ValueError, match=r"x must have rank 3 or 4 or 5 \[batch, \*spatial \(1 to 3 axes\), embed\], got shape \(8,\)"
    ):
        layer.apply(params, x[0, 0, 0])
    big = attn.build("neighborhood", num_heads=2, head_dim=4, kernel_size=5)
    with pytest.raises(
        ValueError, match=r"kernel_size=\(5, 5\) with dilation=\(1, 1\) does not fit spatial_shape=\(4, 4\)"
    ):
        big.init(jax.random.key(0), x)
    spec = attn.get("neighborhood")
    assert spec.input_kind == "spatial" and spec.supports_causal and not spec.supports_decode and spec.catalog == 75


def test_vit_alternating_neighborhood_and_dilated_layers():
    # DiNAT's recipe: NA and DiNA layers alternate, chosen per layer by the model.
    model = ViT(
        num_classes=3,
        patch_size=2,
        num_layers=2,
        d_model=16,
        num_heads=2,
        mlp_dim=32,
        pool="mean",
        attention=("neighborhood", "dilated_neighborhood"),
        attention_options=({"kernel_size": 3}, {"kernel_size": 3}),
    )
    images = normal((2, 12, 12, 3))
    params = random_params(model, images)
    logits = jax.jit(model.apply)(params, images)
    assert logits.shape == (2, 3) and bool(jnp.isfinite(logits).all())
