"""eval.techniques from the command line: --out_dir with --presets, --separately, --probe (training replaced by a
recorder, so these check the plumbing only), and the probes' patch corruption against explicit loops."""

import json

import numpy as np
import pytest

from eval import technique_probes
from eval import techniques as evaluator

CALLS = []


def _fake_run(config, probe=None):
    """What _train_and_read returns, from the config alone (no training); records (technique names, probe)."""
    names = [entry["name"] for entry in evaluator._plain(config.techniques)]
    CALLS.append(("+".join(names), probe))
    return {
        "train_loss": {1: 1.0},
        "eval_loss": {1: 1.0},
        "entropy": {"0": {1: 0.5}},
        "technique_scalars": {},
        "eval": {"accuracy": {1: 0.5}},
        "seconds": 0.0,
        "diverged_at": None,
        "probe": {"accuracy/patches_0": 0.25 * len(names)},
    }


def test_presets_honour_out_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluator, "_train_and_read", _fake_run)
    CALLS.clear()
    argv = ["--config", "configs/vit_tiny.py", "--presets", "sweep,tap_adl", "--out_dir", str(tmp_path), "--name", "x"]
    evaluator.main(argv + ["--probe", "patch_corruption"])
    saved = json.loads((tmp_path / "x.json").read_text())
    assert (tmp_path / "x.png").stat().st_size > 0
    assert CALLS == [("", "patch_corruption"), ("adl_tap", "patch_corruption")]
    assert saved["summary"]["tap_adl"]["probe"] == {"accuracy/patches_0": 0.25}
    assert saved["configs"]["tap_adl"]["model"]["token_pooling"] == "tap"
    assert saved["configs"]["sweep"]["model"]["token_pooling"] is None


def test_separately_trains_each_technique_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluator, "_train_and_read", _fake_run)
    CALLS.clear()
    techniques = "techniques=[{'name': 'attention_iat'}, {'name': 'attention_ivat'}]"
    argv = ["--config", "configs/aspect_tiny.py", "--set", techniques, "--separately", "--out_dir", str(tmp_path)]
    record = evaluator.main(argv + ["--name", "y"])
    assert list(record["runs"]) == ["baseline", "attention_iat", "attention_ivat"]
    assert CALLS == [("", None), ("attention_iat", None), ("attention_ivat", None)]
    assert (tmp_path / "y.json").exists() and (tmp_path / "y.png").stat().st_size > 0


def test_unknown_probe_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluator, "_train_and_read", lambda *a: pytest.fail("trained despite a bad probe"))
    argv = ["--config", "configs/vit_tiny.py", "--presets", "sweep,tap_adl", "--out_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"probe='patch' is unknown; expected one of \['aspect_evidence', 'patch_"):
        evaluator.main(argv + ["--probe", "patch"])


def test_corrupt_patches_replaces_the_chosen_cells_only():
    images = np.full((2, 8, 8, 3), 5.0)  # noise is in [0, 1): every replaced pixel differs from 5
    out = technique_probes.corrupt_patches(images, 4, 0.5, np.random.default_rng(0))
    for row in range(2):
        replaced = [(i, j) for i in (0, 4) for j in (0, 4) if np.all(out[row, i : i + 4, j : j + 4] < 1.0)]
        kept = [(i, j) for i in (0, 4) for j in (0, 4) if np.all(out[row, i : i + 4, j : j + 4] == 5.0)]
        assert len(replaced) == 2 and len(kept) == 2  # round(0.5 * 4) cells of each image
    assert np.all(images == 5.0)  # the input is not modified
    with pytest.raises(ValueError, match=r"fraction=1.5 must be in \[0, 1\]"):
        technique_probes.corrupt_patches(images, 4, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"patch=3 must divide the image size 8x8"):
        technique_probes.corrupt_patches(images, 3, 0.5, np.random.default_rng(0))
