"""`attentive_pooling` (Efficient Probing / multi-head probe) and `low_rank_pooling` (LAMA): closed forms, masked
means, full-rank equals unfactorised, padding, parameter counts, gradients and option errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.pooling.attentive_pooling import efficient_probing
from attn.pooling.low_rank_pooling import low_rank_pooling

B, N, C = 2, 6, 8
X = jax.random.normal(jax.random.key(0), (B, N, C))
LENGTHS = jnp.array([6, 3])
PADDED = attn.Mask(q_lengths=LENGTHS, kv_lengths=LENGTHS)
VALID = np.arange(N)[None, :] < np.asarray(LENGTHS)[:, None]


def masked_mean(x):
    return np.einsum("bn,bnc->bc", VALID / VALID.sum(1, keepdims=True), np.asarray(x))


def softmax_pool(logits, x):
    """Reference: per-row softmax of logits [B, M, N] over the valid tokens, then the weighted sum of x."""
    logits = np.where(VALID[:, None], np.asarray(logits, np.float64), -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    return np.einsum("bmn,bnc->bmc", a, np.asarray(x)), a


def test_efficient_probing_zero_queries_pool_to_the_masked_mean_of_the_values():
    values = X @ jax.random.normal(jax.random.key(1), (C, C))
    pooled, weights = efficient_probing(X, values, jnp.zeros((4, C)), lengths=LENGTHS)
    np.testing.assert_allclose(pooled, masked_mean(values), atol=1e-5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert float(jnp.abs(weights[1, :, 3:]).max()) == 0.0


def test_efficient_probing_one_query_with_identity_values_is_softmax_pooling_of_the_raw_tokens():
    q = jax.random.normal(jax.random.key(2), (1, C))
    pooled, _ = efficient_probing(X, X, q, lengths=LENGTHS)
    want, _ = softmax_pool(np.einsum("mc,bnc->bmn", q, X) / np.sqrt(C), X)
    np.testing.assert_allclose(pooled, want[:, 0], atol=1e-5)


def test_efficient_probing_each_query_reads_its_own_value_chunk_and_is_permutation_invariant():
    q = jax.random.normal(jax.random.key(3), (2, C))
    pooled, _ = efficient_probing(X, X, q)
    logits = np.einsum("mc,bnc->bmn", q, X) / np.sqrt(C)
    a = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = np.concatenate([np.einsum("bn,bnc->bc", a[:, m], X[..., 4 * m : 4 * m + 4]) for m in range(2)], -1)
    np.testing.assert_allclose(pooled, want, atol=1e-5)
    perm = jax.random.permutation(jax.random.key(4), N)
    np.testing.assert_allclose(efficient_probing(X[:, perm], X[:, perm], q)[0], pooled, atol=1e-5)


def test_efficient_probing_layer_parameter_count_padding_and_gradients():
    layer = attn.build("attentive_pooling", num_heads=2, head_dim=4, num_queries=4, d_out=2)
    params = layer.init(jax.random.key(0), X, mask=PADDED)
    assert sum(p.size for p in jax.tree.leaves(nn.unbox(params))) == 4 * C + C * (C // 2)  # M C + C C / d_out
    apply = jax.jit(lambda p, x: layer.apply(p, x, mask=PADDED))
    y = apply(params, X)
    assert y.shape == (B, C // 2)
    np.testing.assert_allclose(apply(params, X.at[1, 3:].set(99.0)), y, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, X) ** 2)))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_multihead_probe_equals_the_projected_cross_attention_averaged_over_queries():
    layer = attn.build("attentive_pooling", variant="multihead", num_heads=2, head_dim=4, num_queries=3)
    params = layer.init(jax.random.key(0), X, mask=PADDED)
    y = jax.jit(lambda p, x: layer.apply(p, x, mask=PADDED))(params, X)
    p = jax.tree.map(np.asarray, nn.unbox(params)["params"])
    q = np.einsum("me,ehd->mhd", p["queries"], p["query"]["kernel"])
    k = np.einsum("bne,ehd->bnhd", X, p["key"]["kernel"])
    v = np.einsum("bne,ehd->bnhd", X, p["value"]["kernel"])
    outs = []
    for h in range(2):
        o, _ = softmax_pool(np.einsum("md,bnd->bmn", q[:, h], k[:, :, h]) / 2.0, v[:, :, h])
        outs.append(o)
    want = np.einsum("bmhd,hde->bme", np.stack(outs, 2), p["out"]["kernel"]).mean(1)
    np.testing.assert_allclose(y, want, atol=1e-5)
    np.testing.assert_allclose(layer.apply(params, X.at[1, 3:].set(-7.0), mask=PADDED), y, atol=1e-5)


def test_low_rank_full_rank_single_head_equals_the_unfactorised_bilinear_pooling():
    w = np.asarray(jax.random.normal(jax.random.key(5), (C, C)))
    c = jax.random.normal(jax.random.key(6), (C,))
    u, s, vt = np.linalg.svd(w)  # W = U diag(s) V^T: one head with rank = embed represents any W
    pooled, _ = low_rank_pooling(X, c, u, vt.T, s[:, None], activation="none", lengths=LENGTHS)
    want, _ = softmax_pool(np.einsum("e,ef,bnf->bn", c, w, X)[:, None], X)
    np.testing.assert_allclose(pooled, want[:, 0], rtol=1e-4, atol=1e-4)


def test_low_rank_heads_are_bilinear_forms_through_shared_factors_and_zero_context_is_the_mean():
    r, heads = 3, 2
    u, v = (jax.random.normal(jax.random.key(i), (C, r)) for i in (7, 8))
    p = jax.random.normal(jax.random.key(9), (r, heads))
    c = jax.random.normal(jax.random.key(10), (C,))
    pooled, weights = low_rank_pooling(X, c, u, v, p, activation="none", lengths=LENGTHS)
    w = np.einsum("er,rh,fr->hef", u, p, v)  # W_k = U diag(P_k) V^T
    want, _ = softmax_pool(np.einsum("e,hef,bnf->bhn", c, w, X), X)
    np.testing.assert_allclose(pooled, want.reshape(B, -1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    mean, _ = low_rank_pooling(X, jnp.zeros(C), u, v, p, lengths=LENGTHS)  # tanh(0) = 0: uniform scores
    np.testing.assert_allclose(mean, np.tile(masked_mean(X), heads), atol=1e-5)


def test_low_rank_layer_parameter_count_padding_and_gradients():
    layer = attn.build("low_rank_pooling", num_heads=3, head_dim=4, rank=2)
    params = layer.init(jax.random.key(0), X, mask=PADDED)
    assert sum(p.size for p in jax.tree.leaves(nn.unbox(params))) == 2 * C * 2 + 2 * 3 + C
    apply = jax.jit(lambda p, x: layer.apply(p, x, mask=PADDED))
    y = apply(params, X)
    assert y.shape == (B, 3 * C)
    np.testing.assert_allclose(apply(params, X.at[1, 3:].set(42.0)), y, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, X) ** 2)))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    ("name", "options", "kwargs", "message"),
    [
        ("attentive_pooling", {"variant": "gated"}, {}, "variant='gated'"),
        ("attentive_pooling", {"num_queries": 3}, {}, "num_queries=3 must divide embed // d_out = 8"),
        ("attentive_pooling", {"d_out": 3}, {}, "d_out=3 must be a positive int dividing embed=8"),
        ("attentive_pooling", {}, {"mask": attn.Mask(causal=True)}, "may only hold padding lengths"),
        ("low_rank_pooling", {"activation": "relu"}, {}, "activation='relu'"),
        ("low_rank_pooling", {"rank": 0}, {}, "rank=0 must be a positive int"),
        ("low_rank_pooling", {}, {"decode": True}, "context and decode=True are not supported"),
    ],
)
def test_bad_options_raise_value_errors_naming_them(name, options, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer = (
            attn.build(name, **{"num_heads": 2, "head_dim": 4, "num_queries": 4, **options})
            if name.startswith("attentive")
            else attn.build(name, **{"num_heads": 2, "head_dim": 4, **options})
        )
        jax.eval_shape(lambda k: layer.init(k, X, **kwargs), jax.random.key(0))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("attentive_pooling", {"variant": "multihead", "num_heads": 2, "head_dim": 4, "num_queries": 3}),
        ("attentive_pooling", {"variant": "efficient_probing", "num_heads": 2, "head_dim": 4, "num_queries": 4}),
        ("low_rank_pooling", {"num_heads": 2, "head_dim": 4, "rank": 3}),
    ],
)
def test_dropout_is_off_when_deterministic(name, options):
    """dropout_rate > 0 with deterministic=True (inference, no "dropout" rng) equals dropout_rate = 0 bit for bit;
    deterministic=False with a "dropout" rng does drop weights."""
    plain = attn.build(name, **options)
    dropped = attn.build(name, **options, dropout_rate=0.1)
    params = plain.init(jax.random.key(1), X, mask=PADDED)
    want = plain.apply(params, X, mask=PADDED)
    np.testing.assert_array_equal(dropped.apply(params, X, mask=PADDED, deterministic=True), want)
    train = dropped.apply(params, X, mask=PADDED, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.abs(train - want).max()) > 1e-6
