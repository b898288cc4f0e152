"""F.block_sparse_attention (XLA path) against a dense numpy reference built from the index lists, its gradients
against jax.grad of dense masked softmax attention, the index-format rules and the argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import functional as F

ATOL = 1e-5


def token_mask(indices, batch, heads, q_len, kv_len, block_size, causal, q_offset):
    """bool [B, H, Tq, Tk] from index lists [B|1, H|1, nq, S], by explicit loops over the entries."""
    indices = np.broadcast_to(np.asarray(indices), (batch, heads) + np.shape(indices)[2:])
    allowed = np.zeros((batch, heads, q_len, kv_len), bool)
    for b in range(batch):
        for h in range(heads):
            for qb in range(indices.shape[2]):
                for kb in indices[b, h, qb]:
                    if kb >= 0:
                        q_rows = slice(qb * block_size, (qb + 1) * block_size)
                        allowed[b, h, q_rows, kb * block_size : (kb + 1) * block_size] = True
    if causal:
        allowed &= np.arange(kv_len)[None, :] <= q_offset + np.arange(q_len)[:, None]
    return allowed


def numpy_attention(q, k, v, allowed, scale):
    """Masked softmax attention in float64 numpy, row by row; rows with no allowed key: out 0, lse -inf."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, _ = q.shape
    group = heads // k.shape[2]
    out = np.zeros((batch, q_len, heads, v.shape[-1]))
    lse = np.full((batch, heads, q_len), -np.inf)
    for b in range(batch):
        for h in range(heads):
            logits = scale * q[b, :, h] @ k[b, :, h // group].T
            for i in range(q_len):
                keep = allowed[b, h, i]
                if keep.any():
                    row = logits[i, keep]
                    top = row.max()
                    weights = np.exp(row - top)
                    lse[b, h, i] = top + np.log(weights.sum())
                    out[b, i, h] = (weights / weights.sum()) @ v[b, keep, h // group]
    return out, lse


def random_qkv(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, q_len, heads, head_dim))
    k = rng.normal(size=(batch, kv_len, kv_heads, head_dim))
    v = rng.normal(size=(batch, kv_len, kv_heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def random_indices(seed, shape, num_k_blocks):
    """Indices in [-1, num_k_blocks) with duplicates and -1 padding; the first row of the first query block is
    all -1 (an empty query block)."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(-1, num_k_blocks, size=shape).astype(np.int32)
    indices[..., 0, 0, 0, :] = -1
    indices[..., -1, -1] = indices[..., -1, 0]  # a duplicate in every row of the last query block
    return indices


CASES = [
    # batch, q_len, kv_len, heads, kv_heads, head_dim, block_size, max_selected, index leading dims, causal, q_offset
    (1, 40, 40, 2, 2, 16, 16, 2, (1, 2), False, 0),
    (3, 37, 45, 4, 2, 60, 8, 4, (3, 4), True, 8),
    (3, 33, 33, 4, 1, 8, 8, 3, (1, 4), True, 0),
    (3, 24, 50, 2, 1, 8, 8, 5, (3, 1), False, 0),
]


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_dense_masked_reference(case):
    batch, q_len, kv_len, heads, kv_heads, head_dim, block_size, selected, lead, causal, q_offset = case
    q, k, v = random_qkv(0, batch, q_len, kv_len, heads, kv_heads, head_dim)
    n_q, n_k = -(-q_len // block_size), -(-kv_len // block_size)
    indices = random_indices(1, (*lead, n_q, selected), n_k)
    allowed = token_mask(indices, batch, heads, q_len, kv_len, block_size, causal, q_offset)
    scale = 0.3

    def sparse(q, k, v):
        return F.block_sparse_attention(
            q, k, v, block_indices=indices, block_size=block_size, causal=causal, q_offset=q_offset, scale=scale,
            return_lse=True,
        )  # fmt: skip

    out, aux = sparse(q, k, v)
    expected_out, expected_lse = numpy_attention(q, k, v, allowed, scale)
    np.testing.assert_allclose(out, expected_out, atol=ATOL)
    np.testing.assert_array_equal(np.isfinite(aux["lse"]), np.isfinite(expected_lse))
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(np.asarray(aux["lse"])[finite], expected_lse[finite], atol=ATOL)
    assert out.dtype == q.dtype and aux["lse"].dtype == jnp.float32
    assert (~allowed).all(axis=-1).any(), "the case should hold a query row with no selected key"

    rng = np.random.default_rng(2)
    w_out, w_lse = rng.normal(size=out.shape), rng.normal(size=aux["lse"].shape)

    def loss(attend):
        def value(q, k, v):
            o, a = attend(q, k, v)
            return jnp.sum(o * w_out) + jnp.sum(jnp.where(jnp.isfinite(a["lse"]), a["lse"], 0.0) * w_lse)

        return value

    def dense(q, k, v):
        return F.softmax_attention(q, k, v, mask=jnp.asarray(allowed), scale=scale, return_lse=True)

    grads = jax.jit(jax.grad(loss(sparse), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    for name, got, want in zip("qkv", grads, expected, strict=True):
        assert not np.isnan(got).any(), f"NaN in d{name}"
        np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"d{name}")


def test_per_head_and_per_row_indices_differ():
    q, k, v = random_qkv(3, 2, 16, 16, 2, 2, 8)
    indices = np.array([[[[0], [1]], [[1], [0]]], [[[1], [1]], [[0], [0]]]], np.int32)  # [2, 2, 2, 1]
    out = F.block_sparse_attention(q, k, v, block_indices=indices, block_size=8)
    allowed = token_mask(indices, 2, 2, 16, 16, 8, False, 0)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, allowed, 8**-0.5)[0], atol=ATOL)


def test_empty_rows_give_zero_output_minus_inf_lse_and_finite_gradients():
    q, k, v = random_qkv(4, 1, 16, 16, 1, 1, 8)
    # query block 0 selects only key block 1, entirely above the causal diagonal; query block 1 selects nothing
    indices = np.array([[[[1, -1], [-1, -1]]]], np.int32)

    def run(q, k, v):
        return F.block_sparse_attention(q, k, v, block_indices=indices, block_size=8, causal=True, return_lse=True)

    out, aux = run(q, k, v)
    np.testing.assert_array_equal(out, 0.0)
    assert np.isneginf(aux["lse"]).all()
    grads = jax.grad(lambda *a: jnp.sum(run(*a)[0]), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_block_mask_equals_indices():
    q, k, v = random_qkv(5, 2, 30, 30, 2, 1, 8)
    rng = np.random.default_rng(6)
    block_mask = rng.random((2, 1, 4, 4)) < 0.5
    indices = [[[list(np.flatnonzero(row)) + [-1] * (4 - row.sum()) for row in head] for head in b] for b in block_mask]
    kwargs = dict(block_size=8, causal=True, return_lse=True)
    by_mask = F.block_sparse_attention(q, k, v, block_mask=jnp.asarray(block_mask), **kwargs)
    by_indices = F.block_sparse_attention(q, k, v, block_indices=np.asarray(indices, np.int32), **kwargs)
    np.testing.assert_array_equal(by_mask[0], by_indices[0])
    np.testing.assert_array_equal(by_mask[1]["lse"], by_indices[1]["lse"])


def test_traced_block_mask_selects_every_block_slot_and_matches_the_concrete_mask():
    from attn.core.block_sparse import block_mask_to_indices

    q, k, v = random_qkv(12, 1, 24, 24, 2, 2, 8)
    block_mask = np.random.default_rng(13).random((1, 2, 3, 3)) < 0.4
    assert jax.eval_shape(block_mask_to_indices, jax.ShapeDtypeStruct(block_mask.shape, bool)).shape == (1, 2, 3, 3)
    traced = jax.jit(lambda m: F.block_sparse_attention(q, k, v, block_mask=m, block_size=8))(block_mask)
    np.testing.assert_array_equal(traced, F.block_sparse_attention(q, k, v, block_mask=block_mask, block_size=8))


def test_block_mask_to_indices_uses_the_largest_row_count():
    from attn.core.block_sparse import block_mask_to_indices

    mask = np.zeros((1, 2, 3, 5), bool)
    mask[0, 0, 1, [1, 4]] = True
    mask[0, 1, 2, [0, 2, 3]] = True
    indices = np.asarray(block_mask_to_indices(mask))
    assert indices.shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(indices[0, 0, 1], [1, 4, -1])
    np.testing.assert_array_equal(indices[0, 1, 2], [0, 2, 3])
    np.testing.assert_array_equal(indices[0, 0, 0], [-1, -1, -1])


@pytest.mark.parametrize("causal", [False, True])
def test_full_density_equals_softmax_attention(causal):
    q, k, v = random_qkv(7, 3, 35, 35, 4, 2, 60)
    indices = np.broadcast_to(np.arange(5, dtype=np.int32), (1, 1, 5, 5))
    out = F.block_sparse_attention(q, k, v, block_indices=indices, block_size=8, causal=causal)
    expected = F.softmax_attention(q, k, v, causal=causal, implementation="xla")
    np.testing.assert_allclose(out, expected, atol=ATOL)


def test_jit_with_traced_indices_and_offset():
    q, k, v = random_qkv(8, 1, 16, 32, 2, 2, 8)
    indices = jnp.asarray([[[[0, 2], [3, 1]]]], jnp.int32)

    @jax.jit
    def run(q, k, v, indices, offset):
        return F.block_sparse_attention(q, k, v, block_indices=indices, block_size=8, causal=True, q_offset=offset)

    allowed = token_mask(np.asarray(indices), 1, 2, 16, 32, 8, True, 16)
    np.testing.assert_allclose(run(q, k, v, indices, 16), numpy_attention(q, k, v, allowed, 8**-0.5)[0], atol=ATOL)


def test_bfloat16_inputs_return_bfloat16_close_to_float32():
    q, k, v = random_qkv(9, 1, 24, 24, 2, 1, 16)
    indices = np.array([[[[0, 1], [1, -1], [2, 0]]]], np.int32)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = F.block_sparse_attention(*low, block_indices=indices, block_size=8)
    assert out.dtype == jnp.bfloat16
    reference = F.block_sparse_attention(*[x.astype(jnp.float32) for x in low], block_indices=indices, block_size=8)
    np.testing.assert_allclose(out.astype(jnp.float32), reference, atol=3e-2)


def test_pallas_on_cpu_and_unknown_implementation_raise():
    q, k, v = random_qkv(10, 1, 8, 8, 1, 1, 8)
    indices = np.zeros((1, 1, 1, 1), np.int32)
    if jax.devices()[0].platform == "cpu":
        with pytest.raises(ValueError, match="implementation='pallas' is not available for block_sparse_attention"):
            F.block_sparse_attention(q, k, v, block_indices=indices, block_size=8, implementation="pallas")
    with pytest.raises(ValueError, match="implementation='triton' is not supported"):
        F.block_sparse_attention(q, k, v, block_indices=indices, block_size=8, implementation="triton")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_size=0), r"block_size=0 must be a positive int"),
        (dict(block_size=-8), r"block_size=-8 must be a positive int"),
        (dict(block_size=8.0), r"block_size=8.0 must be a positive int"),
        (dict(block_size=True), r"block_size=True must be a positive int"),
        (dict(block_size=8, block_mask=np.ones((1, 1, 2, 2), bool)), r"exactly one of .* got both"),
        (dict(block_size=8, block_indices=None), r"exactly one of .* got neither"),
        (dict(block_size=8, block_indices=np.zeros((2,), np.int32)), r"block_indices must have rank 2 or 3 or 4"),
        (dict(block_size=8, block_indices=np.zeros((1, 1, 3, 1), np.int32)), r"block_indices of shape \(1, 1, 3, 1\)"),
        (dict(block_size=8, block_indices=np.zeros((2, 1, 2, 1), np.int32)), r"block_indices of shape \(2, 1, 2, 1\)"),
        (dict(block_size=8, block_indices=np.zeros((1, 3, 2, 1), np.int32)), r"block_indices of shape \(1, 3, 2, 1\)"),
        (dict(block_size=8, block_indices=np.zeros((1, 1, 2, 0), np.int32)), r"block_indices of shape \(1, 1, 2, 0\)"),
        (dict(block_size=8, block_indices=np.full((1, 1, 2, 1), 2, np.int32)), r"block_indices holds 2, out of range"),
        (dict(block_size=8, block_indices=np.full((1, 1, 2, 1), -2, np.int32)), r"block_indices holds -2, out of"),
        (dict(block_size=8, block_indices=np.zeros((1, 1, 2, 1), np.float32)), r"block_indices must be an integer"),
        (dict(block_size=8, block_indices=None, block_mask=np.ones((1, 1, 2, 3), bool)), r"block_mask of shape"),
        (dict(block_size=8, block_indices=None, block_mask=np.ones((1, 1, 2, 2), np.int32)), r"block_mask must be"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, message):
    q, k, v = random_qkv(11, 1, 16, 16, 2, 2, 8)
    kwargs = {"block_indices": np.zeros((1, 1, 2, 1), np.int32), **kwargs}
    if kwargs["block_indices"] is None:
        del kwargs["block_indices"]
    with pytest.raises(ValueError, match=message):
        F.block_sparse_attention(q, k, v, **kwargs)
