"""`mqsa`: the causal window mean by explicit loops, the reduction to causal softmax attention, a numpy reference of
the long/short mix, and bad input."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import attn
from attn.cross.mqsa import window_mean

B, T, E, H, D = 2, 7, 8, 2, 4
CAUSAL = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def loop_window_mean(q, window):
    out = np.zeros(q.shape)
    for t in range(q.shape[1]):
        start = max(0, t - window + 1)
        out[:, t] = sum(q[:, s] for s in range(start, t + 1)) / (t + 1 - start)
    return out


@pytest.mark.parametrize("window", [1, 3, 10])
def test_window_mean_matches_the_explicit_loop(window):
    q = np.asarray(jax.random.normal(jax.random.key(1), (B, T, H, D)))
    np.testing.assert_allclose(window_mean(q, window), loop_window_mean(q, window), atol=1e-6, rtol=1e-6)


def init(**options):
    layer = attn.build("mqsa", num_heads=H, head_dim=D, **options)
    return layer, nn.unbox(layer.init(jax.random.key(2), X, mask=CAUSAL))


def test_single_item_windows_are_causal_softmax_attention():
    layer, params = init(long_window=1, short_window=1, long_weight=0.3)
    softmax = attn.build("softmax", num_heads=H, head_dim=D, position="none")
    run = jax.jit(lambda module: module.apply(params, X, mask=CAUSAL), static_argnums=0)
    np.testing.assert_allclose(run(layer), run(softmax), atol=1e-6, rtol=1e-6)


def test_layer_matches_a_numpy_reference():
    alpha, long_window = 0.3, 3
    layer, params = init(long_window=long_window, short_window=1, long_weight=alpha)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(X, np.float64)
    q, k, v = (np.einsum("bte,ehd->bthd", x, p[name]["kernel"]) for name in ("query", "key", "value"))

    def attention(queries):
        out = np.zeros(queries.shape)
        for b in range(B):
            for h in range(H):
                for t in range(T):
                    logits = k[b, : t + 1, h] @ queries[b, t, h] / np.sqrt(D)
                    w = np.exp(logits - logits.max())
                    out[b, t, h] = (w / w.sum()) @ v[b, : t + 1, h]
        return out

    heads = alpha * attention(loop_window_mean(q, long_window)) + (1 - alpha) * attention(q)
    want = np.einsum("bthd,hde->bte", heads, p["out"]["kernel"])
    y = jax.jit(lambda params: layer.apply(params, X, mask=CAUSAL))(params)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)


def test_bad_input_names_the_argument():
    layer, params = init()
    with pytest.raises(ValueError, match="mqsa is self-attention; got a context"):
        layer.apply(params, X, context=X, mask=CAUSAL)
    with pytest.raises(ValueError, match="does not decode"):
        layer.apply(params, X, mask=CAUSAL, decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="long_weight=1.5"):
        attn.build("mqsa", num_heads=H, head_dim=D, long_weight=1.5)
    with pytest.raises(ValueError, match="window=0"):
        window_mean(X, 0)
