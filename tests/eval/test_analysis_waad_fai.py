"""waad_fai on planted heads: matching heads (local: they attend to themselves and to an earlier copy of their token)
give a WAAD peak at a repeated token, sink heads (global) give the FAI peak at the sink token; the closed forms of
uniform causal attention check the two metrics."""

import json

import numpy as np
import pytest

from eval.analysis import TOOLS
from eval.analysis.waad_fai import WaadFai, fai, top_positions, waad
from tests.eval.planted_heads import match_model

VOCAB = 8
# row 0: token 1 repeats at position 4 (3 back), the sink token 0 opens the row;
# row 1: token 2 repeats at position 4, the sink token 0 comes right after, at position 5
ROWS = np.array([[0, 1, 2, 3, 1, 4, 5, 6], [1, 2, 3, 4, 2, 0, 5, 6]], np.int32)
T = ROWS.shape[1]


@pytest.fixture(scope="module")
def planted():
    return match_model(VOCAB, [("self", "sink"), ("self", "sink")])


def test_closed_forms_of_uniform_causal_attention():
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    for window in (2, 100):
        expected = [sum(min(t - s, window) for s in range(t + 1)) / (t + 1) for t in range(T)]
        np.testing.assert_allclose(waad(uniform, window), expected)
    expected = [np.mean([1 / (t + 1) for t in range(s + 1, T)]) if s < T - 1 else 0.0 for s in range(T)]
    np.testing.assert_allclose(fai(uniform), expected)
    assert top_positions(np.array([0.1, 0.9, 0.5, 0.7]), 0.5) == [1, 3]


def test_planted_preplan_and_anchor_tokens(planted, tmp_path):
    model, params = planted
    result = WaadFai().evaluate(model, params, [{"inputs": ROWS}])
    assert result["local"] == [[0, 0], [1, 0]]  # the matching heads look 3 tokens back once; the sinks far
    expected_waad = np.zeros((2, T))
    expected_waad[:, 4] = 0.5 * 3  # half the weight 3 tokens back
    np.testing.assert_allclose(result["token_waad"], expected_waad, atol=1e-5)
    # row 0: key 0 takes every later query; row 1: key 5 takes queries 6, 7, earlier queries spread uniformly
    expected_fai = np.zeros((2, T))
    expected_fai[0, 0] = 1.0
    expected_fai[1, 5] = 1.0
    for s in range(5):
        expected_fai[1, s] = sum(1 / (t + 1) for t in range(s + 1, 5)) / (T - 1 - s)
    np.testing.assert_allclose(result["token_fai"], expected_fai, atol=1e-5)
    assert result["preplan"] == [[4], [4]] and result["anchor"] == [[0], [5]] and result["coupling"] == 0.5
    assert result["fidelity"] == "reconstructed" and result["rows"] == 2
    paths = TOOLS["waad_fai"]().write(result, str(tmp_path / "w.json"))
    assert json.loads(open(paths[0]).read())["anchor"] == [[0], [5]]
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_clear_error(planted):
    model, params = planted
    with pytest.raises(ValueError, match=r"local_heads holds \(0, 2\), out of range"):
        WaadFai(local_heads=((0, 2),)).evaluate(model, params, [{"inputs": ROWS}])
    with pytest.raises(ValueError, match="window=0 must be a positive int"):
        WaadFai(window=0)
