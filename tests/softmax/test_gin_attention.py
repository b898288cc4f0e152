"""`gin_attention` (GIN-Attention): reduction to softmax, the GIN update formula with sharpening, thresholded
adjacency, causality, decoding and option errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_decode_matches, assert_finite_grads, init, trace_init

import attn

B, T, E, H, D = 2, 6, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))
PLAIN = dict(gin_mlp=False, sharpening=False)


def test_no_self_term_and_identity_mlp_is_the_softmax_layer_and_eps_zero_adds_the_self_loop():
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2)
    layer, params = init("gin_attention", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, epsilon_init=-1.0, **PLAIN)
    p = nn.unbox(params)["params"]
    shared = {"params": {n: p[n] for n in ("query", "key", "value", "out")}}
    reference = apply(softmax, shared, X, mask=MASK)
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), reference, atol=1e-5)
    # eps = 0: y = (A V + V) W_o = softmax(x) + (x W_v) W_o (value head g serves query heads 2g, 2g + 1).
    p["epsilon"] = jnp.zeros_like(p["epsilon"])
    values = jnp.repeat(jnp.einsum("bte,ehd->bthd", X, p["value"]["kernel"]), 2, axis=2)
    self_loop = jnp.einsum("bthd,hde->bte", values, p["out"]["kernel"])
    np.testing.assert_allclose(apply(layer, {"params": p}, X, mask=MASK), reference + self_loop, atol=1e-5)


def test_output_is_the_gin_mlp_of_the_sharpened_aggregation():
    layer, params = init(
        "gin_attention", X, MASK, num_heads=H, head_dim=D, position="none", sharpening_init=1.7, epsilon_init=0.3
    )
    p = nn.unbox(params)["params"]
    q, k, v = (jnp.einsum("bte,ehd->bthd", X, p[n]["kernel"]) for n in ("query", "key", "value"))
    logits = 1.7 * jnp.einsum("bthd,bshd->bhts", q, k) / D**0.5
    adjacency = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf), axis=-1)
    z = jnp.einsum("bhts,bshd->bthd", adjacency, v) + 1.3 * v
    hidden = jnp.einsum("bthd,hdm->bthm", z, p["gin_in"])
    hidden = hidden / jnp.sqrt(jnp.mean(hidden**2, -1, keepdims=True) + 1e-6) * p["gin_norm"]
    heads = jnp.einsum("bthm,hmd->bthd", jax.nn.silu(hidden), p["gin_out"])
    want = jnp.einsum("bthd,hde->bte", heads, p["out"]["kernel"])
    got, state = layer.apply(params, X, mask=MASK, mutable=["intermediates"])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(state["intermediates"]["attention_weights"][0], adjacency, atol=1e-5)


def test_thresholded_adjacency_is_relu_of_shifted_weights_and_stays_causal():
    options = dict(num_heads=H, head_dim=D, threshold_mode="relu", threshold=0.1, learnable_threshold=True)
    layer, params = init("gin_attention", X, MASK, **options)
    plain = attn.build("gin_attention", **{**options, "threshold_mode": "none"})
    _, thresholded = layer.apply(params, X, mask=MASK, mutable=["intermediates"])
    _, dense = plain.apply(params, X, mask=MASK, mutable=["intermediates"])
    a = dense["intermediates"]["attention_weights"][0]
    want = jnp.maximum(a - 0.1, 0.0) * jnp.tril(jnp.ones((T, T)))
    np.testing.assert_allclose(thresholded["intermediates"]["attention_weights"][0], want, atol=1e-6)
    assert_causal(layer, params, X, cut=3)
    assert_finite_grads(layer, params, X)
    assert float(jnp.abs(nn.unbox(params)["params"]["threshold"] - 0.1)) == 0.0


@pytest.mark.parametrize("options", [dict(num_kv_heads=2), dict(node_features="input", head_dim=E // H)])
def test_causality_gradients_and_decoding(options):
    options = {"num_heads": H, "head_dim": D, **options}
    layer, params = init("gin_attention", X, MASK, **options)
    assert_causal(layer, params, X, cut=3)
    assert_finite_grads(layer, params, X)
    assert_decode_matches(layer, params, X, MASK, atol=5e-5)


@pytest.mark.parametrize(
    "options, kwargs, message",
    [
        (dict(threshold_mode="topk"), dict(), r"threshold_mode='topk' must be one of"),
        (dict(node_features="input", head_dim=3), dict(), r"node_features='input' splits x into heads"),
        (dict(position="t5"), dict(), r"position='t5' must be one of"),
        (dict(mlp_multiplier=0), dict(), r"mlp_multiplier=0 must be a number > 0"),
        (dict(), dict(context=X), r"gin_attention is self-attention"),
    ],
)
def test_bad_options_name_the_option(options, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("gin_attention", **{"num_heads": H, "head_dim": D, **options})
        trace_init(layer, X, **{"mask": MASK, **kwargs})
