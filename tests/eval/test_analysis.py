"""eval.analysis report: per-layer sink mass, entropy and activation outliers of a trained run, as JSON and PNG; the
`python -m eval.analysis <tool>` command on the same tiny run."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import attention_stats
from configs import lm_tiny
from eval.analysis import __main__ as command
from eval.analysis import report as analysis
from eval.analysis import stats
from train import tasks, trainer
from train.run import build_run, load_run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 2-step lm_tiny:smoke run (2 layers, softmax attention)."""
    path = str(tmp_path_factory.mktemp("analysis"))
    config = lm_tiny.get_config("smoke")
    config.total_steps = 2
    trainer.run(config, path)
    return path


def test_kurtosis_of_known_arrays():
    # +-1 with equal counts: fourth moment 1, variance 1
    assert float(stats.kurtosis(jnp.array([1.0, -1.0, 1.0, -1.0]))) == pytest.approx(1.0)
    # one spike c among n zeros: (n^2 - 3n + 3) / (n - 1), whatever c
    for n, c in ((4, 1.0), (10, -7.5)):
        x = jnp.zeros(n).at[0].set(c)
        assert float(stats.kurtosis(x)) == pytest.approx((n * n - 3 * n + 3) / (n - 1), rel=1e-5)
    # along an axis, and nan for a constant row
    rows = stats.kurtosis(jnp.array([[1.0, -1.0, 1.0, -1.0], [2.0, 2.0, 2.0, 2.0]]), axis=1)
    assert float(rows[0]) == pytest.approx(1.0) and np.isnan(float(rows[1]))
    big = jax.random.normal(jax.random.key(0), (200_000,))
    assert float(stats.kurtosis(big)) == pytest.approx(3.0, abs=0.05)  # Gaussian
    out = stats.activation_stats(jnp.array([[1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, -4.0]]))
    assert float(out["max_abs"]) == 4.0 and float(out["kurtosis"]) == pytest.approx((1.0 + 7 / 3) / 2, rel=1e-5)
    assert float(out["kurtosis_max"]) == pytest.approx(7 / 3, rel=1e-5) and float(out["rms"]) == pytest.approx(2.5**0.5)


def test_uniform_causal_baseline_and_bad_length():
    assert stats.uniform_causal_first_key_mass(2) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="length=0 must be a positive int"):
        stats.uniform_causal_first_key_mass(0)


def test_run_report_matches_captured_weights(workdir):
    run = load_run(workdir)
    batch = analysis.validation_batch(run, 8)
    captured = analysis.capture(run, batch)
    report = analysis.analyze_run(workdir, batch_size=8)
    assert report["step"] == run.step == 2 and report["batch_shape"] == [8, run.config.seq_len]
    probs = attention_stats.attention_weights_by_layer(captured)
    outputs = attention_stats.sown_by_layer(captured, stats.ATTENTION_OUTPUT)
    residual = attention_stats.sown_by_layer(captured, stats.BLOCK_OUTPUT)
    assert sorted(probs) == sorted(outputs) == sorted(residual) == [0, 1]
    for entry in report["layers"]:
        p = np.asarray(probs[entry["layer"]], np.float64)  # [B, H, T, T]
        assert 0.0 <= entry["first_key_mass"] <= entry["first_key_mass_max_head"] <= 1.0
        assert entry["first_key_mass"] == pytest.approx(p[..., 0].mean(), rel=1e-5)
        assert entry["first_key_mass_max_head"] == pytest.approx(p[..., 0].mean(axis=(0, 2)).max(), rel=1e-5)
        rows = p.reshape(-1, p.shape[-1])  # every (batch, head, query) row; 0 log 0 = 0 for masked keys
        entropy = np.mean([-sum(w * np.log(w) for w in row if w > 0) for row in rows])
        assert entry["entropy"] == pytest.approx(entropy, rel=1e-5)
        x = np.asarray(residual[entry["layer"]])
        assert x.shape == (8, run.config.seq_len, run.config.model.d_model)
        assert entry["residual"]["max_abs"] == pytest.approx(np.abs(x).max(), rel=1e-6)
        assert outputs[entry["layer"]].shape == x.shape
    # capturing changes nothing: same logits with and without the interceptor
    with run.tracing():
        plain = run.task.apply({"params": run.params}, batch)
    with run.tracing(), stats.capture_outputs():
        logits, _ = run.task.apply({"params": run.params}, batch, mutable=["intermediates"])
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))


def test_gated_attention_output_is_the_projected_sublayer_output():
    """Output-gated layers run their parent's __call__ inside their own: the outer [B, T, E] value is kept."""
    config = lm_tiny.get_config("smoke")
    config.model.attention = "gated"
    task = tasks.build_task(config.model)
    batch = {"inputs": jnp.zeros((2, 8), jnp.int32)}
    params = task.init(jax.random.key(0), batch)["params"]
    with stats.capture_outputs():
        _, collections = task.apply({"params": params}, batch, mutable=["intermediates"])
    outputs = attention_stats.sown_by_layer(collections["intermediates"], stats.ATTENTION_OUTPUT)
    assert [o.shape for o in outputs.values()] == [(2, 8, config.model.d_model)] * config.model.num_layers


def test_command_writes_json_and_png(workdir, tmp_path, capsys):
    output = tmp_path / "out" / "analysis.json"
    report = analysis.main(["--workdir", workdir, "--workdir", workdir, "--output", str(output), "--batch-size", "8"])
    saved = json.loads(output.read_text())
    assert [run["attention"] for run in saved["runs"]] == ["softmax", "softmax"]
    assert saved["runs"][0]["layers"] == saved["runs"][1]["layers"]  # same checkpoint, same fixed batch
    assert set(saved["runs"][0]["means"]) == {key for key, _ in analysis.PANELS}
    assert (tmp_path / "out" / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["png_path"].endswith("analysis.png") and "| softmax | 1 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="batch_size=0 must be a positive int"):
        analysis.validation_batch(build_run(lm_tiny.get_config("smoke"), str(tmp_path)), 0)


def test_command_without_tool_name_runs_the_report(workdir, tmp_path):
    output = tmp_path / "report.json"
    report = command.main(["--workdir", workdir, "--output", str(output), "--no-plot"])
    assert json.loads(output.read_text())["runs"][0]["layers"] == report["runs"][0]["layers"]


@pytest.mark.parametrize("tool", ["sink_rate", "attention_distance", "arank", "head_ablation", "logit_attribution"])
def test_tool_command_on_a_workdir(workdir, tool):
    result = command.main([tool, "--workdir", workdir, "--batch-size", "8"])
    output = pathlib.Path(workdir) / "analysis" / f"{tool}.json"
    saved = json.loads(output.read_text())
    assert saved["tool"] == tool and saved["step"] == 2 and saved["fidelity"] == result["fidelity"]
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["layers"] == [0, 1]


def test_tool_command_bad_input_is_one_line(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        command.main(["head_ablation", "--workdir", workdir, "--batch-size", "8", "--layers", "0,5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layers=(0, 5) holds [5], out of range" in err
    with pytest.raises(SystemExit, match="'nope' is not an analysis tool"):
        command.main(["nope", "--workdir", workdir])
