"""`agent`: the two-softmax formula by hand, the pooling rule, row-stochastic weights, padding, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.linear.agent import adaptive_pool_matrix

# rbg keys: XLA compiles a jitted init ~5x faster than with threefry keys.
KEY = jax.random.key(1, impl="rbg")


def project(params, x, name):
    return jnp.einsum("bte,ehd->bthd", x, params[name]["kernel"])


def conv_by_hand(values, kernel, bias):
    """Depthwise 'same' convolution over tokens, one tap at a time: values [B, T, H, D], kernel [K, H, D]."""
    size, length = kernel.shape[0], values.shape[1]
    padded = np.pad(np.asarray(values), ((0, 0), (size // 2, size // 2), (0, 0), (0, 0)))
    return sum(padded[:, i : i + length] * np.asarray(kernel[i]) for i in range(size)) + np.asarray(bias)


def test_pooling_bins_follow_adaptive_average_pooling():
    """Bin i covers floor(i L / n) .. ceil((i + 1) L / n) - 1 (PyTorch's rule): overlapping bins when n does not
    divide L, per-row lengths for padding, the identity when n == L."""
    pool = np.asarray(adaptive_pool_matrix(11, 4, jnp.asarray([11, 6])))
    for (start, end), row in zip([(0, 3), (2, 6), (5, 9), (8, 11)], pool[0], strict=True):
        np.testing.assert_allclose(
            row, np.where((np.arange(11) >= start) & (np.arange(11) < end), 1 / (end - start), 0)
        )
    for (start, end), row in zip([(0, 2), (1, 3), (3, 5), (4, 6)], pool[1], strict=True):
        np.testing.assert_allclose(
            row, np.where((np.arange(11) >= start) & (np.arange(11) < end), 1 / (end - start), 0)
        )
    np.testing.assert_array_equal(adaptive_pool_matrix(7, 7)[0], np.eye(7))


def test_agents_as_many_as_tokens_match_the_formula_by_hand():
    """n = N agents, bias resolution N (no interpolation): O = softmax(s Q A^T + B_2) softmax(s A K^T + B_1) V + DWC(V)
    with A = Q, from the layer's own parameters; the sown weights are the N x N product, rows summing to 1."""
    batch, length, heads, dim = 2, 9, 4, 8
    layer = attn.build(
        "agent", num_heads=heads, head_dim=dim, num_kv_heads=2, num_agents=length, bias_resolution=length
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, length, 16)), jnp.float32)
    params = nn.unbox(jax.jit(layer.init)(KEY, x)["params"])
    y, state = jax.jit(lambda p, x: layer.apply(p, x, mutable=["intermediates"]))({"params": params}, x)

    q = project(params, x, "query")
    k, v = (jnp.repeat(project(params, x, n), 2, axis=2) for n in ("key", "value"))
    s = dim**-0.5
    aggregation = jax.nn.softmax(s * jnp.einsum("bnhd,bshd->bhns", q, k) + params["aggregation_bias"][None], axis=-1)
    broadcast = jax.nn.softmax(
        s * jnp.einsum("bthd,bnhd->bhtn", q, q) + jnp.swapaxes(params["broadcast_bias"], -1, -2)[None], axis=-1
    )
    weights = jnp.einsum("bhtn,bhns->bhts", broadcast, aggregation)
    out = jnp.einsum("bhts,bshd->bthd", weights, v) + conv_by_hand(v, params["dwc"]["kernel"], params["dwc"]["bias"])
    expected = jnp.einsum("bthd,hde->bte", out, params["out"]["kernel"])
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=2e-5)
    sown = state["intermediates"]["attention_weights"][0]
    np.testing.assert_allclose(sown, weights, atol=1e-6)
    np.testing.assert_allclose(sown.sum(-1), 1.0, atol=1e-5)


def test_pooled_agents_and_interpolated_biases():
    """n < N: agents are the bin means of Q; the learned [H, n, R] biases are linearly interpolated to N
    (R = 2 points -> a linear ramp between them, half-pixel centres)."""
    batch, length, heads, dim = 1, 8, 2, 4
    layer = attn.build("agent", num_heads=heads, head_dim=dim, num_agents=2, bias_resolution=2, dwc_kernel_size=0)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, length, 8)), jnp.float32)
    params = nn.unbox(jax.jit(layer.init)(KEY, x)["params"])
    q, k, v = (project(params, x, n) for n in ("query", "key", "value"))
    agents = jnp.stack([q[:, :4].mean(1), q[:, 4:].mean(1)], axis=1)  # [B, 2, H, D]
    # Half-pixel linear interpolation of 2 points to 8: weight of the second point is clip((t + 0.5) / 4 - 0.5, 0, 1).
    ramp = np.clip((np.arange(length) + 0.5) / 4 - 0.5, 0, 1)
    interp = lambda b: b[..., :1] * (1 - ramp) + b[..., 1:] * ramp  # noqa: E731
    s = dim**-0.5
    aggregation = jax.nn.softmax(s * jnp.einsum("bnhd,bshd->bhns", agents, k) + interp(params["aggregation_bias"]), -1)
    broadcast = jax.nn.softmax(
        s * jnp.einsum("bthd,bnhd->bhtn", q, agents) + jnp.swapaxes(interp(params["broadcast_bias"]), -1, -2), -1
    )
    out = jnp.einsum("bhtn,bhns,bshd->bthd", broadcast, aggregation, v)
    np.testing.assert_allclose(
        layer.apply({"params": params}, x), jnp.einsum("bthd,hde->bte", out, params["out"]["kernel"]), atol=2e-5
    )


def test_padding_lengths_equal_the_unpadded_sequence():
    """Agents pool the valid queries only, padded keys get no weight and padded values do not reach the conv.
    (agent_bias=False: the learned biases are interpolated to the padded length.)"""
    layer = attn.build("agent", num_heads=4, head_dim=8, num_agents=3, agent_bias=False)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 11, 16)), jnp.float32)
    apply = jax.jit(layer.apply)
    params = jax.jit(layer.init)(KEY, x)
    lengths = jnp.asarray([7])
    padded = apply(params, x, mask=attn.Mask(q_lengths=lengths, kv_lengths=lengths))
    np.testing.assert_allclose(padded[:, :7], apply(params, x[:, :7]), atol=2e-5)
    assert np.all(np.asarray(padded[:, 7:]) == 0)


def test_gradients_are_finite_under_jit():
    layer = attn.build("agent", num_heads=4, head_dim=8, num_agents=4, num_kv_heads=1)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 11, 16)), jnp.float32)
    params = jax.jit(layer.init)(KEY, x)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves) and all(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_errors_name_the_problem():
    x = jnp.zeros((1, 5, 16))
    build = lambda **o: attn.build("agent", num_heads=4, head_dim=8, **o)  # noqa: E731
    with pytest.raises(ValueError, match="agent attention is not causal"):
        build().init(KEY, x, mask=attn.Mask(causal=True))
    with pytest.raises(ValueError, match="decode=True is not supported by agent attention"):
        build().init(KEY, x, decode=True)
    with pytest.raises(ValueError, match="num_agents=0 must be a positive int"):
        build(num_agents=0).init(KEY, x)
    with pytest.raises(ValueError, match="dwc_kernel_size=2 must be 0 \\(off\\) or a positive odd int"):
        build(dwc_kernel_size=2).init(KEY, x)
    with pytest.raises(ValueError, match="agent cannot honour the mask part\\(s\\) window"):
        build().init(KEY, x, mask=attn.Mask(window=2))
    spec = attn.get("agent")
    assert not spec.supports_causal and not spec.supports_decode and spec.catalog == 24
