"""Split-KV decode (attn.core.split_kv_decode) and the decode dispatch (attn.core.kv_cache.decode_attention) against
an explicit numpy reference and today's dense cache decode, for any split count, ragged lengths and quantized KV."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core import cache as cache_lib
from attn.core import kv_cache
from attn.core.masks import Mask
from attn.core.reference import reference_softmax_attention
from attn.core.split_kv_decode import plan_splits, split_kv_attention, split_kv_decode

TOL = dict(rtol=2e-5, atol=2e-5)


def numpy_decode(q, k, v, lengths, *, q_offset=None, scale=None, softcap=None, window=None):
    """Explicit loops: query i of head h (kv head h // G) sees slots j < lengths[b, h // G], and with q_offset also
    j <= q_offset + i (causal) and, with window (left, right), q_offset + i - left <= j."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    group = heads // k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    out = np.zeros((batch, q_len, heads, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            kv = h // group
            for i in range(q_len):
                slots = [
                    j
                    for j in range(int(lengths[b, kv]))
                    if (q_offset is None or j <= q_offset + i) and (window is None or j >= q_offset + i - window[0])
                ]
                if not slots:
                    continue
                s = np.array([scale * q[b, i, h] @ k[b, j, kv] for j in slots])
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                w = np.exp(s - s.max())
                out[b, i, h] = (w / w.sum()) @ v[b, slots, kv]
    return out


def inputs(seed, batch=2, q_len=1, heads=4, kv_heads=2, dim=8, length=40):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, q_len, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32)
    return q, k, v


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 40])  # 40 splits of 1-slot tiles: more splits than tiles
def test_ragged_lengths_any_split_count(num_splits):
    q, k, v = inputs(0)
    lengths = np.array([[40, 13], [0, 29]], np.int32)  # ragged per (batch, kv head), one head empty
    out = jax.jit(lambda q, k, v, n: split_kv_attention(q, k, v, lengths=n, num_splits=num_splits, block=4))(
        q, k, v, jnp.asarray(lengths)
    )
    np.testing.assert_allclose(out, numpy_decode(q, k, v, lengths), **TOL)
    assert np.all(np.asarray(out)[1, :, :2] == 0.0)  # the empty head's queries see no key


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_equals_dense_cache_decode_with_causal_window_softcap(num_splits):
    q, k, v = inputs(1, batch=3, q_len=3, heads=6, kv_heads=3, dim=16, length=50)
    start = 30  # three queries at positions 30, 31, 32; the cache filled to 33
    mask = Mask(causal=True, kv_lengths=jnp.full((3,), start + 3, jnp.int32), window=(9, 0))
    kwargs = dict(mask=mask, q_offset=start, softcap=3.0, scale=0.3)
    dense = reference_softmax_attention(q, k, v, **kwargs)
    out = split_kv_attention(q, k, v, num_splits=num_splits, block=8, **kwargs)
    np.testing.assert_allclose(out, dense, **TOL)
    lengths = np.full((3, 3), start + 3)
    ref = numpy_decode(q, k, v, lengths, q_offset=start, scale=0.3, softcap=3.0, window=(9, 0))
    np.testing.assert_allclose(out, ref, **TOL)


def test_lse_and_one_split_is_the_dense_decode_exactly():
    q, k, v = inputs(2, length=64)
    mask = Mask(kv_lengths=jnp.array([50, 20], jnp.int32))
    dense, aux = reference_softmax_attention(q, k, v, mask=mask, return_lse=True)
    out, lse = split_kv_attention(q, k, v, mask=mask, num_splits=1, return_lse=True)
    np.testing.assert_array_equal(out, dense)  # same pipeline stages, one split: bit-identical
    np.testing.assert_allclose(lse, aux["lse"], rtol=1e-6)
    _, lse4 = split_kv_attention(q, k, v, mask=mask, num_splits=4, block=4, return_lse=True)
    np.testing.assert_allclose(lse4, aux["lse"], rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_dequantised_split_by_split(bits):
    q, k, v = inputs(3, dim=8, length=36)
    kq, vq = cache_lib.quantize(k, bits), cache_lib.quantize(v, bits)
    lengths = np.array([[36, 5], [17, 30]], np.int32)
    out = split_kv_attention(q, kq, vq, lengths=jnp.asarray(lengths), num_splits=5, block=4)
    ref = numpy_decode(q, cache_lib.read(kq), cache_lib.read(vq), lengths)
    np.testing.assert_allclose(out, ref, **TOL)


def numpy_lse(q, k, lengths):
    """lse float64 [B, H, Tq] of each query over the slots j < lengths[b, h // G] (-inf when none)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    group = q.shape[2] // k.shape[2]
    out = np.full((q.shape[0], q.shape[2], q.shape[1]), -np.inf)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            n = int(lengths[b, h // group])
            if n:
                s = np.einsum("id,jd->ij", q[b, :, h], k[b, :n, h // group]) / np.sqrt(q.shape[-1])
                out[b, h] = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    return out


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("bits", [None, 8])
def test_cached_attention_over_ragged_heads(bits, interpret):
    """kv_cache.cached_attention (a policy cache's entries: every filled slot, no other mask) on split-KV (XLA) and on
    the Pallas decode kernel in its interpreter: out and lse equal explicit loops, GQA, one empty head, float or
    8-bit per-token codes."""
    q, k, v = inputs(5, q_len=2, length=24)
    if bits is not None:
        k, v = cache_lib.quantize(k, bits), cache_lib.quantize(v, bits)
    lengths = np.array([[24, 7], [0, 13]], np.int32)
    out, lse = kv_cache.cached_attention(q, k, v, jnp.asarray(lengths), num_splits=3, interpret=interpret)
    keys, values = cache_lib.read(k), cache_lib.read(v)
    np.testing.assert_allclose(out, numpy_decode(q, keys, values, lengths), **TOL)
    expected = numpy_lse(q, keys, lengths)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(expected))
    np.testing.assert_allclose(np.where(np.isinf(expected), 0, lse), np.where(np.isinf(expected), 0, expected), **TOL)


def test_kv_cache_entry_and_unfilled_splits_never_read():
    q, k, v = inputs(4, length=64)
    lengths = np.array([[20, 9], [31, 0]], np.int32)
    # NaN beyond slot 32: splits of 16 slots past every length are never computed (a dense decode would read them:
    # its masked weights are 0, and 0 * NaN is NaN)
    poisoned = v.at[:, 32:].set(jnp.nan)
    cache = cache_lib.KVCache(keys=k, values=poisoned, index=jnp.array(64), lengths=jnp.asarray(lengths))
    out = split_kv_decode(q, cache, num_splits=4, block=16)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(out, numpy_decode(q, k, v, lengths), **TOL)


def test_plan_splits_partition():
    # num_splits: tiles of 128 split evenly; the last split may hang over the end
    plan = plan_splits(1, 8, 1000, num_splits=3)
    assert (plan.num_splits, plan.chunk) == (3, 384)
    # work_units: B * KVH * tiles / units tiles per split (the stream-K share), capped at one head's tiles
    plan = plan_splits(2, 4, 4096, work_units=64)  # 8 heads x 32 tiles = 256 tiles over 64 units: 4 tiles each
    assert (plan.num_splits, plan.chunk) == (8, 512)
    assert plan_splits(1, 1, 4096, work_units=1).num_splits == 1
    assert plan_splits(1, 1, 100, num_splits=5).chunk == 100  # one tile (block 128 > capacity): one split
    default = plan_splits(1, 8, 4096)  # neither: DEFAULT_CHUNK = 512-slot splits
    assert (default.num_splits, default.chunk) == (8, 512)
    with pytest.raises(ValueError, match="num_splits=0"):
        plan_splits(1, 1, 100, num_splits=0)
    with pytest.raises(ValueError, match="give at most one"):
        plan_splits(1, 1, 100, num_splits=2, work_units=4)


def test_bad_arguments_name_what_is_wrong():
    q, k, v = inputs(5)
    with pytest.raises(ValueError, match="lengths has shape"):
        split_kv_attention(q, k, v, lengths=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        split_kv_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="per 'channel'"):
        split_kv_attention(q, cache_lib.quantize(k, 8, "channel"), v)
    with pytest.raises(ValueError, match="KVCache"):
        split_kv_decode(q, {"keys": k})


def test_dispatch_threshold_and_override():
    q, k, _ = inputs(6, length=64)
    assert kv_cache.decode_choice(q, k, None, None) == "dense"  # below SPLIT_MIN_CAPACITY on CPU
    big = jnp.zeros((2, kv_cache.SPLIT_MIN_CAPACITY, 2, 8))
    assert kv_cache.decode_choice(q, big, None, None) == "split_kv"
    assert kv_cache.decode_choice(q, big, None, "xla") == "dense"
    assert kv_cache.decode_choice(q, k, None, "split_kv") == "split_kv"
    prefill = jnp.zeros((2, 64, 4, 8))
    assert kv_cache.decode_choice(prefill, k, None, "split_kv") == "dense"  # the creating call is a prefill
    with pytest.raises(ValueError, match="logits bias"):
        kv_cache.decode_choice(q, k, jnp.zeros((1, 4, 1, 64)), "split_kv")


def test_decode_attention_ragged_dense_fallback_equals_split():
    q, k, v = inputs(7, length=48)
    lengths = jnp.array([[48, 3], [10, 22]], jnp.int32)
    dense = kv_cache.decode_attention(q, k, v, lengths=lengths, implementation="xla")
    split = kv_cache.decode_attention(q, k, v, lengths=lengths, implementation="split_kv", num_splits=4)
    np.testing.assert_allclose(dense, split, **TOL)
    np.testing.assert_allclose(split, numpy_decode(q, k, v, np.asarray(lengths)), **TOL)


@pytest.mark.parametrize("position", ["rope", "none"])
def test_softmax_layer_decode_split_equals_dense(position):
    """Token-by-token decoding of the softmax layer with implementation='split_kv' equals 'xla' (dense decode)."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 12, 32)), jnp.float32)
    outs = {}
    for impl in ("xla", "split_kv"):
        layer = attn.build("softmax", num_heads=4, num_kv_heads=2, head_dim=8, position=position, implementation=impl)
        params = layer.init(jax.random.key(0), x)
        apply = jax.jit(lambda p, t, layer=layer: layer.apply(p, t, decode=True, mutable=["cache"]))
        _, state = apply(params, x)  # the creating call sizes the cache at 12 slots
        ys, cache = [], state["cache"]
        for t in range(12):
            y, state = apply({**params, "cache": cache}, x[:, t : t + 1])
            ys.append(y)
            cache = state["cache"]
        outs[impl] = np.concatenate(ys, axis=1)
    np.testing.assert_allclose(outs["split_kv"], outs["xla"], **TOL)


def test_auto_dispatch_splits_a_lightly_filled_cache_and_scores_a_full_one_densely():
    """implementation=None on a SPLIT_MIN_CAPACITY-slot cache: at a low fill the split branch runs (NaN values
    beyond the filled splits are never read), at a high fill the dense branch runs (it reads every slot, so the
    NaN reaches its output through 0 * NaN); both equal the reference on a clean cache."""
    capacity = kv_cache.SPLIT_MIN_CAPACITY
    q, k, v = inputs(9, batch=1, heads=2, kv_heads=1, dim=8, length=capacity)
    low, high = 200, int(capacity * kv_cache.SPLIT_MAX_FILL) + 64
    poisoned = v.at[:, high + 512 :].set(jnp.nan)
    decode = jax.jit(
        lambda q, k, v, n: kv_cache.decode_attention(
            q, k, v, mask=Mask(causal=True, kv_lengths=n[None]), q_offset=n - 1, num_splits=16
        )
    )
    for filled in (low, high):
        ref = numpy_decode(q, k, v, np.full((1, 1), filled))
        np.testing.assert_allclose(decode(q, k, v, jnp.asarray(filled)), ref, **TOL)
    np.testing.assert_allclose(
        decode(q, k, poisoned, jnp.asarray(low)), numpy_decode(q, k, v, np.full((1, 1), low)), **TOL
    )
    assert not np.all(np.isfinite(np.asarray(decode(q, k, poisoned, jnp.asarray(high)))))
