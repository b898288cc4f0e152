"""The cache protocol (attn.core.cache): quantized storage round trips within its step, entry gathers and keep
orders match numpy loops, the dense cache and a recurrent state live in the "cache" collection under their
variable names, and the logical axis names cover every leaf."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.core import cache as cache_lib
from attn.core import kv_cache


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_quantize_round_trip_within_half_a_step(bits, axis):
    x = np.array(jax.random.normal(jax.random.key(0), (2, 7, 3, 8)) * 3.0)
    x[0, 2, 1] = 0.5  # a constant row: scale 1, exact
    q = cache_lib.quantize(jnp.asarray(x), bits, axis)
    reduce = -1 if axis == "token" else 1
    low, high = x.min(axis=reduce, keepdims=True), x.max(axis=reduce, keepdims=True)
    step = np.where(high > low, (high - low) / (2**bits - 1), 1.0)
    error = np.abs(np.asarray(q.dequantize()) - x)
    assert np.all(error <= step / 2 * (1 + 1e-5) + 1e-6)
    assert q.codes.dtype == np.uint8 and q.shape == x.shape
    assert q.codes.shape[-1] == 8 * bits // 8
    assert error.max() > 0
    # codes as integers: round((x - min) / step), 8 / bits codes per byte, the first channel in the lowest bits
    codes = np.clip(np.round((x - low) / step), 0, 2**bits - 1).astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    if bits == 2:
        codes = codes[..., 0::4] | (codes[..., 1::4] << 2) | (codes[..., 2::4] << 4) | (codes[..., 3::4] << 6)
    assert np.mean(np.asarray(q.codes) == codes) > 0.99  # float rounding may move an exact half


def np_group_quantize(x, bits, axis, group):
    """Dequantized x [B, T, KVH, D] and its step: min/max per group of `group` channels of a token (axis="token")
    or `group` tokens of a channel (axis="channel"), by explicit loops."""
    out, steps = np.zeros_like(x), np.zeros_like(x)
    batch, length, heads, width = x.shape
    for b in range(batch):
        for h in range(heads):
            if axis == "token":
                blocks = [(t, slice(c, c + group)) for t in range(length) for c in range(0, width, group)]
            else:
                blocks = [(slice(t, t + group), c) for t in range(0, length, group) for c in range(width)]
            for rows, cols in blocks:
                block = x[b, rows, h, cols]
                low, high = block.min(), block.max()
                step = (high - low) / (2**bits - 1) if high > low else 1.0
                out[b, rows, h, cols] = np.clip(np.round((block - low) / step), 0, 2**bits - 1) * step + low
                steps[b, rows, h, cols] = step
    return out, steps


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_grouped_quantize_equals_a_loop_per_group(bits, axis):
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 8, 2, 8)) * 2.0, np.float32)
    q = cache_lib.quantize(jnp.asarray(x), bits, axis, group=4)
    expected, steps = np_group_quantize(x.astype(np.float64), bits, axis, 4)
    scale_shape = (2, 8, 2, 2) if axis == "token" else (2, 2, 2, 8)
    assert q.scale.shape == q.zero.shape == scale_shape and q.shape == x.shape
    error = np.abs(np.asarray(q.dequantize()) - x)
    assert np.all(error <= steps / 2 * (1 + 1e-5) + 1e-6)
    close = np.isclose(np.asarray(q.dequantize()), expected, atol=1e-5)
    assert np.mean(close) > 0.99  # float rounding may move an exact half
    if axis == "token":  # per-token groups gather token by token with their scales
        picked = cache_lib.gather_entries(q, jnp.asarray([[[5, 1]] * 2] * 2, jnp.int32))
        np.testing.assert_allclose(picked.dequantize(), np.asarray(q.dequantize())[:, [5, 1]])


def test_two_bit_packing_matches_numpy_bit_layout():
    codes = np.random.default_rng(4).integers(0, 4, size=(3, 5, 12)).astype(np.uint8)
    packed = np.asarray(cache_lib.pack_codes(jnp.asarray(codes), 2))
    expected = np.zeros((3, 5, 3), np.uint8)
    for c in range(12):
        expected[..., c // 4] |= codes[..., c] << (2 * (c % 4))
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(cache_lib.unpack_codes(jnp.asarray(packed), 2), codes)
    q = cache_lib.quantize(jnp.asarray(codes, jnp.float32), 2, "channel")  # bytes are a quarter of the channels
    assert q.codes.shape == (3, 5, 3) and cache_lib.nbytes(q.codes) == codes.size // 4


def test_quantize_rejects_bad_arguments():
    x = jnp.ones((1, 2, 1, 3))
    with pytest.raises(ValueError, match=r"bits=3 must be one of \(2, 4, 8\)"):
        cache_lib.quantize(x, 3)
    with pytest.raises(ValueError, match="axis='head' must be one of"):
        cache_lib.quantize(x, 8, "head")
    with pytest.raises(ValueError, match="must be a multiple of 2"):
        cache_lib.quantize(x, 4)
    with pytest.raises(ValueError, match="must be a multiple of 4"):
        cache_lib.quantize(jnp.ones((1, 2, 1, 6)), 2)
    with pytest.raises(ValueError, match="group=3 must be a positive int dividing the token axis"):
        cache_lib.quantize(jnp.ones((1, 4, 1, 4)), 2, "channel", group=3)
    with pytest.raises(ValueError, match="only per-token codes"):
        cache_lib.quantize(jnp.ones((1, 2, 1, 4)), 8, "channel").tokens(lambda a: a)


def test_gather_entries_and_ordered_keep_match_loops():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 3, 4)).astype(np.float32)
    keep = rng.random((2, 3, 6)) < 0.5
    indices, counts = cache_lib.ordered_keep(jnp.asarray(keep), 4)
    gathered = np.asarray(cache_lib.gather_entries(jnp.asarray(x), indices))
    for b in range(2):
        for h in range(3):
            kept = [e for e in range(6) if keep[b, h, e]]
            assert counts[b, h] == min(len(kept), 4)
            np.testing.assert_array_equal(indices[b, h, : counts[b, h]], kept[:4])
            for slot in range(4):
                np.testing.assert_array_equal(gathered[b, slot, h], x[b, indices[b, h, slot], h])
    quantized = cache_lib.quantize(jnp.asarray(x, jnp.float32), 8)
    np.testing.assert_allclose(
        cache_lib.gather_entries(quantized, indices).dequantize(),
        cache_lib.gather_entries(quantized.dequantize(), indices),
    )


def test_head_mask_and_kv_head_mass_follow_the_gqa_layout():
    visible = jnp.asarray(np.random.default_rng(1).random((1, 2, 3, 5)) < 0.5)
    per_head = np.asarray(cache_lib.head_mask(visible, 4))
    for h in range(4):
        np.testing.assert_array_equal(per_head[:, h], visible[:, h // 2])
    mass = np.random.default_rng(2).random((1, 4, 5))
    np.testing.assert_allclose(cache_lib.kv_head_mass(jnp.asarray(mass), 2)[:, 1], mass[:, 2] + mass[:, 3], rtol=1e-6)


class DenseCacheUser(nn.Module):
    @nn.compact
    def __call__(self, k, v):
        return kv_cache.write(self, k, v)


def test_dense_cache_is_a_kv_cache_with_implicit_lengths_and_positions():
    module = DenseCacheUser()
    k = jnp.arange(2 * 4 * 1 * 2, dtype=jnp.float32).reshape(2, 4, 1, 2)
    _, state = module.apply({}, k, k, mutable=["cache"])
    assert set(state["cache"]) == {"cached_key", "cached_value", "cache_index"}
    (keys, _, start), state = module.apply({"cache": state["cache"]}, k[:, :3], k[:, :3], mutable=["cache"])
    assert int(start) == 0
    cache = cache_lib.KVCache(
        keys=state["cache"]["cached_key"], values=state["cache"]["cached_value"], index=state["cache"]["cache_index"]
    )
    np.testing.assert_array_equal(cache.filled(), np.full((2, 1), 3))
    np.testing.assert_array_equal(cache.slot_positions(), np.broadcast_to(np.arange(4), (2, 1, 4)))
    np.testing.assert_array_equal(keys[:, :3], k[:, :3])
    axes = cache_lib.axes(cache_lib.empty_kv(k, k, 4, stats=("key_mass",), bits=8))
    assert axes.keys.codes == cache_lib.KV_AXES and axes.lengths == ("batch", "kv_heads")
    assert axes.positions == axes.key_mass == ("batch", "kv_heads", "cache_length")
    with pytest.raises(ValueError, match="unknown statistics"):
        cache_lib.empty_kv(k, k, 4, stats=("entropy",))


class Accumulator(nn.Module):
    """A recurrent state: running sum of x [B, T, F] over tokens (state [B, F])."""

    @nn.compact
    def __call__(self, x):
        state = cache_lib.load_state(self, ("total",))
        if state is None:
            state = cache_lib.RecurrentState(state={"total": jnp.zeros(x.shape[::2])}, index=jnp.array(0, jnp.int32))
        total = state.state["total"] + x.sum(axis=1)
        names = (("total", ("batch", "embed")),)
        cache_lib.store_state(self, cache_lib.RecurrentState({"total": total}, state.index + x.shape[1], names))
        return total


def test_recurrent_state_round_trips_through_the_cache_collection():
    module = Accumulator()
    x = jnp.arange(12, dtype=jnp.float32).reshape(1, 4, 3)
    total, state = module.apply({}, x[:, :3], mutable=["cache"])
    total, state = module.apply({"cache": state["cache"]}, x[:, 3:], mutable=["cache"])
    np.testing.assert_allclose(total, x.sum(axis=1))
    assert set(state["cache"]) == {"total", "cache_index"} and int(state["cache"]["cache_index"]) == 4
