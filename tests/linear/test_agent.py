"""`agent` (1-D) and `agent_2d` (the paper's grid form): the two-softmax formula by hand, the pooling rule,
row-stochastic weights, padding, gradients, errors. (The 1-D gradient check is in test_agent_grads.py.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

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


def pool_by_hand(grid: np.ndarray, side: int) -> np.ndarray:
    """AdaptiveAvgPool2d of grid [h, w, ...] to side x side, one bin at a time, flattened row-major."""
    h, w = grid.shape[:2]
    bins = lambda n, i: (i * n // side, -(-(i + 1) * n // side))  # noqa: E731
    out = []
    for i in range(side):
        for j in range(side):
            (r0, r1), (c0, c1) = bins(h, i), bins(w, j)
            out.append(grid[r0:r1, c0:c1].mean(axis=(0, 1)))
    return np.stack(out)


def bilinear_by_hand(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PyTorch's interpolate(mode="bilinear", align_corners=False) of maps [..., R1, R2] to [..., h, w]: source
    coordinate (t + 0.5) R / n - 0.5 clamped at 0, two taps, the upper one clamped to R - 1."""

    def taps(n_in: int, n_out: int) -> np.ndarray:
        weights = np.zeros((n_out, n_in))
        for t in range(n_out):
            src = max((t + 0.5) * n_in / n_out - 0.5, 0.0)
            low = int(np.floor(src))
            high, frac = min(low + 1, n_in - 1), src - low
            weights[t, low] += 1 - frac
            weights[t, high] += frac
        return weights

    rows, cols = taps(maps.shape[-2], size[0]), taps(maps.shape[-1], size[1])
    return np.einsum("yr,...rc,xc->...yx", rows, maps, cols)


def depthwise_conv_by_hand(values: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """'Same' zero-padded depthwise conv of values [B, h, w, C] with kernel [k, k, 1, C], one tap at a time."""
    k, (h, w) = kernel.shape[0], values.shape[1:3]
    padded = np.pad(values, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    out = np.zeros_like(values) + bias
    for dy in range(k):
        for dx in range(k):
            out += padded[:, dy : dy + h, dx : dx + w] * kernel[dy, dx, 0]
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def agent_2d_by_hand(params, x: np.ndarray, *, heads: int, kv_heads: int, side: int) -> np.ndarray:
    """The paper's 2-D agent attention in float64 numpy from the layer's parameters, per batch row and head."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    batch, h, w, _ = x.shape
    n, tokens = side * side, h * w
    q = np.einsum("byxe,ehd->byxhd", x, p["query"]["kernel"])
    k = np.einsum("byxe,ehd->byxhd", x, p["key"]["kernel"])
    v = np.einsum("byxe,ehd->byxhd", x, p["value"]["kernel"])
    group = heads // kv_heads
    dim = q.shape[-1]
    # B_1 [H, n, h, w] and B_2 [H, h, w, n]: block maps interpolated to the grid plus row and column terms.
    b1 = (
        bilinear_by_hand(p["aggregation_bias"], (h, w))
        + p["aggregation_bias_rows"][:, :, :, None]
        + p["aggregation_bias_cols"][:, :, None, :]
    )
    b2 = (
        np.moveaxis(bilinear_by_hand(p["broadcast_bias"], (h, w)), 1, -1)
        + p["broadcast_bias_rows"][:, :, None, :]
        + p["broadcast_bias_cols"][:, None, :, :]
    )
    out = np.zeros((batch, h, w, heads, dim))
    for b in range(batch):
        for head in range(heads):
            kv = head // group
            qh = q[b, :, :, head].reshape(tokens, dim)
            kh, vh = k[b, :, :, kv].reshape(tokens, dim), v[b, :, :, kv].reshape(tokens, dim)
            agents = pool_by_hand(q[b, :, :, head], side)  # [n, D]
            aggregation = softmax(agents @ kh.T / np.sqrt(dim) + b1[head].reshape(n, tokens))
            broadcast = softmax(qh @ agents.T / np.sqrt(dim) + b2[head].reshape(tokens, n))
            out[b, :, :, head] = (broadcast @ (aggregation @ vh)).reshape(h, w, dim)
    values = np.repeat(v, group, axis=3).reshape(batch, h, w, heads * dim)
    conv = depthwise_conv_by_hand(values, p["dwc"]["kernel"], p["dwc"]["bias"]).reshape(out.shape)
    return np.einsum("byxhd,hde->byxe", out + conv, p["out"]["kernel"])


@pytest.mark.parametrize("resolution", [3, 7], ids=["bias-upsampled", "bias-downsampled"])
def test_agent_2d_matches_the_papers_grid_form_by_hand(resolution):
    """2 x 2 agents pooled from a 5 x 6 grid (overlapping row bins), GQA, R x R block biases interpolated up (3) or
    down (7) to the grid plus row/column biases, 3 x 3 depthwise conv of V: equal to the float64 loops above."""
    heads, kv_heads, dim = 4, 2, 4
    layer = attn.build(
        "agent_2d",
        num_heads=heads,
        head_dim=dim,
        num_kv_heads=kv_heads,
        num_agents=4,
        bias_resolution=resolution,
    )
    x = np.random.default_rng(4).standard_normal((2, 5, 6, 16)).astype(np.float32)
    params = nn.unbox(layer.init(KEY, x)["params"])
    # The init's small biases would hide a wrong bias layout: make them as large as the logits.
    for name in [n for n in params if "bias" in n]:
        params[name] = jnp.asarray(np.random.default_rng(len(name)).standard_normal(params[name].shape), jnp.float32)
    y = layer.apply({"params": params}, x)
    expected = agent_2d_by_hand(params, x.astype(np.float64), heads=heads, kv_heads=kv_heads, side=2)
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-5, rtol=2e-5)


def test_agent_2d_weights_are_row_stochastic_and_the_grid_form_differs_from_1d():
    """The sown N x N weights sum to 1 per query; the 2-D pooling of a 4 x 4 grid to 2 x 2 agents averages 2 x 2
    blocks, unlike the 1-D form's runs of 4 tokens along the flattened rows."""
    layer = attn.build("agent_2d", num_heads=2, head_dim=4, num_agents=4, agent_bias=False, dwc_kernel_size=0)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 4, 4, 8)), jnp.float32)
    params = layer.init(KEY, x)
    y, state = layer.apply(params, x, mutable=["intermediates"])
    weights = state["intermediates"]["attention_weights"][0]
    assert weights.shape == (1, 2, 16, 16)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    flat = attn.build("agent", num_heads=2, head_dim=4, num_agents=4, agent_bias=False, dwc_kernel_size=0)
    y_1d = flat.apply(params, x.reshape(1, 16, 8)).reshape(y.shape)
    assert float(jnp.max(jnp.abs(y - y_1d))) > 1e-3


@pytest.mark.slow  # ~10-20 s on 2 cores; the registry matrix checks the same in its slow phase too
def test_agent_2d_gradients_match_finite_differences():
    """Gradients w.r.t. x [1, 3, 4, 8] and every parameter (4 agents, MQA, biases and DWC on) equal central
    differences; the 2-D form computes every stage in float64 when asked, so the tolerance is float64's."""
    with jax.enable_x64(True):
        layer = attn.build(
            "agent_2d",
            num_heads=2,
            head_dim=4,
            num_agents=4,
            bias_resolution=3,
            num_kv_heads=1,
            dtype=jnp.float64,
            param_dtype=jnp.float64,
        )
        x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 3, 4, 8)))
        params = {"params": layer.init(jax.random.key(1), x)["params"]}
        forward = jax.jit(lambda x, p: layer.apply(p, x))
        assert forward(x, params).dtype == jnp.float64
        check_grads(forward, (x, params), order=1, modes=("rev",), eps=1e-4, atol=1e-6, rtol=1e-6)


def test_agent_2d_errors_name_the_problem():
    build = lambda **o: attn.build("agent_2d", num_heads=2, head_dim=4, **o)  # noqa: E731
    grid = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match="num_agents=6 must be a positive perfect square"):
        build(num_agents=6)
    with pytest.raises(ValueError, match="use `agent` for sequences"):
        build().init(KEY, jnp.zeros((1, 16, 8)))
    with pytest.raises(ValueError, match="mask is not supported by the spatial layer"):
        build().init(KEY, grid, mask=attn.Mask(causal=True))
    spec = attn.get("agent_2d")
    assert spec.input_kind == "spatial" and spec.catalog == 24 and not spec.supports_causal
