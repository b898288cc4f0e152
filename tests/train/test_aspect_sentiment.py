"""The aspect-sentiment source: the label is the polarity of the opinion words tied to the queried aspect, the
evidence and context keys mark them, batches are deterministic, and bad options are named."""

import numpy as np
import pytest

from configs import aspect_tiny
from train import config_checks
from train.data import make_source
from train.data.aspect_sentiment import AspectSentimentSource


def _source(**options):
    return make_source("aspect_sentiment", batch_size=6, seq_len=20, seed=3, **options)


def test_label_is_the_polarity_of_the_queried_aspects_opinion_words():
    source = _source()
    a, o = 8, 8
    first_aspect, first_positive, first_negative, first_filler = 2, 2 + a, 2 + a + o, 2 + a + 2 * o
    for step in range(3):
        batch = source.batch_at(step)
        for row in range(6):
            tokens = batch["inputs"][row]
            position = int(batch["aspect_positions"][row])
            assert tokens[1] == 1 and tokens[0] == tokens[position]  # the query names the mention's aspect
            assert first_aspect <= tokens[0] < first_positive
            evidence = [t for t in range(20) if batch["evidence"][row, t]]
            assert len(evidence) == 2 and all(position < t <= position + 3 for t in evidence)
            label = int(batch["labels"][row])
            for t in evidence:
                word = int(tokens[t])
                assert (first_positive <= word < first_negative) == (label == 1)
                assert first_positive <= word < first_filler
            # the other mention: a different aspect, somewhere else in the sentence
            mentions = [t for t in range(2, 20) if first_aspect <= tokens[t] < first_positive]
            assert len(mentions) == 2 and position in mentions
            other = [t for t in mentions if t != position][0]
            assert tokens[other] != tokens[position]
            expected_context = [0, 0] + [0 if t == position else 1 for t in range(2, 20)]
            assert batch["context"][row].tolist() == expected_context
        assert batch["lengths"].tolist() == [20] * 6 and batch["weights"].tolist() == [1.0] * 6


def test_both_polarities_and_disagreeing_distractors_occur():
    batch = _source().batch_at(0)
    labels = [int(v) for step in range(4) for v in _source().batch_at(step)["labels"]]
    assert 0 < sum(labels) < len(labels)
    assert batch["inputs"].dtype == np.int32 and batch["evidence"].dtype == np.int32


def test_batches_are_deterministic_and_resumable():
    source = _source()
    first = source.next_batch()
    second = source.next_batch()
    again = _source()
    again.set_state({"step": 1})
    resumed = again.next_batch()
    for key in first:
        np.testing.assert_array_equal(resumed[key], second[key])
    assert not np.array_equal(first["inputs"], second["inputs"])
    valid = make_source("aspect_sentiment", split="valid", batch_size=6, seq_len=20, seed=3)
    assert not np.array_equal(valid.batch_at(0)["inputs"], _source().batch_at(0)["inputs"])


def test_vocabulary_and_element_spec():
    source = _source()
    assert source.vocab_size == 2 + 8 + 16 + 32 == aspect_tiny.get_config().model.vocab_size
    batch = source.batch_at(0)
    assert {key: (value.shape, value.dtype) for key, value in batch.items()} == {
        key: (shape, dtype) for key, (shape, dtype) in source.element_spec.items()
    }
    assert int(batch["inputs"].max()) < source.vocab_size


def test_bad_options_are_named():
    with pytest.raises(
        ValueError, match=r"seq_len=9 leaves 3-token segments for num_mentions=2.*expected seq_len >= 10"
    ):
        AspectSentimentSource(batch_size=2, seq_len=9)
    with pytest.raises(ValueError, match=r"num_aspects must be >= 3, got 2"):
        AspectSentimentSource(batch_size=2, seq_len=30, num_mentions=3, num_aspects=2)
    with pytest.raises(ValueError, match=r"window must be >= 2, got 1"):
        AspectSentimentSource(batch_size=2, seq_len=30, window=1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) for data source 'aspect_sentiment': 'windw'"):
        make_source("aspect_sentiment", batch_size=2, seq_len=20, windw=2)


def test_aspect_configs_pass_the_config_checks():
    for preset in ("", "pss", "smoke"):
        config_checks.check_config(aspect_tiny.get_config(preset))
