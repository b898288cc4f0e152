"""`softplus` (LSSA / LSSAR): the explicit formula, l1 rows, stability, re-weighting, causality, decode."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_decode_matches, assert_finite_grads, init, trace_init

import attn
from attn.softmax.softplus import softplus_attention

B, T, E, H, D = 2, 8, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))
Q, K, V = (jax.random.normal(jax.random.key(i), (B, T, 2, D)) for i in range(3))


def explicit(q, k, v, allowed, p=None):
    """numpy float64 transcription of the paper's Eq. 4 (and Eq. 5 when p is given), causal rows N_i = i."""
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    n = allowed.sum(-1, keepdims=True)
    z = math.log(D) * np.log(n) * np.einsum("bqhd,bkhd->bhqk", q, k)
    a = np.log1p(np.exp(z)) * allowed
    a = a / a.sum(-1, keepdims=True)
    if p is not None:
        offset = np.where(np.arange(1, a.shape[-2] + 1)[:, None] <= 3, 0.0, 1.0)  # the first 3 rows: O = 0
        a = np.maximum(a * n - offset, 0.0) ** p
        a = a / a.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", a, v), a


@pytest.mark.parametrize("mask", [MASK, attn.Mask(kv_lengths=jnp.array([8, 3]))], ids=["causal", "padded"])
def test_functional_equals_the_explicit_formula_and_rows_sum_to_one(mask):
    out, aux = softplus_attention(Q, K, V, mask=mask, return_probs=True)
    allowed = np.asarray(mask.materialize(T, T))
    want, weights = explicit(*map(np.asarray, (Q, K, V)), allowed)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(aux["probs"], np.broadcast_to(weights, aux["probs"].shape), atol=1e-6)
    np.testing.assert_allclose(aux["probs"].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("p", [3.0, 15.0])
def test_reweighting_equals_the_papers_eq5(p):
    out, aux = softplus_attention(Q, K, V, causal=True, reweight=True, reweight_power=p, return_probs=True)
    allowed = np.tril(np.ones((T, T), bool))[None, None]
    want, weights = explicit(*(np.asarray(a, np.float64) for a in (Q, K, V)), allowed, p=p)
    np.testing.assert_allclose(aux["probs"], np.broadcast_to(weights, aux["probs"].shape), atol=1e-5)
    np.testing.assert_allclose(out, want, atol=1e-4)


def test_cosine_logits_ignore_the_norms_of_q_and_k():
    base = softplus_attention(Q, K, V, causal=True, return_probs=True)[1]["probs"]
    scaled = softplus_attention(Q * 7.0, K * 0.1, V, causal=True, return_probs=True)[1]["probs"]
    np.testing.assert_allclose(scaled, base, atol=1e-6)


def test_sharpening_does_not_overflow_at_long_rows():
    t = 512  # every row puts ~all weight on key 0, so N a ~ 512 and (N a)^15 ~ 2^135 overflows float32 if naive
    u = jnp.ones((1, t, 1, D))
    k = (-u).at[:, 0].set(1.0)
    out, aux = softplus_attention(u, k, u, causal=True, reweight=True, return_probs=True)
    assert float(aux["probs"][0, 0, -1, 0]) > 0.999 and bool(jnp.all(jnp.isfinite(out)))


def test_huge_logits_stay_finite_and_linear():
    out, aux = softplus_attention(
        Q * 1e4, K, V, causal=True, cosine=False, length_scale=False, scale=D**-0.5, return_probs=True
    )
    assert bool(jnp.all(jnp.isfinite(out)))
    s = np.einsum("bqhd,bkhd->bhqk", np.asarray(Q * 1e4, np.float64), np.asarray(K, np.float64)) / math.sqrt(D)
    last = np.maximum(s[:, :, -1], 0.0)  # softplus(z) ~ relu(z) at this scale
    np.testing.assert_allclose(aux["probs"][:, :, -1], last / last.sum(-1, keepdims=True), atol=1e-3)


def test_reweighting_identity_and_sharpening():
    plain = softplus_attention(Q, K, V, causal=True, return_probs=True)[1]["probs"]
    same = softplus_attention(
        Q, K, V, causal=True, reweight=True, reweight_threshold=0.0, reweight_power=1.0, return_probs=True
    )[1]["probs"]
    np.testing.assert_allclose(same, plain, atol=1e-6)
    sharp = softplus_attention(Q, K, V, causal=True, reweight=True, reweight_power=2.0, return_probs=True)[1]["probs"]
    n = jnp.arange(1, T + 1, dtype=jnp.float32)[:, None]
    below = (plain < 1.0 / n) & (plain > 0) & (n > 3)  # rows N <= 3 have offset 0: nothing is cut there
    assert bool(below.any()) and bool(jnp.all(sharp[below] == 0.0))  # below the row mean: suppressed
    np.testing.assert_allclose(sharp.sum(-1), 1.0, atol=1e-5)
    assert bool(jnp.all(sharp.max(-1) >= plain.max(-1) - 1e-6))  # the largest weight only grows


def test_layer_causal_decode_and_gradients():
    layer, params = init("softplus", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, reweight=True)
    assert_causal(layer, params, X, cut=5)
    assert_decode_matches(layer, params, X, MASK)
    assert_finite_grads(layer, params, X)
    _, state = apply(layer, params, X, mask=MASK, mutable=["intermediates"])
    np.testing.assert_allclose(state["intermediates"]["attention_weights"][0].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(reweight=True, reweight_warmup=-1), r"reweight_warmup=-1 must be a non-negative int"),
        (dict(reweight=True, reweight_power=0.0), r"reweight_power=0.0 must be a number > 0"),
        (dict(reweight_threshold=-1.0), r"reweight_threshold=-1.0 must be a number >= 0"),
        (dict(softcap=5.0), r"softcap=5.0 must be one of \(None,\)"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("softplus", num_heads=H, head_dim=D, **options)
        trace_init(layer, X)
