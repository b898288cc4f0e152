"""`rcmha`: identity filters without the relative term are softmax; the authors' convolution + Transformer-XL
formula re-implemented in numpy; the music variant; causality through the convolution padding; decode with the
convolution state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_decode_matches, assert_finite_grads, init, trace_init

import attn
from attn import functional as F
from attn.softmax.relative_music import relative_logits_gathered

B, T, E, H, D = 2, 8, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def random_filters(params):
    p = dict(nn.unbox(params)["params"])
    names = [n for n in p if n.endswith(("_conv", "_conv_bias")) or n in ("query_bias", "relative_bias")]
    for i, name in enumerate(sorted(names)):
        p[name] = jax.random.normal(jax.random.key(10 + i), p[name].shape)
    return {"params": p}


def test_identity_filters_without_relative_term_are_softmax():
    layer, params = init("rcmha", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, relative="none")
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2, position="none")
    shared = {"params": {n: params["params"][n] for n in ("query", "key", "value", "out")}}
    np.testing.assert_array_equal(apply(layer, params, X, mask=MASK), apply(softmax, shared, X, mask=MASK))


def causal_conv_numpy(y, w, b):
    """Token by token: out_t = b + sum_s w[s] y_{t-2+s} (width 3, zeros before the start); w [3, D] for all heads."""
    out = np.zeros_like(y) + b
    for t in range(y.shape[1]):
        for s in range(3):
            if t - 2 + s >= 0:
                out[:, t] += w[s] * y[:, t - 2 + s]
    return out


def test_xl_form_matches_the_authors_equations_in_numpy():
    layer, params = init("rcmha", X, MASK, num_heads=H, head_dim=D, conv_width=3, max_distance=5)
    params = random_filters(params)
    p = {k: np.asarray(v, np.float64) if not isinstance(v, dict) else v for k, v in params["params"].items()}
    x = np.asarray(X, np.float64)

    def proj(name):
        y = np.einsum("bte,ehd->bthd", x, np.asarray(p[name]["kernel"], np.float64))
        return causal_conv_numpy(y, p[f"{name}_conv"], p[f"{name}_conv_bias"])

    q, k, v = proj("query"), proj("key"), proj("value")
    r, d, u = p["relative_embeddings"], p["relative_bias"], p["query_bias"]  # [H, 5, D], [H, 5], [H, D]
    s = np.einsum("bihd,bjhd->bhij", q + u, k)
    for i in range(T):
        for j in range(max(0, i - 4), i + 1):  # distance j - i in -(M-1)..0 is row M - 1 + j - i
            s[:, :, i, j] += np.einsum("bhd,hd->bh", q[:, i], r[:, 4 + j - i]) + d[:, 4 + j - i]
    s = np.where(np.tril(np.ones((T, T), bool)), s / np.sqrt(D), -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    want = np.einsum("bhij,bjhd,hde->bie", a, v, np.asarray(p["out"]["kernel"], np.float64))
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), want, atol=2e-5)
    shapes = {n: p[n].shape for n in ("query_conv", "query_conv_bias", "relative_bias", "query_bias")}
    assert shapes == {"query_conv": (3, D), "query_conv_bias": (D,), "relative_bias": (H, 5), "query_bias": (H, D)}


def test_music_form_equals_convolution_then_relative_attention():
    layer, params = init(
        "rcmha", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, conv_width=3, max_distance=5, relative="music"
    )
    params = random_filters(params)
    p = params["params"]

    def conv(name):
        y = np.asarray(jnp.einsum("bte,ehd->bthd", X, p[name]["kernel"]), np.float64)
        out = causal_conv_numpy(y, np.asarray(p[f"{name}_conv"], np.float64), np.asarray(p[f"{name}_conv_bias"]))
        return jnp.asarray(out, jnp.float32)

    q, k, v = conv("query"), conv("key"), conv("value")
    bias = relative_logits_gathered(q, p["relative_embeddings"], jnp.arange(T), jnp.arange(T)) / np.sqrt(D)
    want = jnp.einsum("bthd,hde->bte", F.softmax_attention(q, k, v, causal=True, bias=bias), p["out"]["kernel"])
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), want, atol=2e-5)


def test_causal_decode_and_gradients():
    layer, params = init("rcmha", X, MASK, num_heads=H, head_dim=D, num_kv_heads=1, max_distance=6)
    params = random_filters(params)
    assert_causal(layer, params, X, cut=5)
    assert_decode_matches(layer, params, X, MASK, atol=5e-5)  # prefill, then one token at a time through the state
    assert_finite_grads(layer, params, X)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(conv_width=0), "conv_width=0 must be a positive int"),
        (dict(relative="rmha"), "relative='rmha' must be one of"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("rcmha", num_heads=H, head_dim=D, **options)
        trace_init(layer, X)


def test_context_is_rejected():
    layer = attn.build("rcmha", num_heads=H, head_dim=D)
    with pytest.raises(ValueError, match="rcmha is self-attention only"):
        trace_init(layer, X, context=X)
