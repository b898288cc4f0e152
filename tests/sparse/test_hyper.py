"""`hyper`: the LSH buckets and one unmasked pass (given sort orders and samples) against loop-by-loop numpy, the exact
reductions to softmax (one block per level; min_seq_len in the slow layer test), key-side causality of the recursion, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import functional as F
from attn.sparse.hyper import angular_lsh_hash, hyper_attention, hyper_unmasked
from tests.sparse.sparse_reference import random_qk


def gray_sequence(bits):
    """The unit-Hamming-distance ordering, built recursively (reflected binary code)."""
    if bits == 1:
        return [0, 1]
    prev = gray_sequence(bits - 1)
    return prev + [c + 2 ** (bits - 1) for c in reversed(prev)]


def test_angular_lsh_hash_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 4)).astype(np.float32)
    proj = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    perm = gray_sequence(3)
    expected = np.zeros((2, 3, 5), int)
    for b in range(2):
        for h in range(3):
            for t in range(5):
                code = sum(2**i for i in range(3) if x[b, t, h] @ proj[:, i] > 0)
                expected[b, h, t] = perm[code]
    np.testing.assert_array_equal(angular_lsh_hash(jnp.asarray(x), jnp.asarray(proj)), expected)


def numpy_unmasked(q, k, v, q_order, k_order, samples, bs):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, n, heads, dim = q.shape
    out = np.zeros((batch, n, heads, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            for rank in range(n):  # the query at sorted position `rank`
                i = q_order[b, h, rank]
                block = [k_order[b, h, r] for r in range(n) if r // bs == rank // bs]
                terms = [(q[b, i, h] @ k[b, j, h] / np.sqrt(dim), v[b, j, h], 1.0) for j in block]
                m = samples.shape[-1]
                for u in samples[b, h]:
                    if u // bs != rank // bs:
                        j = k_order[b, h, u]
                        terms.append((q[b, i, h] @ k[b, j, h] / np.sqrt(dim), v[b, j, h], n / m))
                top = max(t[0] for t in terms)
                weights = np.array([w * np.exp(s - top) for s, _, w in terms])
                out[b, i, h] = weights @ np.array([t[1] for t in terms]) / weights.sum()
    return out


@pytest.mark.parametrize("n, bs, m", [(10, 3, 4)])  # a partial last block
def test_unmasked_pass_matches_numpy(n, bs, m):
    q, k, v = random_qk(n + bs, 2, n, n, 2, 2, 4)
    rng = np.random.default_rng(n)
    q_order = np.stack([np.stack([rng.permutation(n) for _ in range(2)]) for _ in range(2)])
    k_order = np.stack([np.stack([rng.permutation(n) for _ in range(2)]) for _ in range(2)])
    samples = rng.integers(0, n, size=(2, 2, m))
    with jax.enable_x64(True):
        out, _ = jax.jit(
            lambda q, k, v: hyper_unmasked(
                q, k, v, q_order=q_order, k_order=k_order, samples=samples, block_size=bs, scale=0.5
            )
        )(*(jnp.asarray(x, np.float64) for x in (q, k, v)))
    expected = numpy_unmasked(q, k, v, q_order, k_order, samples, bs)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=2e-7)  # the core's lse is float32 by design


def test_exact_reductions_and_key_side_causality():
    q, k, v = random_qk(5, 1, 8, 8, 4, 2, 4)
    key = jax.random.key(3)

    def run(q, k, v, k2, v2):
        exact = F.softmax_attention(q, k, v, causal=True)
        one_block = hyper_attention(q, k, v, key=key, block_size=4, sample_size=3, min_seq_len=4, causal=True)
        approx = hyper_attention(q, k, v, key=key, block_size=2, sample_size=3, min_seq_len=4, causal=True)
        changed = hyper_attention(q, k2, v2, key=key, block_size=2, sample_size=3, min_seq_len=4, causal=True)
        return exact, one_block, approx, changed

    k2, v2 = k.copy(), v.copy()
    k2[:, 5:] += 1.0
    v2[:, 5:] -= 2.0
    exact, one_block, approx, changed = jax.jit(run)(q, k, v, k2, v2)
    np.testing.assert_allclose(one_block, exact, atol=2e-6, rtol=2e-5)
    assert float(jnp.max(jnp.abs(approx - exact))) > 1e-3  # the approximation is in use
    np.testing.assert_array_equal(changed[:, :5], approx[:, :5])  # later keys/values never reach earlier queries
    assert float(jnp.max(jnp.abs(changed[:, 5:] - approx[:, 5:]))) > 0


@pytest.mark.slow  # a jitted layer init + apply of two layers: ~10 s on 2 cores shared with other jobs
def test_layer_below_min_seq_len_equals_softmax():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 16)), jnp.float32)
    mask = attn.Mask(causal=True)
    layer = attn.build("hyper", num_heads=2, head_dim=4, num_kv_heads=1, block_size=2, sample_size=2, min_seq_len=9)
    base = attn.build("softmax", num_heads=2, head_dim=4, num_kv_heads=1)

    def both(x):
        params = layer.init(jax.random.key(0), x, mask=mask)
        return layer.apply(params, x, mask=mask), base.apply(params, x, mask=mask)

    y, expected = jax.jit(both)(x)
    np.testing.assert_allclose(y, expected, atol=2e-6, rtol=2e-5)


def test_bad_arguments_raise():
    q, k, v = random_qk(0, 1, 6, 6, 2, 2, 4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="block_size=0"):
        hyper_attention(q, k, v, key=key, block_size=0)
    with pytest.raises(ValueError, match="sample_size=-1"):
        hyper_attention(q, k, v, key=key, sample_size=-1)
    with pytest.raises(ValueError, match="needs as many queries as keys"):
        hyper_attention(q[:, :4], k, v, key=key)
    with pytest.raises(ValueError, match="num_projs=0"):
        attn.build("hyper", num_heads=2, head_dim=4, num_projs=0)
    layer = attn.build("hyper", num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="window"):
        layer.init(jax.random.key(0), jnp.ones((1, 6, 8)), mask=attn.Mask(causal=True, window=(2, 0)))
