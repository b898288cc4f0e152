"""attn_vs_attribution: rank correlations against explicit pair counts, rollout by hand, and a planted decoder whose
prediction at the last position is a copy of token 0 (both layer-1 heads read position 0, only head (1, 0) writes):
every method but rollout ranks token 0 first, and nothing but tokens 0 and the last one can move the prediction."""

import itertools

import numpy as np
import pytest

from eval.analysis import TOOLS
from eval.analysis.attn_vs_attribution import METHODS, AttnVsAttribution, kendall_tau_b, rollout
from eval.analysis.stiffness import spearman
from tests.eval.planted_heads import C, position_reader_model

VOCAB, LENGTH = 8, 5


def _tau_b_by_counting(a, b):
    concordant = discordant = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
        ties_a += da == 0
        ties_b += db == 0
        concordant += da * db > 0
        discordant += da * db < 0
    pairs = len(a) * (len(a) - 1) / 2
    return (concordant - discordant) / np.sqrt((pairs - ties_a) * (pairs - ties_b))


def test_rank_correlations_and_rollout_by_hand():
    x = np.array([0.1, 0.4, 0.4, 0.9, 0.2])
    y = np.array([1.0, 3.0, 2.0, 2.0, 0.5])
    assert kendall_tau_b(x, y) == pytest.approx(_tau_b_by_counting(x, y))
    assert kendall_tau_b(x, x) == pytest.approx(1.0) and kendall_tau_b(x, -x) == pytest.approx(-1.0)
    # Spearman with average ranks: x ranks [0, 2.5, 2.5, 4, 1], y ranks [1, 4, 2.5, 2.5, 0]
    rx, ry = np.array([0, 2.5, 2.5, 4, 1]), np.array([1, 4, 2.5, 2.5, 0])
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    a1 = np.array([[[[1.0, 0.0], [0.5, 0.5]]]])  # [B=1, H=1, 2, 2]
    a2 = np.array([[[[1.0, 0.0], [1.0, 0.0]]]])
    m1, m2 = 0.5 * a1[0, 0] + 0.5 * np.eye(2), 0.5 * a2[0, 0] + 0.5 * np.eye(2)
    np.testing.assert_allclose(rollout([a1, a2])[0], m2 @ m1)


@pytest.mark.slow  # ~16 s: jitted gradients, integrated gradients and occlusion through the model
def test_planted_copy_of_token_zero(tmp_path):
    model, params = position_reader_model(VOCAB, LENGTH)
    second = params["layers_1"]["attention"]
    second["out"]["kernel"][1] = 0.0  # only head (1, 0) writes: the prediction is token 0
    second["key"]["kernel"][VOCAB + 1, 1, 0], second["key"]["kernel"][VOCAB, 1, 0] = 0.0, C  # head (1, 1) reads 0 too
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, VOCAB, (2, LENGTH)).astype(np.int32)
    inputs[:, -1] = (inputs[:, 0] + 1) % VOCAB  # the last token differs from token 0
    result = AttnVsAttribution(rows=2, steps=2).evaluate(model, params, [{"inputs": inputs}])
    importance = {name: np.asarray(result["importance"][name]) for name in METHODS}
    for name in METHODS:
        if name != "rollout":  # rollout keeps half of the last token's own residual (below)
            assert (importance[name].argmax(axis=1) == 0).all(), name
    for name in ("saliency", "grad_input", "integrated_gradients", "occlusion"):
        np.testing.assert_allclose(importance[name][:, 1:-1], 0.0, atol=1e-6)  # nothing reads tokens 1..T-2
    # both layer-1 heads put all their weight on token 0; the layer-0 heads attend to themselves (identity)
    np.testing.assert_allclose(importance["attention"], np.tile([1.0, 0, 0, 0, 0], (2, 1)), atol=1e-6)
    np.testing.assert_allclose(importance["rollout"], np.tile([0.5, 0, 0, 0, 0.5], (2, 1)), atol=1e-6)
    for pair in result["agreement"]:
        a, b = (importance[name] for name in pair["methods"])
        taus = [_tau_b_by_counting(x, y) for x, y in zip(a, b, strict=True)]
        finite = [t for t in taus if np.isfinite(t)]
        assert pair["kendall"] == pytest.approx(np.mean(finite))
        assert pair["top1"] == 1.0 or "rollout" in pair["methods"]
    assert result["position"] == LENGTH - 1 and result["fidelity"] == "reconstructed"
    paths = TOOLS["attn_vs_attribution"]().write(result, str(tmp_path / "a.json"))
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_clear_error():
    model, params = position_reader_model(VOCAB, LENGTH)
    with pytest.raises(ValueError, match="position=7 is out of range for sequences of length 5"):
        AttnVsAttribution(position=7).evaluate(model, params, [{"inputs": np.zeros((1, LENGTH), np.int32)}])
    with pytest.raises(ValueError, match="steps=0 must be a positive int"):
        AttnVsAttribution(steps=0)
