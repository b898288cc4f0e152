"""eval.technique_probes' measurements that use a technique's own code, on freshly initialised smoke models: the
pss_attention probe against train.techniques.pss.aspect_attention_report, and patch_corruption's adl_similarity
against numpy of the ADL equations (adl_tap's module docstring). The two on models are slow (each builds a run and
compiles several forwards: 15-30 s of one core, minutes on the shared CI machine)."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import attention_stats
from configs import aspect_tiny, vit_tiny
from eval import technique_probes
from eval.trainer_api import build_run
from train.techniques import pss


def _initialised_run(config, tmp_path):
    """A trainer_api.Run of `config` with fresh parameters (seed 0) instead of a checkpoint."""
    run = build_run(config, str(tmp_path))
    return dataclasses.replace(run, params=run.init_state(jax.random.key(0)).params)


def _numpy_adl(layers, threshold):
    """L_ADL of attention weights [B, H, N, N] per layer, from the equations with numpy."""
    total = 0.0
    for weights in layers:
        rows = np.asarray(weights, np.float64).mean(axis=1)  # [B, N, N]
        mean = rows.mean(axis=1)  # [B, N]
        cut = threshold / rows.shape[-1]
        rows, mean = rows * (rows > cut), mean * (mean > cut)
        norms = (
            np.maximum(np.linalg.norm(rows, axis=-1), 1e-8) * np.maximum(np.linalg.norm(mean, axis=-1), 1e-8)[:, None]
        )
        total += np.mean(np.einsum("bik,bk->bi", rows, mean) / norms)
    return total / (len(layers) + 1e-6)


@pytest.mark.slow
def test_pss_attention_probe_matches_the_aspect_attention_report(tmp_path):
    config = aspect_tiny.get_config("smoke")
    run = _initialised_run(config, tmp_path)
    probed = technique_probes.pss_attention(run)
    technique = pss.PSS()
    technique.bind_model(dict(config.model))
    batch = run.data("valid", batch_size=technique_probes.PROBE_ROWS, per_process=False).next_batch()
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    report = jax.jit(functools.partial(pss.aspect_attention_report, technique))(run.model_params, batch)
    for key, value in report.items():
        assert probed[key] == pytest.approx(float(value), abs=1e-6), key
    assert 0.0 <= probed["evidence_top1"] <= 1.0 and probed["mined_per_row"] >= probed["active_per_row"]


def test_pss_attention_probe_refuses_other_tasks():
    run = types.SimpleNamespace(config=vit_tiny.get_config("smoke"))  # refused from the config, before any forward
    with pytest.raises(ValueError, match=r"probe 'pss_attention' needs a classifier on data.name='aspect_sentiment'"):
        technique_probes.pss_attention(run)


@pytest.mark.slow
def test_patch_corruption_reports_the_adl_similarity_of_the_clean_forward(tmp_path):
    run = _initialised_run(vit_tiny.get_config("smoke"), tmp_path)
    probed = technique_probes.patch_corruption(run)
    images = run.data("valid", batch_size=technique_probes.PROBE_ROWS, per_process=False).next_batch()["images"]
    _, collections = run.task.model.apply({"params": run.model_params}, jnp.asarray(images), mutable=["intermediates"])
    by_layer = attention_stats.attention_weights_by_layer(collections["intermediates"])
    expected = _numpy_adl([by_layer[i] for i in sorted(by_layer)], technique_probes.ADL_THRESHOLD)
    assert probed["adl_similarity"] == pytest.approx(expected, rel=1e-4)
    assert sorted(probed) == ["accuracy/patches_0", "accuracy/patches_10", "accuracy/patches_25", "adl_similarity"]
