"""The ordinal_successor data source (the successor_heads probe): layout checked token by token."""

import numpy as np
import pytest

from train.data import make_source


def test_rows_list_ordinals_a_marker_then_their_successors():
    source = make_source("ordinal_successor", batch_size=4, seq_len=9, num_orders=2, order_length=5, num_items=3)
    assert source.vocab_size == 2 + 2 * 5
    batch = source.next_batch()
    orders = [[2, 3, 4, 5, 6], [7, 8, 9, 10, 11]]
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"], strict=True):
        sequence = list(inputs) + [targets[-1]]
        items = sequence[:3]
        for item in items:  # each item lies in an order and is not its last token
            assert any(item in order[:-1] for order in orders), item
        assert sequence[3] == 1
        assert sequence[4:7] == [item + 1 for item in items]
        assert sequence[7:] == [0, 0, 0]
        assert list(targets) == sequence[1:]
        assert list(weights) == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    np.testing.assert_array_equal(source.batch_at(0)["inputs"], batch["inputs"])  # a pure function of the step


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="seq_len=5 is too small for ordinal_successor: need seq_len >= 2"):
        make_source("ordinal_successor", batch_size=2, seq_len=5, num_items=3)
    with pytest.raises(ValueError, match="order_length must be >= 2, got 1"):
        make_source("ordinal_successor", batch_size=2, seq_len=8, order_length=1)
