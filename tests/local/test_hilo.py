"""The `hilo` layer (HiLo [149]): the first heads (Hi-Fi) equal dense attention under the s x s window mask built
with loops, the last int(alpha * heads) (Lo-Fi) equal dense attention to the s x s average-pooled grid (pooled with
loops); the documented head split; s = 1 is softmax; captured weights; gradients; errors."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from local_reference import normal, random_params

import attn
from attn import functional as F
from attn.local.hilo import hilo_heads


def loop_window_mask(height, width, s):
    coords = list(itertools.product(range(height), range(width)))
    return np.array([[(qr // s, qc // s) == (kr // s, kc // s) for kr, kc in coords] for qr, qc in coords])


def loop_pool(x, s):
    """[B, H, W, E] -> [B, (H/s)(W/s), E]: window means, windows row-major."""
    x = np.asarray(x)
    batch, height, width, features = x.shape
    pooled = [x[:, r : r + s, c : c + s].mean(axis=(1, 2)) for r in range(0, height, s) for c in range(0, width, s)]
    return jnp.asarray(np.stack(pooled, axis=1))


def hilo_reference(params, x, s, hifi):
    p = nn.meta.unbox(params)["params"]
    batch, height, width, features = x.shape
    flat = x.reshape(batch, height * width, features)
    q = jnp.einsum("bne,ehd->bnhd", flat, p["query"]["kernel"])
    outputs = []
    if hifi:
        k, v = (jnp.einsum("bne,ehd->bnhd", flat, p[n]["kernel"]) for n in ("hifi_key", "hifi_value"))
        mask = jnp.asarray(loop_window_mask(height, width, s))[None, None]
        outputs.append(F.softmax_attention(q[:, :, :hifi], k, v, mask=mask))
    if hifi < q.shape[2]:
        pooled = loop_pool(x, s)
        k, v = (jnp.einsum("bme,ehd->bmhd", pooled, p[n]["kernel"]) for n in ("lofi_key", "lofi_value"))
        outputs.append(F.softmax_attention(q[:, :, hifi:], k, v))
    out = jnp.concatenate(outputs, axis=2)
    return jnp.einsum("bnhd,hde->bne", out, p["out"]["kernel"]).reshape(x.shape)


def test_head_split_is_as_documented():
    assert hilo_heads(4, 0.9, 2) == (1, 3)  # int(3.6) = 3 Lo-Fi heads, the rest Hi-Fi
    assert hilo_heads(4, 0.5, 2) == (2, 2)
    assert hilo_heads(8, 0.0, 2) == (8, 0)
    assert hilo_heads(3, 1.0, 4) == (0, 3)
    assert hilo_heads(4, 0.5, 1) == (0, 4)  # s = 1: every head is global (official code)


@pytest.mark.parametrize(
    "spatial, s, alpha, hifi", [((4, 6), 2, 0.9, 1), ((6, 6), 3, 0.5, 2), ((4, 4), 2, 0.0, 4)], ids=["a09", "a05", "a0"]
)
def test_layer_equals_per_head_group_references(spatial, s, alpha, hifi):
    layer = attn.build("hilo", num_heads=4, head_dim=4, alpha=alpha, window_size=s)
    x = normal((2, *spatial, 8))
    params = random_params(layer, x)
    names = set(nn.meta.unbox(params)["params"])
    assert ("hifi_key" in names) == (hifi > 0) and ("lofi_key" in names) == (hifi < 4)
    out = jax.jit(layer.apply)(params, x)
    np.testing.assert_allclose(out, hilo_reference(params, x, s, hifi), atol=3e-5, rtol=1e-5)


def test_window_one_is_softmax():
    layer = attn.build("hilo", num_heads=2, head_dim=4, window_size=1)
    softmax = attn.build("softmax", num_heads=2, head_dim=4, position="none")
    x = normal((2, 3, 4, 8))
    params = random_params(layer, x)
    p = nn.meta.unbox(params)["params"]
    renamed = {"params": {"query": p["query"], "key": p["lofi_key"], "value": p["lofi_value"], "out": p["out"]}}
    ref = jax.jit(softmax.apply)(renamed, x.reshape(2, 12, 8)).reshape(x.shape)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), ref, atol=2e-5)


def test_captured_weights_and_gradients():
    height, width, s = 4, 4, 2
    layer = attn.build("hilo", num_heads=2, head_dim=4, alpha=0.5, window_size=s)
    x = normal((1, height, width, 8))
    params = random_params(layer, x)
    _, state = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(params, x)
    (weights,) = state["intermediates"]["attention_weights"]
    weights = np.asarray(weights)
    assert weights.shape == (1, 2, 16, 16)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    window = loop_window_mask(height, width, s)
    assert np.all(weights[0, 0][~window] == 0)  # Hi-Fi head: its window only
    # Lo-Fi head: a pooled key's weight is spread evenly over its s x s tokens.
    for member in window:
        np.testing.assert_allclose(weights[0, 1][:, member], weights[0, 1][:, member][:, :1].repeat(4, 1), atol=1e-7)

    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_errors():
    x = jnp.zeros((1, 4, 6, 8))
    with pytest.raises(ValueError, match=r"alpha=1.5 must be a number in \[0, 1\]"):
        attn.build("hilo", num_heads=2, head_dim=4, alpha=1.5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"window_size=4 must be a positive int dividing the grid 4 x 6"):
        attn.build("hilo", num_heads=2, head_dim=4, window_size=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"num_kv_heads=1 is not supported by hilo"):
        attn.build("hilo", num_heads=2, head_dim=4, num_kv_heads=1).init(jax.random.key(0), x)
