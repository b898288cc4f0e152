"""`flashbias`: low-rank factors reproduce the dense bias (exact ALiBi, full-rank SVD), gradients, the layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_decode_matches, assert_finite_grads, init, trace_init

import attn
from attn import functional as F
from attn.core import positions as pos
from attn.softmax.flashbias import alibi_factors, flashbias_attention, svd_factors

B, T, E, H, KVH, D = 2, 8, 16, 4, 2, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))
Q = jax.random.normal(jax.random.key(1), (B, T, H, D))
K, V = (jax.random.normal(jax.random.key(i), (B, T, KVH, D)) for i in (2, 3))
factored_attention, dense_attention = flashbias_attention, F.softmax_attention


def test_alibi_factors_are_the_causal_alibi_bias():
    positions = jnp.arange(T)
    u, w = alibi_factors(H, positions, positions)
    assert u.shape == (1, T, H, 2) and w.shape == (1, T, 1, 2)
    product = jnp.einsum("bqhr,bkr->bhqk", u, w[:, :, 0])
    dense = pos.alibi_bias(H, positions, positions)
    lower = np.tril(np.ones((T, T), bool))
    np.testing.assert_array_equal(np.where(lower, product, 0), np.where(lower, dense, 0))
    out = factored_attention(Q, K, V, u, w, causal=True)
    np.testing.assert_allclose(out, dense_attention(Q, K, V, bias=dense, causal=True), atol=1e-5)


def test_full_rank_svd_reproduces_any_bias_and_error_falls_with_rank():
    bias = jax.random.normal(jax.random.key(5), (B, H, T, T))
    want = dense_attention(Q, K, V, bias=bias)
    u, w = svd_factors(bias, rank=T)
    assert u.shape == (B, T, H, T) and w.shape == (B, T, H, T)  # head-specific w: k, v repeated per group
    np.testing.assert_allclose(factored_attention(Q, K, V, u, w), want, atol=1e-5)
    errors = [float(jnp.abs(factored_attention(Q, K, V, *svd_factors(bias, rank=r)) - want).max()) for r in (2, 5)]
    assert errors[0] > errors[1] > 1e-4


def test_gradients_match_explicit_bias_autodiff():
    u = jax.random.normal(jax.random.key(6), (B, T, H, 3))
    w = jax.random.normal(jax.random.key(7), (B, T, KVH, 3))

    def dense(q, k, v, u, w):
        bias = jnp.einsum("bqhr,bkhr->bhqk", u, jnp.repeat(w, H // KVH, axis=2))
        return jnp.sum(jnp.tanh(F.softmax_attention(q, k, v, bias=bias, causal=True)))

    def factored(q, k, v, u, w):
        return jnp.sum(jnp.tanh(flashbias_attention(q, k, v, u, w, causal=True)))

    args = (Q, K, V, u, w)
    want = jax.jit(jax.grad(dense, argnums=range(5)))(*args)
    got = jax.jit(jax.grad(factored, argnums=range(5)))(*args)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(g, h, atol=1e-5)


def test_layer_with_alibi_factors_is_the_alibi_softmax_layer():
    layer, params = init("flashbias", X, MASK, num_heads=H, head_dim=D, num_kv_heads=KVH)
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=KVH, position="alibi")
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), apply(softmax, params, X, mask=MASK), atol=1e-5)
    assert_decode_matches(layer, params, X, MASK)


def test_learned_factors_causal_and_gradients():
    layer, params = init(
        "flashbias",
        X,
        MASK,
        num_heads=H,
        head_dim=D,
        num_kv_heads=KVH,
        factors="learned",
        rank=3,
        max_len=32,
        position="rope",
    )
    assert params["params"]["query_factors"].value.shape == (32, H, 3)
    assert_causal(layer, params, X, cut=5)
    assert_finite_grads(layer, params, X)


def test_explicit_stages_see_the_biased_logits_of_the_factors():
    """A capture moves the call to the explicit stages (on the same folded q', k'): the output is bit-identical to
    the fused path (XLA), and the sown weights are causal ALiBi softmax weights computed in numpy."""
    layer, params = init("flashbias", X, MASK, num_heads=H, head_dim=D, num_kv_heads=KVH)
    fused = apply(layer, params, X, mask=MASK)
    explicit, state = apply(layer, params, X, mask=MASK, mutable=["intermediates"])
    np.testing.assert_array_equal(explicit, fused)
    (weights,) = state["intermediates"]["attention_weights"]
    p = {n: np.asarray(params["params"][n]["kernel"].value, np.float64) for n in ("query", "key")}
    x = np.asarray(X, np.float64)
    q = np.einsum("bte,ehd->bthd", x, p["query"])
    k = np.repeat(np.einsum("bte,ehd->bthd", x, p["key"]), H // KVH, axis=2)
    slopes = 2.0 ** (-8.0 * np.arange(1, H + 1) / H)  # ALiBi's geometric slopes for H a power of 2
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    logits = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D) - slopes[:, None, None] * (i - j)
    logits = np.where(j <= i, logits, -np.inf)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(weights, want / want.sum(-1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize(
    "options, mask, message",
    [
        (dict(), None, r"factors='alibi' is exact only under a causal mask"),
        (dict(factors="dense"), MASK, r"factors='dense' must be one of"),
        (dict(position="alibi"), MASK, r"position='alibi' must be one of"),
        (dict(softcap=3.0), MASK, r"softcap=3.0 must be one of \(None,\)"),
        (dict(factors="learned", rank=0), MASK, r"rank=0 must be a positive int"),
    ],
)
def test_bad_options_name_the_option(options, mask, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("flashbias", num_heads=H, head_dim=D, **options)
        trace_init(layer, X, mask=mask)


def test_bad_factor_shapes():
    u = jnp.zeros((B, T, H, 2))
    with pytest.raises(ValueError, match=r"w has shape \(2, 8, 3, 2\); expected \[batch\|1, kv_len=8, kv_heads=2"):
        flashbias_attention(Q, K, V, u, jnp.zeros((B, T, 3, 2)))
    with pytest.raises(ValueError, match=r"u and w must have the same rank"):
        flashbias_attention(Q, K, V, u, jnp.zeros((B, T, 1, 3)))
