"""`landmark` retrieval decoding (the paper's inference with the KV cache): token by token and in chunks against an
explicit-loop numpy reference of the paper's equations (per token: softmax over the landmarks of the complete earlier
blocks, top_k, grouped softmax with the own block), the exact reduction to the training form with top_k >= the
number of blocks, and the layer's decode through the cache protocol (RoPE, GQA, the cache index)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.sparse.landmark import landmark_attention, landmark_decode_attention
from tests.sparse.sparse_reference import random_qk


def numpy_retrieval_decode(q, k, v, bs, top_k, start=0):
    """out float64 [B, Tq, H, Dv] for queries q [B, Tq, H, D] at positions start + i over keys/values [B, >= start +
    Tq, KVH, D], by loops over (batch, head, query). Block of position j: j // bs; its landmark: the last position
    of the block. Query at p in block r: score of block c < r = softmax over the landmarks l_0..l_{r-1} of q.k_l /
    sqrt(D); keep the top_k (ties: lower c; all if top_k is None); one softmax over the own block's regular keys
    j <= p and the kept landmarks; a kept landmark's probability is spread over its block's regular tokens by their
    own softmax; landmark values are never read."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros((batch, q_len, heads, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            g = h // group
            for i in range(q_len):
                p = start + i
                r = p // bs

                def s(j, b=b, i=i, h=h, g=g):
                    return q[b, i, h] @ k[b, j, g] / np.sqrt(dim)

                marks = [c * bs + bs - 1 for c in range(r)]
                kept = []
                if marks:
                    logits = np.array([s(m) for m in marks])
                    score = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
                    order = sorted(range(r), key=lambda c: (-score[c], c))
                    kept = order if top_k is None else order[:top_k]
                own = [j for j in range(r * bs, p + 1) if j % bs != bs - 1]
                e = {j: np.exp(s(j)) for j in own + [c * bs + bs - 1 for c in kept]}
                total = sum(e.values())
                for j in own:
                    out[b, i, h] += e[j] / total * v[b, j, g]
                for c in kept:
                    members = list(range(c * bs, c * bs + bs - 1))
                    inner = np.array([s(j) for j in members])
                    inner = np.exp(inner - inner.max()) / np.exp(inner - inner.max()).sum()
                    out[b, i, h] += e[c * bs + bs - 1] / total * (inner @ v[b, members, g])
    return out


def decode_steps(q, k, v, bs, top_k, pieces, capacity):
    """Writes k, v chunk by chunk into a cache of `capacity` slots (the unwritten slots hold large garbage, which
    must never be read) and decodes each chunk of q at its offset; returns the concatenated outputs."""
    batch, _, kv_heads, dim = k.shape
    garbage = jnp.asarray(np.random.default_rng(99).normal(size=(batch, capacity, kv_heads, dim)) * 1e3, k.dtype)
    keys, values = garbage, garbage

    @jax.jit
    def step(q, k, v, keys, values, start):
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k, start, 1)
        values = jax.lax.dynamic_update_slice_in_dim(values, v, start, 1)
        out = landmark_decode_attention(q, keys, values, q_offset=start, block_size=bs, top_k=top_k)
        return out, keys, values

    outs, start = [], 0
    for piece in pieces:
        part = slice(start, start + piece)
        out, keys, values = step(q[:, part], k[:, part], v[:, part], keys, values, start)
        outs.append(out)
        start += piece
    return jnp.concatenate(outs, axis=1)


CASES = [
    # batch, length, heads, kv_heads, dim, block_size, top_k, pieces
    (2, 14, 4, 2, 6, 3, 2, (1,) * 14),  # partial last block, GQA, a real choice from block 3 on
    (1, 13, 2, 1, 4, 4, 1, (5, 1, 3, 1, 1, 1, 1)),  # chunks that cross block boundaries
]


@pytest.mark.parametrize("case", CASES)
def test_decode_equals_the_numpy_retrieval_at_every_step(case):
    batch, length, heads, kv_heads, dim, bs, top_k, pieces = case
    q, k, v = random_qk(sum(case[:7]), batch, length, length, heads, kv_heads, dim)
    out = decode_steps(q, k, v, bs, top_k, pieces, capacity=length + 3)
    expected = numpy_retrieval_decode(q, k, v, bs, top_k)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
    # the retrieval matters here: reading every block gives another answer
    assert not np.allclose(expected, numpy_retrieval_decode(q, k, v, bs, None), atol=1e-3)


@pytest.mark.parametrize("top_k", [None, 4])  # 4 = every block
def test_decode_with_every_block_is_the_training_form(top_k):
    q, k, v = random_qk(3, 2, 15, 15, 2, 1, 4)  # 4 blocks of 4, the last partial
    out = decode_steps(q, k, v, 4, top_k, (1,) * 15, capacity=16)
    forward = landmark_attention(q, k, v, block_size=4)
    np.testing.assert_allclose(out, forward, atol=2e-6, rtol=2e-5)


@pytest.mark.slow  # two jitted decode shapes of a layer: 46 s measured on 2 cores under a load average of 14
def test_layer_decode_through_the_cache_matches_the_numpy_retrieval():
    """The layer (RoPE, GQA) decodes a 4-token prompt chunk then single tokens with its dense KV cache; the q, k, v
    that reach `attend` at each call are recorded, and every step's attend output equals the numpy retrieval on the
    recorded queries and the keys of the final cache."""
    length, bs = 12, 3
    layer = attn.build("landmark", num_heads=4, head_dim=4, num_kv_heads=2, block_size=bs, top_k=1)
    mask = attn.Mask(causal=True)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, length, 16)), jnp.float32)

    def call(variables, x):
        record = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "attend":
                record.update(q=args[0], k=args[1], v=args[2], out=out)
            return out

        with nn.intercept_methods(interceptor):
            _, state = layer.apply(variables, x, mask=mask, decode=True, mutable=["cache"])
        return state, record

    params = {"params": layer.init(jax.random.key(0), x, mask=mask)["params"]}
    _, state = layer.apply(params, jnp.zeros_like(x), mask=mask, decode=True, mutable=["cache"])  # sizes the cache
    step = jax.jit(call)
    qs, outs, start = [], [], 0
    for piece in (4,) + (1,) * (length - 4):
        state, record = step({**params, **state}, x[:, start : start + piece])
        qs.append(record["q"])
        outs.append(record["out"])
        start += piece
    keys, values = record["k"], record["v"]  # the whole cache after the last write
    expected = numpy_retrieval_decode(jnp.concatenate(qs, 1), keys, values, bs, top_k=1)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), expected, atol=2e-5, rtol=2e-5)
    assert not np.allclose(expected, numpy_retrieval_decode(jnp.concatenate(qs, 1), keys, values, bs, None), atol=1e-3)


def test_decode_bad_arguments_raise():
    q, k, v = random_qk(0, 1, 1, 6, 2, 1, 4)
    with pytest.raises(ValueError, match="block_size=1"):
        landmark_decode_attention(q, k, v, q_offset=5, block_size=1)
    with pytest.raises(ValueError, match="top_k=0"):
        landmark_decode_attention(q, k, v, q_offset=5, block_size=3, top_k=0)
