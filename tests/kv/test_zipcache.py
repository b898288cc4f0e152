"""ZipCache (`zipcache`): decoding equals a numpy replay of the rule (normalized-attention saliency, the floor(r m)
least salient tokens of each compressed group at low bits, channel-separable token-wise codes, a full-precision
window of `gap` generated tokens); the quantization error stays within its bound; the normalized score removes the
early-token bias; the two stores are allocated at their capacities with packed codes; 8-bit storage is close to
softmax attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core import cache as cache_lib
from attn.kv import zipcache
from tests.kv.decoding import decode_pieces
from tests.kv.score_reference import np_rope, projections

B, T, E, H, D = 2, 12, 16, 4, 8
CAUSAL = attn.Mask(causal=True)


def build(**options):
    base = {"num_kv_heads": 2, "bits_high": 8, "bits_low": 4, "low_ratio": 0.5, "gap": 3}
    return attn.build("zipcache", num_heads=H, head_dim=D, **{**base, **options})


def inputs(seed=0, length=T):
    return 3.0 * jax.random.normal(jax.random.key(seed), (B, length, E))


def np_codes(x, scale, bits):
    """Channel-separable token-wise quantization of x [T, D] with channel scales [D] (float32, as stored)."""
    y = (x.astype(np.float32) / scale).astype(np.float32)
    low, high = y.min(-1, keepdims=True), y.max(-1, keepdims=True)
    step = np.where(high > low, (high - low) / np.float32(2**bits - 1), np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.round((y - low) / step), 0, 2**bits - 1)
    return ((codes * step + low) * scale).astype(np.float64)


def reference(params, x, pieces, *, kv_heads=2, bits_high=8, bits_low=4, ratio=0.5, gap=3):
    q, k, v, out_kernel = projections(params, x)
    group = q.shape[2] // kv_heads
    out = np.zeros(q.shape)
    stores = [[{"high": [], "low": [], "window": [], "scale": None} for _ in range(kv_heads)] for _ in range(B)]
    start = 0
    for size in pieces:
        chunk, n = list(range(start, start + size)), start + size
        for b in range(B):
            for g in range(kv_heads):
                st = stores[b][g]
                fresh = [[j, k[b, j, g], v[b, j, g], 0.0] for j in chunk]
                pending = st["window"] + fresh
                cached = st["high"] + st["low"]
                for h in range(g * group, (g + 1) * group):
                    for t in chunk:
                        seen = cached + [e for e in pending if e[0] <= t]
                        keys = np_rope(np.stack([e[1] for e in seen]), np.array([e[0] for e in seen]))
                        logits = keys @ np_rope(q[b, t, h], t) / np.sqrt(D)
                        w = np.exp(logits - logits.max())
                        w /= w.sum()
                        out[b, t, h] = w @ np.stack([e[2] for e in seen])
                        for e, a in zip(seen[len(cached) :], w[len(cached) :], strict=True):
                            e[3] += a
                if start == 0:  # the prompt: channel scales, every token compressed
                    kk = np.stack([e[1] for e in pending]).astype(np.float32)
                    vv = np.stack([e[2] for e in pending]).astype(np.float32)
                    st["scale"] = (np.sqrt(np.abs(kk).max(0)), np.sqrt(np.abs(vv).max(0)))
                    m = len(pending)
                else:
                    m = len(pending) // gap * gap
                chosen, st["window"] = pending[:m], pending[m:]
                n_low = math.floor(ratio * m + 1e-6)
                order = sorted(chosen, key=lambda e: (e[3] / (n - e[0]), e[0]))
                low_ids = {e[0] for e in order[:n_low]}
                for e in chosen:
                    bits, dest = (bits_low, "low") if e[0] in low_ids else (bits_high, "high")
                    kq = np_codes(np.asarray(e[1])[None], st["scale"][0], bits)[0]
                    vq = np_codes(np.asarray(e[2])[None], st["scale"][1], bits)[0]
                    st[dest].append([e[0], kq, vq, 0.0])
        start = n
    return np.einsum("bthd,hde->bte", out, out_kernel), stores


@pytest.mark.parametrize("pieces", [pytest.param((5,) + (1,) * 7, marks=pytest.mark.slow), (4, 2, 3, 3)])
def test_decode_equals_reference(pieces):
    layer = build()
    x = inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, pieces)
    expected, stores = reference(params, x, pieces)
    np.testing.assert_allclose(y, expected, atol=2e-4, rtol=1e-3)
    for b in range(B):
        for g in range(2):
            st = stores[b][g]
            for name, lengths, positions in (
                ("high", "cache_lengths", "cache_positions"),
                ("low", "low_lengths", "low_positions"),
            ):
                kept = [e[0] for e in st[name]]
                assert int(cache[lengths][b, g]) == len(kept)
                np.testing.assert_array_equal(cache[positions][b, g, : len(kept)], kept)
            assert int(cache["window_count"]) == len(st["window"])
    assert any(stores[0][0]["low"]) and {e[0] for e in stores[0][0]["low"]} != {e[0] for e in stores[0][1]["low"]}


def test_quantization_error_within_bound():
    x = jax.random.normal(jax.random.key(3), (2, 6, 2, 8)) * jnp.arange(1.0, 9.0)  # channels of growing range
    scale = zipcache.channel_scale(x, jnp.ones((2, 6, 2), bool))
    np.testing.assert_allclose(scale[:, 0], np.sqrt(np.abs(np.asarray(x)).max(1)), rtol=1e-6)
    for bits in (2, 4, 8):
        approx = zipcache.dequantize_separable(zipcache.quantize_separable(x, scale, bits), scale)
        y = np.asarray(x) / np.asarray(scale)
        span = (y.max(-1, keepdims=True) - y.min(-1, keepdims=True)) / (2**bits - 1)
        bound = np.asarray(scale) * span / 2 + 1e-5
        assert np.all(np.abs(np.asarray(approx) - np.asarray(x)) <= bound), bits


def test_normalized_saliency_removes_the_early_token_bias():
    """Keys that receive the same weight c from every query that sees them score c wherever they sit; their raw
    column sums c (n - j) favour early keys."""
    n, c = 8, 0.1
    positions = jnp.arange(n)[None, None]
    mass = c * (n - positions).astype(jnp.float32)
    np.testing.assert_allclose(zipcache.normalized_saliency(mass, positions, jnp.int32(n)), np.full((1, 1, n), c))
    low, high = zipcache.split_by_saliency(jnp.array([[[0.3, 0.1, 0.2, 0.1]]]), jnp.ones((1, 1, 4), bool), 0.5)
    np.testing.assert_array_equal(low, [[[False, True, False, True]]])
    np.testing.assert_array_equal(high, ~np.asarray(low))


def test_stores_are_allocated_at_their_capacity():
    layer = build(bits_high=4, bits_low=2, low_ratio=0.4, gap=4)
    x = inputs(length=20)
    params = layer.init(jax.random.key(1), x[:, :4], mask=CAUSAL)
    shapes = jax.eval_shape(lambda: layer.apply(params, x, decode=True, mutable=["cache"])[1])["cache"]
    high, low = math.ceil(0.6 * 20) + 20 // 4 + 1, math.floor(0.4 * 20)
    assert shapes["cached_key"].codes.shape == (B, high, 2, D // 2)  # 4-bit: two codes per byte
    assert shapes["low_key"].codes.shape == (B, low, 2, D // 4)  # 2-bit: four codes per byte
    assert shapes["window_key"].shape == (B, 4, 2, D)
    dense = 2 * B * 20 * 2 * D * 4
    assert cache_lib.nbytes(shapes) < dense, (cache_lib.nbytes(shapes), dense)


def test_eight_bit_storage_is_close_to_softmax():
    x = inputs(seed=2)
    layer = build(bits_low=8, low_ratio=0.0)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, _ = decode_pieces(layer, params, x, (6,) + (1,) * 6)
    exact = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2).apply(params, x, mask=CAUSAL)
    error = np.abs(y - np.asarray(exact)).max() / np.abs(np.asarray(exact)).max()
    assert 0 < error < 0.02, error


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits_low": 8, "bits_high": 4}, "bits_low=8 must be at most bits_high=4"),
        ({"bits_high": 3}, "bits_high=3 must be one of"),
        ({"low_ratio": 1.5}, "low_ratio=1.5 must be"),
        ({"gap": 0}, "gap=0 must be a positive int"),
        ({"cache_bits": 8}, "cache_bits=8 must be None for zipcache"),
        ({"position": "alibi"}, "position='alibi' must be one of"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options).init(jax.random.key(0), inputs())
