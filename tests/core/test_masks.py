"""attn.Mask: dense materialisation equals the naive predicate; tiles and block bounds agree with it."""

import itertools

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import attn


def naive_allowed(
    tq, tk, *, causal=False, window=None, prefix=None, kv_len=None, q_len=None, seg=None, block=None, offset=0
):
    out = np.zeros((tq, tk), bool)
    for i, j in itertools.product(range(tq), range(tk)):
        qi = i + offset
        ok = True
        if causal:
            ok &= j <= qi or (prefix is not None and j < prefix)
        if window is not None:
            ok &= qi - window[0] <= j <= qi + window[1]
        if kv_len is not None:
            ok &= j < kv_len
        if q_len is not None:
            ok &= i < q_len
        if seg is not None:
            ok &= seg[0][i] == seg[1][j]
        if block is not None:
            bm, (bq, bk) = block
            ok &= bool(bm[qi // bq, j // bk])
        out[i, j] = ok
    return out


@settings(max_examples=25, deadline=None)
@given(
    tq=st.integers(1, 9),
    tk=st.integers(1, 9),
    causal=st.booleans(),
    window=st.none() | st.tuples(st.integers(0, 4), st.integers(0, 4)),
    use_prefix=st.booleans(),
    kv_len=st.none() | st.integers(0, 9),
    q_len=st.none() | st.integers(0, 9),
    offset=st.integers(0, 3),
    use_seg=st.booleans(),
    use_block=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_materialize_matches_predicate(
    tq, tk, causal, window, use_prefix, kv_len, q_len, offset, use_seg, use_block, seed
):
    rng = np.random.default_rng(seed)
    prefix = int(rng.integers(0, tk + 1)) if (use_prefix and causal) else None
    seg = (np.sort(rng.integers(0, 3, tq)), np.sort(rng.integers(0, 3, tk))) if use_seg else None
    block = ((rng.random((4, 4)) < 0.6), (3, 3)) if use_block else None
    mask = attn.Mask(
        causal=causal,
        window=window,
        prefix_lengths=None if prefix is None else jnp.array([prefix]),
        kv_lengths=None if kv_len is None else jnp.array([kv_len]),
        q_lengths=None if q_len is None else jnp.array([q_len]),
        q_segment_ids=None if seg is None else jnp.array(seg[0])[None],
        kv_segment_ids=None if seg is None else jnp.array(seg[1])[None],
        block_mask=None if block is None else jnp.array(block[0]),
        block_size=None if block is None else block[1],
    )
    got = np.asarray(mask.materialize(tq, tk, q_offset=offset))
    want = naive_allowed(
        tq,
        tk,
        causal=causal,
        window=window,
        prefix=prefix,
        kv_len=kv_len,
        q_len=q_len,
        seg=seg,
        block=block,
        offset=offset,
    )
    np.testing.assert_array_equal(np.broadcast_to(got, (1, 1, tq, tk))[0, 0], want)
    # Kernels see the same thing tile by tile, and never a visible key outside block_bounds.
    for q0 in range(0, tq, 4):
        qs = min(4, tq - q0)
        lo, hi = mask.block_bounds(q0, qs, q_offset=offset)
        for k0 in range(0, tk, 3):
            ks = min(3, tk - k0)
            tile = np.broadcast_to(np.asarray(mask.tile(q0, qs, k0, ks, q_offset=offset)), (1, 1, qs, ks))[0, 0]
            np.testing.assert_array_equal(tile, want[q0 : q0 + qs, k0 : k0 + ks])
        visible = np.nonzero(want[q0 : q0 + qs].any(0))[0]
        assert all(lo <= j < hi for j in visible)


def test_mask_fn_and_batched_lengths():
    mask = attn.Mask(mask_fn=lambda i, j: (i + j) % 2 == 0, kv_lengths=jnp.array([3, 5]))
    dense = np.asarray(mask.materialize(4, 6))
    assert dense.shape == (2, 1, 4, 6)
    for b, n in enumerate([3, 5]):
        want = np.array([[(i + j) % 2 == 0 and j < n for j in range(6)] for i in range(4)])
        np.testing.assert_array_equal(dense[b, 0], want)


def test_from_args_merges_and_empty_is_none():
    assert attn.Mask.from_args() is None
    m = attn.Mask.from_args(causal=True, window=5, mask=attn.Mask(window=(2, 9)))
    assert m.causal and m.window == (2, 5)
    seg = jnp.array([[0, 0, 1]])
    m = attn.Mask.from_args(segment_ids=seg)
    assert m.q_segment_ids is seg and m.kv_segment_ids is seg
