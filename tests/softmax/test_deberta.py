"""`deberta` (disentangled attention): reduction to softmax, c2p/p2c against an explicit (i, j) loop, v1 biases, both
released log-bucket variants against loops written from their code, causality and decode."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_decode_matches, assert_finite_grads, init, trace_init

import attn
from attn.softmax.deberta import TERMS, log_bucket_position, relative_index

B, T, E, H, D = 2, 6, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def test_no_relative_terms_is_softmax():
    layer, params = init("deberta", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, attention_terms=())
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2, position="none")
    p = {"params": {n: params["params"][n] for n in ("query", "key", "value", "out")}}
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), apply(softmax, p, X, mask=MASK), atol=1e-6)


def bucket_2021(r, bucket_size, max_position):
    """One distance through transformers' `make_log_bucket_position` (microsoft/DeBERTa 2021): no clamp."""
    mid = bucket_size // 2
    if abs(r) <= mid:
        return r
    log_pos = math.ceil(math.log(abs(r) / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return int(math.copysign(log_pos, r))


def bucket_2023(r, bucket_size, max_position):
    """microsoft/DeBERTa 2023 `make_log_bucket_position`: a table over [-max, max) read at clip(r, +-(max - 1))."""
    table = [bucket_2021(t, bucket_size, max_position) for t in range(-max_position, max_position)]
    return table[min(max(r, -max_position + 1), max_position - 1) + max_position]


def explicit_output(p, x, terms, p2c_index, share, span, bucket):
    """Loops over (b, h, i, j): A_ij = q.k + q.K^r[delta(i,j)] + k.Q^r[delta(i,j) or delta(j,i)], / sqrt(d n), with
    delta(i, j) = clip(bucket(i - j) + span, 0, 2 span - 1). Position projections: the layer's own (share) or v1's
    (position_key without bias, position_query with one)."""
    x = np.asarray(x, np.float64)
    batch, length = x.shape[:2]
    proj = lambda name: np.einsum("bte,ehd->bthd", x, p[name]["kernel"]) + p[name]["bias"]
    q, k, v = proj("query"), proj("key"), proj("value")
    table = np.asarray(p["relative_embeddings"], np.float64)
    rq, rk = ("query", "key") if share else ("position_query", "position_key")
    assert ("bias" in p[rk]) == share and "bias" in p[rq]
    pos_q = np.einsum("re,ehd->rhd", table, p[rq]["kernel"]) + p[rq]["bias"]
    pos_k = np.einsum("re,ehd->rhd", table, p[rk]["kernel"]) + (p[rk]["bias"] if share else 0.0)
    delta = lambda a, b: min(max(bucket(a - b) + span, 0), 2 * span - 1)
    logits = np.zeros((batch, H, length, length))
    for b in range(batch):
        for h in range(H):
            for i in range(length):
                for j in range(length):
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
    expected = explicit_output(p, X, terms, p2c_index, share, span, bucket=lambda r: r)
    np.testing.assert_allclose(apply(layer, params, X), expected, atol=2e-5)


@pytest.mark.parametrize("use_bias", [False, True])
def test_v1_position_projections_have_v1_biases(use_bias):
    """DeBERTa-v1: `pos_proj` (c2p keys) has no bias and `pos_q_proj` (p2c queries) has one, whatever use_bias."""
    options = dict(share_att_key=False, position_buckets=0, max_relative_positions=4, use_bias=use_bias)
    _, params = init("deberta", X, None, num_heads=H, head_dim=D, **options)
    p = nn.unbox(params)["params"]
    assert set(p["position_key"]) == {"kernel"} and set(p["position_query"]) == {"kernel", "bias"}
    assert ("bias" in p["key"]) == use_bias


@pytest.mark.parametrize("bucket_size, max_position", [(8, 32), (256, 512), (64, 100)])
def test_log_buckets_equal_each_released_code(bucket_size, max_position):
    r = np.arange(-3 * max_position, 3 * max_position + 1)
    unclamped = np.asarray(log_bucket_position(jnp.asarray(r), bucket_size, max_position))
    clamped = np.asarray(log_bucket_position(jnp.asarray(r), bucket_size, max_position, clamp=True))
    np.testing.assert_array_equal(unclamped, [bucket_2021(int(t), bucket_size, max_position) for t in r])
    np.testing.assert_array_equal(clamped, [bucket_2023(int(t), bucket_size, max_position) for t in r])
    inside = np.abs(r) < max_position
    np.testing.assert_array_equal(unclamped[inside], clamped[inside])
    assert np.all(np.abs(clamped) <= bucket_size - 1) and np.all(np.abs(unclamped[~inside]) >= bucket_size)


def test_log_buckets_by_hand():
    # mid = 4; 4 + ceil(ln(|r| / 4) / ln(31 / 4) * 3): 5 -> 5, 10 -> 6, 20 -> 7, 31 -> 7, 32 -> 8, 100 -> 9
    r = jnp.asarray([0, 3, 4, 5, 10, 20, 31, 32, 100, -32, -100])
    np.testing.assert_array_equal(log_bucket_position(r, 8, 32), [0, 3, 4, 5, 6, 7, 7, 8, 9, -8, -9])
    np.testing.assert_array_equal(log_bucket_position(r, 8, 32, clamp=True), [0, 3, 4, 5, 6, 7, 7, 7, 7, -7, -7])


def test_bucket_variants_differ_only_for_keys_max_positions_after_the_query():
    q_pos, kv_pos = jnp.arange(40), jnp.arange(40)
    options = dict(position_buckets=8, max_relative_positions=32)
    free, span = relative_index(q_pos, kv_pos, **options)
    clamped, _ = relative_index(q_pos, kv_pos, log_bucket_clamp=True, **options)
    i, j = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    clip = lambda b: np.clip(b + span, 0, 2 * span - 1)
    np.testing.assert_array_equal(free[0], clip(np.vectorize(bucket_2021)(i - j, 8, 32)))
    np.testing.assert_array_equal(clamped[0], clip(np.vectorize(bucket_2023)(i - j, 8, 32)))
    differ = np.asarray(free[0] != clamped[0])
    np.testing.assert_array_equal(differ, j - i >= 32)
    assert np.all(np.asarray(free[0])[differ] == 0) and np.all(np.asarray(clamped[0])[differ] == 1)


@pytest.mark.parametrize("clamp, bucket", [(False, bucket_2021), (True, bucket_2023)])
def test_layer_with_log_buckets_equals_an_explicit_loop(clamp, bucket):
    """Bidirectional input longer than max_relative_positions, so the two bucket variants give different outputs."""
    x = jax.random.normal(jax.random.key(3), (1, 12, E))
    options = dict(position_buckets=4, max_relative_positions=5, log_bucket_clamp=clamp, use_bias=True)
    layer, params = init("deberta", x, None, num_heads=H, head_dim=D, **options)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params)["params"])
    expected = explicit_output(p, x, TERMS, "released", True, 4, bucket=lambda r: bucket(r, 4, 5))
    np.testing.assert_allclose(apply(layer, params, x), expected, atol=2e-5)


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
