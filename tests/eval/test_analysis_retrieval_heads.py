"""retrieval_heads on a planted induction circuit: the head that attends to the successor of the previous occurrence
scores 1, the others 0, and masking it breaks retrieval."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.models.decoder import DecoderLM
from eval.analysis import TOOLS
from eval.analysis.retrieval_heads import RetrievalHeads, copy_paste_hits, find_needle
from tests.eval.planted_heads import blank_params, induction_model

VOCAB, T = 16, 12  # digits 0..9, marker 10, filler 11..15


def needle_batch():
    """Rows: filler, marker 10, a 3-digit needle, filler, then marker 10 and the needle again (teacher forced); the
    last row has no needle before its answer."""
    rows = [
        [11, 10, 3, 7, 1, 12, 13, 14, 15, 10, 3, 7, 1],
        [13, 11, 10, 5, 2, 8, 12, 14, 15, 10, 5, 2, 8],
        [11, 12, 13, 14, 15, 11, 12, 13, 14, 10, 6, 4, 9],
    ]
    seq = np.array(rows, np.int32)
    weights = np.zeros((3, T), np.float32)
    weights[:, T - 3 :] = 1.0  # answer positions 9, 10, 11
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": weights}


def test_find_needle_and_hits_against_hand_counts():
    inputs = np.array([4, 3, 7, 1, 3, 7, 1, 9])
    assert find_needle(inputs, np.array([3, 7, 1]), 7) == 4 and find_needle(inputs, np.array([3, 7, 1]), 6) == 1
    assert find_needle(inputs, np.array([2, 2]), 8) is None
    # head 0 lands on the needle token it generates at both steps, head 1 once on the wrong token, head 2 outside
    keys = np.array([[1, 2], [2, 2], [0, 7]])
    np.testing.assert_array_equal(copy_paste_hits(keys, inputs, np.array([3, 7]), 1, 3), [2, 1, 0])


@pytest.fixture(scope="module")
def planted():
    return induction_model(VOCAB, T)


def surgery_accuracy(apply, params, head):
    """Answer-token accuracy of the model (its jitted apply) with head (layer, head)'s output-projection rows zeroed."""
    batch, cut = needle_batch(), jax.tree.map(np.copy, params)
    cut[f"layers_{head[0]}"]["attention"]["out"]["kernel"][head[1]] = 0.0
    guesses = np.asarray(apply({"params": cut}, jnp.asarray(batch["inputs"]))).argmax(-1)
    answer = batch["weights"] > 0
    return float(np.mean(guesses[answer] == batch["targets"][answer]))


def test_planted_induction_head_is_the_retrieval_head(planted, tmp_path):
    model, params = planted
    result = RetrievalHeads(mask_top=(1, 3), random_trials=4).evaluate(model, params, [needle_batch()])
    assert result["rows"] == 3 and result["rows_without_needle"] == 1 and result["rows_scored"] == 2
    np.testing.assert_allclose(result["retrieval_score"], [[0.0, 0.0], [1.0, 0.0]])
    assert result["retrieval_heads"] == [[1, 0]] and result["ranking"][0] == [1, 0]
    # unmasked, the two needle rows are answered (the third, with no needle, is not): 6 of 9 answer tokens
    assert result["accuracy"] == pytest.approx(6 / 9)
    top, random = result["masked"]["top_accuracy"], result["masked"]["random_accuracy"]
    assert result["masked"]["k"] == [1, 3] and top == [0.0, 0.0] and random[1] is None  # 3 others left for k = 3
    # random single heads outside the top, drawn as documented (seed 0), each scored by zeroing its output rows: the
    # previous-token head (0, 0) breaks the circuit, (1, 1) does not
    others = [(0, 0), (0, 1), (1, 1)]
    rng = np.random.default_rng(0)
    draws = [others[int(rng.choice(3, size=1, replace=False)[0])] for _ in range(4)]
    apply = jax.jit(model.apply)
    assert random[0] == pytest.approx(np.mean([surgery_accuracy(apply, params, head) for head in draws]))
    assert surgery_accuracy(apply, params, (0, 0)) == 0.0 and surgery_accuracy(apply, params, (1, 1)) == 6 / 9
    assert result["fidelity"] == "official-code" and result["paper"].startswith("[37]")
    paths = TOOLS["retrieval_heads"]().write(result, str(tmp_path / "r.json"))
    assert json.loads(open(paths[0]).read())["retrieval_heads"] == [[1, 0]]
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_clear_error(planted):
    model, params = planted
    batch = needle_batch()
    with pytest.raises(ValueError, match=r"mask_top=\(5,\) holds \[5\]: the model has 4 heads"):
        RetrievalHeads(mask_top=(5,)).evaluate(model, params, [batch])
    with pytest.raises(ValueError, match="needs 'targets' and 'weights' marking the answer positions"):
        RetrievalHeads().evaluate(model, params, [{"inputs": batch["inputs"]}])
    with pytest.raises(ValueError, match="min_recall=1.0 must be in"):
        RetrievalHeads(min_recall=1.0)
    linear = DecoderLM(vocab_size=VOCAB, num_layers=2, d_model=VOCAB, num_heads=2, mlp_dim=8, attention="linear")
    with pytest.raises(ValueError, match="record no 'attention_weights'"):
        RetrievalHeads().evaluate(linear, blank_params(linear, T), [batch])
