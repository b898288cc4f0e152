"""`titans`: each variant's output against an independent numpy implementation of the paper's equations.

The reference below is written from the paper ([8], eqs. 13-15 for the memory, 19 for the persistent tokens, 21-25
MAC, 26-28 MAG, 29-31 LMM/MAL, section 4.4 for the SiLU / l2-norm / depthwise convolution after the projections)
with the layer's documented interpretive choices (gate offsets -4 and +2, theta_max, sigmoid of the RMS-normalised
memory output as the gate). It shares no code with the module: explicit loops over tokens and heads in float64,
a linear memory (memory_depth=1) with its gradient written by hand, 2 k^T (k W - v), and the exact online rule
(chunk_size=1). All parameters are randomised, so identity-initialised convolutions and maps are exercised.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn

T, E, H, D, KVH, NP, WINDOW, SEGMENT, WIDTH, THETA_MAX = 7, 8, 2, 4, 1, 2, 2, 3, 3, 0.4


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def l2n(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def project(x, kernel):  # x [T, E], kernel [E, H, D] -> [T, H, D]
    return np.einsum("te,ehd->thd", x, kernel)


def conv(y, kernel, history=None):
    """Causal depthwise: out_t = sum_s kernel[s] y_{t - W + 1 + s}; y [T, H, D], kernel [W, H, D]."""
    width = kernel.shape[0]
    past = np.zeros((width - 1,) + y.shape[1:]) if history is None else history
    padded = np.concatenate([past, y], axis=0)
    out = np.stack([sum(kernel[s] * padded[t + s] for s in range(width)) for t in range(y.shape[0])])
    return out, padded[-(width - 1) :]


def gates(x, p):
    z = np.einsum("te,ehg->thg", x, p["gates"]["kernel"]) + p["gates"]["bias"]
    return sigmoid(z[..., 0] - 4.0), sigmoid(z[..., 1] + 2.0), THETA_MAX * sigmoid(z[..., 2])


def memory_run(q, k, v, alpha, eta, theta, weights, momentum):
    """The online rule per head: S_t = eta S - theta 2 k^T (k W - v); W_t = (1 - alpha) W + S_t; y_t = q_t W_t."""
    weights, momentum = weights.copy(), momentum.copy()
    out = np.zeros_like(v)
    for t in range(q.shape[0]):
        for h in range(H):
            grad = 2.0 * np.outer(k[t, h], k[t, h] @ weights[h] - v[t, h])
            momentum[h] = eta[t, h] * momentum[h] - theta[t, h] * grad
            weights[h] = (1.0 - alpha[t, h]) * weights[h] + momentum[h]
            out[t, h] = q[t, h] @ weights[h]
    return out, weights, momentum


def memory_branch(x, p):
    """m_t = M_t(q_t) over x [T, E] from M_0, with the convolved SiLU / l2-normalised inputs."""
    q, k, v = (
        conv(project(x, p[name]["kernel"]), p[f"{name}_conv"])[0]
        for name in ("memory_query", "memory_key", "memory_value")
    )
    w0 = p["memory_0"]
    return memory_run(l2n(silu(q)), l2n(silu(k)), silu(v), *gates(x, p), w0, np.zeros_like(w0))[0]


def single_head(q, k, v, allowed):
    """softmax(q k^T / sqrt(D), masked to `allowed` [Tq, Tk]) v for one head: q [Tq, D], k, v [Tk, D]."""
    logits = np.where(allowed, q @ k.T / np.sqrt(D), -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


def attention(q, k, v, allowed):
    """Softmax attention q [Tq, H, D], k, v [Tk, KVH, D] (GQA: kv head h // (H / KVH)), allowed [Tq, Tk]."""
    group = H // k.shape[1]
    return np.stack([single_head(q[:, h], k[:, h // group], v[:, h // group], allowed) for h in range(H)], axis=1)


def sliding_window(length):
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    return (j <= i) & ((j < NP) | (i - j <= WINDOW))


def reference(variant, x, p):
    """One sequence x [T, E] -> [T, E]."""
    xt = np.concatenate([p["persistent"], x], axis=0)
    if variant == "mac":
        heads = mac(x, p)
    else:
        m = memory_branch(xt, p)
        if variant == "lmm":
            heads = m[NP:]
        else:
            source = xt if variant == "mag" else np.einsum("thd,hde->te", m, p["memory_out"]["kernel"])
            q, k, v = (project(source, p[name]["kernel"]) for name in ("query", "key", "value"))
            y = attention(q, k, v, sliding_window(len(xt)))[NP:]
            if variant == "mal":
                heads = y
            else:
                heads = rms(y, p["attention_norm"]) * sigmoid(rms(m[NP:], p["memory_norm"]))
    return np.einsum("thd,hde->te", heads, p["out"]["kernel"])


def mac(x, p):
    """Memory as context: per segment, attention over [P || h || segment] (h = M_start(q)), then the memory learns
    from the attention output y, and o = y * sigmoid(RMSNorm(M_t(q'_t)))."""
    xt = np.concatenate([p["persistent"], x], axis=0)
    keys, values = project(xt, p["key"]["kernel"]), project(xt, p["value"]["kernel"])
    queries = project(x, p["query"]["kernel"])
    retrieve = l2n(silu(conv(project(x, p["memory_query"]["kernel"]), p["memory_query_conv"])[0]))
    alpha, eta, theta = gates(x, p)
    weights, momentum = p["memory_0"].copy(), np.zeros_like(p["memory_0"])
    histories = {name: None for name in ("update_query", "update_key", "update_value")}
    out = np.zeros((x.shape[0], H, D))
    for start in range(0, x.shape[0], SEGMENT):
        seg = slice(start, min(start + SEGMENT, x.shape[0]))
        n = seg.stop - seg.start
        h = np.einsum("thd,hde->the", retrieve[seg], weights)
        ctx_k, ctx_v = np.einsum("thd,hde->the", h, p["context_key"]), np.einsum("thd,hde->the", h, p["context_value"])
        group = H // KVH
        # keys per query head: [P || h || S]; the persistent and segment keys are shared by the heads of a group
        allowed = np.concatenate([np.ones((n, NP), bool), np.tril(np.ones((n, n), bool)), np.tril(np.ones((n, n)))], 1)
        y = np.zeros((n, H, D))
        for head in range(H):
            kk = np.concatenate(
                [keys[:NP, head // group], ctx_k[:, head], keys[NP + seg.start : NP + seg.stop, head // group]]
            )
            vv = np.concatenate(
                [values[:NP, head // group], ctx_v[:, head], values[NP + seg.start : NP + seg.stop, head // group]]
            )
            y[:, head] = single_head(queries[seg][:, head], kk, vv, allowed.astype(bool))
        convolved = {}
        for name in histories:
            convolved[name], histories[name] = conv(
                np.einsum("thd,hde->the", y, p[name]), p[f"{name}_conv"], histories[name]
            )
        mq, mk, mv = (
            l2n(silu(convolved["update_query"])),
            l2n(silu(convolved["update_key"])),
            silu(convolved["update_value"]),
        )
        m, weights, momentum = memory_run(mq, mk, mv, alpha[seg], eta[seg], theta[seg], weights, momentum)
        out[seg] = y * sigmoid(rms(m, p["memory_norm"]))
    return out


@pytest.mark.parametrize("variant", ["mag", "mal", "lmm", "mac"])
def test_variant_equals_the_papers_equations(variant):
    layer = attn.build(
        "titans",
        num_heads=H,
        head_dim=D,
        num_kv_heads=KVH,
        variant=variant,
        memory_depth=1,
        chunk_size=1,
        window=WINDOW,
        segment_size=SEGMENT,
        num_persistent=NP,
        conv_width=WIDTH,
        theta_max=THETA_MAX,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
    )
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x = rng.standard_normal((2, T, E))
        params = nn.unbox(layer.init(jax.random.key(0), jnp.asarray(x), mask=attn.Mask(causal=True))["params"])
        # randomise every parameter (identity maps and filters, zero biases and unit scales would hide mistakes)
        params = jax.tree.map(lambda a: np.asarray(a) + 0.3 * rng.standard_normal(a.shape), params)
        y = layer.apply({"params": params}, jnp.asarray(x), mask=attn.Mask(causal=True))
    assert y.dtype == jnp.float64
    for b in range(x.shape[0]):
        np.testing.assert_allclose(np.asarray(y[b]), reference(variant, x[b], params), rtol=1e-9, atol=1e-9)
