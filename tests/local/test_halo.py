"""The `halo` layer (HaloNet [72]): equals a (query, window slot) loop with the row + column relative logits, with the
zero-padded border attended (the paper) or masked; halo 0 is window attention; captured weights; gradients; errors."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from local_reference import normal, random_params

import attn


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


def loop_halo_reference(params, x, block, halo, rel_pos, mask_padding):
    """numpy float64, one (query, window slot) pair at a time: every query attends to the (b + 2h) window around its
    block; a slot outside the grid is a zero pixel (key b_k, value b_v: the projections of 0) unless mask_padding
    drops it. Logits (q . k + q . r_row[dr] + q . r_col[dc]) / sqrt(D), offsets d = key - query + b + h - 1."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params)["params"])
    x = np.asarray(x, np.float64)
    batch, rows, cols, _ = x.shape
    heads, head_dim = p["query"]["kernel"].shape[1:]
    groups = heads // p["key"]["kernel"].shape[1]
    proj = lambda n: np.einsum("brce,ehd->brchd", x, p[n]["kernel"]) + p[n].get("bias", 0.0)
    q, k, v = proj("query"), proj("key"), proj("value")
    zero_k = p["key"].get("bias", np.zeros(p["key"]["kernel"].shape[1:]))
    zero_v = p["value"].get("bias", np.zeros(p["value"]["kernel"].shape[1:]))
    out = np.zeros((batch, rows, cols, heads, head_dim))
    for b, r, c, h in itertools.product(range(batch), range(rows), range(cols), range(heads)):
        top, left = (r // block[0]) * block[0] - halo[0], (c // block[1]) * block[1] - halo[1]
        logits, values = [], []
        for kr in range(top, top + block[0] + 2 * halo[0]):
            for kc in range(left, left + block[1] + 2 * halo[1]):
                inside = 0 <= kr < rows and 0 <= kc < cols
                if not inside and mask_padding:
                    continue
                key = k[b, kr, kc, h // groups] if inside else zero_k[h // groups]
                logit = q[b, r, c, h] @ key
                if rel_pos:
                    logit += q[b, r, c, h] @ p["rel_height"][kr - r + block[0] + halo[0] - 1]
                    logit += q[b, r, c, h] @ p["rel_width"][kc - c + block[1] + halo[1] - 1]
                logits.append(logit / math.sqrt(head_dim))
                values.append(v[b, kr, kc, h // groups] if inside else zero_v[h // groups])
        weights = np.exp(np.array(logits) - max(logits))
        out[b, r, c, h] = (weights / weights.sum()) @ np.array(values)
    return np.einsum("brchd,hde->brce", out, p["out"]["kernel"]) + p["out"].get("bias", 0.0)


@pytest.mark.parametrize("mask_padding", [False, True])
@pytest.mark.parametrize(
    "spatial, block, halo, rel_pos, kv_heads, use_bias",
    [
        ((6, 8), (3, 4), (1, 1), True, 2, True),
        ((7, 5), (3, 2), (2, 1), True, None, True),
        ((5, 5), (2, 2), (1, 1), False, 1, False),
    ],
    ids=["divisible_gqa_bias", "partial_blocks_bias", "mqa_no_rel"],
)
def test_layer_equals_loop_reference(spatial, block, halo, rel_pos, kv_heads, use_bias, mask_padding):
    layer = attn.build(
        "halo",
        num_heads=4,
        head_dim=8,
        num_kv_heads=kv_heads,
        block_size=block,
        halo_size=halo,
        rel_pos=rel_pos,
        use_bias=use_bias,
        mask_padding=mask_padding,
    )
    x = normal((2, *spatial, 16))
    params = random_params(layer, x)
    expected = loop_halo_reference(params, x, block, halo, rel_pos, mask_padding)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), expected, atol=3e-5, rtol=1e-5)


def test_padding_settings_differ_only_in_border_blocks():
    """The default attends to the zero padding (so border blocks change); interior blocks are the same either way."""
    x = normal((1, 9, 9, 8))
    options = dict(num_heads=2, head_dim=4, block_size=3, halo_size=1)
    unmasked = attn.build("halo", **options)
    masked = attn.build("halo", mask_padding=True, **options)
    params = random_params(unmasked, x)
    diff = np.abs(np.asarray(unmasked.apply(params, x) - masked.apply(params, x))).max(-1)[0]
    assert diff[3:6, 3:6].max() < 1e-6 and diff[:3].min() > 1e-4 and diff[6:].min() > 1e-4


def test_zero_halo_is_window_attention():
    x = normal((2, 6, 4, 8))
    halo = attn.build("halo", num_heads=2, head_dim=4, block_size=(3, 2), halo_size=0, rel_pos=False)
    window = attn.build("window", num_heads=2, head_dim=4, window_size=(3, 2))
    params = random_params(window, x)
    np.testing.assert_allclose(jax.jit(halo.apply)(params, x), jax.jit(window.apply)(params, x), atol=2e-5)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_captured_weights_gradients_and_relative_tables(mask_padding):
    spatial, block, halo = (6, 9), (2, 3), (1, 2)  # the middle block's window stays inside the grid
    layer = attn.build("halo", num_heads=2, head_dim=4, block_size=block, halo_size=halo, mask_padding=mask_padding)
    x = normal((1, *spatial, 8))
    params = random_params(layer, x)
    assert nn.meta.unbox(params)["params"]["rel_height"].shape == (2 * (2 + 1) - 1, 4)
    assert nn.meta.unbox(params)["params"]["rel_width"].shape == (2 * (3 + 2) - 1, 4)
    _, state = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(params, x)
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (1, 2, 54, 54)
    halo_mask = loop_halo_mask(spatial, block, halo)
    assert np.all(np.asarray(weights)[..., ~halo_mask] == 0)
    # Rows sum to 1 with the padding masked; otherwise to 1 minus the mass on the zero-padded pixels, which only the
    # queries of border blocks (whose window leaves the grid) have.
    window = (block[0] + 2 * halo[0]) * (block[1] + 2 * halo[1])
    border = halo_mask.sum(-1) < window
    row_sums = np.asarray(weights.sum(-1))[0]
    if mask_padding:
        np.testing.assert_allclose(row_sums, 1.0, atol=1e-5)
    else:
        assert border.any() and (~border).any() and np.all(row_sums[:, border] < 1 - 1e-4)
        np.testing.assert_allclose(row_sums[:, ~border], 1.0, atol=1e-5)

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
