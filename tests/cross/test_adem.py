"""`adem` (ADEM-VL): row-quantile dropping by explicit loops, a numpy reference of the fused output with and
without dropping, the parameters, and bad input."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import attn
from attn.cross.adem import drop_low_scores

B, T, N, E = 2, 3, 6, 8
X = jax.random.normal(jax.random.key(0), (B, T, E))
CONTEXT = jax.random.normal(jax.random.key(1), (B, N, E))


def loop_drop(scores, ratio):
    out = scores.copy()
    count = int(ratio * scores.shape[-1])
    for row in np.ndindex(*scores.shape[:-1]):
        for j in np.argsort(scores[row])[:count]:
            out[row + (j,)] = 0.0
    return out


@pytest.mark.parametrize("ratio", [0.0, 0.34, 0.5, 0.9])
def test_dropping_zeroes_the_lowest_entries_of_each_row(ratio):
    scores = np.asarray(jax.random.normal(jax.random.key(2), (B, 2, T, N)))
    dropped = np.asarray(drop_low_scores(scores, ratio))
    np.testing.assert_array_equal(dropped, loop_drop(scores, ratio))
    assert ((dropped != 0).sum(-1) == N - int(ratio * N)).all()


def silu(a):
    return a / (1.0 + np.exp(-a))


@pytest.mark.parametrize("heads, ratio", [(1, 0.0), (2, 0.5)])
def test_layer_matches_the_silu_kernel_reference(heads, ratio):
    layer = attn.build(
        "adem", num_heads=heads, head_dim=E // heads, drop_ratio=ratio, output_scale=0.5, context_length=N
    )
    params = nn.unbox(layer.init(jax.random.key(3), X, context=CONTEXT))
    assert set(params["params"]) == {"key_offset", "value_offset"}
    e1 = np.asarray(jax.random.normal(jax.random.key(4), (N, E))) * 0.5  # nonzero offsets: both are used
    e2 = np.asarray(jax.random.normal(jax.random.key(5), (N, E))) * 0.5
    params = {"params": {"key_offset": e1, "value_offset": e2}}
    x, c = np.asarray(X, np.float64), np.asarray(CONTEXT, np.float64)
    d = E // heads
    want = np.zeros(X.shape)
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        scores = np.einsum("btd,bnd->btn", silu(x[..., part]), silu(c[..., part] + e1[:, part]))
        want[..., part] = 0.5 * np.einsum("btn,bnd->btd", loop_drop(scores, ratio), c[..., part] + e2[:, part])
    y = jax.jit(lambda p: layer.apply(p, X, context=CONTEXT))(params)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)


def test_bad_input_names_the_argument():
    layer = attn.build("adem", num_heads=1, head_dim=E, context_length=N)
    params = nn.unbox(layer.init(jax.random.key(3), X, context=CONTEXT))
    with pytest.raises(ValueError, match="needs context"):
        layer.apply(params, X)
    with pytest.raises(ValueError, match="expected context_length=6"):
        layer.apply(params, X, context=CONTEXT[:, :5])
    with pytest.raises(ValueError, match="must both have width num_heads \\* head_dim = 8"):
        layer.apply(params, X, context=CONTEXT[..., :4])
    with pytest.raises(ValueError, match="adem takes no mask"):
        layer.apply(params, X, context=CONTEXT, mask=attn.Mask(causal=True))
    with pytest.raises(ValueError, match="drop_ratio=1.0"):
        attn.build("adem", num_heads=1, head_dim=E, drop_ratio=1.0)
