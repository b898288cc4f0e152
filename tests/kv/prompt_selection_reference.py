"""A float64 numpy re-implementation of SnapKV-style prompt compression (official FasterDecoding/SnapKV
`SnapKVCluster.update_kv`, with Ada-KV's GQA mean) and of the decode that follows, written as explicit loops:
the prefill attends causally over the whole prompt, the last `window` queries vote, the votes are pooled like
torch's avg_pool1d / max_pool1d (padding kernel // 2, zero / -inf padding), each kv head keeps its `counts[b][g]`
best prompt keys (ties: the earlier key) plus the window; decoding appends and, once `capacity` is reached, keeps
the first `capacity - window - decode_budget` entries and the latest `window + decode_budget` tokens."""

import numpy as np

from tests.kv.score_reference import np_rope, projections


def softmax_row(q_t, t, keys, positions):
    """Weights of the query q_t [D] at position t over keys [n, D] at `positions` (RoPE, 1/sqrt(D))."""
    logits = np_rope(keys, np.asarray(positions)) @ np_rope(q_t, t) / np.sqrt(q_t.shape[-1])
    w = np.exp(logits - logits.max())
    return w / w.sum()


def pooled_votes(q, k, b, g, prompt, window, kernel, pooling, heads, kv_heads):
    """The pooled votes [prompt - window] of kv head g for the keys before the observation window."""
    group = heads // kv_heads
    n = prompt - window
    votes = np.zeros(n)
    for h in range(g * group, (g + 1) * group):
        for i in range(prompt - window, prompt):
            w = softmax_row(q[b, i, h], i, k[b, : i + 1, g], np.arange(i + 1))
            votes += w[:n] / (window * group)
    pad = kernel // 2
    pooled = np.zeros(n)
    for j in range(n):
        around = [votes[m] for m in range(j - pad, j + pad + 1) if 0 <= m < n]
        pooled[j] = max(around) if pooling == "max" else sum(around) / kernel
    return pooled


def top_keys(scores, count):
    """The `count` entries with the highest scores (ties: the earlier one), in increasing order."""
    ranked = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(ranked[:count])


def decode_reference(params, x, prompt, *, budget, window, kernel, pooling, decode_budget, capacity, counts, heads,
                     kv_heads, compress_from=None):  # fmt: skip
    """Outputs [B, T, E] of a prefill over x[:, :prompt] followed by single-token decoding of the rest, and the
    kept positions per (batch, kv head) at the end. counts(b, g, scores) -> prompt keys kept before the window
    (given the pooled scores of every kv head of row b) when prompt >= compress_from (default budget + 1)."""
    q, k, v, wo = projections(params, x)
    batch, length = x.shape[:2]
    group = heads // kv_heads
    out = np.zeros((batch, length, heads, v.shape[-1]))
    kept = [[None] * kv_heads for _ in range(batch)]
    recent = window + decode_budget
    for b in range(batch):
        scores = [pooled_votes(q, k, b, g, prompt, window, kernel, pooling, heads, kv_heads) for g in range(kv_heads)]
        for g in range(kv_heads):
            for t in range(prompt):  # the prefill: full causal attention over the prompt
                for h in range(g * group, (g + 1) * group):
                    out[b, t, h] = softmax_row(q[b, t, h], t, k[b, : t + 1, g], np.arange(t + 1)) @ v[b, : t + 1, g]
            if prompt >= (budget + 1 if compress_from is None else compress_from):
                kept[b][g] = top_keys(scores[g], counts(b, g, scores)) + list(range(prompt - window, prompt))
            else:
                kept[b][g] = list(range(prompt))
            for t in range(prompt, length):
                cache = kept[b][g] + [t]
                for h in range(g * group, (g + 1) * group):
                    out[b, t, h] = softmax_row(q[b, t, h], t, k[b, cache, g], cache) @ v[b, cache, g]
                if len(cache) > capacity:
                    cache = cache[: capacity - recent] + [j for j in cache[capacity - recent :] if j > t - recent]
                kept[b][g] = cache
    return np.einsum("bthd,hde->bte", out, wo), kept
