"""`arrow` (SeNER): equals dense attention under the arrow mask written with loops and LogN factors counted with
loops; LogN is the identity at the training length; full band = softmax; causal decode; errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from local_reference import random_params

import attn
from attn import functional as F

B, E, H, D = 2, 16, 4, 4


def loop_arrow(length, num_global, left, right, causal=False, lengths=(None, None)):
    """bool [B, T, T]: row i sees key j iff i or j is global or j is in the band (and j <= i if causal, j valid)."""
    mask = np.zeros((B, length, length), bool)
    for b in range(B):
        valid = length if lengths[b] is None else lengths[b]
        for i in range(length):
            for j in range(length):
                arrow = i < num_global or j < num_global or i - left <= j <= i + right
                mask[b, i, j] = arrow and (j <= i or not causal) and j < valid
    return mask


def loop_logn(mask, num_global, base):
    """float [B, T]: log(#visible keys) / log(base) on the global rows, 1 elsewhere."""
    factors = np.ones(mask.shape[:2], np.float32)
    for b in range(mask.shape[0]):
        for i in range(min(num_global, mask.shape[1])):
            factors[b, i] = math.log(max(mask[b, i].sum(), 1)) / math.log(base)
    return factors


def build(x, **options):
    layer = attn.build("arrow", num_heads=H, head_dim=D, position="none", **options)
    return layer, random_params(layer, x)


def apply(layer, params, x, mask=None):
    return jax.jit(lambda p, x: layer.apply(p, x, mask=mask))(params, x)


@jax.jit
def reference(params, x, allowed, factors):
    """Projections + softmax attention with the logits of row i multiplied by factors[b, i] (by scaling q)."""
    p = nn.unbox(params)["params"]
    proj = lambda name: jnp.einsum("bte,ehd->bthd", x, p[name]["kernel"])
    q = proj("query") * factors[:, :, None, None]
    out = F.softmax_attention(q, proj("key"), proj("value"), mask=allowed[:, None])
    return jnp.einsum("bthd,hde->bte", out, p["out"]["kernel"])


@pytest.mark.parametrize(
    "num_global, window, causal, base",
    [(1, 2, False, 8), (2, (1, 3), False, 5), (2, 2, True, 4)],
    ids=["cls", "two_globals_asymmetric", "causal"],
)
def test_layer_equals_dense_arrow_reference_with_logn(num_global, window, causal, base):
    length = 13
    x = jax.random.normal(jax.random.key(0), (B, length, E))
    layer, params = build(x, local_window=window, num_global=num_global, logn_base_length=base)
    left, right = (window, window) if isinstance(window, int) else window
    lengths = (None, 10)
    mask = attn.Mask(causal=causal, kv_lengths=jnp.array([length, 10]))
    allowed = loop_arrow(length, num_global, left, right, causal, lengths)
    factors = loop_logn(allowed, num_global, base)
    assert not np.allclose(factors[:, :num_global], 1.0)  # the scaling is really exercised
    want = reference(params, x, jnp.asarray(allowed), jnp.asarray(factors))
    np.testing.assert_allclose(apply(layer, params, x, mask), want, atol=2e-5)


def test_logn_is_identity_at_the_training_length_and_full_band_is_softmax():
    length = 12
    x = jax.random.normal(jax.random.key(1), (B, length, E))
    # bidirectional global row sees all `length` keys: factor log(12) / log(12) = 1
    layer, params = build(x, local_window=2, logn_base_length=length)
    plain = attn.build("arrow", num_heads=H, head_dim=D, position="none", local_window=2, logn_scaling=False)
    np.testing.assert_allclose(apply(layer, params, x), apply(plain, params, x), atol=1e-6)
    # a band covering the sequence allows every pair: exactly softmax attention
    full = attn.build("arrow", num_heads=H, head_dim=D, position="none", local_window=length, logn_scaling=False)
    softmax = attn.build("softmax", num_heads=H, head_dim=D, position="none")
    np.testing.assert_allclose(apply(full, params, x), apply(softmax, params, x), atol=1e-6)


def test_causal_decode_and_gradients():
    length = 16
    x = jax.random.normal(jax.random.key(2), (B, length, E))
    mask = attn.Mask(causal=True)
    layer = attn.build("arrow", num_heads=H, head_dim=D, num_kv_heads=2, local_window=3, num_global=2)
    layer_params = random_params(layer, x)
    full = apply(layer, layer_params, x, mask)
    x2 = x.at[:, 9:].set(jax.random.normal(jax.random.key(3), (B, length - 9, E)))
    np.testing.assert_allclose(apply(layer, layer_params, x2, mask)[:, :9], full[:, :9], atol=1e-6)
    shapes = jax.eval_shape(lambda k, x: layer.init(k, x, mask=mask, decode=True), jax.random.key(0), x)["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    step = jax.jit(lambda v, chunk: layer.apply(v, chunk, mask=mask, decode=True, mutable=["cache"]))
    outs, start = [], 0
    for size in (1, length - 3, 1, 1):  # the first chunk holds only the first global token
        y, mutated = step({**layer_params, "cache": cache}, x[:, start : start + size])
        outs.append(y)
        cache, start = mutated["cache"], start + size
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)
    loss = lambda p: jnp.sum(layer.apply(p, x, mask=mask) ** 2)
    leaves = jax.tree.leaves(jax.jit(jax.grad(loss))(layer_params))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves) and any(float(jnp.abs(g).max()) > 0 for g in leaves)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(local_window=-1), r"local_window=-1 must be an int w >= 0"),
        (dict(local_window=(1, 2, 3)), r"local_window=\(1, 2, 3\) must be an int"),
        (dict(num_global=-1), "num_global=-1 must be a non-negative int"),
        (dict(logn_base_length=1), "logn_base_length=1 must be an int >= 2"),
        (dict(window=4), r"window=4 must be None \(a window would also cut the global rows"),
    ],
)
def test_bad_options_name_the_option(options, message):
    x = jnp.zeros((1, 8, E))
    with pytest.raises(ValueError, match=message):
        layer = attn.build("arrow", num_heads=H, head_dim=D, **options)
        jax.eval_shape(lambda k, x: layer.init(k, x), jax.random.key(0), x)


def test_context_and_foreign_mask_fn_are_rejected():
    layer = attn.build("arrow", num_heads=H, head_dim=D)
    x = jnp.zeros((1, 8, E))
    with pytest.raises(ValueError, match="arrow is self-attention; got a context"):
        jax.eval_shape(lambda k, x: layer.init(k, x, context=x), jax.random.key(0), x)
    foreign = attn.Mask(mask_fn=jnp.greater_equal)
    with pytest.raises(ValueError, match="arrow builds its own mask_fn"):
        jax.eval_shape(lambda k, x: layer.init(k, x, mask=foreign), jax.random.key(0), x)
