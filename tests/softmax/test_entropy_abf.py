"""`entropy_abf`: reductions to RoPE softmax, the log-length query scale, explicit positions, decode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_decode_matches, assert_finite_grads, init, trace_init

import attn
from attn import functional as F
from attn.core import positions as pos
from attn.softmax.entropy_abf import entropy_aware_scale

B, T, E, H, D = 2, 8, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def rope_softmax(params, positions=None, base=500000.0):
    layer = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2, rope_base=base)
    return apply(layer, params, X, mask=MASK, positions=positions)


def test_without_scaling_or_within_the_window_it_is_rope_softmax_exactly():
    layer, params = init("entropy_abf", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, query_scaling=False)
    np.testing.assert_array_equal(apply(layer, params, X, mask=MASK), rope_softmax(params))
    short = attn.build("entropy_abf", num_heads=H, head_dim=D, num_kv_heads=2, original_max_len=T)
    np.testing.assert_array_equal(apply(short, params, X, mask=MASK), rope_softmax(params))  # p + 1 <= L: s = 1
    base = attn.build("entropy_abf", num_heads=H, head_dim=D, num_kv_heads=2, rope_base=10000.0, query_scaling=False)
    np.testing.assert_array_equal(apply(base, params, X, mask=MASK), rope_softmax(params, base=10000.0))


def test_scale_formula():
    s = entropy_aware_scale(jnp.array([0, 3, 4, 15, 4095, 16383]), 4096)
    np.testing.assert_allclose(s, [1, 1, 1, 1, 1, np.log(16384) / np.log(4096)], rtol=1e-6)


def test_layer_scales_queries_by_their_explicit_positions():
    positions = jnp.broadcast_to(jnp.arange(T) + 100, (B, T))
    layer, params = init("entropy_abf", X, MASK, num_heads=H, head_dim=D, original_max_len=16)
    p = nn.unbox(params)["params"]
    proj = lambda name: jnp.einsum("bte,ehd->bthd", X, p[name]["kernel"])
    inv_freq, _ = pos.rope_frequencies(D, base=500000.0)
    q, k = (pos.apply_rope(proj(n), positions, inv_freq) for n in ("query", "key"))
    q = q * (jnp.log(positions + 1.0) / jnp.log(16.0))[..., None, None]
    want = jnp.einsum("bthd,hde->bte", F.softmax_attention(q, k, proj("value"), causal=True), p["out"]["kernel"])
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK, positions=positions), want, atol=1e-5)


def test_causal_decode_and_gradients_with_active_scaling():
    layer, params = init("entropy_abf", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, original_max_len=2)
    assert_causal(layer, params, X, cut=5)
    assert_decode_matches(layer, params, X, MASK)
    assert_finite_grads(layer, params, X)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(position="alibi"), r"position='alibi' must be one of"),
        (dict(original_max_len=1), r"original_max_len=1 must be an int >= 2"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("entropy_abf", num_heads=H, head_dim=D, **options)
        trace_init(layer, X, mask=MASK)
