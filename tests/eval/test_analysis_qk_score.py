"""qk_score on planted heads: a head whose query meets the key of the option holding the query's own token picks the
right option every time, with the QK-score derived by hand; sink and uniform heads never pick (ties)."""

import json

import numpy as np
import pytest

from eval.analysis import TOOLS
from eval.analysis.qk_score import QKScore, centred_correlation, picks
from tests.eval.planted_heads import C, match_model

VOCAB = 8


def questions():
    """Token 0 first (the sink), three options at positions 1..3, a filler, and the query token at the end: it equals
    the right option's token."""
    inputs = np.array([[0, 3, 5, 2, 7, 5], [0, 1, 4, 6, 7, 1], [0, 2, 3, 4, 7, 4]], np.int32)
    return {
        "inputs": inputs,
        "option_positions": np.tile([1, 2, 3], (3, 1)),
        "answer": np.array([1, 0, 2]),
        "option_tokens": inputs[:, 1:4],
    }


@pytest.fixture(scope="module")
def planted():
    return match_model(VOCAB, [("self", "sink"), ("none", "self")])


def test_picks_and_correlation_by_hand():
    scores = np.array([[1.0, 3.0, 2.0], [2.0, 2.0, 0.0]])
    np.testing.assert_array_equal(picks(scores, np.array([1, 0])), [True, False])  # a tie is not a pick
    assert centred_correlation(np.array([[0.0, 3.0, 0.0]]), np.array([1])) == pytest.approx(1.0)
    assert centred_correlation(np.array([[0.0, 3.0, 0.0]]), np.array([0])) == pytest.approx(-0.5)
    assert centred_correlation(np.ones((2, 3)), np.array([0, 1])) is None


def test_planted_select_and_copy_heads(planted, tmp_path):
    model, params = planted
    result = QKScore().evaluate(model, params, [questions()])
    assert result["qk_accuracy"] == [[1.0, 0.0], [0.0, 1.0]] and result["attention_accuracy"] == result["qk_accuracy"]
    assert result["correlation"][0][0] == pytest.approx(1.0) and result["correlation"][0][1] is None
    # one-hot rows normalised by RMSNorm are sqrt(8) e_v: q . k = 8 C^2 for the right option, times 1/sqrt(8)
    assert result["qk_correct"][0][0] == pytest.approx(8 * C**2 / np.sqrt(8), rel=1e-4)
    assert result["qk_other"][0][0] == pytest.approx(0.0, abs=1e-4)
    assert result["best_head"] == [0, 0] and result["chance"] == pytest.approx(1 / 3) and result["rows"] == 3
    # the model's own logits: the residual is the query token's one-hot, whose tied logit names the right option
    assert result["model_accuracy"] == 1.0
    chosen = QKScore(layers=(1,), heads=(1,)).evaluate(model, params, [questions()])
    assert chosen["qk_accuracy"] == [[1.0]] and chosen["layers"] == [1] and chosen["heads"] == [1]
    paths = TOOLS["qk_score"]().write(result, str(tmp_path / "q.json"))
    assert json.loads(open(paths[0]).read())["best_head"] == [0, 0]
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_clear_error(planted):
    model, params = planted
    with pytest.raises(ValueError, match=r"heads=\(2,\) holds \[2\], out of range: the model has 2 heads"):
        QKScore(heads=(2,)).evaluate(model, params, [questions()])
    with pytest.raises(ValueError, match=r"layers=\(3,\) holds \[3\], out of range"):
        QKScore(layers=(3,)).evaluate(model, params, [questions()])
    with pytest.raises(ValueError, match="has no 'option_positions': qk_score needs multiple-choice rows"):
        QKScore().evaluate(model, params, [{"inputs": questions()["inputs"]}])
    late = {**questions(), "option_positions": np.tile([1, 2, 5], (3, 1))}
    with pytest.raises(ValueError, match="must lie before the query positions"):
        QKScore().evaluate(model, params, [late])
