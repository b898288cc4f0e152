"""The `davit` layer (DaViT [144]): channel group attention equals its per-group definition (written with loops),
is permutation-equivariant over positions and builds no token x token array; spatial mode is window attention; dual
mode is spatial then channel; gradients; errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from local_reference import normal, random_params

import attn


def channel_reference(params, x):
    """Per channel group g: A = softmax(Q_g^T K_g / sqrt(C_g)) over channels, o_g = V_g A^T; then W_o."""
    p = {name: np.asarray(value) for name, value in _kernels(params["channel"]).items()}
    flat = np.asarray(x).reshape(x.shape[0], -1, x.shape[-1])
    out = np.zeros(flat.shape[:2] + p["query"].shape[1:], np.float64)
    for b in range(flat.shape[0]):
        for g in range(p["query"].shape[1]):
            qg, kg, vg = (flat[b] @ p[n][:, g] for n in ("query", "key", "value"))  # [N, C_g]
            logits = qg.T @ kg / np.sqrt(qg.shape[1])
            attention = np.exp(logits - logits.max(-1, keepdims=True))
            attention /= attention.sum(-1, keepdims=True)
            out[b, :, g] = vg @ attention.T
    return np.einsum("bnhd,hde->bne", out, p["out"]).reshape(x.shape)


def _kernels(tree):
    return {name: module["kernel"] for name, module in tree.items()}


def test_channel_attention_equals_its_definition_and_is_permutation_equivariant():
    layer = attn.build("davit", num_heads=2, head_dim=4, mode="channel")
    x = normal((2, 5, 3, 8))
    params = random_params(layer, x)
    apply = jax.jit(layer.apply)
    out = apply(params, x)
    ref = channel_reference(nn.meta.unbox(params)["params"], x)
    np.testing.assert_allclose(out, ref, atol=3e-5, rtol=1e-5)
    # Channel tokens see every position as a feature: shuffling the positions shuffles the output the same way.
    perm = np.random.default_rng(0).permutation(15)
    shuffled = x.reshape(2, 15, 8)[:, perm].reshape(x.shape)
    np.testing.assert_allclose(apply(params, shuffled).reshape(2, 15, 8), out.reshape(2, 15, 8)[:, perm], atol=3e-5)


def test_channel_attention_builds_no_token_by_token_array():
    layer = attn.build("davit", num_heads=2, head_dim=4, mode="channel")
    x = jnp.zeros((1, 37, 8))  # 37 tokens in a 1-D grid
    params = random_params(layer, x)
    shapes = _all_shapes(jax.make_jaxpr(layer.apply)(params, x).jaxpr)
    assert (1, 37, 2, 4) in shapes  # the projections are traced
    assert not any(shape.count(37) >= 2 for shape in shapes)


def _all_shapes(jaxpr):
    """Shapes of every value computed in `jaxpr`, including inside nested (jit, custom_vjp, ...) sub-jaxprs."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _all_shapes(inner)
    return shapes


def test_spatial_mode_is_window_attention_and_dual_composes_both():
    x = normal((2, 6, 4, 8))
    dual = attn.build("davit", num_heads=2, head_dim=4, window_size=(3, 2))
    params = random_params(dual, x)
    p = params["params"]
    window = attn.build("window", num_heads=2, head_dim=4, window_size=(3, 2))
    channel = attn.build("davit", num_heads=2, head_dim=4, mode="channel")
    spatial = attn.build("davit", num_heads=2, head_dim=4, window_size=(3, 2), mode="spatial")

    s = jax.jit(window.apply)({"params": p["spatial"]}, x)
    np.testing.assert_allclose(jax.jit(spatial.apply)({"params": {"spatial": p["spatial"]}}, x), s, atol=1e-6)
    expected = s + jax.jit(channel.apply)({"params": {"channel": p["channel"]}}, x + s)
    np.testing.assert_allclose(jax.jit(dual.apply)(params, x), expected, atol=3e-5)


def test_window_is_clipped_to_the_grid_and_gradients_are_finite():
    x = normal((1, 3, 4, 8))
    layer = attn.build("davit", num_heads=2, head_dim=4)  # window 7 > grid: full attention per Swin's rule
    softmax = attn.build("softmax", num_heads=2, head_dim=4, position="none")
    params = random_params(layer, x)
    spatial = {"params": params["params"]["spatial"]}
    _, state = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))(params, x)
    (weights,) = state["intermediates"]["spatial"]["attention_weights"]
    assert "attention_weights" not in state["intermediates"]["channel"]  # channel attention has no token matrix
    assert weights.shape == (1, 2, 12, 12) and np.all(np.asarray(weights) > 0)
    np.testing.assert_allclose(
        jax.jit(attn.build("davit", num_heads=2, head_dim=4, mode="spatial").apply)(
            {"params": {"spatial": spatial["params"]}}, x
        ),
        jax.jit(softmax.apply)(spatial, x.reshape(1, 12, 8)).reshape(x.shape),
        atol=2e-5,
    )
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_errors():
    x = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match=r"mode='both' must be one of \('spatial', 'channel', 'dual'\)"):
        attn.build("davit", num_heads=2, head_dim=4, mode="both").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"window_size=0 must be a positive int"):
        attn.build("davit", num_heads=2, head_dim=4, window_size=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"num_kv_heads=1 is not supported by channel group attention"):
        attn.build("davit", num_heads=2, head_dim=4, num_kv_heads=1, mode="channel").init(jax.random.key(0), x)
