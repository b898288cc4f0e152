"""vmtc_cmai: primary tokens + k-means merges (numpy reference with explicit loops), CMAI's inhibited pairs get no
attention and the rest is renormalised (numpy reference), ratio 1 + inhibit 0 is bit-identical, bad input refused."""

import math

import numpy as np
import pytest

import attn
from attn import interventions as iv
from attn.steer import STEERERS, VmtcCmai
from attn.steer import visual_tokens as vt
from tests.steer.prefix_vlm import IMAGES, TOKENS, N, encoder_weights, full_logits, image_tokens, model_only, tiny_vlm


def reference_merge(tokens, scores, k, share, iterations):
    out = []
    for row in range(len(tokens)):
        kp = min(k, max(1, int(share * k + 0.5)))
        km = k - kp
        primary = sorted(sorted(range(N), key=lambda j: (-scores[row][j], j))[:kp])
        rest = [j for j in range(N) if j not in primary]
        x = tokens[row][rest]
        centres = [x[m * len(rest) // km].copy() for m in range(km)]
        for _ in range(iterations):
            assign = [min(range(km), key=lambda m: (((x[r] - centres[m]) ** 2).sum(), m)) for r in range(len(rest))]
            for m in range(km):
                members = [x[r] for r in range(len(rest)) if assign[r] == m]
                if members:
                    centres[m] = np.mean(members, axis=0)
        out.append(np.concatenate([tokens[row][primary], np.array(centres).reshape(km, -1)]))
    return np.stack(out)


def decoder_layer0(model, params, prefix, rules=()):
    with attn.intervene(*rules):
        _, cache = iv.run_with_cache(
            model, {"params": params}, TOKENS, prefix, names=("attention_weights",),
            layers=["decoder/layers_0/attention"], method="decode",
        )  # fmt: skip
    return np.asarray(cache["decoder/layers_0/attention"]["attention_weights"], np.float64)


def test_registered_with_its_record():
    assert STEERERS["vmtc_cmai"].cls is VmtcCmai and "inhibit=0" in STEERERS["vmtc_cmai"].no_op


@pytest.mark.parametrize("ratio, share", [(0.5, 0.5), (0.25, 0.25)])
def test_merged_prefix_matches_the_reference(ratio, share):
    model, params = tiny_vlm()
    reduction = VmtcCmai(ratio, primary_share=share).reduce(model, params, IMAGES, TOKENS)
    weights = encoder_weights(model, params)
    scores = weights[:, :, :, 0, 1:].mean(axis=2).sum(axis=0)  # [B, N]: head-mean [CLS] rows summed over layers
    k = max(1, math.ceil(round(ratio * N, 9)))
    expected = reference_merge(np.asarray(image_tokens(model, params), np.float64), scores, k, share, 3)
    assert reduction.prefix.shape == (2, k, 16)
    np.testing.assert_allclose(np.asarray(reduction.prefix), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reduction.kept, k / N)


def test_inhibition_masks_the_lowest_focus_pairs_and_renormalises():
    model, params = tiny_vlm()
    inhibit = 0.25
    reduction = VmtcCmai(1.0, inhibit=inhibit, layers=[0]).reduce(model, params, IMAGES, TOKENS)
    before = decoder_layer0(model, params, reduction.prefix)
    after = decoder_layer0(model, params, reduction.prefix, reduction.rules(model))
    b, h, s, _ = before.shape
    count = int(inhibit * N)
    for row in range(b):
        for head in range(h):
            for i in range(N, s):
                focus = [sum(before[row, head, i, t] * before[row, head, t, j] for t in range(N, s)) for j in range(N)]
                low = sorted(range(N), key=lambda j: (focus[j], j))[:count]
                expected = before[row, head, i].copy()
                expected[low] = 0.0
                np.testing.assert_allclose(after[row, head, i], expected / expected.sum(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(after[:, :, :N], before[:, :, :N], rtol=1e-5)  # image queries are untouched


def test_ratio_one_without_inhibition_is_bit_identical():
    model, params = tiny_vlm()
    reduction = VmtcCmai(1.0).reduce(model, params, IMAGES, TOKENS)
    assert reduction.rules(model) == ()
    logits = vt.reduced_logits(model, params, reduction, TOKENS)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(full_logits(model, params)))


def test_bad_input_names_the_argument():
    for kwargs, name in (({"ratio": 0.0}, "ratio="), ({"ratio": 0.5, "inhibit": 1.0}, "inhibit="),
                         ({"ratio": 0.5, "primary_share": 0}, "primary_share="),
                         ({"ratio": 0.5, "iterations": -1}, "iterations=")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            VmtcCmai(**kwargs)
    with pytest.raises(ValueError, match="layers has 4"):
        VmtcCmai(0.5, inhibit=0.1, layers=[4]).check(tiny_vlm()[0])
    with pytest.raises(ValueError, match="model: vmtc_cmai reads attention weights.*vision_attention"):
        VmtcCmai(0.5).check(model_only(vision_attention="lightning"))
    with pytest.raises(ValueError, match="model: vmtc_cmai reads attention weights.*attention layer 0"):
        VmtcCmai(0.5, inhibit=0.1).check(model_only(attention="lightning"))
    with pytest.raises(ValueError, match="fusion='cross'"):
        VmtcCmai(0.5).check(model_only(fusion="cross"))
