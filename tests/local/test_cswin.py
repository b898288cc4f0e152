"""The `cswin` layer (CSWin [34]): half the heads in horizontal and half in vertical stripes, equal to dense softmax
attention under per-head stripe masks built with loops, plus LePE (a depthwise 3x3 conv on V inside each stripe,
written here with loops); full stripes are softmax; captured weights; gradients; errors."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from local_reference import normal, random_params

import attn
from attn import functional as F


def loop_stripe_mask(spatial, sw, horizontal):
    """bool [N, N]: same band of sw rows (horizontal) or sw columns (vertical)."""
    coords = list(itertools.product(*[range(n) for n in spatial]))
    axis = 0 if horizontal else 1
    return np.array([[qc[axis] // sw == kc[axis] // sw for kc in coords] for qc in coords])


def loop_lepe(v, kernel, bias, sw, horizontal):
    """Depthwise 3x3 conv of v [B, H, W, C] with zero padding at the image and stripe borders (loops)."""
    out = np.broadcast_to(np.asarray(bias), v.shape).copy()
    height, width = v.shape[1:3]
    axis = 0 if horizontal else 1
    for r, c, dr, dc in itertools.product(range(height), range(width), (-1, 0, 1), (-1, 0, 1)):
        rr, cc = r + dr, c + dc
        if 0 <= rr < height and 0 <= cc < width and (rr, cc)[axis] // sw == (r, c)[axis] // sw:
            out[:, r, c] += np.asarray(kernel)[dr + 1, dc + 1, 0] * np.asarray(v)[:, rr, cc]
    return out


def cswin_reference(params, x, sw, lepe):
    p = nn.meta.unbox(params)["params"]
    batch, height, width, features = x.shape
    flat = x.reshape(batch, height * width, features)
    q, k, v = (jnp.einsum("bne,ehd->bnhd", flat, p[n]["kernel"]) for n in ("query", "key", "value"))
    heads, kv_heads = q.shape[2], k.shape[2]
    outputs = []
    for branch, horizontal in enumerate((True, False)):
        hs = slice(branch * heads // 2, (branch + 1) * heads // 2)
        ks = slice(branch * kv_heads // 2, (branch + 1) * kv_heads // 2)
        mask = jnp.asarray(loop_stripe_mask((height, width), sw, horizontal))[None, None]
        out = F.softmax_attention(q[:, :, hs], k[:, :, ks], v[:, :, ks], mask=mask)
        if lepe:
            vh = jnp.repeat(v[:, :, ks], (heads // 2) // (kv_heads // 2), axis=2)
            grid = vh.reshape(batch, height, width, -1)
            conv = p["lepe_horizontal" if horizontal else "lepe_vertical"]
            out = out + loop_lepe(grid, conv["kernel"], conv["bias"], sw, horizontal).reshape(out.shape)
        outputs.append(out)
    out = jnp.concatenate(outputs, axis=2)
    return jnp.einsum("bnhd,hde->bne", out, p["out"]["kernel"]).reshape(x.shape)


@pytest.mark.parametrize(
    "spatial, sw, lepe, kv_heads",
    [((6, 4), 2, True, None), ((5, 7), 2, False, 2), ((4, 6), 3, True, 2)],
    ids=["lepe", "partial_stripes_gqa", "lepe_partial_gqa"],
)
def test_layer_equals_dense_masked_reference(spatial, sw, lepe, kv_heads):
    layer = attn.build("cswin", num_heads=4, head_dim=4, num_kv_heads=kv_heads, stripe_width=sw, lepe=lepe)
    x = normal((2, *spatial, 8))
    params = random_params(layer, x)
    out = jax.jit(layer.apply)(params, x)
    np.testing.assert_allclose(out, cswin_reference(params, x, sw, lepe), atol=3e-5, rtol=1e-5)


def test_full_stripes_without_lepe_are_softmax():
    layer = attn.build("cswin", num_heads=2, head_dim=4, stripe_width=4, lepe=False)
    softmax = attn.build("softmax", num_heads=2, head_dim=4, position="none")
    x = normal((2, 4, 4, 8))
    params = random_params(layer, x)
    ref = jax.jit(softmax.apply)(params, x.reshape(2, 16, 8)).reshape(x.shape)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), ref, atol=2e-5)


def test_captured_weights_and_gradients():
    spatial, sw = (4, 6), 2
    layer = attn.build("cswin", num_heads=2, head_dim=4, stripe_width=sw)
    x = normal((1, *spatial, 8))
    params = random_params(layer, x)
    _, state = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(params, x)
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (1, 2, 24, 24)
    for head, horizontal in enumerate((True, False)):
        allowed = loop_stripe_mask(spatial, sw, horizontal)
        assert np.all(np.asarray(weights)[0, head][~allowed] == 0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)

    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(nn.meta.unbox(grads)["params"]["lepe_vertical"]["kernel"]).sum()) > 0


def test_errors():
    x = jnp.zeros((1, 4, 6, 8))
    with pytest.raises(ValueError, match=r"num_heads=3 must be even"):
        attn.build("cswin", num_heads=3, head_dim=4, stripe_width=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"num_kv_heads=1 must be even"):
        attn.build("cswin", num_heads=2, head_dim=4, num_kv_heads=1, stripe_width=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"stripe_width=5 must be an int between 1 and min\(height, width\) = 4"):
        attn.build("cswin", num_heads=2, head_dim=4, stripe_width=5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x must have rank 4"):
        attn.build("cswin", num_heads=2, head_dim=4, stripe_width=2).init(jax.random.key(0), jnp.zeros((1, 4, 8)))
