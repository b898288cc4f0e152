"""`combiner`: the factorised p(j | i) written out, full support, softmax reduction, decode, causality, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attn
from attn.linear.combiner import combiner_attention

# rbg keys: XLA compiles a jitted init ~5x faster than with threefry keys.
KEY = jax.random.key(1, impl="rbg")
CAUSAL = attn.Mask(causal=True)


def qkv(batch=2, length=11, heads=4, kv_heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, length, heads, dim), (batch, length, kv_heads, dim), (batch, length, kv_heads, dim)]
    return tuple(rng.standard_normal(s).astype(np.float32) for s in shapes)


def factorised_probs(q, k, block, causal, pool):
    """p(j | i) by the paper's factorisation, one query at a time in numpy: direct softmax weights in the own block
    and p(Omega_r | i) p(j | Omega_r) elsewhere, normalised jointly. [B, H, T, T]."""
    batch, length, heads, dim = q.shape
    k = np.repeat(k, heads // k.shape[2], axis=2)
    s = dim**-0.5
    regions = [list(range(r, min(r + block, length))) for r in range(0, length, block)]
    probs = np.zeros((batch, heads, length, length))
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                own = i // block
                local = [j for j in regions[own] if not causal or j <= i]
                others = [r for r in range(len(regions)) if (r < own if causal else r != own)]
                logits = [s * q[b, i, h] @ k[b, j, h] for j in local]
                logits += [s * q[b, i, h] @ pool(k[b, regions[r], h]) for r in others]
                weights = np.exp(np.array(logits) - max(logits))
                weights /= weights.sum()
                probs[b, h, i, local] = weights[: len(local)]
                for r, p_region in zip(others, weights[len(local) :], strict=True):
                    inner = np.array([s * pool(q[b, regions[r], h]) @ k[b, j, h] for j in regions[r]])
                    inner = np.exp(inner - inner.max())
                    probs[b, h, i, regions[r]] = p_region * inner / inner.sum()
    return probs


def axial_probs(q, k, block, causal):
    """p(j | i) by Combiner-Axial in numpy: direct softmax weights in the own row; row r reached through the token
    (r, c(i)) of the query's column, expanded by that token's attention over row r. [B, H, T, T]."""
    batch, length, heads, dim = q.shape
    k = np.repeat(k, heads // k.shape[2], axis=2)
    s = dim**-0.5
    rows = [list(range(r, min(r + block, length))) for r in range(0, length, block)]
    probs = np.zeros((batch, heads, length, length))
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                own, col = divmod(i, block)
                local = [j for j in rows[own] if not causal or j <= i]
                others = [r for r in range(len(rows)) if (r < own if causal else r != own) and col < len(rows[r])]
                logits = [s * q[b, i, h] @ k[b, j, h] for j in local]
                logits += [s * q[b, i, h] @ k[b, rows[r][col], h] for r in others]
                weights = np.exp(np.array(logits) - max(logits))
                weights /= weights.sum()
                probs[b, h, i, local] = weights[: len(local)]
                for r, p_row in zip(others, weights[len(local) :], strict=True):
                    inner = np.array([s * q[b, rows[r][col], h] @ k[b, j, h] for j in rows[r]])
                    inner = np.exp(inner - inner.max())
                    probs[b, h, i, rows[r]] = p_row * inner / inner.sum()
    return probs


@pytest.mark.parametrize(("causal", "length"), [(True, 11), (False, 12)])
def test_axial_probabilities_are_the_row_column_factorisation_over_all_keys(causal, length):
    q, k, v = qkv(length=length, seed=5)
    run = jax.jit(
        lambda q, k, v: combiner_attention(
            q, k, v, block_size=3, causal=causal, factorization="axial", return_probs=True
        )
    )
    out, probs = run(q, k, v)
    np.testing.assert_allclose(probs, axial_probs(q, k, 3, causal), atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    visible = np.tril(np.ones((length, length))) if causal else np.ones((length, length))
    assert np.all(np.asarray(probs)[:, :, visible > 0] > 0) and np.all(np.asarray(probs)[:, :, visible == 0] == 0)
    np.testing.assert_allclose(out, jnp.einsum("bhts,bshd->bthd", probs, np.repeat(v, 2, axis=2)), atol=1e-5)


@pytest.mark.parametrize(("causal", "summary"), [(True, "max"), (False, "mean")])
def test_probabilities_are_the_factorised_distribution_over_all_keys(causal, summary):
    q, k, v = qkv()
    run = jax.jit(
        lambda q, k, v: combiner_attention(q, k, v, block_size=3, causal=causal, summary=summary, return_probs=True)
    )
    out, probs = run(q, k, v)
    pool = (lambda x: x.max(0)) if summary == "max" else (lambda x: x.mean(0))
    np.testing.assert_allclose(probs, factorised_probs(q, k, 3, causal, pool), atol=1e-5)
    # Full support: every row is a distribution over all (visible) keys, and the output is its expectation of v.
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    visible = np.tril(np.ones((11, 11))) if causal else np.ones((11, 11))
    assert np.all(np.asarray(probs)[:, :, visible > 0] > 0) and np.all(np.asarray(probs)[:, :, visible == 0] == 0)
    np.testing.assert_allclose(out, jnp.einsum("bhts,bshd->bthd", probs, np.repeat(v, 2, axis=2)), atol=1e-5)


@pytest.mark.parametrize("factorization", ["fixed", "axial"])
def test_one_block_covering_the_sequence_is_softmax_attention(factorization):
    options = dict(num_heads=4, head_dim=8, num_kv_heads=2)
    combiner = attn.build("combiner", block_size=16, factorization=factorization, **options)
    softmax = attn.build("softmax", position="rope", **options)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 11, 16)), jnp.float32)
    params = jax.jit(combiner.init)(KEY, x)
    np.testing.assert_allclose(
        jax.jit(combiner.apply)(params, x, mask=CAUSAL), jax.jit(softmax.apply)(params, x, mask=CAUSAL), atol=2e-5
    )


@pytest.mark.parametrize("factorization", ["fixed", "axial"])
def test_decode_equals_full_forward_and_is_causal(factorization):
    """Prefill, a step and a prefill crossing block boundaries: local keys from the cache, summaries of the
    completed blocks (axial: the row attention of each column token) from the cached keys and queries."""
    layer = attn.build("combiner", num_heads=4, head_dim=8, num_kv_heads=2, block_size=3, factorization=factorization)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 11, 16)), jnp.float32)
    params = {"params": jax.jit(layer.init)(KEY, x, mask=CAUSAL)["params"]}
    forward = jax.jit(lambda p, x: layer.apply(p, x, mask=CAUSAL))
    step = jax.jit(lambda p, x: layer.apply(p, x, mask=CAUSAL, decode=True, mutable=["cache"]))
    shapes = jax.eval_shape(lambda x: layer.init(KEY, x, mask=CAUSAL, decode=True)["cache"], x)
    cache, outs, start = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), [], 0
    for size in (5, 1, 5):
        y, mutated = step({**params, "cache": cache}, x[:, start : start + size])
        outs.append(y)
        cache, start = mutated["cache"], start + size
    full = forward(params, x)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)
    changed = x.at[:, 7:].set(0.5)
    after = forward(params, changed)
    np.testing.assert_allclose(after[:, :7], full[:, :7], atol=1e-6)
    assert float(jnp.abs(after[:, 7:] - full[:, 7:]).max()) > 1e-4


@pytest.mark.parametrize("factorization", ["fixed", "axial"])
def test_padding_and_weights_capture(factorization):
    layer = attn.build("combiner", num_heads=4, head_dim=8, block_size=3, factorization=factorization)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 11, 16)), jnp.float32)
    params = jax.jit(layer.init)(KEY, x)
    lengths = jnp.asarray([7])
    apply = jax.jit(lambda p, x, mask: layer.apply(p, x, mask=mask, mutable=["intermediates"]))
    padded, state = apply(params, x, attn.Mask(q_lengths=lengths, kv_lengths=lengths))
    alone, _ = apply(params, x[:, :7], None)
    np.testing.assert_allclose(padded[:, :7], alone, atol=2e-5)
    assert np.all(np.asarray(padded[:, 7:]) == 0)
    weights = state["intermediates"]["attention_weights"][0]
    np.testing.assert_allclose(weights[:, :, :7].sum(-1), 1.0, atol=1e-5)
    assert np.all(np.asarray(weights[..., 7:]) == 0)


def test_gradients_match_finite_differences():
    """Reverse-mode gradients w.r.t. x and every parameter equal central differences in float64 (tolerance 1e-3:
    combiner computes a stage in float32 whatever the dtype)."""
    with jax.enable_x64(True):
        layer = attn.build(
            "combiner",
            num_heads=2,
            head_dim=4,
            num_kv_heads=1,
            block_size=2,
            dtype=jnp.float64,
            param_dtype=jnp.float64,
        )
        x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 8)))
        params = {"params": layer.init(KEY, x, mask=CAUSAL)["params"]}
        forward = jax.jit(lambda x, p: layer.apply(p, x, mask=CAUSAL))
        check_grads(forward, (x, params), order=1, modes=("rev",), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_errors_name_the_problem():
    x = jnp.zeros((1, 5, 16))
    build = lambda **o: attn.build("combiner", num_heads=4, head_dim=8, **o)  # noqa: E731
    with pytest.raises(ValueError, match="block_size=0 must be a positive int"):
        build(block_size=0).init(KEY, x)
    with pytest.raises(ValueError, match="summary='min' must be one of"):
        build(summary="min").init(KEY, x)
    with pytest.raises(ValueError, match="factorization='logsparse' must be one of"):
        build(factorization="logsparse").init(KEY, x)
    with pytest.raises(ValueError, match="combiner supports only the mask parts causal, q_lengths and kv_lengths"):
        build().init(KEY, x, mask=attn.Mask(causal=True, window=2))
    with pytest.raises(ValueError, match="decode=True needs a causal mask"):
        build().init(KEY, x, decode=True)
    q, k, v = qkv(length=5)
    with pytest.raises(ValueError, match="non-causal combiner attention needs q_len == kv_len"):
        combiner_attention(q[:, :2], k, v, block_size=2, summary_queries=q)
    spec = attn.get("combiner")
    assert spec.supports_causal and spec.supports_decode and spec.catalog == 135
