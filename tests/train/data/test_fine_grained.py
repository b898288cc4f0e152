"""Fine-grained images: the label is (part colour, slot) and the pixels say so; decoys, body, balance, determinism
and bad options."""

import numpy as np
import pytest

from train.data import make_source
from train.data.fine_grained import BODY_COLOR, DECOY_COLOR, PART_COLORS, slot_offsets


def test_labels_follow_the_part_and_the_pixels_show_it():
    source = make_source("fine_grained", batch_size=64, seed=0, noise_std=0.0, num_slots=3, num_colors=4)
    batch, geometry = source.sample(source.rng_for(0))
    assert source.num_classes == 12
    np.testing.assert_array_equal(batch["labels"], geometry["color"] * 3 + geometry["slot"])
    images, s = batch["images"], source.part_size
    offsets = slot_offsets(source.body_size, s)
    for i in range(64):
        body, slot, color = geometry["body"][i], geometry["slot"][i], geometry["color"][i]
        np.testing.assert_array_equal(geometry["part"][i], body + offsets[slot])
        y, x = body + offsets[slot]
        part = images[i, y : y + s, x : x + s]
        # every pixel of the part is its palette colour (+-0.08 jitter) and closest to it among the palette
        assert np.abs(part - PART_COLORS[color]).max() <= 0.08 + 1e-6
        nearest = np.argmin(np.abs(part[0, 0][None] - PART_COLORS[:4]).sum(-1))
        assert nearest == color
        for other in range(3):
            if other != slot:  # the other slots carry dark decoys
                y, x = body + offsets[other]
                assert np.abs(images[i, y : y + s, x : x + s] - DECOY_COLOR).max() <= 0.08 + 1e-6
        centre = body + source.body_size // 2  # the body's centre is body colour
        assert np.abs(images[i, centre[0], centre[1]] - BODY_COLOR).max() <= 0.08 + 1e-6


def test_classes_balance_and_streams_are_deterministic():
    source = make_source("fine_grained", batch_size=1600, seed=3)
    batch, geometry = source.sample(source.rng_for(0))
    counts = np.bincount(batch["labels"], minlength=8)
    assert counts.sum() == 1600 and np.all(np.abs(counts - 200) < 60)
    assert batch["images"].dtype == np.float32 and batch["images"].min() >= 0 and batch["images"].max() <= 1
    # the body moves (pose jitter): many distinct places
    assert len({tuple(b) for b in geometry["body"]}) > 50
    a = make_source("fine_grained", batch_size=8, seed=5).next_batch()
    b = make_source("fine_grained", batch_size=8, seed=5).next_batch()
    c = make_source("fine_grained", batch_size=8, seed=5, split="valid").next_batch()
    np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.array_equal(a["images"], c["images"])


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="num_slots=5"):
        make_source("fine_grained", batch_size=2, seed=0, num_slots=5)
    with pytest.raises(ValueError, match="part_size=8 is too large"):
        make_source("fine_grained", batch_size=2, seed=0, part_size=8)
    with pytest.raises(ValueError, match="num_colors=9"):
        make_source("fine_grained", batch_size=2, seed=0, num_colors=9)
    with pytest.raises(ValueError, match="noise_std"):
        make_source("fine_grained", batch_size=2, seed=0, noise_std=-1)
