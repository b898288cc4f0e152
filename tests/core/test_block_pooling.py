"""attn.core.block_pooling against explicit numpy loops over the blocks (odd lengths, every kind, any axis)."""

import jax.numpy as jnp
import numpy as np
import pytest

from attn.core.block_pooling import POOLINGS, pool_blocks, real_token_mask, split_blocks

_REDUCE = {"mean": np.mean, "sum": np.sum, "max": np.max, "min": np.min, "first": lambda a: a[0]}


def _pool_loop(x, block_size, kind, axis):
    """numpy: for each block b, the reduction of x's entries b*bs .. min((b+1)*bs, T)-1 along axis, one at a time."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
    length = x.shape[0]
    blocks = []
    for start in range(0, length, block_size):
        members = x[start : min(start + block_size, length)]
        pooled = np.empty(x.shape[1:])
        for index in np.ndindex(*x.shape[1:]):
            pooled[index] = _REDUCE[kind](np.array([m[index] for m in members]))
        blocks.append(pooled)
    return np.moveaxis(np.stack(blocks), 0, axis)


@pytest.mark.parametrize("kind", POOLINGS)
@pytest.mark.parametrize("length, block_size, axis", [(7, 3, 1), (9, 4, -1), (5, 5, 1), (4, 1, 2), (3, 8, 0)])
def test_pool_blocks_matches_loops(kind, length, block_size, axis):
    shape = [2, 3, 2]
    shape[axis] = length
    x = np.random.default_rng(length * 7 + block_size).normal(size=shape).astype(np.float32)
    got = pool_blocks(jnp.asarray(x), block_size, kind, axis=axis)
    want = _pool_loop(x, block_size, kind, axis)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["max", "mean", "first"])
def test_pool_blocks_two_axes_is_the_2d_block_reduction(kind):
    x = np.random.default_rng(1).normal(size=(2, 7, 5)).astype(np.float32)
    got = np.asarray(pool_blocks(jnp.asarray(x), 3, kind, axis=(1, 2)))
    want = np.zeros((2, 3, 2))
    for b in range(2):
        for r in range(3):
            for c in range(2):
                tile = x[b, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3]
                want[b, r, c] = tile[0, 0] if kind == "first" else _REDUCE[kind](tile.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_pool_blocks_ignores_the_padding_of_negative_and_integer_inputs():
    x = -np.arange(1, 6, dtype=np.float32)[None]  # [-1..-5]: a zero pad would win a max over the last block
    np.testing.assert_array_equal(pool_blocks(jnp.asarray(x), 3, "max", axis=1), [[-1.0, -4.0]])
    ints = jnp.asarray([[4, 9, 2, 7, 5]], jnp.int32)
    np.testing.assert_array_equal(pool_blocks(ints, 2, "min", axis=1), [[4, 2, 5]])
    np.testing.assert_array_equal(pool_blocks(ints, 2, "max", axis=1), [[9, 7, 5]])
    np.testing.assert_allclose(pool_blocks(ints, 2, "mean", axis=1), [[6.5, 4.5, 5.0]])


def test_split_blocks_pads_the_tail_with_fill():
    x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    blocks, n_blocks = split_blocks(jnp.asarray(x), 2, axis=1, fill=-7.0)
    assert n_blocks == 3 and blocks.shape == (2, 3, 2, 3)
    for b in range(3):
        for i in range(2):
            token = 2 * b + i
            want = x[:, token] if token < 5 else np.full((2, 3), -7.0)
            np.testing.assert_array_equal(np.asarray(blocks[:, b, i]), want)
    whole, count = split_blocks(jnp.asarray(x), 5, axis=-2)
    assert count == 1 and whole.shape == (2, 1, 5, 3)


def test_real_token_mask_marks_the_real_entries():
    got = np.asarray(real_token_mask(7, 3))
    want = np.array([[3 * b + i < 7 for i in range(3)] for b in range(3)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: pool_blocks(x, 0, "mean"), "block_size=0"),
        (lambda x: pool_blocks(x, 2.0, "mean"), "block_size=2.0"),
        (lambda x: pool_blocks(x, True, "mean"), "block_size=True"),
        (lambda x: pool_blocks(x, 2, "avg"), "kind='avg'"),
        (lambda x: pool_blocks(x, 2, "max", axis=3), "axis=3"),
        (lambda x: pool_blocks(x, 2, "max", axis=(1, -2)), r"axis=\(1, -2\)"),
        (lambda x: split_blocks(x, -1), "block_size=-1"),
        (lambda x: split_blocks(x[:, :0], 2), "empty axis 1"),
        (lambda x: real_token_mask(0, 2), "length=0"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.zeros((2, 5, 3)))
