"""EMS (`ems`): decoding equals a numpy replay of the Global-Local score, the head-wise keep rule and the evict-then-
merge (score-weighted folding of redundant evicted entries, the rest dropped) on float64 q/k/v, token by token and
after a prompt chunk; merging an exact copy changes nothing; budget >= length is causal softmax attention; the cache is
allocated at the budget; bad options are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core import cache as cache_lib
from attn.kv import ems
from tests.kv.decoding import decode_cache_bytes, decode_equals_softmax, decode_pieces
from tests.kv.score_reference import np_rope, projections

B, T, E, H, D = 2, 12, 16, 4, 8
BUDGET, RECENT, DECAY, THRESHOLD = 5, 1, 0.8, 0.2
CAUSAL = attn.Mask(causal=True)


def build(**options):
    defaults = {"budget": BUDGET, "recent": RECENT, "decay": DECAY, "threshold": THRESHOLD}
    return attn.build("ems", num_heads=H, head_dim=D, **{**defaults, **options})


def inputs(seed=0, length=T):
    return 3.0 * jax.random.normal(jax.random.key(seed), (B, length, E))


def cos(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def reference(params, x, pieces, *, kv_heads, budget, recent, decay, threshold):
    """(y [B, T, E], per (b, g) the kept entries [(position, key, value, m, r)], merge and drop counts)."""
    q, k, v, out_kernel = projections(params, x)
    group = H // kv_heads
    out = np.zeros(q.shape)
    cache = [[[] for _ in range(kv_heads)] for _ in range(B)]
    merges = drops = 0
    start = 0
    for size in pieces:
        chunk = list(range(start, start + size))
        n = start + size
        for b in range(B):
            for g in range(kv_heads):
                cands = [list(entry) for entry in cache[b][g]] + [[t, k[b, t, g], v[b, t, g], 0.0, 0.0] for t in chunk]
                mass = np.zeros(len(cands))
                local = np.zeros(len(cands))
                for h in range(g * group, (g + 1) * group):
                    for t in chunk:
                        seen = [i for i, c in enumerate(cands) if c[0] <= t]
                        keys = np.stack([np_rope(cands[i][1], cands[i][0]) for i in seen])
                        logits = keys @ np_rope(q[b, t, h], t) / np.sqrt(D)
                        w = np.exp(logits - logits.max())
                        w /= w.sum()
                        out[b, t, h] = w @ np.stack([cands[i][2] for i in seen])
                        for i, a in zip(seen, w, strict=True):
                            mass[i] += a
                            local[i] += decay ** (n - 1 - t) * a
                for i, c in enumerate(cands):
                    c[3] += mass[i]
                    c[4] = c[4] * decay**size + local[i]
                glo = np.array([c[3] / max(n - c[0], 1) for c in cands])
                loc = np.array([c[4] for c in cands])
                score = glo / max(glo.mean(), 1e-12) + loc / max(loc.mean(), 1e-12)
                latest = [i for i, c in enumerate(cands) if c[0] >= n - recent]
                older = sorted((i for i, c in enumerate(cands) if c[0] < n - recent), key=lambda i: (-score[i], i))
                kept = sorted(latest + older[: budget - recent])
                evicted = [i for i in range(len(cands)) if i not in kept]
                weight = np.maximum(score, 1e-6)
                num_k = {c: weight[c] * cands[c][1] for c in kept}
                num_v = {c: weight[c] * cands[c][2] for c in kept}
                den = {c: weight[c] for c in kept}
                extra = {c: [0.0, 0.0] for c in kept}
                for e in evicted:
                    rho = [cos(cands[e][1], cands[c][1]) * cos(cands[e][2], cands[c][2]) for c in kept]
                    best = int(np.argmax(rho))
                    if rho[best] >= threshold:
                        c = kept[best]
                        num_k[c] = num_k[c] + weight[e] * cands[e][1]
                        num_v[c] = num_v[c] + weight[e] * cands[e][2]
                        den[c] += weight[e]
                        extra[c][0] += cands[e][3]
                        extra[c][1] += cands[e][4]
                        merges += 1
                    else:
                        drops += 1
                cache[b][g] = [
                    (cands[c][0], num_k[c] / den[c], num_v[c] / den[c], cands[c][3] + extra[c][0],
                     cands[c][4] + extra[c][1])
                    for c in kept
                ]  # fmt: skip
        start = n
    return np.einsum("bthd,hde->bte", out, out_kernel), cache, merges, drops


@pytest.mark.parametrize(("kv_heads", "pieces"), [(2, (1,) * T), pytest.param(4, (5, 3, 1, 3), marks=pytest.mark.slow)])
def test_decode_equals_reconstructed_rule(kv_heads, pieces):
    layer = build(num_kv_heads=kv_heads)
    x = inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, pieces)
    expected, kept, merges, drops = reference(
        params, x, pieces, kv_heads=kv_heads, budget=BUDGET, recent=RECENT, decay=DECAY, threshold=THRESHOLD
    )
    assert merges > 0 and drops > 0  # both branches of the evict-then-merge ran
    np.testing.assert_allclose(y, expected, atol=5e-5, rtol=1e-4)
    for b in range(B):
        for g in range(kv_heads):
            entries = kept[b][g]
            np.testing.assert_array_equal(cache["cache_positions"][b, g], [e[0] for e in entries])
            np.testing.assert_allclose(cache["cached_key"][b, :, g], np.stack([e[1] for e in entries]), atol=1e-4)
            np.testing.assert_allclose(cache["cached_value"][b, :, g], np.stack([e[2] for e in entries]), atol=1e-4)
            np.testing.assert_allclose(cache["cache_key_mass"][b, g], [e[3] for e in entries], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(cache["cache_key_recent"][b, g], [e[4] for e in entries], rtol=1e-4, atol=1e-5)
    # head-wise: some sequence keeps different entries in different kv heads
    assert any(kept[b][g][i][0] != kept[b][0][i][0] for b in range(B) for g in range(kv_heads) for i in range(BUDGET))


def test_merging_a_copy_changes_nothing_and_threshold_drops_the_rest():
    """A kept entry and an evicted copy of it: the merge leaves the kept key/value as they were and adds the copy's
    statistics; an evicted entry below the threshold is dropped (kept entries unchanged)."""
    key = np.array([1.0, 0.0, 0.0, 0.0])
    other = np.array([0.0, 1.0, 0.0, 0.0])
    keys = jnp.asarray(np.stack([key, key, other])[None, :, None, :], jnp.float32)  # [1, 3, 1, 4]
    cands = cache_lib.Candidates(
        keys=keys, values=keys, stored_keys=keys, stored_values=keys,
        positions=jnp.arange(3)[None, None], valid=jnp.ones((1, 1, 3), bool), index=jnp.array(3),
        key_mass=jnp.array([[[0.5, 0.25, 2.0]]]), key_recent=jnp.array([[[0.1, 0.2, 0.3]]]),
    )  # fmt: skip
    kept = jnp.array([[[True, False, False]]])
    score = jnp.array([[[3.0, 1.0, 5.0]]])
    k2, v2, mass, recent = ems.merge_redundant(cands, kept, score, threshold=0.5)
    np.testing.assert_allclose(k2[0, :, 0], keys[0, :, 0])  # the copy folds in without change; the orthogonal stays
    np.testing.assert_allclose(v2, keys)
    np.testing.assert_allclose(mass[0, 0, 0], 0.75)  # the copy's mass joins its class; entry 2 (dropped) does not
    np.testing.assert_allclose(recent[0, 0, 0], 0.3, rtol=1e-6)


def test_budget_at_least_length_is_softmax():
    x = inputs(length=6)
    layer = build(budget=6, num_kv_heads=2)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    _, cache = decode_equals_softmax(layer, params, x, (2, 1, 3), mask=CAUSAL)
    np.testing.assert_array_equal(cache["cache_positions"], np.broadcast_to(range(6), (B, 2, 6)))


def test_cache_is_allocated_at_the_budget():
    x = inputs(length=20)
    small, large = build(num_kv_heads=2), build(num_kv_heads=2, budget=3 * BUDGET)
    params = small.init(jax.random.key(1), x[:, :4], mask=CAUSAL)

    def cache_bytes(layer, length):
        return decode_cache_bytes(layer, params, x[:, :length])

    assert cache_bytes(small, 8) == cache_bytes(small, 20)
    per_slot = B * 2 * (2 * D * 4 + 4 + 4 + 4)  # keys, values (float32), position, global and local statistics
    assert cache_bytes(large, 20) - cache_bytes(small, 20) == 2 * BUDGET * per_slot


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"budget": 0}, "budget=0 must be a positive int"),
        ({"recent": 6}, r"recent=6 must be in \[0, budget=5\]"),
        ({"decay": 1.0}, "decay=1.0 must be"),
        ({"threshold": 1.5}, "threshold=1.5 must be"),
        ({"cache_bits": 8}, "cache_bits=8 must be"),
        ({"window": 3}, "window=3 must be None"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options).init(jax.random.key(0), inputs())
