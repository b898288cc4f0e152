"""`hcam`: chunk selection, mixture weights and output against loop-by-loop numpy, the one-chunk reduction to causal
`softmax`, and the argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.sparse.hcam import hcam_attention, hcam_selection
from tests.sparse.sparse_reference import indices_to_sets, random_qk


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def numpy_hcam(q, k, v, bs, top_k, causal, q_offset):
    """(kept chunk sets [B][H][nq], output [B, Tq, H, D]) by loops over heads, query blocks, tokens and chunks."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    kv_len, group = k.shape[1], heads // k.shape[2]
    n_q, n_k = -(-q_len // bs), -(-kv_len // bs)
    out = np.zeros((batch, q_len, heads, v.shape[-1]))
    kept = [[[] for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            g = h // group
            summaries = [k[b, c * bs : (c + 1) * bs, g].mean(0) for c in range(n_k)]
            for r in range(n_q):
                tokens = range(r * bs, min((r + 1) * bs, q_len))
                rel = {
                    (t, c): q[b, t, h] @ summaries[c] / np.sqrt(dim)
                    for t in tokens
                    for c in range(n_k)
                    if not causal or c * bs <= q_offset + t
                }
                score = {c: max(val for (t, cc), val in rel.items() if cc == c) for c in {c for _, c in rel}}
                chunks = sorted(score, key=lambda c: (-score[c], c))[:top_k]
                kept[b][h].append(sorted(chunks))
                for t in tokens:
                    mine = [c for c in chunks if (t, c) in rel]
                    weights = softmax(np.array([rel[t, c] for c in mine]))
                    for w, c in zip(weights, mine, strict=True):
                        keys = [j for j in range(c * bs, min((c + 1) * bs, kv_len)) if not causal or j <= q_offset + t]
                        a = softmax(np.array([q[b, t, h] @ k[b, j, g] / np.sqrt(dim) for j in keys]))
                        out[b, t, h] += w * (a @ v[b, keys, g])
    return kept, out


CASES = [
    # batch, q_len, kv_len, heads, kv_heads, dim, block_size, top_k, causal, q_offset
    (2, 10, 10, 2, 1, 4, 2, 2, True, 0),
    (1, 9, 13, 4, 2, 4, 3, 2, False, 0),
    (1, 6, 14, 2, 2, 4, 2, 3, True, 8),
]


@pytest.mark.parametrize("case", CASES)
def test_selection_weights_and_output_match_numpy(case):
    batch, q_len, kv_len, heads, kv_heads, dim, bs, top_k, causal, offset = case
    q, k, v = random_qk(sum(case[:7]), batch, q_len, kv_len, heads, kv_heads, dim)

    def run(q, k, v):
        ids, weights = hcam_selection(q, k, block_size=bs, top_k=top_k, causal=causal, q_offset=offset)
        return ids, hcam_attention(q, k, v, ids, weights, block_size=bs, causal=causal, q_offset=offset)

    with jax.enable_x64(True):
        ids, out = jax.jit(run)(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
    kept, expected = numpy_hcam(q, k, v, bs, top_k, causal, offset)
    assert indices_to_sets(ids) == kept
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=1e-6)  # the relevance is float32


@pytest.mark.slow  # a jitted layer init + apply: 13-35 s measured on 2 cores shared with other jobs
def test_one_chunk_equals_causal_softmax():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 16)), jnp.float32)
    mask = attn.Mask(causal=True)
    layer = attn.build("hcam", num_heads=2, head_dim=4, num_kv_heads=1, block_size=9, top_k=1)
    softmax_layer = attn.build("softmax", num_heads=2, head_dim=4, num_kv_heads=1)

    def both(x):
        params = layer.init(jax.random.key(0), x, mask=mask)
        return layer.apply(params, x, mask=mask), softmax_layer.apply(params, x, mask=mask)

    y, expected = jax.jit(both)(x)
    np.testing.assert_allclose(y, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("kwargs, message", [({"top_k": 0}, "top_k=0"), ({"block_size": 0}, "block_size=0")])
def test_bad_arguments_raise_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attn.build("hcam", num_heads=2, head_dim=4, **kwargs)
    q, k, _ = random_qk(0, 1, 4, 4, 2, 2, 4)
    with pytest.raises(ValueError, match=message):
        hcam_selection(q, k, **{"block_size": 2, "top_k": 2, **kwargs})


def test_unsupported_masks_raise():
    layer = attn.build("hcam", num_heads=2, head_dim=4, block_size=2)
    with pytest.raises(ValueError, match="causal mask and RoPE"):
        layer.init(jax.random.key(0), jnp.ones((1, 4, 8)), mask=attn.Mask(causal=True, window=(2, 0)))
