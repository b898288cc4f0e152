"""`relative_music` (Music Transformer): the skew equals explicit relative logits, reduction to softmax, relative
invariance, causality, decode with the KV cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_decode_matches, assert_finite_grads, init, trace_init

import attn
from attn import functional as F
from attn.softmax.relative_music import relative_logits_gathered, relative_logits_skewed

B, T, E, H, D = 2, 8, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def explicit_relative(q, table):
    """S[b, h, i, j] = q_i . E[h, M - 1 + j - i] for -(M-1) <= j - i <= 0, else 0, by a loop."""
    q, table = np.asarray(q, np.float64), np.asarray(table, np.float64)
    rows = table.shape[1]
    out = np.zeros((q.shape[0], q.shape[2], q.shape[1], q.shape[1]))
    for i in range(q.shape[1]):
        for j in range(i + 1):
            if i - j < rows:
                out[:, :, i, j] = np.einsum(
                    "bhd,hd->bh", q[:, i], np.broadcast_to(table, (q.shape[2], *table.shape[1:]))[:, rows - 1 + j - i]
                )
    return out


@pytest.mark.parametrize("rows, heads", [(12, H), (5, H), (8, 1)])
def test_skew_equals_explicit_relative_logits(rows, heads):
    q = jax.random.normal(jax.random.key(1), (B, T, H, D))
    table = jax.random.normal(jax.random.key(2), (heads, rows, D))
    want = explicit_relative(q, table)
    np.testing.assert_allclose(jax.jit(relative_logits_skewed)(q, table), want, atol=1e-5)
    gathered = jax.jit(relative_logits_gathered)(q, table, jnp.arange(T), jnp.arange(T))
    np.testing.assert_allclose(gathered, want, atol=1e-5)


def test_zero_embeddings_is_softmax_and_layer_equals_the_formula():
    layer, params = init("relative_music", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, max_distance=6)
    p = nn.unbox(params)["params"]
    proj = lambda name: jnp.einsum("bte,ehd->bthd", X, p[name]["kernel"])
    q = proj("query")
    bias = jnp.asarray(explicit_relative(q, p["relative_embeddings"]), jnp.float32) / np.sqrt(D)
    heads = F.softmax_attention(q, proj("key"), proj("value"), causal=True, bias=bias)
    want = jnp.einsum("bthd,hde->bte", heads, p["out"]["kernel"])
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), want, atol=1e-5)

    zero = {"params": {**p, "relative_embeddings": jnp.zeros_like(p["relative_embeddings"])}}
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2, position="none")
    shared = {"params": {n: p[n] for n in ("query", "key", "value", "out")}}
    np.testing.assert_array_equal(apply(layer, zero, X, mask=MASK), apply(softmax, shared, X, mask=MASK))


def test_shifted_positions_take_the_gather_path_and_change_nothing():
    layer, params = init("relative_music", X, MASK, num_heads=H, head_dim=D, max_distance=6)
    shifted = jnp.broadcast_to(jnp.arange(T) + 11, (B, T))
    np.testing.assert_allclose(
        apply(layer, params, X, mask=MASK, positions=shifted), apply(layer, params, X, mask=MASK), atol=1e-5
    )


def test_causal_decode_and_gradients():
    options = dict(num_heads=H, head_dim=D, num_kv_heads=2, max_distance=6, position="rope")  # RoPE on top, too
    layer, params = init("relative_music", X, MASK, **options)
    assert_causal(layer, params, X, cut=5)
    assert_decode_matches(layer, params, X, MASK)  # decode gathers; the full forward skews
    assert_finite_grads(layer, params, X)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_distance=0), "max_distance=0 must be a positive int"),
        (dict(position="alibi"), "position='alibi' must be one of"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("relative_music", num_heads=H, head_dim=D, **options)
        trace_init(layer, X)
