"""head_patching on a planted model where head (1, 0) alone reads position 0 and head (1, 1) alone reads position 1:
corrupting position 0 puts (1, 0) alone in the circuit with the effect derived by hand, corrupting position 1 puts
(1, 1), and the two circuits do not overlap."""

import json

import numpy as np
import pytest

from eval.analysis import TOOLS
from eval.analysis.head_patching import HeadPatching, circuit_overlap
from tests.eval.planted_heads import position_reader_model

VOCAB, T = 8, 4


def corrupted_at(position, task):
    """Rows [a, b, 6, 7] whose last position must name the token at `position`; the corruption changes only it."""
    clean = np.array([[0, 1, 6, 7], [2, 3, 6, 7]], np.int32)
    corrupted = clean.copy()
    corrupted[:, position] = [4, 5]
    targets, corrupted_targets = np.zeros_like(clean), np.zeros_like(clean)
    targets[:, -1], corrupted_targets[:, -1] = clean[:, position], corrupted[:, position]
    weights = np.zeros(clean.shape, np.float32)
    weights[:, -1] = 1.0
    return {
        "inputs": clean,
        "corrupted": corrupted,
        "targets": targets,
        "corrupted_targets": corrupted_targets,
        "weights": weights,
        "task": task,
    }


@pytest.fixture(scope="module")
def planted():
    return position_reader_model(VOCAB, T)


def test_circuit_overlap_by_hand():
    assert circuit_overlap([[0, 1], [1, 0]], [[1, 0], [2, 2], [3, 3]]) == {"iou": 0.25, "shared": 0.5}
    assert circuit_overlap([[1, 0]], [[1, 0]]) == {"iou": 1.0, "shared": 1.0}
    assert circuit_overlap([], [[1, 0]]) == {"iou": 0.0, "shared": 0.0}


def test_only_the_planted_head_carries_the_corrupted_position(planted, tmp_path):
    model, params = planted
    batches = [corrupted_at(0, "first"), corrupted_at(1, "second")]
    result = HeadPatching(normalisation="gap").evaluate(model, params, batches)
    first, second = result["tasks"]["first"], result["tasks"]["second"]
    # the clean run's last position holds a s e_a + a s e_b; the corrupted one a s e_a' instead: LD = +-a s
    assert first["corrupted"] == pytest.approx(-first["clean"], rel=1e-4) and first["clean"] > 1.0
    # noising (1, 0) turns the clean run's last position into the corrupted run's: effect -1; other heads 0
    np.testing.assert_allclose(first["effect"], [[0.0, 0.0], [-1.0, 0.0]], atol=1e-5)
    np.testing.assert_allclose(second["effect"], [[0.0, 0.0], [0.0, -1.0]], atol=1e-5)
    assert first["circuit"] == [[1, 0]] and second["circuit"] == [[1, 1]]
    assert result["overlap"] == [{"tasks": ["first", "second"], "iou": 0.0, "shared": 0.0}]
    paths = TOOLS["head_patching"]().write(result, str(tmp_path / "p.json"))
    assert json.loads(open(paths[0]).read())["tasks"]["first"]["circuit"] == [[1, 0]]
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_relative_change_and_denoising(planted):
    model, params = planted
    batches = [corrupted_at(0, "first")]
    relative = HeadPatching().evaluate(model, params, batches)["tasks"]["first"]
    # (R - C) / |C| with R = -C: the paper's relative change is -2 for the planted head
    np.testing.assert_allclose(relative["effect"], [[0.0, 0.0], [-2.0, 0.0]], atol=1e-5)
    denoised = HeadPatching(direction="denoising", normalisation="gap").evaluate(model, params, batches)
    np.testing.assert_allclose(denoised["tasks"]["first"]["effect"], [[0.0, 0.0], [1.0, 0.0]], atol=1e-5)


def test_bad_input_is_one_clear_error(planted):
    model, params = planted
    batch = corrupted_at(0, "first")
    with pytest.raises(ValueError, match="direction='up' must be one of"):
        HeadPatching(direction="up")
    no_answers = {k: v for k, v in batch.items() if k != "corrupted_targets"}
    with pytest.raises(ValueError, match="needs 'corrupted_targets'"):
        HeadPatching().evaluate(model, params, [no_answers])
    same = {**batch, "corrupted": batch["inputs"], "corrupted_targets": batch["targets"]}
    with pytest.raises(ValueError, match="the corruption does not change the answer's logit difference"):
        HeadPatching().evaluate(model, params, [same])
