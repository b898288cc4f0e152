"""`gated` (Gated Attention for LLMs): reductions to softmax, the explicit gate formula, causality, decode."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import (
    apply,
    assert_causal,
    assert_decode_matches,
    assert_finite_grads,
    decode_all,
    init,
    shared_params,
    trace_init,
)

import attn
from attn import functional as F
from attn.softmax.gated import GatedAttention

B, T, E, H, D = 2, 8, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def softmax_output(params, **options):
    layer = attn.build("softmax", num_heads=H, head_dim=D, **options)
    return apply(layer, params, X, mask=MASK)


def set_gate(params, kernel_value, bias_value=None):
    p = nn.unbox(params)
    gate = {"kernel": jnp.full_like(p["params"]["gate"]["kernel"], kernel_value)}
    if bias_value is not None:
        gate["bias"] = jnp.full_like(p["params"]["gate"]["bias"], bias_value)
    return {"params": {**p["params"], "gate": gate}}


def test_gate_none_is_softmax_exactly():
    layer, params = init("gated", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, gate="none")
    assert "gate" not in params["params"]
    np.testing.assert_array_equal(apply(layer, params, X, mask=MASK), softmax_output(params, num_kv_heads=2))


def test_open_gate_is_softmax_and_half_gate_halves_the_output_projection():
    layer, params = init("gated", X, MASK, num_heads=H, head_dim=D, use_bias=True)
    opened = set_gate(params, 0.0, 30.0)  # sigmoid(30) rounds to 1 in float32
    want = softmax_output(shared_params(opened), use_bias=True)
    np.testing.assert_array_equal(apply(layer, opened, X, mask=MASK), want)
    half = set_gate(params, 0.0, 0.0)
    p = shared_params(half)["params"]
    halved = {"params": {**p, "out": {"kernel": p["out"]["kernel"] * 0.5, "bias": p["out"]["bias"]}}}
    np.testing.assert_allclose(apply(layer, half, X, mask=MASK), softmax_output(halved, use_bias=True), atol=1e-6)


@pytest.mark.parametrize("gate, gate_position", [("elementwise", "sdpa"), ("headwise", "value")])
def test_layer_equals_the_explicit_gate_formula(gate, gate_position):
    layer, params = init(
        "gated", X, MASK, num_heads=H, head_dim=D, position="none", gate=gate, gate_position=gate_position
    )
    p = nn.unbox(params)["params"]
    proj = lambda name: jnp.einsum("bte,ehd->bthd", X, p[name]["kernel"])
    g = jax.nn.sigmoid(proj("gate"))
    assert g.shape == (B, T, H, D if gate == "elementwise" else 1)
    if gate_position == "sdpa":
        heads = F.softmax_attention(proj("query"), proj("key"), proj("value"), causal=True) * g
    else:
        heads = F.softmax_attention(proj("query"), proj("key"), proj("value") * g, causal=True)
    want = jnp.einsum("bthd,hde->bte", heads, p["out"]["kernel"])
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), want, atol=1e-5)


def test_causal_decode_gradients_with_dropout_and_sown_gate_scores():
    layer, params = init("gated", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, dropout_rate=0.1)
    assert_causal(layer, params, X, cut=5)
    assert_decode_matches(layer, params, X, MASK)
    assert_finite_grads(layer, params, X, deterministic=False, rngs={"dropout": jax.random.key(3)})
    _, state = apply(layer, params, X, mask=MASK, mutable=["intermediates"])
    (scores,) = state["intermediates"]["gate_scores"]
    assert scores.shape == (B, T, H, D) and bool(jnp.all((scores > 0) & (scores < 1)))
    assert state["intermediates"]["attention_weights"][0].shape == (B, H, T, T)
    assert tuple(nn.get_partition_spec(params)["params"]["gate"]["kernel"]) == ("embed", "heads", "head_dim")


def test_value_gate_causal_and_decode():
    # G2: the cache holds the gated values (one prefill chunk, then a step); headwise SiLU gate, MQA
    options = dict(num_kv_heads=1, gate="headwise", gate_position="value", gate_activation="silu")
    layer, params = init("gated", X, MASK, num_heads=H, head_dim=D, **options)
    assert_causal(layer, params, X, cut=5)
    np.testing.assert_allclose(
        decode_all(layer, params, X, MASK, [7, 1]), apply(layer, params, X, mask=MASK), atol=2e-5
    )


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("gate", "channel", "gate='channel' must be one of ('elementwise', 'headwise', 'none')"),
        ("gate_position", "key", "gate_position='key' must be one of ('sdpa', 'value')"),
        ("gate_activation", "tanh", "gate_activation='tanh' must be one of ('sigmoid', 'silu')"),
    ],
)
def test_bad_options_name_the_option(option, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):  # at build time (the registry's validators)
        attn.build("gated", num_heads=H, head_dim=D, **{option: value})
    layer = GatedAttention(num_heads=H, head_dim=D, **{option: value})  # constructed directly: at call time
    with pytest.raises(ValueError, match=re.escape(message)):
        trace_init(layer, X)
