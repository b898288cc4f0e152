"""The `window` layer (Swin-style non-overlapping windows): equals its dense-masked reference with shifts, padding
and relative position bias; equals GNA with stride = kernel_size; full window is `softmax`; errors."""

import jax
import numpy as np
import pytest
from local_reference import (
    dense_attention,
    layer_reference,
    loop_relative_bias,
    loop_window_mask,
    normal,
    random_params,
)

import attn


@pytest.mark.parametrize(
    "spatial, window, shift, rpb",
    [
        ((6, 8), (3, 4), 0, False),
        ((7, 5), (3, 2), (1, 1), True),  # shifted, extents not multiples of the window
        ((10,), 4, 2, True),
        ((4, 4, 3), (2, 2, 3), (1, 0, 0), False),
    ],
    ids=["2d", "2d_shift_pad_rpb", "1d_shift", "3d_shift"],
)
def test_layer_equals_dense_masked_reference(spatial, window, shift, rpb):
    layer = attn.build("window", num_heads=4, head_dim=8, num_kv_heads=2, window_size=window, shift=shift, rpb=rpb)
    x = normal((2, *spatial, 16))
    params = random_params(layer, x)
    out = jax.jit(layer.apply)(params, x)
    mask = loop_window_mask(spatial, window, shift)

    def attend(q, k, v, p):
        bias = loop_relative_bias(np.asarray(p["rpb"]), spatial, window, 1, mask) if rpb else None
        return dense_attention(q, k, v, mask, bias)

    np.testing.assert_allclose(out, layer_reference(params, x, attend), atol=3e-5, rtol=1e-5)


def swin_procedure_mask(n, w, s):
    """Swin's recipe on an n x n grid (n % w == 0): roll by -s, partition into w x w windows, and keep pairs of the
    same window and the same region of Swin's slices (0, -w), (-w, -s), (-s, None); in original coordinates."""

    def region(p):
        return 0 if p < n - w else (1 if p < n - s else 2)

    coords = [(i, j) for i in range(n) for j in range(n)]
    label = {}
    for pi in range(n):
        for pj in range(n):
            original = ((pi + s) % n, (pj + s) % n)
            label[original] = (pi // w, pj // w, region(pi), region(pj))
    return np.array([[label[a] == label[b] for b in coords] for a in coords])


def test_shift_is_swins_cyclic_shift_with_its_mask():
    for n, w, s in [(6, 3, 1), (8, 4, 2), (6, 2, 1)]:
        np.testing.assert_array_equal(loop_window_mask((n, n), w, s), swin_procedure_mask(n, w, s))


def test_equals_blocked_generalized_neighborhood():
    x = normal((2, 6, 4, 8))
    window = attn.build("window", num_heads=2, head_dim=4, window_size=(3, 2))
    gna = attn.build("generalized_neighborhood", num_heads=2, head_dim=4, kernel_size=(3, 2), stride=(3, 2))
    params = random_params(window, x)
    np.testing.assert_allclose(jax.jit(window.apply)(params, x), jax.jit(gna.apply)(params, x), atol=2e-5)


def test_full_window_is_softmax_and_weights_are_captured():
    spatial = (3, 4)
    layer = attn.build("window", num_heads=2, head_dim=4, window_size=spatial)
    softmax = attn.build("softmax", num_heads=2, head_dim=4, position="none")
    x = normal((1, *spatial, 8))
    params = random_params(layer, x)
    ref = jax.jit(softmax.apply)(params, x.reshape(1, 12, 8)).reshape(x.shape)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), ref, atol=2e-5)

    shifted = attn.build("window", num_heads=2, head_dim=4, window_size=(2, 3), shift=(1, 1))
    _, state = jax.jit(lambda p, x: shifted.apply(p, x, mutable=["intermediates"]))(params, x)
    (weights,) = state["intermediates"]["attention_weights"]
    allowed = loop_window_mask(spatial, (2, 3), (1, 1))
    assert weights.shape == (1, 2, 12, 12) and np.all(np.asarray(weights)[..., ~allowed] == 0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


def test_errors():
    x = normal((1, 4, 4, 8))
    with pytest.raises(
        ValueError,
        match=r"window_size=\(5, 5\) must be between 1 and the extent on every axis; axis 0 has window 5 and extent 4",
    ):
        attn.build("window", num_heads=2, head_dim=4, window_size=5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"shift=\(2, 2\) must satisfy 0 <= shift < window_size=\(2, 2\)"):
        attn.build("window", num_heads=2, head_dim=4, window_size=2, shift=2).init(jax.random.key(0), x)
    layer = attn.build("window", num_heads=2, head_dim=4, window_size=2)
    params = random_params(layer, x)
    with pytest.raises(ValueError, match="decode=True is not supported by the spatial layer WindowAttention"):
        layer.apply(params, x, decode=True)
