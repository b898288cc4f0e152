"""vtc_cls: the kept image tokens are the top [CLS]-attention ones (numpy reference), ratio 1 is bit-identical, the
decoder runs on exactly the kept tokens, and bad input is refused."""

import math

import numpy as np
import pytest

from attn.steer import STEERERS, VtcCls
from attn.steer import visual_tokens as vt
from tests.steer.prefix_vlm import (
    IMAGES,
    TOKENS,
    N,
    decode,
    encoder_weights,
    full_logits,
    image_tokens,
    model_only,
    tiny_vlm,
)


def reference_indices(weights, ratio, layers):
    """Top-k of the summed head-mean [CLS] rows, ties to the lower index, in position order (explicit loops)."""
    _, b, h, _, _ = weights.shape
    out = []
    for row in range(b):
        scores = [sum(weights[layer, row, :, 0, 1 + j].mean() for layer in layers) for j in range(N)]
        k = max(1, math.ceil(round(ratio * N, 9)))
        order = sorted(range(N), key=lambda j: (-scores[j], j))[:k]
        out.append(sorted(order))
    return np.array(out)


def test_registered_with_its_record():
    spec = STEERERS["vtc_cls"]
    assert spec.cls is VtcCls and spec.fidelity == "official-code" and "ratio=1" in spec.no_op


@pytest.mark.parametrize(
    "ratio, layers",
    [(0.5, None), pytest.param(0.1, [1], marks=pytest.mark.slow), pytest.param(0.3, [0, 1], marks=pytest.mark.slow)],
)
def test_kept_tokens_match_the_reference_and_feed_the_decoder(ratio, layers):
    model, params = tiny_vlm()
    steer = VtcCls(ratio, layers)
    indices = np.asarray(steer.select(model, params, IMAGES))
    expected = reference_indices(encoder_weights(model, params), ratio, [0, 1] if layers is None else layers)
    np.testing.assert_array_equal(indices, expected)
    assert indices.shape[1] == max(1, math.ceil(round(ratio * N, 9)))
    reduction = steer.reduce(model, params, IMAGES, TOKENS)
    tokens = np.asarray(image_tokens(model, params))
    gathered = np.stack([tokens[i, expected[i]] for i in range(len(expected))])
    np.testing.assert_array_equal(np.asarray(reduction.prefix), gathered)
    np.testing.assert_allclose(reduction.kept, expected.shape[1] / N)
    np.testing.assert_allclose(
        vt.reduced_logits(model, params, reduction, TOKENS), decode(model, params, gathered), rtol=1e-6, atol=1e-6
    )


def test_ratio_one_is_bit_identical():
    model, params = tiny_vlm()
    reduction = VtcCls(1.0).reduce(model, params, IMAGES, TOKENS)
    full = full_logits(model, params)
    assert reduction.masks is None and reduction.rules(model) == ()
    np.testing.assert_array_equal(np.asarray(vt.reduced_logits(model, params, reduction, TOKENS)), np.asarray(full))


def test_class_token_is_optional_and_stays_in_the_encoder():
    model, params = tiny_vlm()
    plain, plain_params = tiny_vlm(vision_cls_token=False)
    assert "cls_token" in params["image_encoder"] and "cls_token" not in plain_params["image_encoder"]
    assert image_tokens(model, params).shape == image_tokens(plain, plain_params).shape == (2, N, 16)


def test_bad_input_names_the_argument():
    model, params = tiny_vlm()
    for ratio in (0.0, 1.5, -0.2, True, "half"):
        with pytest.raises(ValueError, match="ratio="):
            VtcCls(ratio)
    with pytest.raises(ValueError, match="model=.*fusion='cross'"):
        VtcCls(0.5).check(tiny_vlm(fusion="cross")[0])
    with pytest.raises(ValueError, match="model: vtc_cls reads attention weights.*'lightning'"):
        VtcCls(0.5).check(model_only(vision_attention="lightning"))
    with pytest.raises(ValueError, match="vision_cls_token=False"):
        VtcCls(0.5).select(*tiny_vlm(vision_cls_token=False), IMAGES)
    with pytest.raises(ValueError, match="layers has 2"):
        VtcCls(0.5, layers=[2]).select(model, params, IMAGES)
