"""The multiple-instance-learning task: the mil_bags source, the attention-MIL model (ABMIL gated attention, ACMIL
branches and top-k masking) against numpy, the localisation sums against explicit loops, and a smoke run."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.models.mil import AttentionMIL, localization_sums
from configs import mil_tiny
from tests.train.test_techniques import _train
from train import trainer
from train.data import make_source


def mil_config(*techniques, preset="smoke"):
    """mil_tiny:<preset> with `techniques` (entries {"name": ..., options}) in config.techniques."""
    config = mil_tiny.get_config(preset)
    config.techniques = list(techniques)
    return config


@functools.cache
def mil_baseline():
    """(parameters, metrics) of two train steps of mil_tiny:smoke without techniques, computed once per process."""
    return _train(mil_config())


def _source(split="train", **options):
    defaults = dict(batch_size=6, seq_len=10, seed=3, min_instances=5, feature_dim=4)
    return make_source("mil_bags", split=split, **(defaults | options))


# --- data ----------------------------------------------------------------------------------------------------


def test_bag_labels_are_the_max_of_the_planted_instance_labels():
    source = _source(max_positives=3)
    batch = source.batch_at(2)
    assert batch["instances"].shape == (6, 10, 4) and batch["instance_labels"].shape == (6, 10)
    for b in range(6):
        n = batch["lengths"][b]
        assert 5 <= n <= 10
        np.testing.assert_array_equal(batch["instances"][b, n:], 0.0)
        assert not batch["instance_labels"][b, n:].any()
        count = batch["instance_labels"][b].sum()
        assert batch["labels"][b] == int(count > 0)
        assert count <= 3
        positives = batch["instances"][b][batch["instance_labels"][b] == 1]
        # planted positives sit around the positive prototype (noise 1 in 4-D: well within 6 std of the norm)
        assert np.all(np.linalg.norm(positives - source.positive_prototype, axis=1) < 6.0)


def test_source_is_deterministic_resumable_and_shares_prototypes_across_splits():
    source = _source()
    first = [source.next_batch() for _ in range(3)]
    state = source.get_state()
    following = source.next_batch()
    again = _source()
    again.set_state(state)
    np.testing.assert_array_equal(again.next_batch()["instances"], following["instances"])
    np.testing.assert_array_equal(_source().batch_at(1)["instances"], first[1]["instances"])
    valid = _source(split="valid")
    np.testing.assert_array_equal(valid.positive_prototype, source.positive_prototype)
    assert not np.array_equal(valid.batch_at(0)["instances"], first[0]["instances"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_instances": 11}, r"min_instances=11 must be <= seq_len=10"),
        ({"max_positives": 6}, r"max_positives=6 must be <= the smallest bag \(5 instances\)"),
        ({"noise": 0}, r"noise must be a number > 0, got 0"),
        ({"positive_fraction": 1.0}, r"positive_fraction must be in \(0.0, 1.0\), got 1.0"),
        ({"bag_size": 3}, r"unknown option\(s\) for data source 'mil_bags': 'bag_size'"),
    ],
)
def test_bad_source_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        _source(**options)


# --- model ---------------------------------------------------------------------------------------------------


def _init(model, batch):
    return nn.unbox(model.init(jax.random.key(0), jnp.asarray(batch["instances"]))["params"])


def _numpy_forward(p, x, length, branches):
    """ABMIL / ACMIL forward of one bag from the equations: x [N, F] -> (bag logits [C], attention [K, n])."""
    h = np.maximum(x[:length] @ p["embed"]["kernel"] + p["embed"]["bias"], 0.0)
    v = np.tanh(h @ p["attention_v"]["kernel"] + p["attention_v"]["bias"])
    u = 1.0 / (1.0 + np.exp(-(h @ p["attention_u"]["kernel"] + p["attention_u"]["bias"])))
    scores = ((v * u) @ p["attention_w"]["kernel"] + p["attention_w"]["bias"]).T  # [K, n]
    a = np.exp(scores - scores.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)
    z = a.mean(axis=0) @ h
    assert a.shape[0] == branches
    return z @ p["classifier"]["kernel"] + p["classifier"]["bias"], a


@pytest.mark.parametrize("branches", [1, 3])
def test_gated_attention_pooling_matches_numpy_and_ignores_padding(branches):
    batch = _source().batch_at(0)
    model = AttentionMIL(d_model=8, attention_dim=4, branches=branches)
    params = _init(model, batch)
    lengths = jnp.asarray(batch["lengths"])
    apply = jax.jit(lambda x: model.apply({"params": params}, x, lengths=lengths, mutable=["intermediates"]))
    out, sown = apply(jnp.asarray(batch["instances"]))
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    for b in range(6):
        n = int(batch["lengths"][b])
        logits, attention = _numpy_forward(p, batch["instances"][b].astype(np.float64), n, branches)
        np.testing.assert_allclose(out.logits[b], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.attention[b, :n], attention.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out.attention[b, n:], 0.0)
        np.testing.assert_allclose(sown["intermediates"]["mil_attention"][0][b, :, :n], attention, atol=1e-6)
    assert ("branch_logits" in sown["intermediates"]) == (branches > 1)
    garbage = np.where(np.arange(10)[None, :, None] >= batch["lengths"][:, None, None], 7.0, batch["instances"])
    again, _ = apply(jnp.asarray(garbage))
    np.testing.assert_array_equal(again.logits, out.logits)


def test_keep_removes_instances_like_a_shorter_bag():
    batch = _source(min_instances=10).batch_at(0)
    model = AttentionMIL(d_model=8, attention_dim=4)
    params = _init(model, batch)
    keep = np.ones((6, 10), bool)
    keep[:, 6:] = False
    removed = model.apply({"params": params}, jnp.asarray(batch["instances"]), keep=jnp.asarray(keep))
    shorter = model.apply({"params": params}, jnp.asarray(batch["instances"]), lengths=jnp.full((6,), 6))
    np.testing.assert_allclose(removed.logits, shorter.logits, rtol=1e-6, atol=1e-6)


def test_top_k_instance_masking_drops_a_random_part_of_each_branch_top_k_while_training_only():
    batch = _source(min_instances=10).batch_at(0)
    model = AttentionMIL(d_model=8, attention_dim=4, branches=3, mask_top_k=4, mask_drop=0.5)
    params = _init(model, batch)
    x = jnp.asarray(batch["instances"])

    @jax.jit
    def forward():
        rngs = {"dropout": jax.random.key(5)}
        clean = model.apply({"params": params}, x, rngs=rngs, mutable=["intermediates"])
        trained = model.apply({"params": params}, x, deterministic=False, rngs=rngs, mutable=["intermediates"])
        return clean, trained

    (plain, clean), (_, trained) = forward()
    scores = np.asarray(clean["intermediates"]["mil_scores"][0])
    masked = np.asarray(trained["intermediates"]["mil_scores"][0]) == -1e9
    for b in range(6):
        for k in range(3):
            top4 = set(np.argsort(-scores[b, k])[:4])
            dropped = set(np.flatnonzero(masked[b, k]))
            assert len(dropped) == 2 and dropped <= top4  # floor(4 * 0.5) of the top 4
    np.testing.assert_array_equal(np.asarray(trained["intermediates"]["mil_attention"][0])[masked], 0.0)
    unmasked = jax.jit(lambda x: model.apply({"params": params}, x))(x)  # no dropout key: nothing to mask with
    np.testing.assert_allclose(plain.logits, unmasked.logits, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_instance_transformer_blocks_keep_padding_out():
    batch = _source().batch_at(0)
    model = AttentionMIL(d_model=8, attention_dim=4, num_layers=1, num_heads=2, mlp_dim=16, attention="softmax")
    params = _init(model, batch)
    lengths = jnp.asarray(batch["lengths"])
    apply = jax.jit(lambda x: model.apply({"params": params}, x, lengths=lengths))
    garbage = np.where(np.arange(10)[None, :, None] >= batch["lengths"][:, None, None], 7.0, batch["instances"])
    clean, noisy = apply(jnp.asarray(batch["instances"])), apply(jnp.asarray(garbage))
    assert "layers_0" in params
    np.testing.assert_allclose(noisy.logits, clean.logits, rtol=1e-5, atol=1e-6)


def test_bad_model_fields_are_named():
    x = jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match=r"branches=0 must be an int >= 1"):
        AttentionMIL(branches=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"mask_drop=1.5 must be a fraction in \[0, 1\]"):
        AttentionMIL(mask_drop=1.5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"instances must be \[batch, instances, features\]; got shape \(4, 3\)"):
        AttentionMIL().init(jax.random.key(0), x[0])


# --- localisation metrics ----------------------------------------------------------------------------------------


def test_localization_sums_match_explicit_loops():
    rng = np.random.default_rng(0)
    attention = rng.random((5, 6)).astype(np.float32)
    attention[0, 2] = attention[0, 4]  # a tie
    instance_labels = np.zeros((5, 6), np.int32)
    instance_labels[0, [2, 3]] = 1
    instance_labels[1, 5] = 1
    instance_labels[3, :4] = 1  # every valid instance positive: AUC counts 1
    labels = (instance_labels.sum(axis=1) > 0).astype(np.int32)
    lengths = np.array([6, 6, 5, 4, 6], np.int32)
    sums = jax.jit(localization_sums)(
        jnp.asarray(attention), jnp.asarray(instance_labels), jnp.asarray(labels), jnp.asarray(lengths)
    )
    auc, hits, mass = 0.0, 0.0, 0.0
    for b in np.flatnonzero(labels):
        pos = [i for i in range(lengths[b]) if instance_labels[b, i] == 1]
        neg = [i for i in range(lengths[b]) if instance_labels[b, i] == 0]
        wins = sum(1.0 if attention[b, p] > attention[b, q] else 0.5 if attention[b, p] == attention[b, q] else 0.0
                   for p in pos for q in neg)  # fmt: skip
        auc += wins / (len(pos) * len(neg)) if neg else 1.0
        hits += float(instance_labels[b, int(np.argmax(attention[b]))] == 1)
        mass += attention[b, pos].sum()
    np.testing.assert_allclose(float(sums["instance_auc_sum"]), auc, rtol=1e-6)
    assert float(sums["top1_hit_sum"]) == hits and float(sums["positive_bags"]) == 3
    np.testing.assert_allclose(float(sums["positive_mass_sum"]), mass, rtol=1e-6)


# --- the training task -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mil_smoke_run_reports_bag_accuracy_and_localisation(tmp_path):
    result = trainer.run(mil_tiny.get_config("smoke"), str(tmp_path / "run"))
    assert result.step == 6
    for name in ("accuracy", "instance_auc", "top1_hit", "positive_mass"):
        assert 0.0 <= result.eval_metrics[f"eval/{name}"] <= 1.0
    assert np.isfinite(result.eval_metrics["eval/loss"])


def test_preset_comparison_needs_two_presets():
    from eval import techniques as evaluator

    with pytest.raises(ValueError, match=r"presets=\('aem',\) must name at least two presets"):
        evaluator.PresetComparison("configs/mil_tiny.py", ("aem",))
