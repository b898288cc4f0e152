"""attn.core.windows: partition/unpartition round trips with odd extents and shifts, window membership equals the
shifted-window rule written with loops, and window_attention equals dense softmax attention under the explicit
block-diagonal mask (with bias, GQA, captured probabilities) on 1-D, 2-D and 3-D grids."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import functional as F
from attn.core.windows import (
    dense_window_probs,
    partition_windows,
    unpartition_windows,
    window_attention,
    window_key_mask,
    window_plan,
)

CASES = [
    ((7,), (3,), (0,)),
    ((10,), (4,), (2,)),
    ((5, 7), (2, 3), (1, 2)),
    ((6, 4), (3, 4), (0, 0)),
    ((3, 5, 4), (2, 2, 3), (1, 0, 2)),
]
IDS = ["1d_pad", "1d_shift", "2d_shift_pad", "2d_exact", "3d_shift_pad"]


def loop_windows(spatial, window, shift):
    """Per token (row-major): (window coordinates, slot coordinates inside the window) from the shifted rule
    win(i) = (i + (w - s) % w) // w per axis."""
    out = []
    for c in itertools.product(*[range(n) for n in spatial]):
        shifted = [c[a] + (window[a] - shift[a]) % window[a] for a in range(len(spatial))]
        out.append(
            (
                tuple(p // w for p, w in zip(shifted, window, strict=True)),
                tuple(p % w for p, w in zip(shifted, window, strict=True)),
            )
        )
    return out


def loop_block_mask(spatial, window, shift):
    """bool [N, N]: query and key in the same window."""
    wins = [w for w, _ in loop_windows(spatial, window, shift)]
    return np.array([[a == b for b in wins] for a in wins])


def loop_block_bias(table, spatial, window, shift):
    """float [H, N, N]: table[h, slot(i), slot(j)] (slots row-major inside the window) where i, j share a window."""
    info = loop_windows(spatial, window, shift)
    bias = np.zeros((table.shape[0], len(info), len(info)), np.float32)
    for i, (wi, si) in enumerate(info):
        for j, (wj, sj) in enumerate(info):
            if wi == wj:
                bias[:, i, j] = table[:, np.ravel_multi_index(si, window), np.ravel_multi_index(sj, window)]
    return bias


@pytest.mark.parametrize("spatial, window, shift", CASES, ids=IDS)
def test_partition_round_trip_and_membership(spatial, window, shift):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *spatial, 3, 2)).astype(np.float32)
    windows, valid = partition_windows(x, window, shift, fill=np.nan)
    num_windows, size = valid.shape
    assert windows.shape == (2 * num_windows, size, 3, 2) and size == np.prod(window)
    assert valid.sum() == np.prod(spatial)
    # padded slots hold the fill value, real slots hold real tokens
    assert np.isnan(windows.reshape(2, num_windows, size, -1)[:, ~valid]).all()
    assert not np.isnan(windows.reshape(2, num_windows, size, -1)[:, valid]).any()
    np.testing.assert_array_equal(unpartition_windows(windows, spatial, window, shift), x)
    # jax arrays take the same path
    jax_windows, _ = partition_windows(jnp.asarray(x), window, shift)
    np.testing.assert_array_equal(np.asarray(unpartition_windows(jax_windows, spatial, window, shift)), x)

    # window n holds exactly the tokens the loop rule puts in one window, in row-major slot order
    tokens, _ = partition_windows(np.arange(np.prod(spatial)).reshape(1, *spatial), window, shift, fill=-1)
    info = loop_windows(spatial, window, shift)
    for n in range(num_windows):
        members = tokens[n][valid[n]]
        assert len({info[t][0] for t in members}) == 1
        slots = [np.ravel_multi_index(info[t][1], window) for t in members]
        np.testing.assert_array_equal(np.flatnonzero(valid[n]), slots)
    assert sorted(tokens[valid].tolist()) == list(range(np.prod(spatial)))


@pytest.mark.parametrize("spatial, window, shift", CASES, ids=IDS)
def test_window_attention_equals_block_diagonal_dense_attention(spatial, window, shift):
    rng = np.random.default_rng(1)
    heads, kv_heads, dim = 4, 2, 8
    q = jnp.asarray(rng.standard_normal((2, *spatial, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, *spatial, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, *spatial, kv_heads, 6)), jnp.float32)
    size = int(np.prod(window))
    table = rng.standard_normal((heads, size, size)).astype(np.float32)

    tokens = int(np.prod(spatial))
    mask = jnp.asarray(loop_block_mask(spatial, window, shift))[None, None]
    dense_bias = jnp.asarray(loop_block_bias(table, spatial, window, shift))[None]

    @jax.jit  # one compile per case instead of one per primitive
    def both(q, k, v, table):
        out, aux = window_attention(q, k, v, window=window, shift=shift, bias=table[None], return_probs=True)
        flat = [t.reshape(2, tokens, *t.shape[-2:]) for t in (q, k, v)]
        ref, ref_aux = F.softmax_attention(*flat, mask=mask, bias=dense_bias, return_probs=True)
        return out, dense_window_probs(aux["probs"], spatial, window, shift), ref, ref_aux["probs"]

    out, probs, ref, ref_probs = both(q, k, v, jnp.asarray(table))
    np.testing.assert_allclose(out, ref.reshape(2, *spatial, heads, 6), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-6)


def test_window_attention_without_bias_jit_grad_and_dropout():
    rng = np.random.default_rng(2)
    spatial, window, shift = (5, 6), (2, 4), (1, 3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, *spatial, 2, 4)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(loop_block_mask(spatial, window, shift))[None, None]
    ref = jax.jit(lambda q, k, v: F.softmax_attention(q, k, v, mask=mask))(*(t.reshape(1, 30, 2, 4) for t in (q, k, v)))
    ref = ref.reshape(q.shape)
    attend = jax.jit(lambda q, k, v: window_attention(q, k, v, window=window, shift=shift))
    np.testing.assert_allclose(attend(q, k, v), ref, atol=2e-5)
    grads = jax.jit(jax.grad(lambda q: jnp.sum(attend(q, k, v) ** 2)))(q)
    assert bool(jnp.isfinite(grads).all()) and float(jnp.abs(grads).sum()) > 0

    dropped = jax.jit(
        lambda q, k, v, key: window_attention(q, k, v, window=window, shift=shift, dropout_rate=0.5, dropout_rng=key)
    )
    drop = [dropped(q, k, v, jax.random.key(0)) for _ in range(2)]
    np.testing.assert_array_equal(drop[0], drop[1])
    assert not np.allclose(drop[0], ref, atol=1e-3)


def test_full_window_is_plain_softmax_attention():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 4, 2, 4)), jnp.float32) for _ in range(3))
    ref = jax.jit(F.softmax_attention)(*(t.reshape(2, 12, 2, 4) for t in (q, k, v))).reshape(q.shape)
    np.testing.assert_allclose(jax.jit(lambda *a: window_attention(*a, window=(3, 4)))(q, k, v), ref, atol=2e-5)


def test_key_mask_kinds():
    # no padding: no mask; real keys a prefix of every window (1-D, end padding): key lengths; otherwise dense
    assert window_key_mask(partition_windows(np.zeros((1, 8)), (4,))[1], 2) is None
    lengths = window_key_mask(partition_windows(np.zeros((1, 7)), (3,))[1], 2)
    assert lengths.dense is None
    np.testing.assert_array_equal(lengths.kv_lengths, [3, 3, 1, 3, 3, 1])
    dense = window_key_mask(partition_windows(np.zeros((1, 4, 5)), (2, 2))[1], 2)
    assert dense.kv_lengths is None and dense.dense.shape == (2 * 6, 1, 1, 4)
    assert int(dense.dense.sum()) == 2 * 20


def test_errors_name_the_argument():
    x = jnp.zeros((1, 4, 4, 2, 4))
    with pytest.raises(ValueError, match=r"window=\(5, 5\) must be between 1 and the extent on every axis"):
        window_attention(x, x, x, window=5)
    with pytest.raises(ValueError, match=r"shift=\(2, 2\) must satisfy 0 <= shift < window=\(2, 2\)"):
        window_attention(x, x, x, window=2, shift=2)
    with pytest.raises(ValueError, match=r"window_size=\(3, 9\) must be between"):
        window_plan((4, 4), (3, 9), window_name="window_size")
    assert window_plan((4, 4), (3, 9), clip=True) == ((3, 4), (0, 0), (2, 0))
    with pytest.raises(ValueError, match=r"k and v have spatial shape \(4, 2\) but q has \(4, 4\)"):
        window_attention(x, x[:, :, :2], x[:, :, :2], window=2)
    with pytest.raises(ValueError, match=r"q must have rank 4 or 5 or 6"):
        window_attention(x[0, 0], x[0, 0], x[0, 0], window=2)
    with pytest.raises(ValueError, match=r"window=2 must be a tuple with one int per spatial axis"):
        partition_windows(x, 2)
    with pytest.raises(ValueError, match=r"must be \[batch \* 4 windows, 4 tokens, \.\.\.\]"):
        unpartition_windows(np.zeros((3, 4, 2)), (4, 4), (2, 2))
