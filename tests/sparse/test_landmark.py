"""`landmark`: the grouped softmax and the retrieval against loop-by-loop numpy written from the official algorithm
(group ids from the landmark cumsum), the reduction to `softmax` (one block), `insert_landmarks`, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import functional as F
from attn.sparse.landmark import insert_landmarks, landmark_attention, landmark_block_indices, landmark_block_scores
from tests.sparse.sparse_reference import indices_to_sets, random_qk


def numpy_grouped_weights(q, k, bs, kept):
    """Dense weights [B, H, T, T] by loops. Key j's group: the number of landmarks before it (its block); the query's
    own block and the landmarks form the top group; a landmark's top-group probability spreads over its block."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, length, heads, dim = q.shape
    group = heads // k.shape[2]
    is_mark = np.array([j % bs == bs - 1 for j in range(length)])
    weights = np.zeros((batch, heads, length, length))
    for b in range(batch):
        for h in range(heads):
            s = q[b, :, h] @ k[b, :, h // group].T / np.sqrt(dim)
            for i in range(length):
                own = i // bs
                top = [j for j in range(i + 1) if j // bs == own and not is_mark[j]]
                marks = [c * bs + bs - 1 for c in kept[b][h][own]]
                e = {j: np.exp(s[i, j]) for j in top + marks}
                total = sum(e.values())
                for j in top:
                    weights[b, h, i, j] = e[j] / total
                for mark in marks:
                    members = [j for j in range(mark - bs + 1, mark)]
                    inner = np.exp(s[i, members] - s[i, members].max())
                    weights[b, h, i, members] = e[mark] / total * inner / inner.sum()
    return weights


def numpy_kept(q, k, bs, top_k):
    """The retrieval by loops: softmax over earlier landmarks per token, max over the block's tokens, top_k."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, length, heads, dim = q.shape
    group, n = heads // k.shape[2], -(-length // bs)
    kept = [[[[] for _ in range(n)] for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            for r in range(1, n):
                score = np.zeros(r)
                for i in range(r * bs, min((r + 1) * bs, length)):
                    s = np.array([q[b, i, h] @ k[b, c * bs + bs - 1, h // group] / np.sqrt(dim) for c in range(r)])
                    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                    score = np.maximum(score, p)
                order = sorted(range(r), key=lambda c: (-score[c], c))
                kept[b][h][r] = sorted(order if top_k is None else order[:top_k])
    return kept


CASES = [
    # batch, length, heads, kv_heads, dim, block_size, top_k
    (2, 12, 2, 1, 4, 3, None),
    (1, 11, 4, 2, 4, 3, 2),  # partial last block, GQA, retrieval
]


@pytest.mark.parametrize("case", CASES)
def test_grouped_softmax_and_retrieval_match_numpy(case):
    batch, length, heads, kv_heads, dim, bs, top_k = case
    q, k, v = random_qk(sum(case[:6]), batch, length, length, heads, kv_heads, dim)

    def run(q, k, v):
        ids = landmark_block_indices(landmark_block_scores(q, k, block_size=bs), top_k=top_k)
        return ids, landmark_attention(q, k, v, block_size=bs, block_indices=ids)

    with jax.enable_x64(True):
        ids, out = jax.jit(run)(*(jnp.asarray(x, np.float64) for x in (q, k, v)))
    kept = numpy_kept(q, k, bs, top_k)
    assert indices_to_sets(ids) == kept
    weights = numpy_grouped_weights(q, k, bs, kept)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-12)
    group = heads // kv_heads
    expected = np.einsum("bhij,bjhd->bihd", weights, np.repeat(np.asarray(v, np.float64), group, axis=2))
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_full_budget_is_the_training_form_and_one_block_is_softmax():
    q, k, v = random_qk(4, 1, 10, 10, 2, 1, 4)

    def run(q, k, v):
        ids = landmark_block_indices(landmark_block_scores(q, k, block_size=3), top_k=9)
        retrieved = landmark_attention(q, k, v, block_size=3, block_indices=ids)
        one_block = landmark_attention(q, k, v, block_size=11)
        return (
            retrieved,
            landmark_attention(q, k, v, block_size=3),
            one_block,
            F.softmax_attention(q, k, v, causal=True),
        )

    retrieved, full, one_block, softmax = jax.jit(run)(q, k, v)
    np.testing.assert_allclose(retrieved, full, atol=1e-6)
    np.testing.assert_allclose(one_block, softmax, atol=2e-6, rtol=2e-5)


@pytest.mark.slow  # a jitted layer init + apply of two layers: 11 s measured on 2 cores shared with other jobs
def test_one_block_equals_softmax():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 16)), jnp.float32)
    mask = attn.Mask(causal=True)
    layer = attn.build("landmark", num_heads=2, head_dim=4, num_kv_heads=1, block_size=10)
    base = attn.build("softmax", num_heads=2, head_dim=4, num_kv_heads=1)

    def both(x):
        params = layer.init(jax.random.key(0), x, mask=mask)
        return layer.apply(params, x, mask=mask), base.apply(params, x, mask=mask)

    y, expected = jax.jit(both)(x)
    np.testing.assert_allclose(y, expected, atol=2e-6, rtol=2e-5)


def test_insert_landmarks():
    tokens = np.arange(1, 8)[None]  # 7 tokens, blocks of 3 = 2 regular + landmark 0
    out = insert_landmarks(tokens, block_size=3, landmark_id=0)
    np.testing.assert_array_equal(out, [[1, 2, 0, 3, 4, 0, 5, 6, 0, 7]])


def test_bad_arguments_raise():
    q, k, v = random_qk(0, 1, 6, 6, 2, 2, 4)
    with pytest.raises(ValueError, match="block_size=1"):
        landmark_attention(q, k, v, block_size=1)
    with pytest.raises(ValueError, match="query block 1 may keep only earlier blocks"):
        landmark_attention(q, k, v, block_size=3, block_indices=np.array([[[[-1], [1]]]]))
    with pytest.raises(ValueError, match="top_k=0"):
        landmark_block_indices(jnp.zeros((1, 1, 2, 2)), top_k=0)
    with pytest.raises(ValueError, match="block_size=1"):
        attn.build("landmark", num_heads=2, head_dim=4, block_size=1)
    layer = attn.build("landmark", num_heads=2, head_dim=4, block_size=3)
    x = jnp.ones((1, 6, 8))
    with pytest.raises(ValueError, match="needs mask=attn.Mask"):
        layer.init(jax.random.key(0), x)
