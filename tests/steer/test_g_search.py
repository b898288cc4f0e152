"""g_search: nested per-layer top-k of the text's attention (numpy reference, layer by layer), the P-Sigmoid schedule
and the greedy search, ratios all 1 bit-identical, bad input refused."""

import math

import numpy as np
import pytest

from attn.steer import STEERERS, GSearch
from attn.steer import g_search as g_lib
from attn.steer import visual_tokens as vt
from tests.steer.prefix_vlm import IMAGES, TOKENS, N, full_logits, model_only, tiny_vlm
from tests.steer.test_zipvl import captured


def reference_keep(weights, previous, count):
    b, h, s, _ = weights.shape
    keep = np.zeros((b, N), bool)
    for row in range(b):
        scores = {j: sum(weights[row, hd, i, j] for hd in range(h) for i in range(N, s)) for j in range(N)}
        order = sorted((j for j in range(N) if previous[row, j]), key=lambda j: (-scores[j], j))
        keep[row, order[:count]] = True
    return keep


def test_registered_with_its_record():
    assert STEERERS["g_search"].cls is GSearch and "ratios all 1" in STEERERS["g_search"].no_op


@pytest.mark.parametrize("ratios", [(0.5, 0.25), pytest.param((1.0, 0.1), marks=pytest.mark.slow)])
def test_nested_masks_match_the_reference(ratios):
    model, params = tiny_vlm()
    masks = np.asarray(GSearch(ratios).reduce(model, params, IMAGES, TOKENS).masks)
    previous = np.ones((2, N), bool)
    for layer, ratio in enumerate(ratios):
        count = max(1, math.ceil(round(ratio * N, 9)))
        expected = reference_keep(captured(model, params, layer, list(masks[:layer])), previous, count)
        np.testing.assert_array_equal(masks[layer], expected)
        assert (masks[layer].sum(-1) == count).all() and not (masks[layer] & ~previous).any()
        previous = expected


def test_ratios_all_one_are_bit_identical():
    model, params = tiny_vlm()
    reduction = GSearch((1.0, 1.0)).reduce(model, params, IMAGES, TOKENS)
    np.testing.assert_array_equal(
        np.asarray(vt.reduced_logits(model, params, reduction, TOKENS)), np.asarray(full_logits(model, params))
    )


def test_p_sigmoid_is_non_increasing_and_meets_the_budget():
    for budget, steepness in ((0.5, 1.0), (0.25, 3.0), (0.1, 0.5)):
        ratios = g_lib.p_sigmoid(6, budget, steepness)
        assert all(b <= a for a, b in zip(ratios, ratios[1:], strict=False))
        assert abs(np.mean(ratios) - budget) < 1e-9
        centre = np.log(1 / ratios[0] - 1) / steepness  # r_0 = sigmoid(steepness * c)
        np.testing.assert_allclose(ratios, [1 / (1 + np.exp(steepness * (i + centre))) for i in range(6)])
    assert g_lib.p_sigmoid(3, 1.0) == (1.0, 1.0, 1.0)


def test_greedy_search_keeps_the_fewest_tokens_within_tolerance():
    # A score that drops once any layer keeps under 0.5, or layer 0 under 0.75: the search must stop there.
    def score(ratios):
        return 1.0 - (ratios[0] < 0.75) - (min(ratios) < 0.5)

    ratios, trials = g_lib.g_search(score, 3, candidates=(1.0, 0.75, 0.5, 0.25), tolerance=0.0)
    assert ratios == (0.75, 0.5, 0.5)
    assert trials[0] == {"ratios": [1.0, 1.0, 1.0], "score": 1.0}


def test_bad_input_names_the_argument():
    model, params = tiny_vlm()
    with pytest.raises(ValueError, match="ratios="):
        GSearch((0.5, 0.0))
    with pytest.raises(ValueError, match="non-increasing"):
        GSearch((0.25, 0.5))
    with pytest.raises(ValueError, match="ratios has 3 entries"):
        GSearch((1.0, 0.5, 0.5)).check(model)
    with pytest.raises(ValueError, match=r"span=\(0, 99\) lies outside"):
        GSearch((0.5, 0.5), span=(0, 99)).reduce(model, params, IMAGES, TOKENS)
    with pytest.raises(ValueError, match="model: g_search reads attention weights"):
        GSearch((0.5, 0.5)).check(model_only(attention="lightning"))
    with pytest.raises(ValueError, match="budget="):
        g_lib.p_sigmoid(4, 1.5)
