"""head_attribution on a planted decoder that answers "a op b =" with its first operand: head (1, 0) reads position 0
(operand 1) and copies it (gain 4), head (1, 1) reads position 1 (the operator, gain 2). Patching head (1, 0) from
the counterfactual prompt flips the logit difference (-2), zeroing it removes it (-1); zeroing head (1, 1) only
rescales the final RMSNorm; the attention from "=" is 1 on their roles."""

import numpy as np
import pytest

from eval.analysis import TOOLS
from eval.analysis.head_attribution import HeadAttribution, arithmetic_batch, encode
from tests.eval.planted_heads import position_reader_model

VOCAB, LENGTH = 16, 4


@pytest.fixture(scope="module")
def planted():
    model, params = position_reader_model(VOCAB, LENGTH)
    params["layers_1"]["attention"]["out"]["kernel"][1] *= 0.5  # the operator head writes with gain 2
    batch = arithmetic_batch(32, "+", 1, "compact", seed=0)
    first, other = batch["inputs"][:, 0], batch["corrupted"][:, 0]  # the planted answer: the first operand
    batch["targets"][:, -1], batch["corrupted_targets"][:, -1] = first, other
    batch["weights"][:, -1] = first != other
    return model, params, batch


def test_prompts_by_hand():
    assert encode("12+7=", "bytes") == [49, 50, 43, 55, 61] and encode("3*4=", "compact") == [3, 12, 4, 13]
    batch = arithmetic_batch(8, "-", 2, "compact", seed=1)
    for row, target in zip(batch["inputs"], batch["targets"][:, -1], strict=True):
        a, b = 10 * row[0] + row[1], 10 * row[3] + row[4]
        assert row[2] == 11 and row[5] == 13 and a >= b and target == int(str(a - b)[0])
    assert batch["roles"][0].tolist() == [1, 1, 2, 3, 3, 0]
    np.testing.assert_array_equal(batch["weights"][:, -1], batch["targets"][:, -1] != batch["corrupted_targets"][:, -1])


def test_planted_operand_head_is_found(planted, tmp_path):
    model, params, batch = planted
    result = HeadAttribution(top=1).evaluate(model, params, [batch])
    assert result["prompts"] == "given" and result["layers"] == [0, 1]
    np.testing.assert_allclose(result["patching"], [[0, 0], [-2, 0]], atol=1e-4)
    # the heads copy RMS-normalised tokens: |norm(e_tok + e_pos)|^2 = d / 2 per unit, d = VOCAB + LENGTH; the
    # residual at "=" is e_= + e_pos + 4 norm(x_0) + 2 norm(x_1)
    unit = (VOCAB + LENGTH) / 2
    rescale = np.sqrt((2 + unit * (16 + 4)) / (2 + unit * 16)) - 1
    np.testing.assert_allclose(result["ablation"], [[0, 0], [-1, rescale]], atol=1e-4)
    np.testing.assert_allclose(result["attention_to"]["operand_1"], [[0, 0], [1, 0]], atol=1e-4)
    np.testing.assert_allclose(result["attention_to"]["operator"], [[0, 0], [0, 1]], atol=1e-4)
    np.testing.assert_allclose(result["attention_to"]["operand_2"], [[0, 0], [0, 0]], atol=1e-4)
    assert result["ranking"][0] == [1, 0] and result["key_heads"] == [[1, 0]]
    assert result["accuracy"] == {"clean": 1.0, "top_ablated": 0.0, "bottom_ablated": 1.0}
    paths = TOOLS["head_attribution"]().write(result, str(tmp_path / "h.json"))
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_clear_error(planted):
    model, params, _ = planted
    with pytest.raises(ValueError, match=r"operator='/' must be one of \('\+', '-', '\*'\)"):
        HeadAttribution(operator="/")
    with pytest.raises(ValueError, match="answer token .* out of range for the model's vocabulary of 16"):
        HeadAttribution(digits=1, rows=4).evaluate(model, params, [{"inputs": np.zeros((2, 4), np.int32)}])
