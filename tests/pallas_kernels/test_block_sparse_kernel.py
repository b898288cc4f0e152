"""Block-sparse attention kernels against their dense reference, in the Pallas interpreters on CPU.

The reference itself is checked against explicit numpy loops (float64). The GPU (Triton) kernels run with
interpret=True, the TPU (Mosaic) kernels with the TPU interpreter; both are compared on the output, the lse and the
gradients of q, k and v (through out and through lse), at awkward shapes: lengths that are not block multiples,
Tq != Tk with q_offset, head_dim 60, GQA 4:2 and MQA, batch 1 and 3, blocks 16, 24 (padded to 32) and 32, -1
padding, duplicates, per-(batch, head) lists, index lists broadcast over batch or heads, query blocks that select
nothing (output 0, lse -inf, finite gradients), and NaN in the K/V blocks no list selects (never read). Both
kernels are also lowered for their real targets (Triton IR, Mosaic) through jax.export. Tests marked `gpu` run the
compiled Triton kernels at T = 4096, tests marked `tpu` the compiled Mosaic kernels at T = 1024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.block_sparse import block_sparse_attention, block_sparse_attention_reference
from pallas_kernels.block_sparse.index_lists import index_lists
from pallas_kernels.block_sparse.layout import BlockSparsePlan
from pallas_kernels.block_sparse.reference import token_visibility
from tests.pallas_kernels.flash_cases import FORWARD_TOL, GRAD_TOL, assert_close


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    return (
        normal(batch, q_len, heads, head_dim),
        normal(batch, kv_len, kv_heads, head_dim),
        normal(batch, kv_len, kv_heads, head_dim),
    )


def _random_indices(seed, shape, num_k_blocks, empty_block=None):
    """int32 indices in [-1, nk) (so -1 padding and duplicates occur); `empty_block` selects nothing."""
    idx = np.random.default_rng(seed).integers(-1, num_k_blocks, shape)
    if empty_block is not None:
        idx[:, :, empty_block, :] = -1
    return jnp.asarray(idx, jnp.int32)


# ---- the reference against explicit loops ----


def _numpy_attention(q, k, v, idx, block_size, causal, q_offset, scale):
    q, k, v, idx = (np.asarray(x, np.float64) for x in (q, k, v, idx))
    batch, q_len, heads, dim = q.shape
    kv_len, groups = k.shape[1], heads // k.shape[2]
    out = np.zeros(q.shape)
    lse = np.full((batch, heads, q_len), -np.inf)
    for b in range(batch):
        for h in range(heads):
            lists = idx[b % idx.shape[0], h % idx.shape[1]]
            for i in range(q_len):
                keys = [
                    j
                    for j in range(kv_len)
                    if j // block_size in set(lists[i // block_size].tolist()) and (not causal or j <= i + q_offset)
                ]
                if not keys:
                    continue
                s = np.array([scale * q[b, i, h] @ k[b, j, h // groups] for j in keys])
                w = np.exp(s - s.max())
                out[b, i, h] = (w / w.sum()) @ v[b, keys, h // groups]
                lse[b, h, i] = s.max() + np.log(w.sum())
    return out, lse


def test_reference_matches_numpy_loops():
    q, k, v = _inputs(0, 2, 13, 21, 2, 1, 8)
    idx = jnp.asarray(
        [[[[5, 0, 0], [1, -1, 3], [-1, -1, -1], [2, 4, 2]], [[0, 1, 2], [3, 3, -1], [4, 5, 0], [1, 1, 1]]]]
    )
    for causal, q_offset in ((False, 0), (True, 3)):
        out, lse = block_sparse_attention_reference(
            q, k, v, block_indices=idx, block_size=4, causal=causal, q_offset=q_offset, return_lse=True
        )
        want_out, want_lse = _numpy_attention(q, k, v, idx, 4, causal, q_offset, 8**-0.5)
        np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(out[:, 8:12, 0], 0.0)  # head 0, query block 2 selects nothing


def test_index_lists_are_sorted_unique_causal_pruned_and_transposed():
    plan = BlockSparsePlan(4, 16, 13, 21, 4, 6, True, 1.0, 1, True)
    idx = np.array(
        [[[[5, 0, 0], [1, -1, 3], [-1, -1, -1], [2, 4, 2]]], [[[3, 3, 3], [0, 2, 1], [2, 0, -1], [5, 1, 0]]]]
    )
    forward, transposed = index_lists(plan, jnp.asarray(idx, jnp.int32), jnp.int32(2), 2, 2, (4, 8))
    for b in range(2):
        for h in range(2):
            for i in range(4):
                last_query = min(4 * i + 3, 12) + 2
                want = sorted({j for j in idx[b, 0, i] if j >= 0 and 4 * j <= last_query})
                assert forward[b, h, i].tolist() == want + [-1] * (4 - len(want)), (b, h, i)
            for j in range(6):
                want = [i for i in range(4) if j in forward[b, h, i].tolist()]
                assert transposed[b, h, j].tolist() == want + [-1] * (8 - len(want)), (b, h, j)


# ---- kernels against the reference ----


def _value_and_grads(fn, q, k, v, **options):
    """(out, lse, grads of sum(out w) + sum(lse u) over finite lse, for q, k, v)."""

    def loss(q, k, v):
        out, lse = fn(q, k, v, return_lse=True, **options)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        u = jnp.sin(jnp.arange(lse.size, dtype=jnp.float32).reshape(lse.shape))
        finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(finite * u), (out, lse)

    grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads


def _check_against_reference(inputs, options, backend, interpret=True):
    q, k, v = inputs
    out, lse, grads = _value_and_grads(block_sparse_attention, q, k, v, **options, backend=backend, interpret=interpret)
    ref_out, ref_lse, ref_grads = _value_and_grads(block_sparse_attention_reference, q, k, v, **options)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == ref_lse.shape
    assert_close(out, ref_out, FORWARD_TOL, "out")
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    assert_close(jnp.where(jnp.isinf(lse), 0, lse), jnp.where(jnp.isinf(ref_lse), 0, ref_lse), FORWARD_TOL, "lse")
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert got.shape == want.shape and bool(jnp.all(jnp.isfinite(got))), name
        assert_close(got, want, GRAD_TOL, f"d{name}")
    return out, lse


GPU_CASES = {
    # GQA 4:2, batch 3, D=60, Tq=40 < Tk=72 with q_offset 32 (the last 40 positions), per-(batch, head) lists
    # with duplicates and -1, query block 1 selects nothing.
    "gqa_causal_offset_empty_block": (
        (0, 3, 40, 72, 4, 2, 60), dict(block_size=16, causal=True, q_offset=32), (3, 4, 3, 4), 1,
    ),
    # MQA, block 24 (rows padded to 32), batch 2 with lists broadcast over batch and heads, non-causal, Tq=70 > Tk=50.
    "mqa_block24_broadcast": ((1, 2, 70, 50, 2, 1, 32), dict(block_size=24), (1, 1, 3, 5), None),
}  # fmt: skip


def _case(shape, options, index_shape, empty_block):
    inputs = _inputs(*shape)
    nk = -(-shape[3] // options["block_size"])
    idx = _random_indices(shape[0] + 10, index_shape, nk, empty_block)
    return inputs, dict(options, block_indices=idx)


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_kernel_forward_lse_and_gradients(name):
    shape, options, index_shape, empty_block = GPU_CASES[name]
    inputs, options = _case(shape, options, index_shape, empty_block)
    out, lse = _check_against_reference(inputs, options, "gpu")
    if empty_block is not None:
        bs = options["block_size"]
        np.testing.assert_array_equal(out[:, empty_block * bs : (empty_block + 1) * bs], 0.0)
        assert bool(jnp.all(lse[:, :, empty_block * bs : (empty_block + 1) * bs] == -jnp.inf))


def test_tpu_kernel_forward_lse_and_gradients():
    """GQA 4:2, D=60, block 32, Tq=40 != Tk=70 with q_offset 30, causal, duplicates, -1, an empty query block."""
    inputs, options = _case((2, 1, 40, 70, 4, 2, 60), dict(block_size=32, causal=True, q_offset=30), (1, 4, 2, 3), 1)
    out, lse = _check_against_reference(inputs, options, "tpu")
    np.testing.assert_array_equal(out[:, 32:], 0.0)
    assert bool(jnp.all(lse[:, :, 32:] == -jnp.inf))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), causal=st.booleans(), q_offset=st.integers(-8, 40))
def test_gpu_forward_over_random_index_lists(seed, causal, q_offset):
    """Block 16, fixed shapes, random per-head lists; q_offset is passed as an int32 array (a run-time operand: one
    compile per causal flag); -8 hides the first keys from the first queries (rows with no key). K and V of the
    blocks no list selects (always the last one) are NaN for the kernel: they must never be read."""
    q, k, v = _inputs(seed % 1000, 1, 33, 47, 2, 2, 16)
    idx = _random_indices(seed, (1, 2, 3, 2), 2)  # key block 2 is never selected
    options = dict(block_indices=idx, block_size=16, causal=causal, return_lse=True)
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, **options, q_offset=q_offset)
    unread = ~np.isin(np.arange(47) // 16, np.asarray(idx))[None, :, None, None]
    k, v = (jnp.where(unread, jnp.nan, x) for x in (k, v))
    options["q_offset"] = jnp.int32(q_offset)
    out, lse = block_sparse_attention(q, k, v, **options, backend="gpu", interpret=True)
    assert_close(out, ref_out, FORWARD_TOL)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    assert_close(jnp.where(jnp.isinf(lse), 0, lse), jnp.where(jnp.isinf(ref_lse), 0, ref_lse), FORWARD_TOL)


def _lowered(backend, platform):
    """StableHLO of jit(grad) with every kernel compiled for `platform` (no interpreter), bf16, block 24."""
    from jax import export

    q, k, v = _inputs(3, 1, 70, 70, 4, 2, 60, dtype=jnp.bfloat16)
    idx = jnp.zeros((1, 1, 3, 2), jnp.int32)

    def loss(q, k, v):
        out, lse = block_sparse_attention(
            q, k, v, block_indices=idx, block_size=24, causal=True, return_lse=True, backend=backend, interpret=False
        )
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0, lse))

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return export.export(fn, platforms=[platform], disabled_checks=checks)(q, k, v).mlir_module()


def test_gpu_kernels_lower_to_triton():
    """Forward, dQ and dK/dV lower through Pallas' Triton path (Triton IR, not compiled to PTX here)."""
    assert _lowered("gpu", "cuda").count("__gpu$xla.gpu.triton") == 3


def test_tpu_kernels_lower_to_mosaic():
    assert _lowered("tpu", "tpu").count("tpu_custom_call") == 3


# ---- bad input ----


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(block_size=0), r"block_size=0 must be a positive int"),
        (dict(block_size=16.0), r"block_size=16.0 must be a positive int"),
        (dict(block_indices=jnp.asarray([[[[0], [4]]]])), r"block_indices\[0, 0, 1, 0\]=4 is out of range"),
        (dict(block_indices=jnp.asarray([[[[0], [-2]]]])), r"block_indices\[0, 0, 1, 0\]=-2 is out of range"),
        (dict(block_indices=jnp.zeros((1, 1, 3, 1), jnp.int32)), r"block_indices shape \(1, 1, 3, 1\) must be"),
        (dict(block_indices=jnp.zeros((1, 1, 2, 1), jnp.float32)), r"block_indices must be an integer array"),
        (dict(q_offset=1.5), r"q_offset=1.5 must be an int or an int scalar array"),
        (dict(scale=float("nan")), r"scale=nan must be None or a finite number"),
        (dict(backend="cuda"), r"backend='cuda' is not supported"),
        (dict(k=jnp.zeros((1, 30, 3, 8))), r"num_heads=2 \(q\) must be a multiple of num_kv_heads=3 \(k, v\)"),
        (dict(q=jnp.zeros((1, 20, 8))), r"q must have rank 4"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    q, k, _ = _inputs(0, 1, 20, 30, 2, 1, 8)
    args = dict(q=q, k=k, v=k, block_indices=jnp.zeros((1, 1, 2, 1), jnp.int32), block_size=16, interpret=True)
    args.update(change)
    if "k" in change:
        args["v"] = change["k"]
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(**args)


def test_traced_out_of_range_indices_are_ignored():
    """Under jit the indices cannot be checked; out-of-range entries are dropped (never read outside K/V)."""
    q, k, v = _inputs(1, 1, 20, 30, 2, 1, 16)
    bad = jnp.asarray([[[[0, 7], [1, -5]]]], jnp.int32)
    good = jnp.asarray([[[[0, -1], [1, -1]]]], jnp.int32)
    run = jax.jit(lambda idx: block_sparse_attention(q, k, v, block_indices=idx, block_size=16, interpret=True))
    np.testing.assert_array_equal(run(bad), run(good))


# ---- compiled on a real GPU (skipped elsewhere) ----


@pytest.mark.gpu
def test_compiled_gpu_kernels_at_4096():
    """T = 4096, block 64, 8 random blocks per query block plus the diagonal, causal, GQA 4:2: float32 forward and
    gradients against the reference, then bf16 forward by FlashAttention's criterion (error vs the f32 reference
    <= 2x that of dense XLA attention in bf16, + 1e-3)."""
    seq, bs = 4096, 64
    nq = seq // bs
    rng = np.random.default_rng(7)
    idx = rng.integers(-1, nq, (2, 4, nq, 9))
    idx[..., 0] = np.arange(nq)  # the diagonal block: every row sees at least itself
    options = dict(block_indices=jnp.asarray(idx, jnp.int32), block_size=bs, causal=True)
    inputs = _inputs(4, 2, seq, seq, 4, 2, 64)
    _check_against_reference(inputs, options, "gpu", interpret=False)

    q, k, v = (x.astype(jnp.bfloat16) for x in inputs)
    out = block_sparse_attention(q, k, v, **options, backend="gpu", interpret=False)
    exact = block_sparse_attention_reference(*inputs, **options)
    visible = token_visibility(options["block_indices"], bs, seq, seq, causal=True)
    kk, vv = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    s = jnp.einsum("bihd,bjhd->bhij", q, kk, preferred_element_type=jnp.bfloat16) * jnp.asarray(0.125, jnp.bfloat16)
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1).astype(jnp.bfloat16)
    low = jnp.einsum("bhij,bjhd->bihd", p, vv, preferred_element_type=jnp.bfloat16)
    kernel_err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - exact)))
    xla_err = float(jnp.max(jnp.abs(low.astype(jnp.float32) - exact)))
    assert kernel_err <= 2 * xla_err + 1e-3, (kernel_err, xla_err)


# ---- compiled on a real TPU (skipped elsewhere) ----


@pytest.mark.tpu
def test_compiled_tpu_kernels_match_reference():
    """T = 1024, block 128 (the MXU's width), 4 random blocks per query block plus the diagonal, causal, GQA 4:2,
    float32 forward and gradients against the reference."""
    seq, bs = 1024, 128
    nq = seq // bs
    idx = np.random.default_rng(8).integers(-1, nq, (2, 4, nq, 5))
    idx[..., 0] = np.arange(nq)
    options = dict(block_indices=jnp.asarray(idx, jnp.int32), block_size=bs, causal=True, q_offset=0)
    _check_against_reference(_inputs(5, 2, seq, seq, 4, 2, 128), options, "tpu", interpret=False)
