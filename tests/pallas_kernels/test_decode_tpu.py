"""The split-KV decode kernel for TPU (Pallas Mosaic, pallas_kernels/decode/tpu.py) in the TPU interpreter on CPU.

Every case checks the per-split partials (o, lse) against the dense jnp reference (decode/reference.py) AND an
independent numpy explicit loop (the stream-K share from partition.py's formula, one softmax per split, query and
head, written here), and the lse-merged result against the loop's full softmax. Cases: split counts 1, 2, 3 (and more
splits than tiles), ragged per-(batch, kv head) lengths with an empty head and a full one, GQA / MQA, batch 1 and 3,
head_dim 64 and 128, causal multi-token decoding with softcap, int8 codes (int4 / int2 in the slow run) read and
dequantised in the kernel. The default cases compile the interpreter once each (a few seconds of CPU each); the
lowering test runs the Pallas -> Mosaic lowering without a TPU; `tpu`-marked tests compile on a real TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.core.lse_merge import merge_partials
from pallas_kernels.decode import decode_partials, decode_partials_reference

TOL = dict(rtol=2e-5, atol=2e-5)
# One XLA compile each instead of one per jnp op (the default run is near its time limit).
reference = jax.jit(
    decode_partials_reference, static_argnames=("num_splits", "work_units", "block_k", "causal", "scale", "softcap")
)
merge = jax.jit(merge_partials, static_argnames="axis")


# ---- the independent numpy reference: explicit loops over splits, queries, heads and slots ----


def numpy_share(lengths: np.ndarray, block: int, num_splits: int, units: int) -> int:
    """partition.py's docstring formula: max(ceil(sum tiles / units), ceil(max tiles / S), 1)."""
    tiles = [-(-int(n) // block) for n in lengths.ravel()]
    return max(-(-sum(tiles) // units), -(-max(tiles) // num_splits), 1)


def numpy_partials(q, k, v, lengths, *, num_splits, block, units, causal=False, softcap=None):
    """o [S, B, Tq, H, Dv] and lse [S, B, Tq, H] with a Python loop per (split, batch, query, head) and per slot."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    share = numpy_share(lengths, block, num_splits, units)
    o = np.zeros((num_splits, batch, q_len, heads, v.shape[-1]))
    lse = np.full((num_splits, batch, q_len, heads), -np.inf)
    for s in range(num_splits):
        for b in range(batch):
            for h in range(heads):
                kvh = h // (heads // kv_heads)
                n = int(lengths[b, kvh])
                start, stop = s * share * block, min((s + 1) * share * block, n)
                for i in range(q_len):
                    logits, values = [], []
                    for j in range(start, stop):
                        if causal and j >= n - (q_len - 1 - i):
                            continue
                        x = float(q[b, i, h] @ k[b, j, kvh]) / np.sqrt(dim)
                        logits.append(softcap * np.tanh(x / softcap) if softcap else x)
                        values.append(v[b, j, kvh])
                    if logits:
                        top = max(logits)
                        weights = np.exp(np.array(logits) - top)
                        lse[s, b, i, h] = top + np.log(weights.sum())
                        o[s, b, i, h] = (weights[:, None] * np.array(values)).sum(0) / weights.sum()
    return o, lse


def numpy_merge(o, lse):
    """The full softmax from the partials, by a loop over the splits (0 where no split saw a key)."""
    total = np.full(lse.shape[1:], -np.inf)
    for s in range(lse.shape[0]):
        total = np.logaddexp(total, lse[s])
    safe = np.where(np.isinf(total), 0.0, total)
    weights = np.where(np.isinf(lse), 0.0, np.exp(lse - safe[None]))
    return (weights[..., None] * o).sum(0)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., D] (< 2^bits) -> bytes [..., D bits / 8], channel c in bits [bits (c % n), ...) of c // n."""
    per_byte = 8 // bits
    out = np.zeros((*codes.shape[:-1], codes.shape[-1] // per_byte), np.int64)
    for c in range(codes.shape[-1]):
        out[..., c // per_byte] |= codes[..., c].astype(np.int64) << (bits * (c % per_byte))
    return out.astype(np.uint8)


# ---- cases ----


def inputs(seed, *, batch, q_len, heads, kv_heads, dim, length, bits=None):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, dim)).astype(np.float32)
    if bits is None:
        k, v = (rng.standard_normal((batch, length, kv_heads, dim)).astype(np.float32) for _ in range(2))
        return q, k, v, {}
    cache = {}
    for name in ("k", "v"):
        codes = rng.integers(0, 2**bits, (batch, length, kv_heads, dim))
        scale = rng.uniform(0.5, 1.5, (batch, length, kv_heads, 1)).astype(np.float32) / 2**bits
        zero = rng.uniform(-0.5, 0.5, (batch, length, kv_heads, 1)).astype(np.float32)
        cache[name] = (codes * scale.astype(np.float64) + zero, pack(codes, bits))  # (dequantised, bytes)
        cache[f"{name}_scale"], cache[f"{name}_zero"] = scale, zero
    return q, cache["k"][0], cache["v"][0], cache


def check(case, *, num_splits, block_k, lengths, causal=False, softcap=None, bits=None, work_units=None, seed=0):
    q, k, v, cache = inputs(seed, bits=bits, **case)
    batch, kv_heads = lengths.shape
    units = batch * kv_heads * num_splits if work_units is None else work_units
    options = dict(num_splits=num_splits, block_k=block_k, causal=causal, softcap=softcap)
    if bits is None:
        got = decode_partials(q, k, v, lengths, work_units=work_units, backend="tpu", interpret=True, **options)
    else:
        stored = {name: cache[name] for name in ("k_scale", "k_zero", "v_scale", "v_zero")}
        got = decode_partials(
            q, cache["k"][1], cache["v"][1], lengths, bits=bits, work_units=work_units, backend="tpu",
            interpret=True, **stored, **options,
        )  # fmt: skip
    o, lse = (np.asarray(x) for x in got)
    assert o.shape == (num_splits, batch, case["q_len"], case["heads"], case["dim"]) and o.dtype == np.float32
    assert lse.shape == o.shape[:-1]
    block = min(block_k, max(16, 1 << (case["length"] - 1).bit_length()))  # the key tile clipped to the cache
    want_o, want_lse = numpy_partials(q, k, v, lengths, num_splits=num_splits, block=block, units=units,
                                      causal=causal, softcap=softcap)  # fmt: skip
    ref_o, ref_lse = reference(
        jnp.asarray(q), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), lengths, work_units=units, **options
    )
    for other_o, other_lse in ((want_o, want_lse), (np.asarray(ref_o), np.asarray(ref_lse))):
        assert np.array_equal(np.isinf(lse), np.isinf(other_lse)), "empty splits differ"
        np.testing.assert_allclose(np.where(np.isinf(lse), 0.0, lse), np.where(np.isinf(lse), 0.0, other_lse), **TOL)
        np.testing.assert_allclose(o, other_o, **TOL)
    merged = np.asarray(merge(jnp.asarray(o), jnp.asarray(lse), axis=0)[0])
    np.testing.assert_allclose(merged, numpy_merge(want_o, want_lse), **TOL)
    return o, lse


def test_one_split_batch3_gqa_d64_ragged_with_empty_and_full_heads():
    case = dict(batch=3, q_len=1, heads=4, kv_heads=2, dim=64, length=40)
    lengths = np.array([[40, 0], [17, 40], [1, 33]], np.int32)
    o, lse = check(case, num_splits=1, block_k=16, lengths=lengths)
    assert np.all(o[:, 0, :, 2:] == 0.0) and np.all(np.isinf(lse[:, 0, :, 2:]))  # batch 0's second kv head is empty


def test_two_splits_batch1_mqa_d128_causal_softcap():
    """Two decoded tokens (the last two filled slots), 3 query heads on one kv head, a 128-slot memory tile that
    holds several 16-slot partition tiles: split boundaries fall inside a memory tile."""
    case = dict(batch=1, q_len=2, heads=3, kv_heads=1, dim=128, length=37)
    check(case, num_splits=2, block_k=16, lengths=np.array([[29]], np.int32), causal=True, softcap=3.0)


def test_three_splits_int8_codes_batch3_gqa():
    case = dict(batch=3, q_len=1, heads=4, kv_heads=2, dim=64, length=40)
    lengths = np.array([[40, 7], [0, 23], [12, 40]], np.int32)
    check(case, num_splits=3, block_k=16, lengths=lengths, bits=8, seed=1)


def test_bad_backend_and_device_named():
    q, k, v, _ = inputs(2, batch=1, q_len=1, heads=2, kv_heads=1, dim=64, length=8)
    lengths = np.array([[8]], np.int32)
    with pytest.raises(ValueError, match="backend='xla'"):
        decode_partials(q, k, v, lengths, num_splits=1, backend="xla", interpret=True)
    if jax.devices()[0].platform != "tpu":
        with pytest.raises(ValueError, match="backend='tpu' needs a TPU"):
            decode_partials(q, k, v, lengths, num_splits=1, backend="tpu")


def test_kernel_lowers_to_mosaic_for_tpu():
    """Without a TPU, jax.export still runs the Pallas -> Mosaic lowering (compiled mode, no interpreter): float32
    causal with softcap, bfloat16, and int4 codes, at a 1000-slot cache with 256-slot tiles and ragged lengths."""
    from jax import export

    from pallas_kernels.decode.tpu import decode_partials_tpu

    lengths = jnp.array([[1000, 3], [0, 500]], jnp.int32)
    options = dict(num_splits=3, work_units=12, block_k=256, scale=0.1, interpret=False)
    q = jnp.zeros((2, 2, 8, 128), jnp.float32)
    kv = jnp.zeros((2, 1000, 2, 128), jnp.float32)
    codes = jnp.zeros((2, 1000, 2, 64), jnp.uint8)
    scales = [jnp.ones((2, 1000, 2, 1), jnp.float32)] * 4
    calls = [
        (lambda q, k, v, n, share: decode_partials_tpu(q, k, v, n, None, None, None, None, share, bits=None,
                                                       causal=True, softcap=2.0, **options),
         (q, kv, kv, lengths, jnp.int32(2))),
        (lambda q, k, v, n, share: decode_partials_tpu(q, k, v, n, None, None, None, None, share, bits=None,
                                                       causal=False, softcap=None, **options),
         (q.astype(jnp.bfloat16), kv.astype(jnp.bfloat16), kv.astype(jnp.bfloat16), lengths, jnp.int32(2))),
        (lambda q, k, v, n, share, *s: decode_partials_tpu(q, k, v, n, *s, share, bits=4, causal=False, softcap=None,
                                                           **options),
         (q.astype(jnp.bfloat16), codes, codes, lengths, jnp.int32(2), *scales)),
    ]  # fmt: skip
    for fn, args in calls:
        module = export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
        assert module.count("tpu_custom_call") == 1


# ---- slow: more cases ----


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 2])
def test_packed_codes_dequantised_in_kernel(bits):
    case = dict(batch=1, q_len=1, heads=4, kv_heads=2, dim=64, length=40)
    check(case, num_splits=2, block_k=16, lengths=np.array([[40, 9]], np.int32), bits=bits, seed=3)


@pytest.mark.slow
def test_more_splits_than_tiles_and_few_work_units():
    """8 splits of 16-slot tiles on a 45-slot cache (empty splits), then 1 work unit (share = all tiles of a head:
    splits 1.. are empty); batch 3, head_dim 128, GQA."""
    case = dict(batch=3, q_len=1, heads=4, kv_heads=2, dim=128, length=45)
    lengths = np.array([[45, 13], [0, 30], [45, 45]], np.int32)
    check(case, num_splits=8, block_k=16, lengths=lengths, seed=4)
    check(case, num_splits=3, block_k=16, lengths=lengths, work_units=1, seed=4)


@pytest.mark.slow
def test_long_tiles_several_steps_per_split():
    """block_k 128 on a 700-slot cache: programs reduce several memory tiles (the grid's sequential axis)."""
    case = dict(batch=1, q_len=1, heads=2, kv_heads=2, dim=64, length=700)
    check(case, num_splits=2, block_k=128, lengths=np.array([[700, 260]], np.int32), seed=5)


@pytest.mark.slow
def test_lengths_past_the_cache_read_every_slot():
    """lengths > L raise the traced share past the grid's static bound: the kernel clips it, and the merged result
    equals attention over all L slots (the numpy loop with lengths = L)."""
    case = dict(batch=1, q_len=1, heads=4, kv_heads=2, dim=64, length=300)
    q, k, v, _ = inputs(7, **case)
    got = decode_partials(q, k, v, np.array([[900, 300]], np.int32), num_splits=2, block_k=128, backend="tpu",
                          interpret=True)  # fmt: skip
    want = numpy_partials(q, k, v, np.array([[300, 300]], np.int32), num_splits=2, block=128, units=4)
    np.testing.assert_allclose(merge(*got, axis=0)[0], numpy_merge(*want), **TOL)


# ---- compiled on a real TPU (skipped elsewhere) ----


@pytest.mark.tpu
def test_compiled_on_tpu_long_cache_int8_and_float():
    """interpret=False on a TPU: a 32K-slot cache, ragged lengths, float and int8 codes, against the jnp reference."""
    rng = np.random.default_rng(6)
    batch, heads, kv_heads, dim, length = 2, 8, 2, 128, 32768
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), jnp.float32) for _ in range(2))
    lengths = jnp.array([[32768, 1000], [20000, 0]], jnp.int32)
    options = dict(num_splits=16, block_k=512)
    got = decode_partials(q, k, v, lengths, **options)
    want = decode_partials_reference(q, k, v, lengths, work_units=batch * kv_heads * 16, **options)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    codes = jnp.asarray(rng.integers(0, 256, (batch, length, kv_heads, dim)), jnp.uint8)
    scale = jnp.full((batch, length, kv_heads, 1), 0.01, jnp.float32)
    zero = jnp.full((batch, length, kv_heads, 1), -1.0, jnp.float32)
    got = decode_partials(q, codes, codes, lengths, k_scale=scale, k_zero=zero, v_scale=scale, v_zero=zero, bits=8,
                          **options)  # fmt: skip
    x = codes.astype(jnp.float32) * scale + zero
    want = decode_partials_reference(q, x, x, lengths, work_units=batch * kv_heads * 16, **options)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
