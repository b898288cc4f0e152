"""train.data "video_clips": layout of the stacked frames, the answer read back from the asked frame's pixels,
the moving square's path by explicit reflection, determinism, and bad options."""

import numpy as np
import pytest

from train.data import make_source
from train.data.image_questions import PALETTE
from train.data.video_clips import QUESTION, TOKEN, WORDS, square_path

FRAMES, SIZE, SQUARE = 4, 8, 3


def source(**options):
    return make_source("video_clips", split="train", batch_size=6, seed=1, noise_std=0.0, **options)


def test_answer_is_the_colour_of_the_square_in_the_asked_frame():
    batch = source().next_batch()
    assert batch["images"].shape == (6, FRAMES * SIZE, SIZE, 3)
    frame_words = {TOKEN[str(k)]: k for k in range(FRAMES)}
    colour_words = {TOKEN[name]: np.asarray(rgb, np.float32) for name, rgb in PALETTE.items()}
    for row in range(6):
        k = frame_words[int(batch["inputs"][row, QUESTION.index(None)])]
        frame = batch["images"][row, k * SIZE : (k + 1) * SIZE]
        answer = colour_words[int(batch["targets"][row, -1])]
        # the square's SQUARE x SQUARE pixels of frame k have the answer's colour, and no other pixel does
        assert np.sum(np.all(np.isclose(frame, answer), axis=-1)) == SQUARE * SQUARE
        np.testing.assert_array_equal(batch["targets"][row, :-1], batch["inputs"][row, 1:])
        np.testing.assert_array_equal(batch["weights"][row], np.eye(len(QUESTION))[-1])
    assert max(batch["targets"].max(), batch["inputs"].max()) < len(WORDS)


def test_square_path_reflects_at_the_edges():
    rng = np.random.default_rng(0)
    path = square_path(rng, 50, 9, SIZE, SQUARE)
    rng = np.random.default_rng(0)
    span = SIZE - SQUARE
    start = rng.integers(0, span + 1, size=(50, 1, 2))
    velocity = rng.integers(-SQUARE, SQUARE + 1, size=(50, 1, 2))
    for b in range(50):
        for axis in range(2):
            position, step = int(start[b, 0, axis]), int(velocity[b, 0, axis])
            for t in range(9):
                assert path[b, t, axis] == position
                position += step
                if position > span or position < 0:  # bounce: mirror back into [0, span], reverse direction
                    position = 2 * span - position if position > span else -position
                    step = -step


def test_batches_are_deterministic_and_bad_options_are_refused():
    np.testing.assert_array_equal(source().batch_at(3)["images"], source().batch_at(3)["images"])
    with pytest.raises(ValueError, match="square_size=8 must be smaller than frame_size=8"):
        source(square_size=8)
    with pytest.raises(ValueError, match="num_frames=17 must be at most 16"):
        source(num_frames=17)
