"""`longheads`: chunk representations and chunk selection against loop-by-loop numpy, the output against dense softmax
masked to the kept chunks, the reduction to `softmax`, and the argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core.block_sparse import block_sparse_attention
from attn.sparse.longheads import longheads_block_indices, longheads_chunk_keys
from tests.sparse.sparse_reference import blocks_to_token_mask, indices_to_sets, masked_softmax_attention, random_qk


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def numpy_longheads(q, k, v, w, num_chunks, causal):
    """(chunk keys [B, H, n, D], kept chunk sets) by loops over heads, chunks and tokens."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, length, heads, dim = q.shape
    group, n = heads // k.shape[2], -(-length // w)
    chunk_keys = np.zeros((batch, heads, n, dim))
    kept = [[[] for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            keys, values = k[b, :, h // group], v[b, :, h // group]
            for c in range(n):
                tokens = range(c * w, min((c + 1) * w, length))
                outputs = []
                for t in tokens:
                    seen = list(range(c * w, t + 1))
                    outputs.append(softmax(keys[seen] @ q[b, t, h] / np.sqrt(dim)) @ values[seen])
                mean_value = np.mean(outputs, axis=0)
                chunk_keys[b, h, c] = softmax(keys[list(tokens)] @ mean_value / np.sqrt(dim)) @ keys[list(tokens)]
            for r in range(n):
                visible = [c for c in range(n) if c <= r or not causal]
                score = {
                    c: max(q[b, t, h] @ chunk_keys[b, h, c] for t in range(r * w, min((r + 1) * w, length)))
                    for c in visible
                }
                forced = [c for c in visible if c in (0, r - 1, r)]
                rest = sorted((c for c in visible if c not in forced), key=lambda c: (-score[c], c))
                kept[b][h].append(sorted((forced + rest)[:num_chunks]))
    return chunk_keys, kept


CASES = [
    # batch, length, heads, kv_heads, dim, chunk, num_chunks, causal
    (1, 14, 2, 1, 4, 2, 4, True),  # 7 chunks: forced first/previous/own + 1 chosen
    (2, 11, 2, 2, 4, 3, 3, True),  # partial last chunk; only the forced chunks
    (1, 12, 4, 2, 4, 2, 4, False),
]


@pytest.mark.parametrize("case", CASES)
def test_chunks_selection_and_output_match_numpy(case):
    batch, length, heads, kv_heads, dim, w, num_chunks, causal = case
    q, k, v = random_qk(sum(case[:6]), batch, length, length, heads, kv_heads, dim)

    def run(q, k, v):
        keys = longheads_chunk_keys(q, k, v, chunk_size=w)
        ids = longheads_block_indices(q, k, v, chunk_size=w, num_chunks=num_chunks, causal=causal)
        return keys, ids, block_sparse_attention(q, k, v, block_indices=ids, block_size=w, causal=causal)

    with jax.enable_x64(True):
        keys, ids, out = jax.jit(run)(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
    expected_keys, expected_kept = numpy_longheads(q, k, v, w, num_chunks, causal)
    np.testing.assert_allclose(keys, expected_keys, rtol=1e-5, atol=1e-6)  # the chunk keys are float32
    assert indices_to_sets(ids) == expected_kept
    n = -(-length // w)
    mask = np.array([[[[c in row for c in range(n)] for row in head] for head in b] for b in expected_kept])
    allowed = blocks_to_token_mask(mask, length, length, w, causal)
    np.testing.assert_allclose(out, masked_softmax_attention(q, k, v, allowed, dim**-0.5), atol=1e-10, rtol=1e-10)


@pytest.mark.slow  # a jitted layer init + apply: 13-35 s measured on 2 cores shared with other jobs
def test_every_chunk_kept_equals_softmax():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, 16)), jnp.float32)
    mask = attn.Mask(causal=True)
    layer = attn.build("longheads", num_heads=2, head_dim=4, num_kv_heads=1, block_size=2, num_chunks=6)
    softmax_layer = attn.build("softmax", num_heads=2, head_dim=4, num_kv_heads=1)

    def both(x):
        params = layer.init(jax.random.key(0), x, mask=mask)
        return layer.apply(params, x, mask=mask), softmax_layer.apply(params, x, mask=mask)

    y, expected = jax.jit(both)(x)
    np.testing.assert_allclose(y, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_chunks": 2}, "num_chunks=2"), ({"block_size": 0}, "block_size=0"), ({"block_size": 1.5}, "block_size=1.5")],
)
def test_bad_options_raise_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attn.build("longheads", num_heads=2, head_dim=4, **{"block_size": 2, **kwargs})


def test_bad_arguments_raise():
    q, k, v = random_qk(0, 1, 8, 8, 2, 2, 4)
    with pytest.raises(ValueError, match="num_chunks=1"):
        longheads_block_indices(q, k, v, chunk_size=2, num_chunks=1)
    with pytest.raises(ValueError, match="chunk_size=0"):
        longheads_chunk_keys(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="same length"):
        longheads_chunk_keys(q, k[:, :6], v[:, :6], chunk_size=2)
