"""ZipVL's KV cache (`zipvl_cache`): decoding equals a numpy replay of the rule (per batch row and layer, the fewest
tokens of largest accumulated attention covering tau of it are important, chosen by normalized score, stored at
high bits; the rest at low bits; ZipCache's channel-separable token-wise codes and window); the count adapts to
how concentrated the attention is; tau = 1 decodes bit-identically to `zipcache`; the stores are allocated at
their capacities; bad options are refused."""

import math

import jax
import numpy as np
import pytest

import attn
from attn.kv.zipvl_cache import important_count
from tests.kv.decoding import decode_pieces
from tests.kv.score_reference import np_rope, projections

B, T, E, H, D, KVH = 2, 12, 16, 4, 8, 2
CAUSAL = attn.Mask(causal=True)
BASE = {"num_kv_heads": KVH, "bits_high": 8, "bits_low": 4, "gap": 3}


def build(name="zipvl_cache", **options):
    return attn.build(name, num_heads=H, head_dim=D, **{**BASE, **options})


def inputs(seed=0, length=T):
    return 3.0 * jax.random.normal(jax.random.key(seed), (B, length, E))


def np_quantized(x, scale, bits):
    """x [D] through channel-separable token-wise codes: divide by the channel scales [D], min/max over the
    channels at `bits` bits, multiply back (float32 arithmetic, as stored)."""
    y = (x.astype(np.float32) / scale).astype(np.float32)
    low, high = y.min(), y.max()
    step = np.float32((high - low) / np.float32(2**bits - 1)) if high > low else np.float32(1.0)
    codes = np.clip(np.round((y - low) / step), 0, 2**bits - 1)
    return ((codes * step + low) * scale).astype(np.float64)


def np_count(scores, tau):
    """Loop: add scores from the largest down until tau of the total is covered."""
    total, covered = sum(scores), 0.0
    for count, s in enumerate(sorted(scores, reverse=True), start=1):
        covered += s
        if covered >= tau * total:
            return count
    return len(scores)


def reference(params, x, pieces, *, tau, low_ratio=0.0, bits_high=8, bits_low=4, gap=3):
    """Replays decoding: returns (output [B, T, E], per (b, g) the positions stored high and low)."""
    q, k, v, out_kernel = projections(params, x)
    group = H // KVH
    out = np.zeros(q.shape)
    stores = [[{"high": [], "low": []} for _ in range(KVH)] for _ in range(B)]
    windows = [[[] for _ in range(KVH)] for _ in range(B)]  # entries [pos, key, value, mass]
    scales = [[None] * KVH for _ in range(B)]
    start = 0
    for size in pieces:
        chunk, n = list(range(start, start + size)), start + size
        for b in range(B):
            for g in range(KVH):
                windows[b][g] = windows[b][g] + [[j, k[b, j, g], v[b, j, g], 0.0] for j in chunk]
                cached = stores[b][g]["high"] + stores[b][g]["low"]
                for h in range(g * group, (g + 1) * group):
                    for t in chunk:
                        seen = cached + [e for e in windows[b][g] if e[0] <= t]
                        keys = np_rope(np.stack([e[1] for e in seen]), np.array([e[0] for e in seen]))
                        logits = keys @ np_rope(q[b, t, h], t) / np.sqrt(D)
                        w = np.exp(logits - logits.max())
                        w /= w.sum()
                        out[b, t, h] = w @ np.stack([e[2] for e in seen])
                        for e, a in zip(seen[len(cached) :], w[len(cached) :], strict=True):
                            e[3] += a
            m = len(windows[b][0]) if start == 0 else len(windows[b][0]) // gap * gap
            if start == 0:  # channel scales from the prompt
                for g in range(KVH):
                    kk = np.stack([e[1] for e in windows[b][g]]).astype(np.float32)
                    vv = np.stack([e[2] for e in windows[b][g]]).astype(np.float32)
                    scales[b][g] = (np.sqrt(np.abs(kk).max(0)), np.sqrt(np.abs(vv).max(0)))
            if m == 0:
                continue
            # one split per row: mass and normalized score summed over the kv heads
            mass = [sum(windows[b][g][i][3] for g in range(KVH)) for i in range(m)]
            position = [windows[b][0][i][0] for i in range(m)]
            score = [mass[i] / (n - position[i]) for i in range(m)]
            p = min(np_count(mass, tau), m - math.floor(low_ratio * m + 1e-6))
            ranked = sorted(range(m), key=lambda i: (-score[i], -position[i]))  # ties: the later one ranks higher
            important = set(ranked[:p])
            for g in range(KVH):
                for i, e in enumerate(windows[b][g][:m]):
                    bits, dest = (bits_high, "high") if i in important else (bits_low, "low")
                    key = np_quantized(np.asarray(e[1]), scales[b][g][0], bits)
                    value = np_quantized(np.asarray(e[2]), scales[b][g][1], bits)
                    stores[b][g][dest].append([e[0], key, value, 0.0])
                windows[b][g] = windows[b][g][m:]
        start = n
    positions = [[{name: [e[0] for e in stores[b][g][name]] for name in ("high", "low")} for g in range(KVH)]
                 for b in range(B)]  # fmt: skip
    return np.einsum("bthd,hde->bte", out, out_kernel), positions


def test_important_count_matches_loop_and_adapts():
    rng = np.random.default_rng(0)
    scores = rng.random((3, 9)) ** 4 + 0.01  # the smallest within float32 resolution of the total
    for tau in (0.3, 0.8, 1.0):
        got = np.asarray(important_count(scores.astype(np.float32), tau))[:, 0]
        assert list(got) == [np_count(list(row), tau) for row in scores], tau
    concentrated = np.array([[8.0, 0.2, 0.2, 0.2, 0.2, 0.2]], np.float32)
    spread = np.ones((1, 6), np.float32)
    assert int(important_count(concentrated, 0.9)[0, 0]) == 2 and int(important_count(spread, 0.9)[0, 0]) == 6
    assert int(important_count(np.array([[3.0, 1.0, 0.0, 0.0]], np.float32), 1.0)[0, 0]) == 2  # zeros: outside


@pytest.mark.slow  # compiles a decode step per chunk size (25-50 s on the loaded 2 cores)
@pytest.mark.parametrize(("tau", "low_ratio"), [(0.6, 0.0), (0.9, 0.5)])
def test_decode_equals_reference(tau, low_ratio):
    pieces = (4, 4, 4)  # the prompt, then 4 + 4 generated tokens: two windows of 3 compressed, 2 left waiting
    layer = build(tau=tau, low_ratio=low_ratio)
    x = inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, pieces)
    expected, stores = reference(params, x, pieces, tau=tau, low_ratio=low_ratio)
    np.testing.assert_allclose(y, expected, atol=2e-4, rtol=1e-3)
    for b in range(B):
        for g in range(KVH):
            for name, lengths, positions in (
                ("high", "cache_lengths", "cache_positions"),
                ("low", "low_lengths", "low_positions"),
            ):
                kept = stores[b][g][name]
                assert int(cache[lengths][b, g]) == len(kept), (b, g, name)
                np.testing.assert_array_equal(np.sort(cache[positions][b, g, : len(kept)]), sorted(kept))
    # the share of important tokens is dynamic: it differs between the batch rows or between the groups
    assert stores[0][0]["low"] and 0 < len(stores[0][0]["high"]) < 9


@pytest.mark.slow  # two layers' decode steps compile
def test_tau_one_decodes_like_zipcache():
    """One kv head (ZipCache splits per kv head, ZipVL per layer): every token is important up to the budget."""
    x = inputs(seed=4)
    pieces = (6, 6)
    ours = build(tau=1.0, low_ratio=0.5, num_kv_heads=1)
    params = ours.init(jax.random.key(2), x, mask=CAUSAL)
    y, _ = decode_pieces(ours, params, x, pieces)
    z, _ = decode_pieces(build("zipcache", low_ratio=0.5, num_kv_heads=1), params, x, pieces)
    np.testing.assert_array_equal(y, z)


@pytest.mark.slow  # traces the decode call (several seconds)
def test_stores_are_allocated_at_their_capacity():
    layer = build(bits_high=4, bits_low=2, low_ratio=0.25, gap=4)
    x = inputs(length=20)
    params = layer.init(jax.random.key(1), x[:, :4], mask=CAUSAL)
    shapes = jax.eval_shape(lambda: layer.apply(params, x, decode=True, mutable=["cache"])[1])["cache"]
    high = math.ceil(0.75 * 20) + 20 // 4 + 1
    assert shapes["cached_key"].codes.shape == (B, high, KVH, D // 2)  # 4-bit: two codes per byte
    assert shapes["low_key"].codes.shape == (B, 19, KVH, D // 4)  # every token but one, 2-bit
    codes = math.prod(shapes["cached_key"].codes.shape) + math.prod(shapes["low_key"].codes.shape)  # bytes
    assert codes < 0.25 * B * 20 * KVH * D * 4  # under a quarter of float32 keys (scales and window on top)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"tau": 0.0}, "tau=0.0 must be"), ({"tau": 1.5}, "tau=1.5 must be"), ({"low_ratio": -0.1}, "low_ratio=-0.1")],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options).init(jax.random.key(0), inputs())
