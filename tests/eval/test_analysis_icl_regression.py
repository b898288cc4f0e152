"""icl_regression: closed forms by explicit loops, a planted two-head layer that implements one debiased GD step (the
paper's KQ = +-omega I, OV = +-1/(2 omega) construction), the command line, and (slow) the training dynamics."""

import json

import jax
import numpy as np
import pytest

from eval.analysis import TOOLS
from eval.analysis.__main__ import main
from eval.analysis.icl_layer import context_layer, predict
from eval.analysis.icl_regression import ICLRegression, closed_forms, regression_prompts

DIM, CONTEXT, OMEGA = 3, 8, 0.02


def _loop_forms(z):
    """gd and debiased_gd predictions at the query, one prompt at a time, by explicit sums."""
    gd, debiased = [], []
    for prompt in z:
        xs, ys, query = prompt[:-1, :-1], prompt[:-1, -1], prompt[-1, :-1]
        mean = sum(xs) / len(xs)
        gd.append(sum(y * float(x @ query) for x, y in zip(xs, ys, strict=True)) / len(xs))
        debiased.append(sum(y * float((x - mean) @ query) for x, y in zip(xs, ys, strict=True)) / len(xs))
    return np.array(gd), np.array(debiased)


def _planted():
    """Two heads: logits +-omega x_l . x_q over the x block, values carry y, outputs +-1/(2 omega) into y."""
    model = context_layer(num_heads=2, head_dim=DIM + 1)
    e = DIM + 1
    wq, wk, wv = (np.zeros((e, 2, e)) for _ in range(3))
    wo = np.zeros((2, e, e))
    for head, sign in enumerate((1.0, -1.0)):
        wq[np.arange(DIM), head, np.arange(DIM)] = sign * OMEGA
        wk[np.arange(DIM), head, np.arange(DIM)] = 1.0
        wv[DIM, head, DIM] = 1.0
        wo[head, DIM, DIM] = sign / (2 * OMEGA)
    return model, {"query": {"kernel": wq}, "key": {"kernel": wk}, "value": {"kernel": wv}, "out": {"kernel": wo}}


def test_closed_forms_match_explicit_loops():
    batch = regression_prompts(jax.random.key(0), 5, DIM, CONTEXT, noise=0.0)
    z = np.asarray(batch["inputs"], np.float64)
    forms = closed_forms(z, noise=0.0)
    gd, debiased = _loop_forms(z)
    np.testing.assert_allclose(forms["gd"], gd, rtol=1e-10)
    np.testing.assert_allclose(forms["debiased_gd"], debiased, rtol=1e-10)
    # noiseless, L >= d: least squares recovers beta, so it predicts the query exactly
    np.testing.assert_allclose(forms["least_squares"], np.asarray(batch["targets"]), atol=1e-4)
    np.testing.assert_allclose(forms["bayes"], forms["least_squares"])


def test_planted_layer_is_one_debiased_gd_step(tmp_path):
    model, params = _planted()
    batch = regression_prompts(jax.random.key(1), 64, DIM, CONTEXT, noise=0.0)
    z = np.asarray(batch["inputs"], np.float64)
    # the layer's prediction against the softmax-weighted mean written out (query excluded from the keys)
    reference = []
    for prompt in z:
        xs, ys, query = prompt[:-1, :-1], prompt[:-1, -1], prompt[-1, :-1]
        total = 0.0
        for sign in (1.0, -1.0):
            weights = np.exp(sign * OMEGA * (xs @ query))
            total += sign / (2 * OMEGA) * float(weights @ ys / weights.sum())
        reference.append(total)
    np.testing.assert_allclose(np.asarray(predict(model, params, batch["inputs"], CONTEXT)[:, 0]), reference, atol=2e-3)
    _, debiased = _loop_forms(z)
    np.testing.assert_allclose(reference, debiased, atol=0.02 * np.abs(debiased).max())  # O(omega^2) apart

    result = ICLRegression(dim=DIM, context=CONTEXT).evaluate(model, params, [batch])
    assert result["agreement"]["debiased_gd"]["explained"] > 0.999
    assert result["agreement"]["debiased_gd"]["step_size"] == pytest.approx(1.0, abs=0.01)
    assert result["agreement"]["gd"]["explained"] < result["agreement"]["debiased_gd"]["explained"]
    for head, sign in zip(result["heads"], (1.0, -1.0), strict=True):
        assert head["kq_diag"] == pytest.approx(sign * OMEGA)
        assert head["kq_spread"] == pytest.approx(0.0) and head["kq_offdiag"] == pytest.approx(0.0)
        assert head["ov_last"] == pytest.approx(sign / (2 * OMEGA)) and head["ov_last_share"] == pytest.approx(1.0)
    assert result["ov_zero_sum"] == pytest.approx(0.0) and result["mse"]["least_squares"] < 1e-6
    assert result["fidelity"] == "paper" and result["rows"] == 64
    paths = TOOLS["icl_regression"]().write(result, str(tmp_path / "icl.json"))
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_command_line_trains_its_own_layer(tmp_path):
    output = str(tmp_path / "icl.json")
    main(
        ["icl_regression", "--output", output, "--dim", "2", "--context", "4", "--num-heads", "2", "--head-dim", "3"]
        + ["--steps", "4", "--batch", "8", "--log-every", "2", "--eval-rows", "16", "--no-plot"]
    )
    result = json.load(open(output))
    assert result["curve"]["step"] == [2, 4] and len(result["curve"]["kq_diag"][0]) == 2
    assert np.isfinite(result["mse"]["model"]) and result["rows"] == 16


def test_bad_input_is_one_clear_error(capsys):
    with pytest.raises(ValueError, match="context=0 must be a positive int"):
        ICLRegression(context=0)
    with pytest.raises(ValueError, match="noise=-1.0 must be a float >= 0"):
        ICLRegression(noise=-1.0)
    model, params = _planted()
    wrong = regression_prompts(jax.random.key(0), 2, DIM, CONTEXT + 1, noise=0.0)
    with pytest.raises(ValueError, match=r"expected \[B, 9, 4\] \(context=8, dim=3\)"):
        ICLRegression(dim=DIM, context=CONTEXT).evaluate(model, params, [wrong])
    with pytest.raises(SystemExit):
        main(["icl_regression", "--steps", "3"])
    assert capsys.readouterr().err.strip() == "error: icl_regression trains its own model: give --output (a JSON path)"


@pytest.mark.slow
def test_training_learns_the_debiased_gd_pattern():
    result = ICLRegression(
        dim=3, context=12, num_heads=2, head_dim=4, steps=600, batch=128, eval_rows=1024
    ).standalone_run()
    assert result["curve"]["loss"][-1] < 0.5 * result["curve"]["loss"][0]
    assert result["mse"]["model"] < 0.5 * result["mse"]["zero"]
    assert result["agreement"]["debiased_gd"]["explained"] > 0.9
    signs = sorted(np.sign(head["kq_diag"]) * np.sign(head["ov_last"]) for head in result["heads"])
    assert signs == [1.0, 1.0] and abs(result["ov_zero_sum"]) < 0.3  # omega_h u_h > 0 for both, u_1 + u_2 ~ 0
