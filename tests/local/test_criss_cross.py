"""The `criss_cross` layer (CCNet [180]): each step equals dense softmax attention under the row-or-column mask
(built with loops) plus the gamma-gated residual; R = 2 reaches every pixel and R = 1 only the row and column
(gradient support); gamma starts at 0; captured weights; gradients; errors."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from local_reference import normal, random_params

import attn
from attn import functional as F


def loop_cross_mask(height, width):
    """bool [N, N]: the key shares the query's row or column (the query itself once)."""
    coords = list(itertools.product(range(height), range(width)))
    return np.array([[qr == kr or qc == kc for kr, kc in coords] for qr, qc in coords])


def criss_cross_reference(params, x, recurrence, scale):
    p = nn.meta.unbox(params)["params"]
    batch, height, width, features = x.shape
    mask = jnp.asarray(loop_cross_mask(height, width))[None, None]
    h = x.reshape(batch, height * width, features)
    for _ in range(recurrence):
        q, k, v = (jnp.einsum("bne,ehd->bnhd", h, p[n]["kernel"]) for n in ("query", "key", "value"))
        out = F.softmax_attention(q, k, v, mask=mask, scale=scale)
        h = h + p["gamma"] * jnp.einsum("bnhd,hde->bne", out, p["out"]["kernel"])
    return h.reshape(x.shape)


@pytest.mark.parametrize(
    "spatial, recurrence, kv_heads, scale", [((4, 5), 1, None, 1.0), ((5, 3), 2, 1, None)], ids=["r1", "r2_mqa"]
)
def test_layer_equals_dense_masked_reference(spatial, recurrence, kv_heads, scale):
    layer = attn.build(
        "criss_cross",
        num_heads=2,
        head_dim=8,
        num_kv_heads=kv_heads,
        qk_reduction=2,
        recurrence=recurrence,
        scale=scale,
    )
    x = normal((2, *spatial, 8))
    params = random_params(layer, x)
    assert nn.meta.unbox(params)["params"]["query"]["kernel"].shape == (8, 2, 4)  # head_dim // qk_reduction
    expected_scale = 4**-0.5 if scale is None else scale
    out = jax.jit(layer.apply)(params, x)
    np.testing.assert_allclose(out, criss_cross_reference(params, x, recurrence, expected_scale), atol=3e-5, rtol=1e-5)


def test_two_steps_reach_every_pixel_and_one_step_only_the_cross():
    height, width = 4, 5
    x = normal((1, height, width, 8))
    cross = loop_cross_mask(height, width)[0].reshape(height, width)  # pixels on the path of (0, 0)

    def reach(recurrence):
        """bool [H, W]: input pixels with a non-zero gradient on output pixel (0, 0)."""
        layer = attn.build("criss_cross", num_heads=1, head_dim=8, recurrence=recurrence, qk_reduction=2)
        params = random_params(layer, x)
        grad = jax.jit(jax.grad(lambda x: jnp.sum(layer.apply(params, x)[0, 0, 0])))(x)
        return np.abs(np.asarray(grad[0])).sum(-1) > 0

    np.testing.assert_array_equal(reach(1), cross)
    assert reach(2).all()


def test_gamma_starts_at_zero_so_the_layer_starts_as_identity():
    layer = attn.build("criss_cross", num_heads=1, head_dim=8)
    x = normal((1, 3, 4, 8))
    params = layer.init(jax.random.key(0), x)
    assert float(nn.meta.unbox(params)["params"]["gamma"]) == 0.0
    np.testing.assert_array_equal(jax.jit(layer.apply)(params, x), x)


def test_captured_weights_and_gradients():
    height, width = 3, 4
    layer = attn.build("criss_cross", num_heads=2, head_dim=4, qk_reduction=2, recurrence=2)
    x = normal((1, height, width, 8))
    params = random_params(layer, x)
    _, state = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(params, x)
    steps = state["intermediates"]["attention_weights"]
    assert len(steps) == 2
    for weights in steps:
        assert weights.shape == (1, 2, 12, 12)
        assert np.all(np.asarray(weights)[..., ~loop_cross_mask(height, width)] == 0)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)

    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(nn.meta.unbox(grads)["params"]["gamma"])) > 0


def test_errors():
    x = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match=r"recurrence=0 must be a positive int"):
        attn.build("criss_cross", num_heads=1, head_dim=8, recurrence=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"qk_reduction=16 must be an int between 1 and head_dim=8"):
        attn.build("criss_cross", num_heads=1, head_dim=8, qk_reduction=16).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x must have rank 4"):
        attn.build("criss_cross", num_heads=1, head_dim=8).init(jax.random.key(0), jnp.zeros((1, 4, 8)))


def test_gamma_init_opens_the_gate():
    layer = attn.build("criss_cross", num_heads=1, head_dim=8, gamma_init=1.0)
    x = normal((1, 3, 4, 8))
    params = layer.init(jax.random.key(0), x)
    assert float(nn.meta.unbox(params)["params"]["gamma"]) == 1.0
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)
    assert float(jnp.abs(nn.meta.unbox(grads)["params"]["query"]["kernel"]).max()) > 0  # q/k learn from step 0
