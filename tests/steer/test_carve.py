"""attn.steer.carve: the contrast map against numpy on captured attention, the keep rule, pixel-level masking of the
dropped patches, the exact no-op setting, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.interventions import run_with_cache
from attn.steer import STEERERS, Carve
from attn.steer import carve as carve_lib
from tests.steer.vlm_helpers import IMAGES, SPAN, TOKENS, N, logits_under, tiny_vlm


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm()


def test_contrast_is_the_ratio_of_the_deep_layers_image_attention(vlm):
    model, variables = vlm
    general = TOKENS.at[:, -2].set(0)
    steer = Carve(keep_ratio=0.5, lam=0.01)

    @jax.jit
    def run(variables):
        contrast = steer.contrast(model, variables, IMAGES, TOKENS, general)
        maps = [
            run_with_cache(model, variables, IMAGES, t, names=("attention_weights",))[1]["decoder/layers_1/attention"]
            for t in (TOKENS, general)
        ]
        return contrast, [m["attention_weights"] for m in maps]

    contrast, (task_map, general_map) = run(variables)
    a = [np.asarray(m, np.float64)[:, :, -1, :N].mean(axis=1) for m in (task_map, general_map)]  # layer 1 = deep half
    a = [x / x.sum(-1, keepdims=True) for x in a]
    np.testing.assert_allclose(contrast, a[0] / (a[1] + 0.01), rtol=1e-4)
    keep = np.asarray(steer.keep(contrast))
    assert keep.sum(-1).tolist() == [2, 2]
    for b in range(2):
        assert set(np.flatnonzero(keep[b])) == set(np.argsort(-np.asarray(contrast[b]))[:2])


def test_masking_zeroes_the_dropped_patches(vlm):
    model, _ = vlm
    keep = jnp.asarray([[True, False, False, True], [False, True, True, True]])
    masked = np.asarray(Carve().mask_images(model, IMAGES, keep))
    images = np.asarray(IMAGES)
    for b in range(2):
        for j in range(N):
            row, col = divmod(j, 2)  # 2x2 patch grid of 4x4 patches, row-major
            patch = (b, slice(4 * row, 4 * row + 4), slice(4 * col, 4 * col + 4))
            want = images[patch] if keep[b, j] else 0.0
            np.testing.assert_array_equal(masked[patch], want)


def test_keep_ratio_one_is_bit_identical(vlm):
    model, variables = vlm
    steer = Carve(keep_ratio=1.0)
    keep = steer.keep(jnp.asarray(np.random.default_rng(0).random((2, N))))
    assert bool(keep.all())
    np.testing.assert_array_equal(steer.mask_images(model, IMAGES, keep), IMAGES)
    assert steer.rules(model, keep, SPAN) == ()
    half = Carve(keep_ratio=0.5)
    clean, dropped = logits_under(
        model, variables, (), half.rules(model, half.keep(jnp.arange(8.0).reshape(2, N)), SPAN)
    )
    assert not np.array_equal(dropped, clean)
    assert "keep_ratio=1" in STEERERS["carve"].no_op


def test_bad_input_names_the_argument(vlm):
    model, variables = vlm
    with pytest.raises(ValueError, match="keep_ratio"):
        Carve(keep_ratio=0.0)
    with pytest.raises(ValueError, match="layers=.*out of range"):
        Carve(layers=[3]).contrast(model, variables, IMAGES, TOKENS, TOKENS)
    with pytest.raises(ValueError, match="general_tokens"):
        Carve().contrast(model, variables, IMAGES, TOKENS, TOKENS[:, :2])
    with pytest.raises(ValueError, match="keep must be"):
        Carve().mask_images(model, IMAGES, jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="image_span"):
        Carve().rules(model, jnp.ones((2, N), bool), (0, 0))
    with pytest.raises(ValueError, match="model"):
        Carve().contrast(tiny_vlm(fusion="cross")[0], variables, IMAGES, TOKENS, TOKENS)
    with pytest.raises(ValueError, match="no attention probability matrix"):
        Carve().contrast(model.clone(attention="cca"), variables, IMAGES, TOKENS, TOKENS)
    assert carve_lib.patch_mask(jnp.ones((1, 4), bool), (2, 2), 4).shape == (1, 8, 8, 1)
