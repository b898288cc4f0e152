"""stiffness on a planted block whose residual Jacobian is known in closed form: uniform causal attention (zero
queries and keys) with W_V = I and W_O = diag(d), one-hot inputs under RMSNorm, zero MLPs. At token t holding v,
J_t = sqrt(E) / (t + 1) diag(d) (I - e_v e_v^T) (to the norm's epsilon): eigenvalues sqrt(E) d_i / (t + 1) for
i != v and a neutral mode along e_v; the layer's full Jacobian is block lower-triangular with these blocks."""

import numpy as np
import pytest

from eval.analysis import TOOLS
from eval.analysis.stiffness import Stiffness, spearman, spectrum_stats
from tests.eval.planted_heads import blank_params, decoder

E = 6
D = -np.arange(1.0, E + 1)  # the OV circuit's diagonal: decay rates 1..6
TOKENS = np.array([[0, 5, 2, 2, 3]])


@pytest.fixture(scope="module")
def planted():
    model = decoder(E, E, E)
    params = blank_params(model, TOKENS.shape[1])
    attention = params["layers_0"]["attention"]
    attention["value"]["kernel"][np.arange(E), 0, np.arange(E)] = 1.0
    attention["out"]["kernel"][0, np.arange(E), np.arange(E)] = D
    return model, params


def test_spectrum_stats_and_spearman_by_hand():
    stats = spectrum_stats(np.array([-1.0, -100.0 + 3j, 2.0, 1e-9]), tolerance=1e-6)
    assert stats["ratio"] == pytest.approx(100.0) and stats["rate_max"] == 100.0
    assert stats["neutral_fraction"] == 0.25 and stats["stable_fraction"] == pytest.approx(2 / 3)
    assert np.isnan(spectrum_stats(np.zeros(3), 1e-4)["ratio"])
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 25, 99])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)


def test_planted_block_has_the_closed_form_stiffness(planted, tmp_path):
    model, params = planted
    result = Stiffness(rows=1, length=TOKENS.shape[1]).evaluate(model, params, [{"inputs": TOKENS}])
    first, second = result["per_layer"]
    expected, rates, slowest = [], [], []
    for t, v in enumerate(TOKENS[0]):  # explicit eigenvalues of each J_t, the neutral mode e_v left out
        active = np.abs(np.delete(D, v)) * np.sqrt(E) / (t + 1)
        expected.append(active.max() / active.min())
        rates.append(active.max())
        slowest.append(active.min())
    np.testing.assert_allclose(10 ** np.array(result["token_ratio_log10"][0]), expected, rtol=1e-4)
    assert first["token"]["ratio_max"] == pytest.approx(max(expected), rel=1e-4)
    assert first["token"]["rate_max"] == pytest.approx(np.mean(rates), rel=1e-4)
    assert first["token"]["neutral_fraction"] == pytest.approx(1 / E) and first["token"]["stable_fraction"] == 1.0
    assert first["sequence"]["ratio"] == pytest.approx(max(rates) / min(slowest), rel=1e-4)
    # step size: |F(x)_t| = |diag(d) sqrt(E) mean_{s <= t} e_{v_s}|, |x_t| = 1
    steps = [np.linalg.norm(D * np.sqrt(E) * np.eye(E)[TOKENS[0, : t + 1]].mean(0)) for t in range(TOKENS.shape[1])]
    assert first["step_size"] == pytest.approx(np.mean(steps), rel=1e-4)
    assert second["token"]["ratio_median"] is None and second["token"]["rate_max"] == 0.0  # F = 0: no dynamics
    assert result["fidelity"] == "reconstructed"
    paths = TOOLS["stiffness"]().write(result, str(tmp_path / "s.json"))
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_clear_error(planted):
    model, params = planted
    with pytest.raises(ValueError, match=r"layers=\(3,\) holds \[3\], out of range: the model has 2 blocks"):
        Stiffness(layers=(3,)).evaluate(model, params, [{"inputs": TOKENS}])
    with pytest.raises(ValueError, match="tolerance=2.0 must be a float in"):
        Stiffness(tolerance=2.0)
