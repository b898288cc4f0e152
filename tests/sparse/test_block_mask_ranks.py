"""F.block_sparse_attention with a rank-2 ([nq, nk]) or rank-3 ([H|1, nq, nk]) block_mask / block_indices, on the
XLA path and through the Pallas dispatch (the kernel in the interpreter), against dense masked softmax written in
numpy loops (tests/sparse/sparse_reference.py) at lengths that are not multiples of the block; the shape errors."""

import jax
import numpy as np
import pytest

from attn import functional as F
from attn.core import block_sparse
from tests.sparse.sparse_reference import blocks_to_token_mask, masked_softmax_attention, random_qk


def reference(q, k, v, block_mask4, block_size, causal, q_offset=0):
    """block_mask4 bool [B, H, nq, nk] (already broadcast by the test itself) -> float64 [B, Tq, H, Dv]."""
    allowed = blocks_to_token_mask(block_mask4, q.shape[1], k.shape[1], block_size, causal, q_offset)
    return masked_softmax_attention(q, k, v, allowed, q.shape[-1] ** -0.5)


def random_mask(seed, shape):
    mask = np.random.default_rng(seed).random(shape) < 0.5
    mask[..., 0, :] = False  # an empty query block: output 0
    return mask


CASES = [
    # batch, q_len, kv_len, heads, kv_heads, dim, block_size, causal, q_offset
    (2, 37, 45, 4, 2, 12, 8, False, 0),
    (1, 21, 35, 2, 2, 8, 8, True, 14),
]


@pytest.mark.parametrize("case", CASES)
def test_rank2_mask_is_one_pattern_for_every_row_and_head(case):
    batch, q_len, kv_len, heads, kv_heads, dim, bs, causal, q_offset = case
    q, k, v = random_qk(sum(case[:7]), batch, q_len, kv_len, heads, kv_heads, dim)
    nq, nk = -(-q_len // bs), -(-kv_len // bs)
    mask = random_mask(nq * nk, (nq, nk))
    # the same pattern as rank-2 index lists too (ids of the True columns, -1 padded)
    ids = np.full((nq, nk), -1, np.int32)
    for r in range(nq):
        cols = np.flatnonzero(mask[r])
        ids[r, : len(cols)] = cols
    options = dict(block_size=bs, causal=causal, q_offset=q_offset, implementation="xla")

    def both(q, k, v):  # the mask and the ids are concrete (closed over): their own index widths
        by_mask = F.block_sparse_attention(q, k, v, block_mask=mask, **options)
        return by_mask, F.block_sparse_attention(q, k, v, block_indices=ids, **options)

    by_mask, by_ids = jax.jit(both)(q, k, v)
    expected = reference(q, k, v, np.broadcast_to(mask, (batch, heads, nq, nk)), bs, causal, q_offset)
    np.testing.assert_allclose(by_mask, expected, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(by_ids, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("leading", [4, 1])
def test_rank3_mask_is_per_head_and_shared_by_the_batch(leading):
    batch, q_len, kv_len, heads, kv_heads, dim, bs = 2, 30, 27, 4, 2, 8, 8
    q, k, v = random_qk(leading, batch, q_len, kv_len, heads, kv_heads, dim)
    mask = random_mask(7 + leading, (leading, 4, 4))
    attend = jax.jit(lambda q, k, v, m: F.block_sparse_attention(q, k, v, block_mask=m, block_size=bs, causal=True))
    out = attend(q, k, v, mask)
    expected = reference(q, k, v, np.broadcast_to(mask[None], (batch, heads, 4, 4)), bs, causal=True)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
    if leading == 4:  # heads do differ: the mask of head 0 for every head gives another output
        same = attend(q, k, v, mask[:1])
        assert not np.allclose(same[:, :, 1:], out[:, :, 1:], atol=1e-3)


def test_traced_rank2_mask_under_jit():
    # a traced mask: the rank-2 view is reshaped while tracing, and every key block becomes a slot (dense cost)
    q, k, v = random_qk(3, 2, 19, 19, 2, 1, 8)
    mask = random_mask(4, (3, 3))
    out = jax.jit(lambda q, k, v, m: F.block_sparse_attention(q, k, v, block_mask=m, block_size=8, causal=True))(
        q, k, v, mask
    )
    expected = reference(q, k, v, np.broadcast_to(mask, (2, 2, 3, 3)), 8, causal=True)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


def test_pallas_dispatch_accepts_a_rank2_mask(monkeypatch):
    # on CPU the dispatch refuses "pallas"; pretend the kernel can run so that F sends it to the kernel (interpreted)
    monkeypatch.setattr(block_sparse, "_kernel_unavailable", lambda: None)
    batch, q_len, kv_len, heads, kv_heads, dim, bs = 1, 20, 13, 2, 1, 8, 8
    q, k, v = random_qk(5, batch, q_len, kv_len, heads, kv_heads, dim)
    mask = np.array([[True, False], [True, True], [False, True]])
    out = F.block_sparse_attention(q, k, v, block_mask=mask, block_size=bs, causal=True, implementation="pallas")
    expected = reference(q, k, v, np.broadcast_to(mask, (1, 2, 3, 2)), bs, causal=True)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("block_mask", np.ones((3,), bool), r"block_mask must have rank 2 or 3 or 4"),
        ("block_mask", np.ones((1, 1, 1, 3, 3), bool), r"block_mask must have rank 2 or 3 or 4"),
        ("block_mask", np.ones((3, 2), bool), r"block_mask of shape \(3, 2\) must be \[num_q_blocks, num_k_blocks\]"),
        ("block_mask", np.ones((2, 3), bool), r"block_mask of shape \(2, 3\) must be .* = \[3, 3\]"),
        ("block_mask", np.ones((3, 3, 3), bool), r"block_mask of shape \(3, 3, 3\) must be \[heads\|1, .* = \[1 or 4"),
        ("block_mask", np.ones((2, 3, 3), bool), r"a rank-3 block_mask is per head: pass .* as \[2, 1, 3, 3\]"),
        ("block_mask", np.ones((3, 3), np.int32), r"block_mask must be a boolean array"),
        ("block_indices", np.zeros((3, 0), np.int32), r"block_indices of shape \(3, 0\) must be .* = \[3, >= 1\]"),
        ("block_indices", np.full((3, 1), 3, np.int32), r"block_indices holds 3, out of range"),
        ("block_indices", np.zeros((5, 3, 1), np.int32), r"block_indices of shape \(5, 3, 1\)"),
    ],
)
def test_wrong_shapes_raise_naming_the_argument(name, value, message):
    q, k, v = random_qk(6, 2, 17, 17, 4, 2, 8)  # 3 query and key blocks of 8
    with pytest.raises(ValueError, match=message):
        F.block_sparse_attention(q, k, v, block_size=8, **{name: value})
