"""Token-aware average pooling (TAP) before a ViT block's attention: numpy loops of the official equations, the ViT
wiring (off by default, a no-op with one scale, the residual adds the unpooled tokens) and bad input."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.models.token_pooling import TokenAwarePooling, dilated_average
from attn.models.vit import ViT

VIT = dict(num_classes=3, patch_size=4, num_layers=1, d_model=8, num_heads=2, mlp_dim=16, pool="mean")


def _conv3x3(x, kernel):
    """Zero-padded 3x3 cross-correlation: x [B, h, w, Cin], kernel [3, 3, Cin, Cout] -> [B, h, w, Cout]."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for i in range(h):
        for j in range(w):
            for di in range(3):
                for dj in range(3):
                    out[:, i, j] += padded[:, i + di, j + dj] @ kernel[di, dj]
    return out


def _numpy_tap(x, params, num_scales, eps=1e-5):
    """The module docstring's equations with explicit loops: x [B, h, w, C] -> [B, h, w, C]."""
    scores = _conv3x3(x, params["predict_in"]["kernel"])
    mean = scores.mean(axis=(1, 2), keepdims=True)
    var = scores.var(axis=(1, 2), keepdims=True)
    scores = (scores - mean) / np.sqrt(var + eps) * params["predict_norm"]["scale"] + params["predict_norm"]["bias"]
    scores = _conv3x3(scores, params["predict_out"]["kernel"])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    b, h, w, c = x.shape
    out = np.zeros_like(x)
    for k in range(num_scales):
        pooled = np.zeros_like(x)
        for i in range(h):
            for j in range(w):
                if k == 0:
                    pooled[:, i, j] = x[:, i, j]
                    continue
                total = np.zeros((b, c))
                for u in (-1, 0, 1):
                    for v in (-1, 0, 1):
                        if 0 <= i + k * u < h and 0 <= j + k * v < w:
                            total += x[:, i + k * u, j + k * v]
                pooled[:, i, j] = total / 9.0
        out += weights[..., k : k + 1] * pooled
    return out


def test_tap_matches_numpy_loops():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5, 3))
    module = TokenAwarePooling(grid=(4, 5), num_scales=3)
    params = flax.linen.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((2, 20, 3)))["params"])
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    got = jax.jit(lambda p, t: module.apply({"params": p}, t))(params, jnp.asarray(x.reshape(2, 20, 3), jnp.float32))
    expected = _numpy_tap(x, jax.tree_util.tree_map(np.asarray, params), 3)
    np.testing.assert_allclose(np.asarray(got).reshape(2, 4, 5, 3), expected, rtol=2e-4, atol=2e-5)


def test_dilated_average_of_ones_counts_the_neighbours_inside_the_grid():
    out = np.asarray(dilated_average(jnp.ones((1, 4, 4, 1)), 2))[0, :, :, 0]
    assert out[0, 0] == pytest.approx(4 / 9)  # (0,0), (0,2), (2,0), (2,2)
    assert out[2, 2] == pytest.approx(4 / 9)  # rows and columns 0, 2 only (4 is outside)
    assert np.array_equal(np.asarray(dilated_average(jnp.arange(4.0).reshape(1, 2, 2, 1), 0)).ravel(), np.arange(4.0))


def _vit_pair(**tap_fields):
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    plain, tap = ViT(**VIT), ViT(**VIT, token_pooling="tap", **tap_fields)
    shapes = flax.linen.unbox(jax.eval_shape(tap.init, jax.random.key(0), images)["params"])
    rng = np.random.default_rng(3)  # random parameters: no init to compile
    tap_params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
    plain_params = {k: v for k, v in tap_params.items()}
    plain_params["layers_0"] = {k: v for k, v in tap_params["layers_0"].items() if k != "token_pooling"}
    return images, plain, plain_params, tap, tap_params


def test_vit_is_off_by_default_and_one_scale_is_the_plain_block_bit_for_bit():
    images, plain, plain_params, tap, tap_params = _vit_pair(token_pooling_scales=1)
    default_params = flax.linen.unbox(jax.eval_shape(plain.init, jax.random.key(0), images)["params"])
    assert "token_pooling" not in default_params["layers_0"] and ViT(**VIT).token_pooling is None
    assert jax.tree_util.tree_structure(default_params) == jax.tree_util.tree_structure(plain_params)
    run = jax.jit(lambda p, x: (plain.apply({"params": p[0]}, x), tap.apply({"params": p[1]}, x)))
    out_plain, out_tap = run((plain_params, tap_params), images)
    assert np.array_equal(np.asarray(out_plain), np.asarray(out_tap))  # softmax over one scale is 1: TAP(x) = x


def test_residual_adds_the_unpooled_tokens():
    """With the attention's output projection zeroed only the residual path and the MLP remain: TAP (which does
    change the tokens with 4 scales) must not reach them."""
    images, plain, plain_params, tap, tap_params = _vit_pair()
    zero = lambda p: {
        **p,
        "layers_0": {
            **p["layers_0"],
            "attention": {
                **p["layers_0"]["attention"],
                "out": {  # noqa: E731
                    "kernel": jnp.zeros_like(p["layers_0"]["attention"]["out"]["kernel"])
                },
            },
        },
    }
    run = jax.jit(lambda p, x: (plain.apply({"params": p[0]}, x), tap.apply({"params": p[1]}, x)))
    out_plain, out_tap = run((zero(plain_params), zero(tap_params)), images)
    np.testing.assert_array_equal(np.asarray(out_plain), np.asarray(out_tap))
    out_plain, out_tap = run((plain_params, tap_params), images)
    assert not np.allclose(np.asarray(out_plain), np.asarray(out_tap))


def test_bad_fields_are_refused():
    images = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match=r"token_pooling='avg' is not supported; expected one of None, 'tap'"):
        jax.eval_shape(ViT(**VIT, token_pooling="avg").init, jax.random.key(0), images)
    with pytest.raises(ValueError, match=r"token_pooling='tap' pools over the patch grid and needs pool='mean'"):
        jax.eval_shape(ViT(**{**VIT, "pool": "cls"}, token_pooling="tap").init, jax.random.key(0), images)
    with pytest.raises(ValueError, match=r"num_scales=0 must be an int >= 1"):
        jax.eval_shape(ViT(**VIT, token_pooling="tap", token_pooling_scales=0).init, jax.random.key(0), images)
