"""Numpy references of the score-based eviction rules (h2o, a2sf, tova), written from the papers' equations and the
official caches' loops, independent of attn.kv: float64 q/k/v from the layer's parameters, RoPE at original
positions, explicit loops over (batch, kv head, query head, query), and the eviction applied after every decode
call (a chunk of several tokens attends causally to the cache and to itself, then is compressed once)."""

import flax.linen as nn
import jax
import numpy as np


def np_rope(x, pos, base=10000.0):
    """x [..., D] rotated at positions pos (broadcast against x[..., 0]; half-split pairs)."""
    inv = base ** (-np.arange(0, x.shape[-1], 2, dtype=np.float64) / x.shape[-1])
    angle = np.asarray(pos, np.float64)[..., None] * inv
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def projections(params, x):
    """float64 q [B, T, H, D], k, v [B, T, KVH, D] and the output kernel [H, D, E]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params)["params"])
    x = np.asarray(x, np.float64)
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
    k = np.einsum("bte,ehd->bthd", x, p["key"]["kernel"])
    v = np.einsum("bte,ehd->bthd", x, p["value"]["kernel"])
    return q, k, v, p["out"]["kernel"]


def alibi_slope(h, heads):
    """ALiBi's slope of head h (heads a power of two)."""
    return (2.0 ** (-8.0 / heads)) ** (h + 1)


def attend(q, k, v, b, h, t, entries, group, position="rope"):
    """Softmax weights of query (b, t, h) over `entries` at their original positions (RoPE, or ALiBi's bias) and its
    output."""
    keys, query = k[b, entries, h // group], q[b, t, h]
    if position == "rope":
        keys, query = np_rope(keys, np.array(entries)), np_rope(query, t)
    logits = keys @ query / np.sqrt(q.shape[-1])
    if position == "alibi":
        logits = logits - alibi_slope(h, q.shape[2]) * np.abs(t - np.array(entries))
    w = np.exp(logits - logits.max())
    w /= w.sum()
    return w, w @ v[b, entries, h // group]


def decode(params, x, pieces, *, kv_heads, score, keep, shared_heads=False, position="rope"):
    """Decodes x [B, T, E] in `pieces` (chunk sizes) and returns (y [B, T, E], kept, scores).

    score(old_scores: dict, weights: {(h, t): {j: a}}, chunk: list, heads: list) -> dict of scores per entry, called
    per (batch, kv head) with the weights of that kv head's query heads (or of every head when shared_heads);
    keep(entries: list, scores: dict, n: int) -> the kept entries. kept[b][g] and scores[b][g] after the last call.
    """
    q, k, v, out_kernel = projections(params, x)
    batch, length, heads = q.shape[:3]
    group = heads // kv_heads
    out = np.zeros(q.shape)
    kept = [[[] for _ in range(kv_heads)] for _ in range(batch)]
    scores = [[{} for _ in range(kv_heads)] for _ in range(batch)]
    start = 0
    for size in pieces:
        chunk = list(range(start, start + size))
        for b in range(batch):
            weights = {}
            for h in range(heads):
                g = h // group
                for t in chunk:
                    entries = kept[b][g] + [j for j in chunk if j <= t]
                    w, out[b, t, h] = attend(q, k, v, b, h, t, entries, group, position)
                    weights[(h, t)] = dict(zip(entries, w, strict=True))
            for g in range(kv_heads):
                own = range(heads) if shared_heads else range(g * group, (g + 1) * group)
                mine = {key: w for key, w in weights.items() if key[0] in own}
                scores[b][g] = score(scores[b][g], mine, chunk, list(own))
                kept[b][g] = keep(kept[b][g] + chunk, scores[b][g], start + size)
                scores[b][g] = {j: scores[b][g][j] for j in kept[b][g]}
        start += size
    assert start == length
    return np.einsum("bthd,hde->bte", out, out_kernel), kept, scores


def accumulated(forgetting=1.0):
    """H2O (forgetting 1) / A2SF score: s_j <- f^L s_j + sum_i f^(last - t_i) sum_h a_{h, t_i, j}."""

    def score(old, weights, chunk, heads):
        last = chunk[-1]
        new = {j: s * forgetting ** len(chunk) for j, s in old.items()}
        for (_, t), row in weights.items():
            for j, a in row.items():
                new[j] = new.get(j, 0.0) + forgetting ** (last - t) * a
        return new

    return score


def heavy_recent(budget, recent):
    """Keep the `recent` latest tokens and the budget - recent older ones with the highest score (ties: earlier)."""

    def keep(entries, scores, n):
        latest = [j for j in entries if j >= n - recent]
        older = sorted((j for j in entries if j < n - recent), key=lambda j: (-scores[j], j))
        return sorted(latest + older[: budget - recent])

    return keep


def last_query_mean(old, weights, chunk, heads):
    """TOVA's score: the last query's attention averaged over `heads` (every head of the layer)."""
    score = {}
    for h in heads:
        for j, a in weights[(h, chunk[-1])].items():
            score[j] = score.get(j, 0.0) + a / len(heads)
    return score


def top_scores(budget):
    """Keep the `budget` entries with the highest score (ties: earlier), in order."""

    def keep(entries, scores, n):
        return sorted(sorted(entries, key=lambda j: (-scores[j], j))[:budget])

    return keep
