"""`tensor_attention` (triple-wise Kronecker attention): the paper's matrix form, the exact reduction to softmax,
causality, decoding and option errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_decode_matches, assert_finite_grads, init, trace_init

import attn
from attn import functional as F
from attn.softmax.tensor_attention import tensor_attention

B, T, E, H, D = 2, 6, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def kronecker_form(q, k1, k2, v1, v2):
    """The paper's D^-1 exp(Q (K1 ⊘ K2)^T) (V1 ⊘ V2) for one head: q [n, d], the rest [n, d], built with jnp.kron."""
    column_kron = lambda a, b: jnp.stack([jnp.kron(a[:, i], b[:, i]) for i in range(a.shape[1])], axis=1)
    a = jnp.exp(q @ column_kron(k1, k2).T)  # [n, n^2]
    return (a @ column_kron(v1, v2)) / a.sum(-1, keepdims=True)


def test_einsum_form_equals_the_papers_kronecker_matrix_form_per_head_with_gqa():
    keys = jax.random.split(jax.random.key(3), 5)
    q = 0.5 * jax.random.normal(keys[0], (1, T, 4, 3))
    k1, k2, v1, v2 = (0.5 * jax.random.normal(k, (1, T, 2, 3)) for k in keys[1:])
    out = tensor_attention(q, k1, k2, v1, v2, scale=1.0)
    for h in range(4):
        g = h // 2  # query head h reads kv head h // (H / KVH)
        want = kronecker_form(q[0, :, h], k1[0, :, g], k2[0, :, g], v1[0, :, g], v2[0, :, g])
        np.testing.assert_allclose(out[0, :, h], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", [attn.Mask(causal=True), attn.Mask(causal=True, kv_lengths=jnp.array([T, 4]))])
def test_unit_second_key_and_value_reduce_to_softmax_attention(mask):
    keys = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(keys[0], (B, T, H, D))
    k1, v1 = (jax.random.normal(k, (B, T, 2, D)) for k in keys[1:])
    ones = jnp.ones_like(k1)
    got = tensor_attention(q, k1, ones, v1, ones, mask=mask)
    np.testing.assert_allclose(got, F.softmax_attention(q, k1, v1, mask=mask), atol=1e-5)
    # k2 = 0 is NOT the reduction: every allowed pair gets the same weight.
    uniform = tensor_attention(q, k1, jnp.zeros_like(k1), v1, ones, causal=True)
    np.testing.assert_allclose(uniform[:, 2], v1[:, :3].mean(1).repeat(2, axis=1), atol=1e-5)


def test_layer_with_constant_unit_key2_value2_is_the_softmax_layer():
    layer, params = init("tensor_attention", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, use_bias=True)
    p = nn.unbox(params)["params"]
    for name in ("key2", "value2"):
        p[name] = {"kernel": jnp.zeros_like(p[name]["kernel"]), "bias": jnp.ones_like(p[name]["bias"])}
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2, use_bias=True)
    shared = {"params": {n: p[n] for n in ("query", "key", "value", "out")}}
    np.testing.assert_allclose(
        apply(layer, {"params": p}, X, mask=MASK), apply(softmax, shared, X, mask=MASK), atol=1e-5
    )


def test_causality_gradients_decoding_and_weights():
    layer, params = init("tensor_attention", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2)
    assert_causal(layer, params, X, cut=3)
    assert_finite_grads(layer, params, X)
    assert_decode_matches(layer, params, X, MASK)
    _, state = layer.apply(params, X, mask=MASK, mutable=["intermediates"])
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (B, H, T, T)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert float(jnp.abs(jnp.triu(weights, 1)).max()) == 0.0


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(position="alibi"), r"position='alibi' must be one of"),
        (dict(num_kv_heads=3), r"num_heads=4 must be a multiple of num_kv_heads=3"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("tensor_attention", num_heads=H, head_dim=D, **options)
        trace_init(layer, X, mask=MASK)


def test_mismatched_second_key_shape_is_an_error():
    q = jnp.zeros((1, 3, 2, 4))
    k = jnp.zeros((1, 3, 2, 4))
    with pytest.raises(ValueError, match=r"k1/k2 and v1/v2 must have equal shapes"):
        tensor_attention(q, k, jnp.zeros((1, 2, 2, 4)), k, jnp.zeros((1, 2, 2, 4)))
