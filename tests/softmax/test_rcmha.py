"""`rcmha`: identity filters without the relative term are softmax; the convolution + relative formula; causality
through the convolution padding; decode with the convolution state."""

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
    for i, name in enumerate(("query_conv", "key_conv", "value_conv")):
        p[name] = jax.random.normal(jax.random.key(10 + i), p[name].shape)
    return {"params": p}


def test_identity_filters_without_relative_term_are_softmax():
    layer, params = init("rcmha", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, relative="none")
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2, position="none")
    shared = {"params": {n: params["params"][n] for n in ("query", "key", "value", "out")}}
    np.testing.assert_array_equal(apply(layer, params, X, mask=MASK), apply(softmax, shared, X, mask=MASK))


def test_layer_equals_convolution_then_relative_attention():
    layer, params = init("rcmha", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, conv_width=3, max_distance=5)
    params = random_filters(params)
    p = params["params"]

    def conv(name):  # explicit causal depthwise convolution, token by token
        y = np.asarray(jnp.einsum("bte,ehd->bthd", X, p[name]["kernel"]), np.float64)
        w = np.asarray(p[f"{name}_conv"], np.float64)
        out = np.zeros_like(y)
        for t in range(T):
            for s in range(3):
                if t - 2 + s >= 0:
                    out[:, t] += w[s] * y[:, t - 2 + s]
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
        (dict(conv_width=0), "conv_width=0 must be > 0"),
        (dict(relative="xl"), "relative='xl' is not supported; expected one of 'music', 'none'"),
    ],
)
def test_bad_options_name_the_option(options, message):
    layer = attn.build("rcmha", num_heads=H, head_dim=D, **options)
    with pytest.raises(ValueError, match=message):
        trace_init(layer, X)


def test_context_is_rejected():
    layer = attn.build("rcmha", num_heads=H, head_dim=D)
    with pytest.raises(ValueError, match="rcmha is self-attention only"):
        trace_init(layer, X, context=X)
