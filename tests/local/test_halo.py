"""The `halo` layer (HaloNet [72]): equals dense softmax attention under the haloed-block mask built with loops, with
the row + column relative logits; halo 0 is window attention; captured weights; gradients; errors."""

import itertools
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from local_reference import normal, random_params

import attn
from attn import functional as F


def loop_halo_mask(spatial, block, halo):
    """bool [N, N]: key (kr, kc) is in the haloed window of the query's block."""
    coords = list(itertools.product(*[range(n) for n in spatial]))
    mask = np.zeros((len(coords), len(coords)), bool)
    for a, (qr, qc) in enumerate(coords):
        top, left = (qr // block[0]) * block[0], (qc // block[1]) * block[1]
        for b, (kr, kc) in enumerate(coords):
            mask[a, b] = (top - halo[0] <= kr < top + block[0] + halo[0]) and (
                left - halo[1] <= kc < left + block[1] + halo[1]
            )
    return mask


def loop_offsets(spatial, block, halo, mask):
    """int [N, N] row and column indices into the relative tables (key - query + b + h - 1; 0 where masked)."""
    coords = list(itertools.product(*[range(n) for n in spatial]))
    rows = np.zeros(mask.shape, int)
    cols = np.zeros(mask.shape, int)
    for a, (qr, qc) in enumerate(coords):
        for b, (kr, kc) in enumerate(coords):
            if mask[a, b]:
                rows[a, b] = kr - qr + block[0] + halo[0] - 1
                cols[a, b] = kc - qc + block[1] + halo[1] - 1
    return rows, cols


def halo_reference(params, x, block, halo, rel_pos):
    mask = loop_halo_mask(x.shape[1:-1], block, halo)
    rows, cols = loop_offsets(x.shape[1:-1], block, halo, mask)
    return _dense(params, x, mask, rows, cols, rel_pos)


@partial(jax.jit, static_argnames="rel_pos")
def _dense(params, x, mask, rows, cols, rel_pos):
    p = nn.meta.unbox(params)["params"]
    batch, *spatial, features = x.shape
    tokens = int(np.prod(spatial))
    flat = x.reshape(batch, tokens, features)
    q, k, v = (jnp.einsum("bne,ehd->bnhd", flat, p[n]["kernel"]) for n in ("query", "key", "value"))
    scale = q.shape[-1] ** -0.5
    bias = None
    if rel_pos:
        table = p["rel_height"][rows] + p["rel_width"][cols]  # [N, N, D]
        bias = jnp.einsum("bnhd,nmd->bhnm", q, table) * scale
    out = F.softmax_attention(q, k, v, mask=jnp.asarray(mask)[None, None], bias=bias, scale=scale)
    return jnp.einsum("bnhd,hde->bne", out, p["out"]["kernel"]).reshape(x.shape)


@pytest.mark.parametrize(
    "spatial, block, halo, rel_pos, kv_heads",
    [((6, 8), (3, 4), (1, 1), True, 2), ((7, 5), (3, 2), (2, 1), True, None), ((5, 5), (2, 2), (1, 1), False, 1)],
    ids=["divisible_gqa", "partial_blocks", "mqa_no_rel"],
)
def test_layer_equals_dense_masked_reference(spatial, block, halo, rel_pos, kv_heads):
    layer = attn.build(
        "halo", num_heads=4, head_dim=8, num_kv_heads=kv_heads, block_size=block, halo_size=halo, rel_pos=rel_pos
    )
    x = normal((2, *spatial, 16))
    params = random_params(layer, x)
    out = jax.jit(layer.apply)(params, x)
    np.testing.assert_allclose(out, halo_reference(params, x, block, halo, rel_pos), atol=3e-5, rtol=1e-5)


def test_zero_halo_is_window_attention():
    x = normal((2, 6, 4, 8))
    halo = attn.build("halo", num_heads=2, head_dim=4, block_size=(3, 2), halo_size=0, rel_pos=False)
    window = attn.build("window", num_heads=2, head_dim=4, window_size=(3, 2))
    params = random_params(window, x)
    np.testing.assert_allclose(jax.jit(halo.apply)(params, x), jax.jit(window.apply)(params, x), atol=2e-5)


def test_captured_weights_gradients_and_relative_tables():
    spatial, block, halo = (5, 6), (2, 3), (1, 2)
    layer = attn.build("halo", num_heads=2, head_dim=4, block_size=block, halo_size=halo)
    x = normal((1, *spatial, 8))
    params = random_params(layer, x)
    assert nn.meta.unbox(params)["params"]["rel_height"].shape == (2 * (2 + 1) - 1, 4)
    assert nn.meta.unbox(params)["params"]["rel_width"].shape == (2 * (3 + 2) - 1, 4)
    _, state = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(params, x)
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (1, 2, 30, 30)
    assert np.all(np.asarray(weights)[..., ~loop_halo_mask(spatial, block, halo)] == 0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)

    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    unboxed = nn.meta.unbox(grads)["params"]
    assert float(jnp.abs(unboxed["rel_height"]).sum()) > 0 and float(jnp.abs(unboxed["rel_width"]).sum()) > 0


def test_errors():
    x = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match=r"block_size=\(5, 5\) must be between 1 and the extent on every axis"):
        attn.build("halo", num_heads=2, head_dim=4, block_size=5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"halo_size=-1 must be a non-negative int"):
        attn.build("halo", num_heads=2, head_dim=4, block_size=2, halo_size=-1).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x must have rank 4 \[batch, height, width, embed\]"):
        attn.build("halo", num_heads=2, head_dim=4, block_size=2).init(jax.random.key(0), jnp.zeros((1, 4, 8)))
