"""adl_tap: the attention diversification loss for ViTs — no-op setting, the loss against numpy loops, its
gradient lowering the similarity, the train step's scalars, and config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import attention_stats
from configs import vit_tiny
from eval.technique_probes import corrupt_patches
from tests.train.test_techniques import _assert_trees_equal, _config, _train
from train import config_checks
from train.config_checks import ConfigError
from train.techniques import adl_tap


def _vit_config(*entries):
    config = vit_tiny.get_config("smoke")
    config.techniques = list(entries)
    return config


@functools.cache
def vit_baseline():
    return _train(_vit_config())


def _numpy_adl(layers, threshold):
    """Explicit loops over layers, batch and queries of the official AttentionDiversificationLoss."""
    total = 0.0
    for weights in layers:
        b, h, n, _ = weights.shape
        mean_heads = weights.mean(axis=1)
        cut = threshold / n
        sims = []
        for bi in range(b):
            mean_row = mean_heads[bi].mean(axis=0)
            mean_row = mean_row * (mean_row > cut)
            for i in range(n):
                row = mean_heads[bi, i] * (mean_heads[bi, i] > cut)
                denom = max(np.linalg.norm(row), 1e-8) * max(np.linalg.norm(mean_row), 1e-8)
                sims.append(float(row @ mean_row) / denom)
        total += np.mean(sims)
    return total / (len(layers) + 1e-6)


def _random_attention(rng, shape, sharpness):
    logits = rng.standard_normal(shape) * sharpness
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def test_diversification_loss_matches_numpy():
    rng = np.random.default_rng(0)
    layers = [_random_attention(rng, (2, 3, 6, 6), 2.0).astype(np.float32) for _ in range(2)]
    expected = _numpy_adl(layers, 1.0)  # keep entries above the uniform 1/N
    got = jax.jit(lambda ws: adl_tap.diversification_loss(ws, 1.0))([jnp.asarray(w) for w in layers])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert 0.0 < expected < 1.0


def test_identical_rows_give_one_and_disjoint_rows_below_the_threshold_give_zero():
    one_hot = np.zeros((1, 1, 4, 4), np.float32)
    one_hot[0, 0, :, 2] = 1.0  # every query attends the same key
    np.testing.assert_allclose(adl_tap.layer_similarity(jnp.asarray(one_hot), 2.0), 1.0, rtol=1e-6)
    diagonal = np.eye(4, dtype=np.float32)[None, None]  # the mean row is uniform 1/4 < 2/4: zeroed
    assert float(adl_tap.layer_similarity(jnp.asarray(diagonal), 2.0)) == 0.0


def test_gradient_step_lowers_the_similarity():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((2, 2, 8, 8)) * 3.0, jnp.float32)
    loss = lambda z: adl_tap.layer_similarity(jax.nn.softmax(z, axis=-1), 1.0)  # noqa: E731
    before, after = jax.jit(lambda z: (loss(z), loss(z - 0.5 * jax.grad(loss)(z))))(logits)
    assert float(after) < float(before)


@pytest.mark.slow
def test_adl_off_trains_exactly_as_the_baseline():
    params, metrics = _train(_vit_config({"name": "adl_tap", "weight": 0.0}))
    _assert_trees_equal(vit_baseline()[0][-1], params[-1])
    assert [m["loss"] for m in metrics] == [m["loss"] for m in vit_baseline()[1]]


@pytest.mark.slow
def test_adl_on_adds_its_weighted_similarity_to_the_loss():
    # threshold 0.5: the fresh model's near-uniform rows (about 1/N) stay above 0.5/N, so the similarity is not 0
    _, metrics = _train(_vit_config({"name": "adl_tap", "weight": 0.5, "threshold": 0.5}), steps=1)
    scalars = metrics[0]
    similarity = float(scalars["technique/adl_tap/similarity"])
    assert 0.0 < similarity <= 1.0
    np.testing.assert_allclose(float(scalars["technique/adl_tap/loss"]), 0.5 * similarity, rtol=1e-6)
    assert {"technique/adl_tap/similarity/layer_0", "technique/adl_tap/similarity/layer_1"} <= set(scalars)


def test_adl_refuses_other_model_kinds_and_bad_options():
    with pytest.raises(ConfigError, match=r"'adl_tap' trains model kinds \('vit',\); model.kind='decoder'"):
        config_checks.check_config(_config({"name": "adl_tap"}))
    with pytest.raises(ConfigError, match=r"threshold=-1 must be a number >= 0"):
        config_checks.check_config(_vit_config({"name": "adl_tap", "threshold": -1}))
    config = _vit_config({"name": "adl_tap"})
    config.model.attention = "hedgehog"
    with pytest.raises(ConfigError, match=r"'adl_tap' regularises the attention probabilities.*'hedgehog'"):
        config_checks.check_config(config)


@pytest.mark.slow
def test_adl_side_by_side_robustness_to_patch_corruption():
    """vit_tiny:sweep for 300 steps without and with adl_tap (weight 1 = official, and 0.1; threshold 2); prints the
    accuracy of each on 512 validation images, clean and with 10% / 25% of the 4x4 patches replaced by noise, and the
    mean ADL similarity of their attention. Checks only that ADL lowers the similarity it penalises."""
    from train import tasks
    from train.data import make_source

    results = {}
    runs = (("baseline", []), ("adl", [{"name": "adl_tap"}]), ("adl_0.1", [{"name": "adl_tap", "weight": 0.1}]))
    for name, entries in runs:
        config = vit_tiny.get_config("sweep")
        config.total_steps = 300
        config.techniques = entries
        params, _ = _train(config, steps=300)
        model_params = {k: v for k, v in params[-1].items() if k != "techniques"}
        task = tasks.build_task(config.model)
        source = make_source("images", split="valid", batch_size=512, seed=0, image_size=32, num_classes=4)
        batch = source.batch_at(0)

        @jax.jit
        def forward(images, p=model_params, model=task.model):
            return model.apply({"params": p}, images, mutable=["intermediates"])

        row = {}
        for label, fraction in (("clean", 0.0), ("patches_10", 0.1), ("patches_25", 0.25)):
            images = corrupt_patches(batch["images"], 4, fraction, np.random.default_rng(1))
            logits, collections = forward(jnp.asarray(images))
            row[label] = float(np.mean(np.argmax(np.asarray(logits), -1) == batch["labels"]))
            if label == "clean":
                layers = attention_stats.attention_weights_by_layer(collections["intermediates"])
                row["similarity"] = float(adl_tap.diversification_loss([layers[i] for i in sorted(layers)], 2.0))
        results[name] = row
    print(results)
    assert max(results["adl"]["similarity"], results["adl_0.1"]["similarity"]) < results["baseline"]["similarity"]
