"""Numpy references shared by the selector tests: dense softmax attention masked to chosen key blocks, by loops."""

import numpy as np


def blocks_to_token_mask(block_mask, q_len, kv_len, block_size, causal, q_offset=0):
    """bool block_mask [B, H, nq, nk] -> bool [B, H, Tq, Tk], entry by entry; AND causal (j <= q_offset + i)."""
    block_mask = np.asarray(block_mask)
    allowed = np.zeros(block_mask.shape[:2] + (q_len, kv_len), bool)
    for i in range(q_len):
        for j in range(kv_len):
            allowed[:, :, i, j] = block_mask[:, :, i // block_size, j // block_size]
            if causal and j > q_offset + i:
                allowed[:, :, i, j] = False
    return allowed


def masked_softmax_attention(q, k, v, allowed, scale):
    """out [B, Tq, H, Dv] (float64) = softmax over the allowed keys of each row; rows with none give 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, _ = q.shape
    group = heads // k.shape[2]
    out = np.zeros((batch, q_len, heads, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            logits = scale * q[b, :, h] @ k[b, :, h // group].T
            for i in range(q_len):
                keep = allowed[b, h, i]
                if keep.any():
                    weights = np.exp(logits[i, keep] - logits[i, keep].max())
                    out[b, i, h] = weights @ v[b, keep, h // group] / weights.sum()
    return out


def indices_to_sets(indices):
    """int [B, H, nq, S] (-1 padding) -> nested lists of sorted block sets, to compare selections."""
    indices = np.asarray(indices)
    return [[[sorted({int(c) for c in row if c >= 0}) for row in head] for head in batch] for batch in indices]


def random_qk(seed, batch, q_len, kv_len, heads, kv_heads, head_dim):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, q_len, heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    return q, k, v
