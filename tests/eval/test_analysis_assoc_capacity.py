"""assoc_capacity: orthonormal keys retrieve exactly (no crosstalk), the Hebbian retrieval equals the explicit sum
v_j + sum_{i != j} (k_i . k_j) v_i, the measured fidelity follows 1 / sqrt(1 + (N - 1) / d_k), and the command
runs without a workdir."""

import json

import numpy as np
import pytest

from eval.analysis.__main__ import main
from eval.analysis.assoc_capacity import AssocCapacity, predicted_fidelity, retrieval_stats, retrieve, unit_rows


def test_orthonormal_keys_retrieve_exactly_and_crosstalk_by_hand():
    rng = np.random.default_rng(0)
    keys = np.linalg.qr(rng.standard_normal((6, 6)))[0][:4][None]  # 4 orthonormal keys in R^6
    values = unit_rows(rng, (1, 4, 6))
    np.testing.assert_allclose(retrieve(keys, values, keys, "hebbian"), values, atol=1e-12)
    assert retrieval_stats(keys, values, "hebbian") == pytest.approx({"accuracy": 1, "error_free": 1, "fidelity": 1})
    keys, values = unit_rows(rng, (1, 4, 3)), unit_rows(rng, (1, 4, 5))  # more keys than dimensions: crosstalk
    out = retrieve(keys, values, keys, "hebbian")
    for j in range(4):
        crosstalk = sum(float(keys[0, i] @ keys[0, j]) * values[0, i] for i in range(4) if i != j)
        np.testing.assert_allclose(out[0, j], values[0, j] + crosstalk, atol=1e-12)


def test_measured_fidelity_follows_the_crosstalk_prediction():
    rng = np.random.default_rng(1)
    dim, count = 32, 33
    stats = retrieval_stats(unit_rows(rng, (256, count, dim)), unit_rows(rng, (256, count, dim)), "hebbian")
    assert stats["fidelity"] == pytest.approx(float(predicted_fidelity(count, dim)), abs=0.02)


def test_command_line_measures_capacity(tmp_path):
    output = str(tmp_path / "a.json")
    main(["assoc_capacity", "--output", output, "--dims", "8,32", "--trials", "8", "--points", "8", "--no-plot"])
    result = json.load(open(output))
    small, large = result["per_dim"]
    assert small["dim"] == 8 and large["capacity_accuracy"] > small["capacity_accuracy"] > 0
    assert small["accuracy"][0] == 1.0 and small["fidelity"][0] == pytest.approx(1.0)  # N = 1: no crosstalk
    assert large["softmax_capacity_accuracy"] >= large["capacity_accuracy"]
    assert small["capacity_fidelity"] <= 9 < large["capacity_fidelity"] <= 33  # predicted: N = d_k + 1
    with pytest.raises(ValueError, match="dims=\\(1,\\) must be key widths >= 2"):
        AssocCapacity(dims=(1,))
