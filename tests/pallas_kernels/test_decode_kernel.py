"""The split-KV decode kernel (Pallas on Triton) in the Pallas interpreter on CPU: its per-split partials against the
dense reference, and the merged result against the XLA split-KV path (attn.core.split_kv_decode), for split counts
1, 2, 3 and more splits than tiles, ragged per-(batch, kv head) lengths (an empty head among them), GQA, causal
multi-token decoding, softcap, and int8 / int4 / int2 codes dequantised in the kernel. Small shapes: the file runs in
well under a minute. The gpu-marked test compiles the kernel on a real GPU at a long cache (skipped elsewhere)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.core import cache as cache_lib
from attn.core.lse_merge import merge_partials
from attn.core.masks import Mask
from attn.core.split_kv_decode import split_kv_attention
from pallas_kernels.decode import decode_partials, decode_partials_reference

TOL = dict(rtol=2e-5, atol=2e-5)
RAGGED = np.array([[45, 13], [0, 30]], np.int32)


def inputs(seed, batch=2, q_len=1, heads=4, kv_heads=2, dim=16, length=45):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, q_len, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32)
    return q, k, v


def assert_partials_close(got, want):
    (o, lse), (ref_o, ref_lse) = got, want
    np.testing.assert_allclose(o, ref_o, **TOL)
    assert np.array_equal(np.isinf(lse), np.isinf(ref_lse)), "empty splits differ"
    np.testing.assert_allclose(np.where(np.isinf(ref_lse), 0.0, lse), np.where(np.isinf(ref_lse), 0.0, ref_lse), **TOL)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])  # 8 splits of 16-slot tiles: more splits than tiles
def test_partials_and_merge_ragged(num_splits):
    q, k, v = inputs(0)
    lengths = jnp.asarray(RAGGED)
    options = dict(num_splits=num_splits, block_k=16)
    got = decode_partials(q, k, v, lengths, interpret=True, **options)
    want = decode_partials_reference(q, k, v, lengths, work_units=2 * 2 * num_splits, **options)
    assert got[0].shape == (num_splits, 2, 1, 4, 16) and got[1].shape == (num_splits, 2, 1, 4)
    assert_partials_close(got, want)
    merged = merge_partials(*got, axis=0)[0]
    xla = split_kv_attention(q, k, v, lengths=lengths, num_splits=3, block=16)
    np.testing.assert_allclose(merged, xla, **TOL)
    assert np.all(np.asarray(merged)[1, :, :2] == 0.0)  # batch 1's first kv head is empty


def test_stream_k_share_balances_ragged_heads():
    """With few work units the share grows: every program reduces at most `share` tiles and the longest head's
    tiles are covered by its splits; the result does not depend on the partition."""
    q, k, v = inputs(1, length=64)
    lengths = jnp.array([[64, 3], [17, 40]], jnp.int32)
    results = []
    for units in (1, 3, 64):
        got = decode_partials(q, k, v, lengths, num_splits=4, work_units=units, block_k=16, interpret=True)
        want = decode_partials_reference(q, k, v, lengths, num_splits=4, work_units=units, block_k=16)
        assert_partials_close(got, want)
        results.append(merge_partials(*got, axis=0)[0])
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], **TOL)


def test_causal_multi_token_gqa_softcap_equals_xla_decode():
    """Three decoded tokens (the last three filled slots), 6 heads over 3 kv heads, head_dim 24 (padded to 32)."""
    q, k, v = inputs(2, batch=1, q_len=3, heads=6, kv_heads=3, dim=24, length=50)
    filled = 41
    got = decode_partials(
        q, k, v, jnp.full((1, 3), filled, jnp.int32), num_splits=3, block_k=16, causal=True, softcap=2.5,
        interpret=True,
    )  # fmt: skip
    merged = merge_partials(*got, axis=0)[0]
    mask = Mask(causal=True, kv_lengths=jnp.array([filled], jnp.int32))
    xla = split_kv_attention(q, k, v, mask=mask, q_offset=filled - 3, softcap=2.5, num_splits=2, block=16)
    np.testing.assert_allclose(merged, xla, **TOL)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_codes_dequantised_in_kernel(bits):
    q, k, v = inputs(3, dim=16, length=40)
    kq, vq = cache_lib.quantize(k, bits), cache_lib.quantize(v, bits)
    lengths = jnp.array([[40, 7], [22, 33]], jnp.int32)
    got = decode_partials(
        q, kq.codes, vq.codes, lengths, k_scale=kq.scale, k_zero=kq.zero, v_scale=vq.scale, v_zero=vq.zero,
        bits=bits, num_splits=3, block_k=16, interpret=True,
    )  # fmt: skip
    merged = merge_partials(*got, axis=0)[0]
    xla = split_kv_attention(q, kq, vq, lengths=lengths, num_splits=2, block=16)  # dequantised by cache.py
    np.testing.assert_allclose(merged, xla, **TOL)


def test_bad_arguments_name_what_is_wrong():
    q, k, v = inputs(4)
    lengths = jnp.asarray(RAGGED)
    with pytest.raises(ValueError, match="lengths has shape"):
        decode_partials(q, k, v, lengths[0], num_splits=2, interpret=True)
    with pytest.raises(ValueError, match="bits=3"):
        decode_partials(q, k, v, lengths, bits=3, num_splits=2, interpret=True)
    with pytest.raises(ValueError, match="block_k=24"):
        decode_partials(q, k, v, lengths, num_splits=2, block_k=24, interpret=True)
    with pytest.raises(ValueError, match="needs a GPU"):
        if jax.devices()[0].platform == "gpu":
            raise ValueError("needs a GPU (on a GPU the kernel compiles: nothing to check)")
        decode_partials(q, k, v, lengths, num_splits=2)


@pytest.mark.gpu
def test_compiled_kernel_long_cache_on_gpu():
    """interpret=False on a GPU: a 32K-slot cache, ragged lengths, int8 codes, against the XLA split path."""
    q, k, v = inputs(5, batch=2, heads=8, kv_heads=2, dim=128, length=32768)
    lengths = jnp.array([[32768, 1000], [20000, 5]], jnp.int32)
    for quantized in (False, True):
        if quantized:
            kq, vq = cache_lib.quantize(k, 8), cache_lib.quantize(v, 8)
            args = (kq.codes, vq.codes)
            extra = dict(k_scale=kq.scale, k_zero=kq.zero, v_scale=vq.scale, v_zero=vq.zero, bits=8)
            ref = split_kv_attention(q, kq, vq, lengths=lengths, num_splits=8)
        else:
            args, extra = (k, v), {}
            ref = split_kv_attention(q, k, v, lengths=lengths, num_splits=8)
        got = decode_partials(q, *args, lengths, num_splits=16, block_k=128, **extra)
        np.testing.assert_allclose(merge_partials(*got, axis=0)[0], ref, rtol=1e-4, atol=1e-4)
