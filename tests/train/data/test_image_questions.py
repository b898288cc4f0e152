"""train.data "image_questions" with count and colour questions: every answer checked against the squares found in
the rendered pixels (connected components of non-background pixels, an explicit flood fill), the question-only
chance against the empirical best guess, the stable vocabulary, and bad options."""

import collections

import numpy as np
import pytest

from train.data import make_source
from train.data.image_questions import KINDS, PALETTE, QUESTION_DISTRACTOR_COLORS, TOKEN, WORDS, question_only_chance

# The position question's vocabulary before the other kinds existed: these ids must never move.
POSITION_WORDS = (
    "<pad>",
    "<bos>",
    "what",
    "colour",
    "is",
    "the",
    "shape",
    "at",
    "left",
    "right",
    "top",
    "bottom",
    "?",
    "red",
    "blue",
    "green",
    "yellow",
)
COLOURS = {**PALETTE, **{f"distractor{i}": c for i, c in enumerate(QUESTION_DISTRACTOR_COLORS)}}


def squares_in(image):
    """[(colour name, pixel count)] of the 4-connected components of square pixels (background is grey <= 0.45,
    every square colour has a channel >= 0.7), each named by the nearest base colour of its mean pixel."""
    square = image.max(axis=-1) > 0.6
    seen = np.zeros_like(square)
    found = []
    for start in zip(*np.nonzero(square), strict=True):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < square.shape[0] and 0 <= nx < square.shape[1] and square[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        mean = np.mean([image[p] for p in pixels], axis=0)
        name = min(COLOURS, key=lambda n: np.abs(COLOURS[n] - mean).max())
        found.append((name, len(pixels)))
    return found


def words(row):
    return [WORDS[t] for t in row if t != TOKEN["<pad>"]]


def test_existing_token_ids_are_stable_and_the_default_is_the_position_question():
    assert WORDS[: len(POSITION_WORDS)] == POSITION_WORDS
    source = make_source("image_questions", batch_size=8, seed=0)
    assert source.vocab_size == len(POSITION_WORDS)
    batch = source.next_batch()
    assert all(words(row)[:3] == ["<bos>", "what", "colour"] for row in batch["inputs"])
    assert make_source("image_questions", batch_size=8, questions=("count",)).vocab_size == len(WORDS)


@pytest.mark.parametrize("image_size", [16, 32])
def test_count_and_colour_answers_match_the_pixels(image_size):
    source = make_source(
        "image_questions", batch_size=96, seed=5, image_size=image_size, noise_std=0.0, questions=("count", "colour")
    )
    batch = source.next_batch()
    side = source.square_size
    forms = collections.Counter()
    for row in range(96):
        question, answer = words(batch["inputs"][row]), WORDS[batch["targets"][row, -1]]
        squares = squares_in(batch["images"][row])
        # every square is whole and apart from the others: one component of side^2 pixels each
        assert all(size == side * side for _, size in squares), (question, squares)
        names = [name for name, _ in squares]
        if question[1:3] == ["how", "many"]:
            if question[3] == "squares":
                forms["count all"] += 1
                assert answer == str(len(names))
            else:
                forms["count colour"] += 1
                assert answer == str(names.count(question[3]))
        elif question[1] == "is":
            forms["present"] += 1
            assert answer == ("yes" if question[4] in names else "no")
        else:
            assert question == ["<bos>", "which", "colour", "is", "missing", "?"]
            forms["missing"] += 1
            absent = [name for name in PALETTE if name not in names]
            assert absent == [answer]
        assert len(names) <= source.max_count
        np.testing.assert_array_equal(batch["targets"][row, :-1], batch["inputs"][row, 1:])
    assert set(forms) == {"count all", "count colour", "present", "missing"}, forms
    np.testing.assert_array_equal(batch["weights"].sum(axis=1), 1.0)
    assert (batch["weights"][:, -1] == 1).all()


def test_a_mixed_batch_draws_every_kind_and_question_kinds_reads_them():
    source = make_source("image_questions", batch_size=300, seed=1, questions=KINDS)
    batch = source.next_batch()
    kinds = source.question_kinds(batch["inputs"])
    first_words = [words(row)[1] for row in batch["inputs"]]
    expected = [{"what": 0, "how": 1, "is": 2, "which": 2}[w] for w in first_words]
    np.testing.assert_array_equal(kinds, expected)
    shares = np.bincount(kinds, minlength=3) / 300
    assert (np.abs(shares - 1 / 3) < 0.08).all(), shares
    assert batch["inputs"].shape == (300, 10) and batch["images"].shape == (300, 32, 32, 3)


def test_question_only_chance_is_the_best_guess_that_reads_the_question():
    questions = ("position", "count", "colour")
    source = make_source("image_questions", batch_size=6000, seed=3, image_size=16, questions=questions)
    batch = source.next_batch()
    kinds = source.question_kinds(batch["inputs"])
    answers = collections.defaultdict(collections.Counter)  # question (its tokens) -> answer counts
    for row, answer in zip(batch["inputs"], batch["targets"][:, -1], strict=True):
        answers[tuple(row)][int(answer)] += 1
    best = {q: max(c.values()) / sum(c.values()) for q, c in answers.items()}  # best constant answer per question
    chance = question_only_chance(questions, source.max_count)
    for index, kind in enumerate(KINDS):
        empirical = np.mean([best[tuple(row)] for row in batch["inputs"][kinds == index]])
        assert abs(empirical - chance[kind]) < 0.03, (kind, empirical, chance[kind])
    assert chance["overall"] == pytest.approx(np.mean([chance[k] for k in KINDS]))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(questions=("size",)), "questions must be distinct names from"),
        (dict(questions=()), "questions must be distinct names from"),
        (dict(questions=("count", "count")), "questions must be distinct names from"),
        (dict(max_count=10), "max_count=10 must be at most 9"),
        (dict(max_count=0), "max_count must be >= 1"),
        (dict(image_size=8, max_count=5), "at most the 4 grid cells"),
        (dict(questions=("colour",), max_count=2), "need max_count >= 3"),
    ],
)
def test_bad_options_name_the_argument(options, match):
    with pytest.raises(ValueError, match=match):
        make_source("image_questions", batch_size=4, **options)
