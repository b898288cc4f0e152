"""Synthetic tasks: each weighted target is the answer the task defines, checked from the inputs alone."""

import numpy as np
import pytest

from train.data import make_source


@pytest.mark.parametrize("seq_len", [16, 37, 200])
def test_mqar_answers_are_the_values_paired_with_the_queried_keys(seq_len):
    n, vocab = 4, 40
    batch = make_source("mqar", batch_size=16, seq_len=seq_len, seed=1, num_kv_pairs=n, vocab_size=vocab).next_batch()
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"], strict=True):
        keys, values = inputs[0 : 2 * n : 2], inputs[1 : 2 * n : 2]
        assert len(set(keys)) == n and keys.min() >= 1 and keys.max() < vocab // 2
        assert values.min() >= vocab // 2 and values.max() < vocab
        answer_positions = np.flatnonzero(weights)
        assert len(answer_positions) == n and answer_positions.min() >= 2 * n
        queried = inputs[answer_positions]
        assert sorted(queried) == sorted(keys)  # every key asked once
        lookup = dict(zip(keys, values, strict=True))
        assert [lookup[k] for k in queried] == list(targets[answer_positions])
        assert np.array_equal(inputs[1:], targets[:-1])


def test_mqar_rejects_short_sequences_and_small_vocabularies():
    with pytest.raises(ValueError, match=r"seq_len=30 is too small for mqar: need seq_len >= 32"):
        make_source("mqar", batch_size=2, seq_len=30, seed=0, num_kv_pairs=8)
    with pytest.raises(ValueError, match=r"vocab_size=16 is too small for mqar: need vocab_size >= 18"):
        make_source("mqar", batch_size=2, seq_len=64, seed=0, num_kv_pairs=8, vocab_size=16)


def test_mqar_random_queries_ask_any_pair_with_replacement():
    n, q, vocab = 4, 12, 40
    source = make_source(
        "mqar", batch_size=32, seq_len=40, seed=2, num_kv_pairs=n, vocab_size=vocab, query_keys="random", num_queries=q
    )
    batch, repeats = source.next_batch(), 0
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"], strict=True):
        keys, values = inputs[0 : 2 * n : 2], inputs[1 : 2 * n : 2]
        answer_positions = np.flatnonzero(weights)
        assert len(answer_positions) == q and answer_positions.min() >= 2 * n
        assert np.all(answer_positions % 2 == 0)  # a query key sits at an even offset, its value right after
        queried = inputs[answer_positions]
        assert set(queried) <= set(keys)
        lookup = dict(zip(keys, values, strict=True))
        assert [lookup[k] for k in queried] == list(targets[answer_positions])
        repeats += len(queried) - len(set(queried))
    assert repeats >= 32 * (q - n)  # 12 queries over 4 keys repeat at least 8 times per row


def test_mqar_query_option_errors():
    with pytest.raises(ValueError, match=r"query_keys must be one of \('each_once', 'random'\), got 'all'"):
        make_source("mqar", batch_size=2, seq_len=64, seed=0, num_kv_pairs=4, vocab_size=40, query_keys="all")
    with pytest.raises(ValueError, match=r"num_queries=6 needs query_keys='random'"):
        make_source("mqar", batch_size=2, seq_len=64, seed=0, num_kv_pairs=4, vocab_size=40, num_queries=6)
    with pytest.raises(ValueError, match=r"seq_len=30 is too small for mqar: need seq_len >= 32"):
        make_source(
            "mqar", batch_size=2, seq_len=30, seed=0, num_kv_pairs=4, vocab_size=40, query_keys="random", num_queries=12
        )


def test_mqar_long_sequences_use_the_sparse_sampler():
    batch = make_source("mqar", batch_size=2, seq_len=4096, seed=0, num_kv_pairs=16, vocab_size=256).next_batch()
    assert batch["weights"].sum() == 2 * 16


@pytest.mark.parametrize("seq_len", [8, 50])
def test_selective_copy_answers_are_the_data_tokens_in_order(seq_len):
    n = 4
    batch = make_source("selective_copy", batch_size=16, seq_len=seq_len, seed=2, num_tokens=n).next_batch()
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"], strict=True):
        region = seq_len - n
        data = inputs[:region][inputs[:region] >= 2]
        assert len(data) == n and np.all(inputs[:region][inputs[:region] < 2] == 0)
        assert inputs[region] == 1  # the marker
        answer_positions = np.flatnonzero(weights)
        assert list(answer_positions) == list(range(region, seq_len))
        assert np.array_equal(targets[answer_positions], data)


def test_selective_copy_rejects_short_sequences():
    with pytest.raises(ValueError, match=r"seq_len=7 is too small for selective_copy: need seq_len >= 8"):
        make_source("selective_copy", batch_size=2, seq_len=7, seed=0, num_tokens=4)


@pytest.mark.parametrize(("seq_len", "depth"), [(11, None), (300, None), (300, 0.0), (300, 1.0)])
def test_passkey_answers_are_the_digits_after_the_needle_marker(seq_len, depth):
    d = 5
    batch = make_source("passkey", batch_size=16, seq_len=seq_len, seed=3, num_digits=d, depth=depth).next_batch()
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"], strict=True):
        needle = np.flatnonzero(inputs == 10)
        assert len(needle) == 1
        start = needle[0]
        digits = inputs[start + 1 : start + 1 + d]
        assert np.all(digits < 10)
        assert np.all(inputs[:start] >= 12)  # filler only before the needle
        assert inputs[seq_len - d] == 11  # the query marker
        answer_positions = np.flatnonzero(weights)
        assert list(answer_positions) == list(range(seq_len - d, seq_len))
        assert np.array_equal(targets[answer_positions], digits)
        if depth == 0.0:
            assert start == 0
        if depth == 1.0:
            assert start + d == seq_len - d - 1  # needle ends right before the query marker


def test_passkey_depth_is_random_by_default():
    batch = make_source("passkey", batch_size=32, seq_len=200, seed=0).next_batch()
    depths = {int(np.flatnonzero(row == 10)[0]) for row in batch["inputs"]}
    assert len(depths) > 10


def test_passkey_repeat_filler_is_periodic():
    batch = make_source("passkey", batch_size=2, seq_len=100, seed=0, filler="repeat", depth=1.0).next_batch()
    head = batch["inputs"][0, :40]
    assert np.array_equal(head, 12 + np.arange(40) % 16)


def test_passkey_argument_errors():
    with pytest.raises(ValueError, match=r"seq_len=10 is too small for passkey: need seq_len >= 11"):
        make_source("passkey", batch_size=2, seq_len=10, seed=0, num_digits=5)
    with pytest.raises(ValueError, match=r"depth must be None \(random\) or a number in \[0, 1\], got 1.5"):
        make_source("passkey", batch_size=2, seq_len=64, seed=0, depth=1.5)
    with pytest.raises(ValueError, match=r"filler must be 'random' or 'repeat', got 'zeros'"):
        make_source("passkey", batch_size=2, seq_len=64, seed=0, filler="zeros")
