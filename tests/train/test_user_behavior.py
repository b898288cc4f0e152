"""The recommendation task: the user_behavior source (determinism, the planted click rule by explicit loops), the
binned AUC against an explicit pair count, the CTR model's shapes and errors, and short training runs per preset."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.models.ctr import CTRModel
from configs import recsys_tiny
from tests.train.test_techniques import _train
from train import tasks
from train.data import make_source
from train.data.user_behavior import item_categories


def _source(split="train", **options):
    defaults = dict(batch_size=16, seq_len=12, seed=5, num_items=24, num_categories=6, num_interests=2)
    return make_source("user_behavior", split=split, **(defaults | options))


# --- data ----------------------------------------------------------------------------------------------------


def test_labels_follow_the_planted_interests():
    source = _source(interest_rate=0.7)
    batch = source.batch_at(1)
    assert batch["behaviours"].shape == (16, 12) and batch["interests"].shape == (16, 2)
    from_interests = 0
    for b in range(16):
        interests = set(batch["interests"][b].tolist())
        assert len(interests) == 2
        assert batch["target"][b] % 6 == batch["target_category"][b]
        assert batch["labels"][b] == int(batch["target_category"][b] in interests)
        for j in range(12):
            item = batch["behaviours"][b, j]
            assert 0 <= item < 24 and item % 6 == batch["behaviour_categories"][b, j]
            from_interests += int(batch["behaviour_categories"][b, j] in interests)
    # 70% planted plus noise landing on an interest (2 of 6 categories): 0.7 + 0.3 * 2 / 6 = 0.8 of 192 behaviours
    assert 0.65 < from_interests / 192 < 0.95
    np.testing.assert_array_equal(item_categories(24, 6), [i % 6 for i in range(24)])


def test_clicks_are_balanced():
    labels = np.concatenate([_source(batch_size=64).batch_at(i)["labels"] for i in range(8)])
    assert 0.4 < labels.mean() < 0.6


def test_source_is_deterministic_and_resumable():
    source = _source()
    first = [source.next_batch() for _ in range(3)]
    state = source.get_state()
    following = source.next_batch()
    again = _source()
    again.set_state(state)
    resumed = again.next_batch()
    for key in following:
        np.testing.assert_array_equal(resumed[key], following[key])
    np.testing.assert_array_equal(_source().batch_at(1)["behaviours"], first[1]["behaviours"])
    assert not np.array_equal(_source(split="valid").batch_at(0)["behaviours"], first[0]["behaviours"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_items": 11}, r"num_items must be >= 12, got 11"),
        ({"num_interests": 6}, r"num_interests=6 must be < num_categories=6"),
        ({"interest_rate": 1.0}, r"interest_rate must be in \(0.0, 1.0\), got 1.0"),
        ({"num_users": 3}, r"unknown option\(s\) for data source 'user_behavior': 'num_users'"),
    ],
)
def test_source_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        _source(**options)


# --- AUC -----------------------------------------------------------------------------------------------------


def _pair_auc(scores, labels, weights):
    """Explicit loop over (positive, negative) pairs: weighted share of pairs the positive wins, ties 1/2."""
    wins = total = 0.0
    for i, j in itertools.product(range(len(scores)), repeat=2):
        if labels[i] == 1 and labels[j] == 0:
            pair = weights[i] * weights[j]
            total += pair
            wins += pair * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
    return wins / total


def test_binned_auc_matches_the_pair_count_and_adds_across_batches():
    rng = np.random.default_rng(0)
    bins = 64
    # scores at bin centres in sigmoid space, several examples per bin (ties across the labels), two batches
    probabilities = (rng.integers(0, bins, size=40) + 0.5) / bins
    scores = np.log(probabilities / (1 - probabilities)).astype(np.float32)
    labels = rng.integers(0, 2, size=40)
    weights = rng.uniform(0.5, 2.0, size=40).astype(np.float32)
    halves = [
        tasks.binned_auc_sums(jnp.asarray(scores[s]), jnp.asarray(labels[s]), jnp.asarray(weights[s]), bins)
        for s in (slice(0, 25), slice(25, 40))
    ]
    total = jax.tree.map(jnp.add, *halves)
    expected = _pair_auc(probabilities, labels, weights)
    np.testing.assert_allclose(float(tasks.binned_auc(total["auc_positive"], total["auc_negative"])), expected, 1e-6)
    assert float(tasks.binned_auc(jnp.ones(4), jnp.zeros(4))) == 0.5  # no negatives: undefined, reported as chance


# --- model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"embedding": "tied"}, r"embedding='tied' is not supported"),
        ({"query": "first"}, r"query='first' is not supported"),
        ({"num_heads": 3}, r"head_dim=None needs num_heads=3 to divide 32"),
    ],
)
def test_ctr_model_rejects_bad_fields(fields, message):
    ids = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=message):
        CTRModel(**fields).init(jax.random.key(0), ids, ids[:, 0])


def test_ctr_model_target_attention_ignores_behaviour_order():
    """Cross target attention without positions sees the behaviours as a set: permuting them keeps the logits."""
    model = CTRModel(num_items=10, d_model=8, mlp_dim=8, attention_options={"position": "none"})
    behaviours = jnp.asarray([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]])
    target = jnp.asarray([3, 1])
    variables = jax.jit(model.init)(jax.random.key(0), behaviours, target)
    apply = jax.jit(model.apply)
    logits = apply(variables, behaviours, target)
    assert logits.shape == (2, 2) and np.all(np.asarray(logits[:, 0]) == 0.0)
    permuted = apply(variables, behaviours[:, ::-1], target)
    np.testing.assert_allclose(permuted, logits, rtol=1e-5, atol=1e-6)


def test_ctr_model_decoupled_attention_table_only_sets_the_scores():
    """DARE: with one behaviour its attention weight is 1 whatever the scores, so the logits must not depend on the
    attention table (the MLP sees E_rep only); the representation table does change them."""
    model = CTRModel(num_items=10, embedding="decoupled", attention="dare", attention_dim=4, representation_dim=4)
    behaviours, target = jnp.asarray([[2], [7]]), jnp.asarray([5, 1])
    variables = jax.jit(model.init)(jax.random.key(0), behaviours, target)
    tables = variables["params"]["DecoupledEmbedding_0"]
    assert set(tables) == {"attention", "representation"}
    apply = jax.jit(model.apply)
    logits = apply(variables, behaviours, target)

    for table, changes in (("attention", False), ("representation", True)):
        params = dict(variables["params"])
        params["DecoupledEmbedding_0"] = dict(tables) | {table: jax.tree.map(lambda x: x + 1.0, tables[table])}
        moved = apply({"params": params}, behaviours, target)
        assert changes != bool(np.allclose(moved, logits, atol=1e-6)), table


# --- training ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["smoke", "smoke_dare", "smoke_mqsa"])
def test_presets_train_four_steps(preset):
    config = recsys_tiny.get_config(preset)
    params, metrics = _train(config, steps=4)
    assert all(np.isfinite(m["loss"]) and 0.0 <= m["auc"] <= 1.0 for m in metrics)
    assert config.model.attention == {"smoke": "softmax"}.get(preset, preset.removeprefix("smoke_"))
    first, last = jax.tree.leaves(params[0]), jax.tree.leaves(params[-1])
    assert any(not np.array_equal(a, b) for a, b in zip(first, last, strict=True))
