"""`recycled`: decoding (a prompt chunk, then one token per call) against a loop-by-loop numpy re-implementation of
Recycled Attention's schedule and recycled key sets, the reductions to causal `softmax` (stride 1, top_k >= context),
and the argument errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn

HEADS, KV_HEADS, DIM, FEATURES, LENGTH, PROMPT = 4, 2, 4, 16, 11, 4


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def numpy_recycled(params, x, top_k, stride):
    """Outputs [B, T, E] of a prompt of PROMPT tokens (full attention) then one token per step, by explicit loops."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params["params"]))
    x = np.asarray(x, np.float64)
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
    k = np.einsum("bte,ehd->bthd", x, p["key"]["kernel"])
    v = np.einsum("bte,ehd->bthd", x, p["value"]["kernel"])
    batch, group = x.shape[0], HEADS // KV_HEADS
    heads_out = np.zeros((batch, LENGTH, HEADS, DIM))
    for b in range(batch):
        last_full, mass = -1, np.zeros((KV_HEADS, LENGTH))
        calls = [list(range(PROMPT))] + [[t] for t in range(PROMPT, LENGTH)]
        for queries in calls:
            full = len(queries) > 1 or queries[0] - last_full >= stride
            weights = np.zeros((HEADS, len(queries), LENGTH))
            for g in range(KV_HEADS):
                old = sorted(range(last_full + 1), key=lambda j: (-mass[g, j], j))[:top_k]
                for a, t in enumerate(queries):
                    seen = list(range(t + 1)) if full else sorted(set(old) | set(range(last_full + 1, t + 1)))
                    for h in range(g * group, (g + 1) * group):
                        w = softmax(k[b, seen, g] @ q[b, t, h] / np.sqrt(DIM))
                        weights[h, a, seen] = w
                        heads_out[b, t, h] = w @ v[b, seen, g]
            if full:
                last_full = queries[-1]
                mass = np.stack([weights[g * group : (g + 1) * group, -1].sum(0) for g in range(KV_HEADS)])
    return np.einsum("bthd,hde->bte", heads_out, p["out"]["kernel"])


def decode(layer, params, x):
    """The layer's outputs [B, T, E]: a creating call, the prompt chunk, then one token per call (one jit)."""

    def run(x):
        _, state = layer.apply(params, x, decode=True, mutable=["cache"])
        y, state = layer.apply({**params, **state}, x[:, :PROMPT], decode=True, mutable=["cache"])
        outputs = [y]
        for t in range(PROMPT, LENGTH):
            y, state = layer.apply({**params, **state}, x[:, t : t + 1], decode=True, mutable=["cache"])
            outputs.append(y)
        return jnp.concatenate(outputs, axis=1)

    return jax.jit(run)(x)


@pytest.mark.slow  # a jitted layer init + apply: 13-35 s measured on 2 cores shared with other jobs
@pytest.mark.parametrize("top_k, stride", [(2, 3), (3, 4)])
def test_decoding_matches_numpy(top_k, stride):
    x = jnp.asarray(np.random.default_rng(top_k).normal(size=(2, LENGTH, FEATURES)), jnp.float32)
    options = dict(num_heads=HEADS, head_dim=DIM, num_kv_heads=KV_HEADS, position="none", capacity=LENGTH)
    layer = attn.build("recycled", top_k=top_k, stride=stride, **options)
    params = layer.init(jax.random.key(0), x[:, :PROMPT], mask=attn.Mask(causal=True))
    y = decode(layer, params, x)
    np.testing.assert_allclose(y, numpy_recycled(params, x, top_k, stride), atol=2e-5, rtol=2e-5)


@pytest.mark.slow  # a jitted layer init + apply: 13-35 s measured on 2 cores shared with other jobs
@pytest.mark.parametrize("top_k, stride", [(2, 1), (LENGTH, 3)])
def test_reductions_equal_causal_softmax(top_k, stride):
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, LENGTH, FEATURES)), jnp.float32)
    mask = attn.Mask(causal=True)
    options = dict(num_heads=HEADS, head_dim=DIM, num_kv_heads=KV_HEADS)
    layer = attn.build("recycled", top_k=top_k, stride=stride, capacity=LENGTH, **options)
    params = layer.init(jax.random.key(1), x, mask=mask)
    expected = attn.build("softmax", **options).apply(params, x, mask=mask)
    np.testing.assert_allclose(layer.apply(params, x, mask=mask), expected, atol=1e-6, rtol=1e-5)  # the forward
    np.testing.assert_allclose(decode(layer, params, x), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 0}, "top_k=0"),
        ({"stride": 0}, "stride=0"),
        ({"capacity": 0}, "capacity=0"),
        ({"top_k": 1.5}, "top_k"),
    ],
)
def test_bad_options_raise_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attn.build("recycled", num_heads=2, head_dim=4, **kwargs)


def test_capacity_below_the_cache_length_raises():
    layer = attn.build("recycled", num_heads=2, head_dim=4, capacity=4)
    with pytest.raises(ValueError, match="capacity=4 is below the length 6"):
        layer.init(jax.random.key(0), jnp.ones((1, 6, 8)), decode=True)
