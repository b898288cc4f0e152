"""Masked LM: 15% of positions chosen, 80/10/10 mask/random/keep, loss only on chosen positions."""

import numpy as np
import pytest

from train.data import make_source
from train.data.masked_lm import MASK_ID


def test_masking_statistics_and_weights():
    source = make_source("masked_lm", batch_size=64, seq_len=200, seed=0)
    batch = source.next_batch()
    inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
    chosen = weights == 1
    assert np.all(chosen.sum(axis=1) == 30)  # round(0.15 * 200) in every row
    assert np.all(inputs[~chosen] == targets[~chosen])  # unchosen positions untouched
    assert targets.max() < 256 and inputs.max() <= MASK_ID == 256
    assert np.all(inputs[inputs == MASK_ID] == inputs[chosen & (inputs == MASK_ID)])  # mask only where chosen
    masked = np.mean(inputs[chosen] == MASK_ID)
    changed = np.mean((inputs[chosen] != MASK_ID) & (inputs[chosen] != targets[chosen]))
    kept = np.mean(inputs[chosen] == targets[chosen])
    # 1920 chosen positions: binomial std of the shares is about 0.01.
    assert abs(masked - 0.8) < 0.04
    assert abs(changed - 0.1 * 255 / 256) < 0.03
    assert abs(kept - (0.1 + 0.1 / 256)) < 0.03
    assert source.vocab_size == 257


def test_targets_are_a_window_of_the_corpus():
    source = make_source("masked_lm", batch_size=2, seq_len=64, seed=1)
    row = source.next_batch()["targets"][0].astype(np.uint8).tobytes()
    assert row in source.corpus.train.tobytes()


def test_vocab_size_must_hold_the_mask_token():
    with pytest.raises(ValueError, match=r"vocab_size must be >= 257, got 256"):
        make_source("masked_lm", batch_size=2, seq_len=64, seed=0, vocab_size=256)
