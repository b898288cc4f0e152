"""`clipped_softmax` (Quantizable Transformers): exact reduction, clipping identities, the per-head gate."""

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
    init,
    shared_params,
    trace_init,
)

import attn
from attn import functional as F
from attn.softmax.clipped_softmax import clipped_softmax_attention

B, T, E, H, D = 2, 8, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def test_zeta_one_gamma_zero_is_softmax_exactly():
    layer, params = init("clipped_softmax", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, zeta=1.0, gamma=0.0)
    want = apply(attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2), params, X, mask=MASK)
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), want, atol=1e-6, rtol=0)


def test_functional_clips_to_exact_zeros_and_ones():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 6, 2, 4)) for i in range(3))
    q = q * 4.0  # peaked rows, so some probabilities exceed 1 / zeta
    zeta, gamma = 1.2, -0.1
    out, aux = clipped_softmax_attention(q, k, v, zeta=zeta, gamma=gamma, causal=True, return_probs=True)
    _, ref = F.softmax_attention(q, k, v, causal=True, return_probs=True)
    p, clipped = ref["probs"], aux["probs"]
    np.testing.assert_allclose(clipped, np.clip((zeta - gamma) * p + gamma, 0, 1), atol=1e-6)
    small, large = p < -gamma / (zeta - gamma), p >= (1 - gamma) / (zeta - gamma)
    assert bool(small.any()) and bool(jnp.all(clipped[small] == 0.0))
    assert bool(large.any()) and bool(jnp.all(clipped[large] == 1.0))
    np.testing.assert_allclose(out, jnp.einsum("bhts,bshd->bthd", clipped, v), atol=1e-5)


def test_alpha_sets_gamma_from_the_number_of_keys():
    layer, params = init("clipped_softmax", X, MASK, num_heads=H, head_dim=D, alpha=2.0)
    same = attn.build("clipped_softmax", num_heads=H, head_dim=D, gamma=-2.0 / T)
    np.testing.assert_array_equal(apply(layer, params, X, mask=MASK), apply(same, params, X, mask=MASK))


def set_gate_bias(params, value):
    p = nn.unbox(params)["params"]
    gate = {**p["gate"], "kernel": jnp.zeros_like(p["gate"]["kernel"]), "bias": jnp.full_like(p["gate"]["bias"], value)}
    return {"params": {**p, "gate": gate}}


@pytest.mark.parametrize("gate", ["linear", "all_features"])
def test_open_gate_is_ungated_and_closed_gate_silences_the_layer(gate):
    layer, params = init("clipped_softmax", X, MASK, num_heads=H, head_dim=D, gate=gate)
    ungated = attn.build("clipped_softmax", num_heads=H, head_dim=D)
    want = apply(ungated, shared_params(nn.unbox(params)), X, mask=MASK)
    np.testing.assert_array_equal(apply(layer, set_gate_bias(params, 30.0), X, mask=MASK), want)
    assert float(jnp.abs(apply(layer, set_gate_bias(params, -30.0), X, mask=MASK)).max()) < 1e-9


def test_linear_gate_reads_each_heads_chunk_of_x():
    layer, params = init("clipped_softmax", X, MASK, num_heads=H, head_dim=D, gate="linear", position="none")
    p = nn.unbox(params)["params"]
    assert p["gate"]["kernel"].shape == (H, E // H, 1)
    np.testing.assert_allclose(jax.nn.sigmoid(p["gate"]["bias"]), 0.25, rtol=1e-6)  # gate_init
    proj = lambda name: jnp.einsum("bte,ehd->bthd", X, p[name]["kernel"])
    heads = clipped_softmax_attention(proj("query"), proj("key"), proj("value"), gamma=-0.025, causal=True)
    pi = jax.nn.sigmoid(
        jnp.einsum("bthc,hco->btho", X.reshape(B, T, H, E // H), p["gate"]["kernel"]) + p["gate"]["bias"][:, None]
    )
    want = jnp.einsum("bthd,hde->bte", heads * pi, p["out"]["kernel"])
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), want, atol=1e-5)


def test_causal_decode_and_gradients():
    options = dict(num_kv_heads=2, zeta=1.05, gate="mlp", dropout_rate=0.1)
    layer, params = init("clipped_softmax", X, MASK, num_heads=H, head_dim=D, **options)
    assert_causal(layer, params, X, cut=5)
    assert_decode_matches(layer, params, X, MASK)
    assert_finite_grads(layer, params, X, deterministic=False, rngs={"dropout": jax.random.key(3)})


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(zeta=0.9), r"zeta=0.9 must be a number in \[1.0, inf\]"),
        (dict(gamma=0.1), r"gamma=0.1 must be a number in \[-inf, 0.0\]"),
        (dict(alpha=-1.0), r"alpha=-1.0 must be None or a number >= 0"),
        (dict(gate="sigmoid"), r"gate='sigmoid' must be one of \('none', 'linear', 'mlp', 'all_features'\)"),
        (dict(gate="linear", gate_init=1.0), r"gate_init=1.0 must be a number in \(0.0, 1.0\)"),
        (
            dict(gate="linear", num_heads=3),
            r"splits x into num_heads=3 chunks, but its feature size 16 is not divisible",
        ),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        trace_init(attn.build("clipped_softmax", **{"num_heads": H, "head_dim": D, **options}), X)
