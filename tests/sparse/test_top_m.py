"""`top_m`: the selection against loop-by-loop numpy (per token and per block), the output against dense softmax
masked to the kept keys, the keys outside the top m having no influence, the reduction to `softmax`, and the argument
errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core.block_sparse import block_sparse_attention
from attn.sparse.top_m import top_m_block_indices
from tests.sparse.sparse_reference import blocks_to_token_mask, indices_to_sets, masked_softmax_attention, random_qk


def numpy_top_m(q, k, m, bs, causal, q_offset):
    """Kept key blocks per (batch, head, query block), by loops over queries and keys."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, q_len, heads, dim = q.shape
    kv_len, group = k.shape[1], heads // k.shape[2]
    n_q, n_k = -(-q_len // bs), -(-kv_len // bs)
    kept = []
    for b in range(batch):
        per_head = []
        for h in range(heads):
            rows = []
            for r in range(n_q):
                score = {}
                for t in range(r * bs, min((r + 1) * bs, q_len)):
                    for j in range(kv_len):
                        if not causal or j <= q_offset + t:
                            logit = q[b, t, h] @ k[b, j, h // group] / np.sqrt(dim)
                            score[j // bs] = max(score.get(j // bs, -np.inf), logit)
                rows.append(sorted(sorted(score, key=lambda c: (-score[c], c))[: min(m, n_k)]))
            per_head.append(rows)
        kept.append(per_head)
    return kept


CASES = [
    # batch, q_len, kv_len, heads, kv_heads, dim, m, block_size, causal, q_offset
    (2, 10, 10, 2, 1, 4, 3, 1, True, 0),  # the paper's per-token top-m
    (1, 9, 13, 4, 2, 4, 2, 2, False, 0),  # blocks, cross lengths, partial blocks
    (1, 6, 14, 2, 2, 4, 4, 1, True, 8),  # chunked prefill after 8 cached keys
]


@pytest.mark.parametrize("case", CASES)
def test_selection_and_output_match_numpy(case):
    batch, q_len, kv_len, heads, kv_heads, dim, m, bs, causal, offset = case
    q, k, v = random_qk(sum(case[:7]), batch, q_len, kv_len, heads, kv_heads, dim)

    def run(q, k, v):
        ids = top_m_block_indices(q, k, m=m, block_size=bs, causal=causal, q_offset=offset)
        return ids, block_sparse_attention(q, k, v, block_indices=ids, block_size=bs, causal=causal, q_offset=offset)

    with jax.enable_x64(True):
        ids, out = jax.jit(run)(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
    kept = numpy_top_m(q, k, m, bs, causal, offset)
    assert indices_to_sets(ids) == kept
    n_k = -(-kv_len // bs)
    mask = np.array([[[[c in row for c in range(n_k)] for row in head] for head in b] for b in kept])
    allowed = blocks_to_token_mask(mask, q_len, kv_len, bs, causal, offset)
    np.testing.assert_allclose(out, masked_softmax_attention(q, k, v, allowed, dim**-0.5), atol=1e-10, rtol=1e-10)


def test_values_outside_the_top_m_do_not_matter():
    q, k, v = random_qk(3, 1, 8, 8, 2, 2, 4)
    ids = np.asarray(top_m_block_indices(q, k, m=2, causal=True))
    kept = np.zeros((1, 2, 8, 8), bool)
    for h in range(2):
        for t in range(8):
            kept[0, h, t, ids[0, h, t][ids[0, h, t] >= 0]] = True
    unused = ~np.any(kept, axis=(1, 2))[0]  # keys no query of any head keeps
    v2 = v.copy()
    v2[0, unused] = 100.0
    attend = jax.jit(lambda v: block_sparse_attention(q, k, v, block_indices=ids, block_size=1, causal=True))
    assert unused.any()
    np.testing.assert_array_equal(attend(v), attend(v2))


@pytest.mark.slow  # a jitted layer init + apply: 13-35 s measured on 2 cores shared with other jobs
def test_m_at_least_the_keys_equals_softmax():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 16)), jnp.float32)
    mask = attn.Mask(causal=True)
    layer = attn.build("top_m", num_heads=2, head_dim=4, num_kv_heads=1, m=9)
    softmax_layer = attn.build("softmax", num_heads=2, head_dim=4, num_kv_heads=1)

    def both(x):
        params = layer.init(jax.random.key(0), x, mask=mask)
        return layer.apply(params, x, mask=mask), softmax_layer.apply(params, x, mask=mask)

    y, expected = jax.jit(both)(x)
    np.testing.assert_allclose(y, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize(
    "kwargs, message", [({"m": 0}, "m=0"), ({"block_size": 0}, "block_size=0"), ({"m": 2.5}, "m=2.5")]
)
def test_bad_arguments_raise_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attn.build("top_m", num_heads=2, head_dim=4, **kwargs)
    q, k, _ = random_qk(0, 1, 4, 4, 2, 2, 4)
    with pytest.raises(ValueError, match=message):
        top_m_block_indices(q, k, **{"m": 2, **kwargs})
