"""`dare`: decoupled embeddings, the tied (coupled) reduction, gradient decoupling, a numpy reference, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.cross.dare import DecoupledEmbedding

B, L, ITEMS, H, D = 2, 6, 10, 2, 2
A = H * D
IDS = jnp.array([[1, 4, 2, 7, 7, 3], [0, 9, 5, 5, 8, 1]])
TARGETS = jnp.array([[4], [5]])


def embed(tied, representation_dim=A):
    table = DecoupledEmbedding(ITEMS, A, representation_dim, tied=tied)
    params = table.init(jax.random.key(0), IDS)
    return lambda ids: table.apply(params, ids), nn.unbox(params)["params"]


def test_decoupled_embedding_concatenates_the_two_tables():
    lookup, p = embed(tied=False, representation_dim=6)
    out = np.asarray(lookup(IDS))
    for b in range(B):
        for j in range(L):
            np.testing.assert_array_equal(out[b, j, :A], p["attention"][IDS[b, j]])
            np.testing.assert_array_equal(out[b, j, A:], p["representation"][IDS[b, j]])
    tied_lookup, tied_p = embed(tied=True)
    assert set(tied_p) == {"representation"}
    np.testing.assert_array_equal(tied_lookup(IDS)[..., :A], tied_lookup(IDS)[..., A:])


def layer_and_params(x, context):
    layer = attn.build("dare", num_heads=H, head_dim=D)
    return layer, nn.unbox(layer.init(jax.random.key(1), x, context=context))


def target_attention(q, k, v):
    """Single-sequence reference: q [A], k [L, A], v [L, R] split into H heads -> [H, R / H]."""
    out = []
    for h in range(H):
        qh, kh = q[h * D : (h + 1) * D], k[:, h * D : (h + 1) * D]
        r = v.shape[-1] // H
        logits = kh @ qh / np.sqrt(D)
        w = np.exp(logits - logits.max())
        out.append((w / w.sum()) @ v[:, h * r : (h + 1) * r])
    return np.stack(out)


@pytest.mark.parametrize("tied", [False, True])
def test_layer_matches_target_attention_and_tied_tables_are_the_coupled_baseline(tied):
    lookup, _ = embed(tied=tied, representation_dim=A if tied else 6)
    x, context = lookup(TARGETS), lookup(IDS)
    layer, params = layer_and_params(x, context)
    y = np.asarray(layer.apply(params, x, context=context))
    out = np.asarray(params["params"]["out"]["kernel"], np.float64)
    xs, cs = np.asarray(x, np.float64), np.asarray(context, np.float64)
    for b in range(B):
        # coupled baseline when tied: keys and values are the same embedding E(id)
        keys, values = cs[b, :, :A], (cs[b, :, :A] if tied else cs[b, :, A:])
        heads = target_attention(xs[b, 0, :A], keys, values)
        np.testing.assert_allclose(y[b, 0], np.einsum("hd,hde->e", heads, out), atol=2e-5, rtol=1e-5)


@pytest.mark.slow  # a gradient compile; the numpy reference checks which channels feed scores and values
def test_weights_ignore_the_representation_channels_which_carry_the_output():
    lookup, _ = embed(tied=False, representation_dim=6)
    x, context = lookup(TARGETS), lookup(IDS)
    layer, params = layer_and_params(x, context)

    def weights(c):
        _, state = layer.apply(params, x, context=c, mutable=["intermediates"])
        (w,) = state["intermediates"]["attention_weights"]
        return jnp.sum(w * jnp.arange(L))

    grad = jax.jit(jax.grad(weights))(context)
    assert float(jnp.abs(grad[..., A:]).max()) == 0.0 and float(jnp.abs(grad[..., :A]).max()) > 0.0
    output = jax.jit(lambda c: layer.apply(params, x, context=c))
    swapped = context.at[..., A:].set(context[..., A:][:, ::-1])  # other values, same attention channels
    assert float(jnp.abs(output(swapped) - output(context)).max()) > 1e-4


def test_bad_input_names_the_argument():
    lookup, _ = embed(tied=False, representation_dim=6)
    x, context = lookup(TARGETS), lookup(IDS)
    layer, params = layer_and_params(x, context)
    with pytest.raises(ValueError, match="needs context"):
        layer.apply(params, x)
    with pytest.raises(ValueError, match="context has width 9"):
        layer.apply(params, x, context=context[..., :9])
    with pytest.raises(ValueError, match="x has width 3"):
        layer.apply(params, x[..., :3], context=context)
    with pytest.raises(ValueError, match="num_kv_heads=1 must be None"):
        attn.build("dare", num_heads=H, head_dim=D, num_kv_heads=1)
    with pytest.raises(ValueError, match="attention_dim=4 must equal representation_dim=6"):
        DecoupledEmbedding(ITEMS, A, 6, tied=True).init(jax.random.key(0), IDS)
