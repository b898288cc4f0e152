"""`dma`: the key bias, the per-query selection and the biased output against loop-by-loop numpy, the bias trick of
the core (q', k'), the reduction to `softmax`, the gradient reaching A, and the argument errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core.block_sparse import block_sparse_attention
from attn.sparse.dma import dma_indices, dma_key_bias, with_key_bias
from tests.sparse.sparse_reference import indices_to_sets, random_qk

HEADS, KV_HEADS, DIM, FEATURES = 4, 2, 4, 16


def softplus(x):
    return np.log1p(np.exp(x))


def numpy_dma(x, params, window, causal):
    """Outputs [B, T, E] and kept key sets, by explicit loops over heads and queries (position="none")."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params["params"]))
    x = np.asarray(x, np.float64)
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
    k = np.einsum("bte,ehd->bthd", x, p["key"]["kernel"])
    v = np.einsum("bte,ehd->bthd", x, p["value"]["kernel"])
    batch, length = x.shape[:2]
    group = HEADS // KV_HEADS
    heads_out = np.zeros((batch, length, HEADS, DIM))
    kept = [[[] for _ in range(HEADS)] for _ in range(batch)]
    for b in range(batch):
        bias = np.zeros((KV_HEADS, length))
        for g in range(KV_HEADS):
            for j in range(length):
                bias[g, j] = p["A"][g] * softplus(v[b, j, g] @ p["dt_proj"][g])
        for h in range(HEADS):
            g = h // group
            for t in range(length):
                visible = [j for j in range(length) if not causal or j <= t]
                keep = sorted(sorted(visible, key=lambda j: (-bias[g, j], j))[:window])
                kept[b][h].append(keep)
                logits = np.array([q[b, t, h] @ k[b, j, g] / np.sqrt(DIM) + bias[g, j] for j in keep])
                w = np.exp(logits - logits.max())
                heads_out[b, t, h] = (w / w.sum()) @ v[b, keep, g]
    return np.einsum("bthd,hde->bte", heads_out, p["out"]["kernel"]), kept


@pytest.mark.slow  # a jitted layer init + apply: 13-35 s measured on 2 cores shared with other jobs
@pytest.mark.parametrize("window, causal", [(3, True), (4, False)])
def test_layer_matches_numpy(window, causal):
    x = jnp.asarray(np.random.default_rng(window).normal(size=(2, 9, FEATURES)), jnp.float32)
    mask = attn.Mask(causal=causal)
    layer = attn.build("dma", num_heads=HEADS, head_dim=DIM, num_kv_heads=KV_HEADS, position="none", window_size=window)

    def run(x):
        params = layer.init(jax.random.key(0), x, mask=mask)
        params["params"]["A"] = params["params"]["A"].replace_boxed(jnp.array([0.7, -1.3]))  # a non-trivial bias
        v = jnp.einsum("bte,ehd->bthd", x, nn.unbox(params["params"]["value"]["kernel"]))
        ids = dma_indices(
            dma_key_bias(v, *(nn.unbox(params["params"][n]) for n in ("dt_proj", "A"))),
            window_size=window,
            q_len=x.shape[1],
            heads=HEADS,
            causal=causal,
        )
        return params, layer.apply(params, x, mask=mask), ids

    params, y, ids = jax.jit(run)(x)
    expected, kept = numpy_dma(x, params, window, causal)
    assert indices_to_sets(ids) == kept
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=2e-5)


def test_bias_trick_adds_the_bias_to_the_logits():
    q, k, v = random_qk(1, 1, 5, 5, 2, 1, 4)
    bias = np.random.default_rng(2).normal(size=(1, 1, 5)).astype(np.float32)
    ids = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (1, 1, 5, 5))

    def attend(q, k, v, bias, scale):
        q_aug, k_aug, s_core = with_key_bias(q, k, bias, scale)
        return block_sparse_attention(q_aug, k_aug, v, block_indices=ids, block_size=1, scale=s_core)

    for scale in (None, 0.3):
        out = jax.jit(attend, static_argnums=4)(q, k, v, bias, scale)
        s = 0.5 if scale is None else scale
        expected = np.zeros((1, 5, 2, 4))
        for h in range(2):
            logits = s * q[0, :, h] @ k[0, :, 0].T + bias[0, 0][None, :]
            w = np.exp(logits - logits.max(-1, keepdims=True))
            expected[0, :, h] = (w / w.sum(-1, keepdims=True)) @ v[0, :, 0]
        np.testing.assert_allclose(out, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.slow  # a jitted layer init + apply: 13-35 s measured on 2 cores shared with other jobs
def test_every_key_kept_with_zero_bias_equals_softmax_and_a_gets_gradient():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, FEATURES)), jnp.float32)
    mask = attn.Mask(causal=True)
    options = dict(num_heads=HEADS, head_dim=DIM, num_kv_heads=KV_HEADS)
    layer, sparse = attn.build("dma", window_size=8, **options), attn.build("dma", window_size=2, **options)

    def run(x):
        params = layer.init(jax.random.key(0), x, mask=mask)
        base = {n: p for n, p in params["params"].items() if n not in ("dt_proj", "A")}
        expected = attn.build("softmax", **options).apply({"params": base}, x, mask=mask)
        grads = jax.grad(lambda p: jnp.sum(sparse.apply(p, x, mask=mask) ** 2))(params)
        return layer.apply(params, x, mask=mask), expected, nn.unbox(grads["params"]["A"])

    y, expected, grad_a = jax.jit(run)(x)
    np.testing.assert_allclose(y, expected, atol=2e-6, rtol=2e-5)
    assert float(jnp.max(jnp.abs(grad_a))) > 0  # the bias is trained through the logits


@pytest.mark.parametrize(
    "kwargs, message", [({"window_size": 0}, "window_size=0"), ({"block_size": 2}, "block_size=2")]
)
def test_bad_options_raise_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attn.build("dma", num_heads=2, head_dim=4, **kwargs)
    if "window_size" in kwargs:
        with pytest.raises(ValueError, match=message):
            dma_indices(jnp.zeros((1, 1, 4)), window_size=0, q_len=4, heads=1)
