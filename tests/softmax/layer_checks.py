"""Checks shared by the softmax-family mechanism tests: decode vs full forward, causality, finite gradients."""

import jax
import jax.numpy as jnp
import numpy as np

import attn


# Eager (op-by-op) execution is used on purpose: its per-op compilations are cached by shape across all the tests,
# which on CPU is much cheaper than compiling one program per test. jit is exercised on the gradient.
def init(name, x, mask=None, **options):
    layer = attn.build(name, **options)
    return layer, layer.init(jax.random.key(1), x, mask=mask)


def apply(layer, params, x, **kwargs):
    return layer.apply(params, x, **kwargs)


def trace_init(layer, x, **kwargs):
    """Traces layer.init abstractly (no compilation): enough to hit the option checks."""
    return jax.eval_shape(lambda key, x: layer.init(key, x, **kwargs), jax.random.key(0), x)


def shared_params(params, names=("query", "key", "value", "out")):
    """The q/k/v/o subtree of a mechanism's params, to run the `softmax` layer with the same weights."""
    return {"params": {n: params["params"][n] for n in names}}


def decode_all(layer, params, x, mask, chunks):
    """Feeds x through the KV cache in chunks of the given sizes; returns the concatenated outputs."""
    shapes = trace_init(layer, x, mask=mask, decode=True)["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    outs, start = [], 0
    for size in chunks:
        chunk = x[:, start : start + size]
        y, mutated = layer.apply({**params, "cache": cache}, chunk, mask=mask, decode=True, mutable=["cache"])
        outs.append(y)
        cache, start = mutated["cache"], start + size
    return jnp.concatenate(outs, axis=1)


def assert_decode_matches(layer, params, x, mask, atol=2e-5):
    """A prefill chunk then single-token steps reproduce the full forward."""
    full = layer.apply(params, x, mask=mask)
    sizes = [x.shape[1] - 3, 1, 1, 1]
    np.testing.assert_allclose(decode_all(layer, params, x, mask, sizes), full, atol=atol, rtol=1e-5)


def assert_causal(layer, params, x, cut, mask=None):
    """Changing tokens at positions >= cut changes no output before cut (and does change later ones)."""
    mask = attn.Mask(causal=True) if mask is None else mask
    y = layer.apply(params, x, mask=mask)
    x2 = x.at[:, cut:].set(jax.random.normal(jax.random.key(7), x[:, cut:].shape))
    y2 = layer.apply(params, x2, mask=mask)
    np.testing.assert_allclose(y[:, :cut], y2[:, :cut], atol=1e-6)
    assert float(jnp.abs(y[:, cut:] - y2[:, cut:]).max()) > 1e-4


def assert_finite_grads(layer, params, x, mask=None, **apply_kwargs):
    mask = attn.Mask(causal=True) if mask is None else mask
    loss = lambda p: jnp.sum(layer.apply(p, x, mask=mask, **apply_kwargs) ** 2)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert bool(jnp.isfinite(value))
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
