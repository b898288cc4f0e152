"""The shape_captions source: deterministic, resumable, and every caption describes its image."""

import numpy as np
import pytest

from train.data import make_source
from train.data.shape_captions import CAPTION_LENGTH, COLORS, SHAPES, WORDS, caption_concepts, encode_caption

PALETTE = list(COLORS.values())


def _source(**options):
    return make_source("shape_captions", batch_size=16, seed=3, **options)


def test_batches_are_deterministic_and_resume_exactly():
    source = _source()
    first, second = source.next_batch(), source.next_batch()
    state = source.get_state()
    third = source.next_batch()
    resumed = _source()
    resumed.set_state(state)
    again, after_resume = _source().batch_at(1), resumed.next_batch()
    for key in first:
        np.testing.assert_array_equal(again[key], second[key])
        np.testing.assert_array_equal(after_resume[key], third[key])
    assert not np.array_equal(first["noise"], second["noise"])
    spec = source.element_spec
    assert {key: value.shape for key, value in first.items()} == {key: shape for key, (shape, _) in spec.items()}
    assert np.all((first["times"] >= 0) & (first["times"] < 1))


def _painted(image, color):
    """bool [S, S]: the pixels of `image` painted in `color` (the background is black)."""
    return np.all(np.isclose(image, color), axis=-1)


def test_captions_name_the_shapes_drawn_in_each_half():
    batch = _source(caption_dropout=0.0).batch_at(0)
    half = batch["images"].shape[1] // 2
    for image, caption, concepts in zip(batch["images"], batch["captions"], batch["concepts"], strict=True):
        words = [WORDS[i] for i in caption if i]
        named = [(words[0], words[1])] + ([(words[3], words[4])] if len(words) == 5 else [])
        assert len(words) in (2, 5) and (len(words) == 2 or words[2] == "left")
        assert concepts.sum() == len(named)
        regions = [image[:, :half], image[:, half:]] if len(named) == 2 else [image]
        for (color, shape), region in zip(named, regions, strict=True):
            assert concepts[list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)] == 1
            mask = _painted(region, COLORS[color])
            rows, cols = np.nonzero(mask)
            box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            if shape == "square":
                assert box.all()
            elif shape == "circle":  # symmetric under flips and transposition, corners empty
                assert np.array_equal(box, box.T) and np.array_equal(box, box[::-1]) and not box[0, 0]
            else:  # triangle: apex row narrower than base row, mirror-symmetric left-right
                assert box[0].sum() < box[-1].sum() and np.array_equal(box, box[:, ::-1])
        other = [c for name, c in COLORS.items() if name not in {color for color, _ in named}]
        assert not any(_painted(image, c).any() for c in other)


def test_caption_dropout_gives_the_null_caption_but_keeps_the_concepts():
    batch = _source(caption_dropout=1.0).batch_at(0)
    assert not batch["captions"].any() and np.all(batch["concepts"].sum(-1) >= 1)


def test_encode_caption_and_its_errors():
    ids = encode_caption("red circle left blue square")
    assert ids.shape == (CAPTION_LENGTH,) and [WORDS[i] for i in ids] == ["red", "circle", "left", "blue", "square"]
    assert list(encode_caption("green triangle")[2:]) == [0, 0, 0]
    assert caption_concepts("red circle left blue square") == [0 * 3 + 0, 2 * 3 + 1]
    for bad in ("red", "purple circle", "red circle right blue square", "circle red"):
        with pytest.raises(ValueError, match="caption="):
            encode_caption(bad)
    with pytest.raises(ValueError, match="image_size=18"):
        _source(image_size=18)
    with pytest.raises(ValueError, match="caption_dropout=1.5"):
        _source(caption_dropout=1.5)
