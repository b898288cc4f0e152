"""`deberta` (disentangled attention): reduction to softmax, c2p/p2c against an explicit (i, j) loop, log buckets,
causality and decode."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_decode_matches, assert_finite_grads, init, trace_init

import attn
from attn.softmax.deberta import log_bucket_position

B, T, E, H, D = 2, 6, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def test_no_relative_terms_is_softmax():
    layer, params = init("deberta", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, attention_terms=())
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2, position="none")
    p = {"params": {n: params["params"][n] for n in ("query", "key", "value", "out")}}
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), apply(softmax, p, X, mask=MASK), atol=1e-6)


def explicit_output(p, terms, p2c_index, share, span):
    """Loops over (b, h, i, j): A_ij = q.k + q.K^r[delta(i,j)] + k.Q^r[delta(i,j) or delta(j,i)], / sqrt(d n)."""
    x = np.asarray(X, np.float64)
    proj = lambda name: np.einsum("bte,ehd->bthd", x, p[name]["kernel"]) + p[name]["bias"]
    q, k, v = proj("query"), proj("key"), proj("value")
    table = np.asarray(p["relative_embeddings"], np.float64)
    rq, rk = ("query", "key") if share else ("position_query", "position_key")
    pos_q = np.einsum("re,ehd->rhd", table, p[rq]["kernel"]) + p[rq]["bias"]
    pos_k = np.einsum("re,ehd->rhd", table, p[rk]["kernel"]) + p[rk]["bias"]
    delta = lambda a, b: min(max(a - b + span, 0), 2 * span - 1)
    logits = np.zeros((B, H, T, T))
    for b in range(B):
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    a = q[b, i, h] @ k[b, j, h]
                    if "c2p" in terms:
                        a += q[b, i, h] @ pos_k[delta(i, j), h]
                    if "p2c" in terms:
                        a += k[b, j, h] @ pos_q[delta(i, j) if p2c_index == "released" else delta(j, i), h]
                    logits[b, h, i, j] = a / math.sqrt(D * (1 + len(terms)))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    heads = np.einsum("bhij,bjhd->bihd", probs, v)
    return np.einsum("bihd,hde->bie", heads, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize(
    "terms, p2c_index, share",
    [(("c2p", "p2c"), "paper", False), (("p2c",), "released", True)],
)
def test_disentangled_terms_equal_an_explicit_loop(terms, p2c_index, share):
    span = 2  # |i - j| up to 5 is clipped to the 2 * span rows
    options = dict(attention_terms=terms, p2c_index=p2c_index, share_att_key=share, use_bias=True)
    options.update(position_buckets=0, max_relative_positions=span)
    layer, params = init("deberta", X, None, num_heads=H, head_dim=D, **options)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params)["params"])
    assert p["relative_embeddings"].shape == (2 * span, E)
    assert ("position_query" in p) == (not share)
    np.testing.assert_allclose(apply(layer, params, X), explicit_output(p, terms, p2c_index, share, span), atol=2e-5)


def test_log_buckets():
    r = jnp.arange(-40, 41)
    buckets = np.asarray(log_bucket_position(r, 8, 32))
    # exact inside |r| <= b/2 = 4; then 4 + ceil(log(|r|/4) / log(31/4) * 3): 5 -> 5, 10 -> 6, 20 -> 7
    for distance, bucket in [(0, 0), (3, 3), (4, 4), (5, 5), (10, 6), (20, 7)]:
        assert buckets[40 + distance] == bucket and buckets[40 - distance] == -bucket
    assert np.all(np.diff(buckets) >= 0)
    assert np.all(buckets[40 + 31 :] == buckets[40 + 31]) and buckets[40 + 31] in (7, 8)


def test_causal_decode_and_gradients():
    options = dict(num_heads=H, head_dim=D, num_kv_heads=2, position_buckets=4, max_relative_positions=8)
    x = jax.random.normal(jax.random.key(1), (B, 8, E))
    layer, params = init("deberta", x, MASK, **options)
    assert_causal(layer, params, x, cut=5)
    assert_decode_matches(layer, params, x, MASK)
    assert_finite_grads(layer, params, x)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(attention_terms=("c2c",)), r"attention_terms=\('c2c',\) must be a tuple of distinct entries of"),
        (dict(p2c_index="transposed"), "p2c_index='transposed' must be one of"),
        (dict(position="alibi"), "position='alibi' must be one of"),
        (dict(position_buckets=64, max_relative_positions=32), "position_buckets=64 must be <= max_relative_positions"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("deberta", num_heads=H, head_dim=D, **options)
        trace_init(layer, X)
