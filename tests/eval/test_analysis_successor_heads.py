"""successor_heads on planted OV circuits: a head whose output projection is the successor map scores 1, copy and
predecessor heads 0, a head that increments digits only scores the digits' share."""

import numpy as np
import pytest

from eval.analysis import TOOLS
from eval.analysis.successor_heads import SuccessorHeads, parse_orders, succession
from tests.eval.planted_heads import ov_model

VOCAB = 16
ORDERS = "0-9,10:11:12:13"  # ten digits, four letters: 9 + 3 successions
DIGITS = {t: t + 1 for t in range(9)}
LETTERS = {10: 11, 11: 12, 12: 13}


@pytest.fixture(scope="module")
def planted():
    return ov_model(
        VOCAB,
        {
            (0, 0): {**DIGITS, **LETTERS},  # successor head
            (0, 1): {t + 1: t for t in range(13)},  # predecessor head
            (1, 0): {t: t for t in range(VOCAB)},  # copy head
            (1, 1): {**DIGITS, **{t: t for t in LETTERS}},  # increments digits, copies letters
        },
    )


def test_parse_orders_and_succession_by_hand():
    assert parse_orders("3-5, 9:7:8") == ((3, 4, 5), (9, 7, 8))
    for bad in ("5-3", "4", "1:1", "a-b"):
        with pytest.raises(ValueError, match="must be an ascending range"):
            parse_orders(bad)
    logits = np.array([[0.0, 2.0, 1.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])  # rows: tokens 0, 1, 2 alone
    hits = succession(logits, [(0, 1, 2)], {0: 0, 1: 1, 2: 2})  # token 0 -> 1 succeeds; token 1 ties: no
    np.testing.assert_array_equal(hits[0], [True, False])


def test_planted_successor_heads(planted, tmp_path):
    model, params = planted
    tool = SuccessorHeads(orders=parse_orders(ORDERS))
    result = tool.evaluate(model, params, [{"inputs": np.zeros((1, 4), np.int32)}])
    # the copy head (1, 0) reads the successor head's output only if layer-0 heads are not ablated: it scores 0
    np.testing.assert_allclose(result["score"], [[1.0, 0.0], [0.0, 9 / 12]])
    np.testing.assert_allclose(result["order_scores"], [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])
    # heads summed: layer 0 (successor + predecessor) ties on every token with both neighbours in its order, leaving
    # tokens 0 and 10 (no predecessor in the order); layer 1 (copy + digit successor) ties on digits, copies letters
    np.testing.assert_allclose(result["layer_score"], [2 / 12, 0.0])
    assert result["ranking"][:2] == [[0, 0], [1, 1]] and result["chance"] == pytest.approx((0.9 + 0.75) / 12)
    assert result["fidelity"] == "reconstructed" and list(result["options"]["orders"][1]) == [10, 11, 12, 13]
    paths = TOOLS["successor_heads"]().write(result, str(tmp_path / "s.json"))
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_clear_error(planted):
    model, params = planted
    with pytest.raises(ValueError, match="orders hold token 20, out of range for the vocabulary of 16"):
        SuccessorHeads(orders=((18, 19, 20),)).evaluate(model, params, [{"inputs": np.zeros((1, 4), np.int32)}])


@pytest.mark.slow  # a second planted model: its own compilations (about 4 s)
def test_a_successor_map_split_over_two_heads_scores_in_the_layer_sum():
    """Head (0, 0) increments the digits only, head (0, 1) the letters only: neither is a successor head on its
    own, their sum is one (the layer-1 heads write nothing: every logit ties, score 0)."""
    model, params = ov_model(VOCAB, {(0, 0): DIGITS, (0, 1): LETTERS})
    result = SuccessorHeads(orders=parse_orders(ORDERS)).evaluate(
        model, params, [{"inputs": np.zeros((1, 4), np.int32)}]
    )
    np.testing.assert_allclose(result["score"], [[9 / 12, 3 / 12], [0.0, 0.0]])
    np.testing.assert_allclose(result["layer_score"], [1.0, 0.0])
