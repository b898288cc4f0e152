"""Image question answering for vision-language models: positions, counts and colours of squares.

Question kinds (the `questions` option, a tuple of names; a batch draws the kind of each row uniformly):

  "position" (the default, alone): "what colour is the shape at the <direction>?". Images are drawn like the
      procedural relation images of `train.data.images`: two target squares of two different colours from PALETTE
      (red, blue, green, yellow), among distractor squares of other colours (cyan, magenta, white), with pixel
      noise. The two targets always lie in opposite halves of the image along every axis a question can ask about;
      the answer is the colour of the target square in the asked half (also the one further in that direction), so
      it is never ambiguous. Answers are uniform over the palette (chance 1/4; 1/2 for knowing which two colours
      are present). directions=2 asks about left/right; directions=4 also about top/bottom.
  "count": half the rows "how many squares are there?" (answer uniform in 1..max_count; each square one of the
      seven colours), half "how many <colour> squares are there?" (a palette colour; answer uniform in
      0..max_count; the other squares take the six other colours). Answers are digit words.
  "colour": half the rows "is there a <colour> square?" (yes/no, uniform; 1..max_count squares), half "which
      colour is missing?" (three palette colours present, one square each, plus up to max_count - 3 squares of the
      present or distractor colours; the answer, the absent palette colour, is uniform).

Count and colour scenes place every square in its own cell of a grid of image_size // (2 * square_size) cells per
side, at a random offset that leaves at least one background pixel to the cell's right and bottom edges, so
squares never touch or overlap and the count is what the pixels show.

Token ids (`WORDS[i]` is token i): 0 padding, 1 start, the position question's words, the colour names (ids 0-16
as before the other kinds existed), then the other kinds' words, "yes", "no" and the digits 0-9. Every question is
QUESTION_LENGTH = 10 tokens, shorter ones left-padded with <pad>; the model answers at the last position:

    inputs   [<pad> ...] BOS <question words> ?          int32 [B, 10]
    targets  inputs[:, 1:] followed by the answer        int32 [B, 10]
    weights  0 ... 0 1                                   float32 [B, 10] (the answer position only)
    images   float32 [B, image_size, image_size, 3] in [0, 1]

`vocab_size` is 17 with questions=("position",) (today's vocabulary) and len(WORDS) otherwise.
`question_kinds(inputs)` recovers each row's kind from its tokens; `question_only_chance` is the accuracy of the
best guess that reads the question but not the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from .base import ElementSpec, check_int
from .images import BLUE, DISTRACTOR_COLORS, RED, RelationImageSource, _paint, relation_label, render_relation_images

PALETTE = {
    "red": RED,
    "blue": BLUE,
    "green": DISTRACTOR_COLORS[0],
    "yellow": DISTRACTOR_COLORS[1],
}
# Distractors take the remaining colours (cyan, magenta, white), so no distractor looks like a target.
QUESTION_DISTRACTOR_COLORS = DISTRACTOR_COLORS[2:]
# Every colour a count or colour scene uses: the palette first (index = palette index), then the distractors.
SCENE_COLORS = np.concatenate([np.stack(list(PALETTE.values())), QUESTION_DISTRACTOR_COLORS])
DIGITS = tuple(str(n) for n in range(10))
WORDS = (
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
    *PALETTE,
    # ids 0-16 above are the position question's vocabulary; the other kinds' words follow, so those ids never move
    "how",
    "many",
    "squares",
    "are",
    "there",
    "a",
    "square",
    "which",
    "missing",
    "yes",
    "no",
    *DIGITS,
)
TOKEN = {word: index for index, word in enumerate(WORDS)}
POSITION_VOCAB_SIZE = TOKEN["yellow"] + 1  # 17: the vocabulary of the position question alone
DIRECTIONS = ("left", "right", "top", "bottom")
QUESTION = ("<bos>", "what", "colour", "is", "the", "shape", "at", "the", None, "?")  # None: the direction
QUESTION_LENGTH = len(QUESTION)  # every kind's question is left-padded to this length
KINDS = ("position", "count", "colour")
# The other kinds' questions; None is the asked colour.
COUNT_ALL = ("<bos>", "how", "many", "squares", "are", "there", "?")
COUNT_COLOUR = ("<bos>", "how", "many", None, "squares", "are", "there", "?")
COLOUR_PRESENT = ("<bos>", "is", "there", "a", None, "square", "?")
COLOUR_MISSING = ("<bos>", "which", "colour", "is", "missing", "?")


def sample_half_geometry(
    rng: np.random.Generator, batch: int, image_size: int, square_size: int, directions: int
) -> dict[str, np.ndarray]:
    """Corners int [B, 2] (row, column) of two squares, "red" (the first) and "blue" (the second) as
    `render_relation_images` names them, in opposite halves of the image along x (and, with directions=4, along
    y; with 2, the rows are free), each square wholly inside its half; "labels" int32 [B] as
    `train.data.images.relation_label` defines them for these positions."""
    half = image_size // 2
    positions = half - square_size + 1  # corner positions that keep a square inside its half

    def opposite_halves() -> tuple[np.ndarray, np.ndarray]:
        first_low = rng.integers(0, 2, size=batch).astype(bool)
        a, b = rng.integers(0, positions, size=(2, batch))
        return np.where(first_low, a, b + half), np.where(first_low, b + half, a)

    first_x, second_x = opposite_halves()
    if directions == 4:
        first_y, second_y = opposite_halves()
    else:
        first_y, second_y = rng.integers(0, image_size - square_size + 1, size=(2, batch))
    first, second = np.stack([first_y, first_x], 1), np.stack([second_y, second_x], 1)
    return {"labels": relation_label(first, second, directions), "red": first, "blue": second}


def answer_is_first(first_yx: np.ndarray, second_yx: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """bool [B]: the first square is the one further left (direction 0), right (1), up (2) or down (3) than the
    second. Positions int [B, 2] are (row, column) of each square's top-left corner."""
    column_less = first_yx[:, 1] < second_yx[:, 1]
    row_less = first_yx[:, 0] < second_yx[:, 0]
    return np.select(
        [direction == 0, direction == 1, direction == 2],
        [column_less, ~column_less, row_less],
        default=~row_less,
    )


def encode_questions(template: Sequence[str | None], fill: np.ndarray | None = None) -> np.ndarray:
    """int32 [B, QUESTION_LENGTH]: `template` (words; one None slot) left-padded with <pad>, the None slot set to
    the token ids `fill` int [B]. Without `fill` (a template with no slot) B is 1."""
    ids = np.array([0 if word is None else TOKEN[word] for word in template], np.int32)
    rows = np.zeros((1 if fill is None else len(fill), QUESTION_LENGTH), np.int32)
    rows[:, QUESTION_LENGTH - len(ids) :] = ids
    if fill is not None:
        rows[:, QUESTION_LENGTH - len(ids) + template.index(None)] = fill
    return rows


def question_kinds(inputs: np.ndarray) -> np.ndarray:
    """int [B]: the index in KINDS of each question of inputs int [B, T] (read from its words)."""
    inputs = np.asarray(inputs)
    count = (inputs == TOKEN["how"]).any(axis=1)
    position = (inputs == TOKEN["what"]).any(axis=1)
    return np.where(position, KINDS.index("position"), np.where(count, KINDS.index("count"), KINDS.index("colour")))


def question_only_chance(questions: Sequence[str], max_count: int) -> dict[str, float]:
    """Accuracy of the best answer to each question form given the question but not the image, per kind of
    `questions` and "overall" (kinds drawn uniformly): position 1/4; count 1/2 (1/max_count) + 1/2 (1/(max_count +
    1)); colour 1/2 (1/2) + 1/2 (1/4)."""
    per_kind = {
        "position": 1 / len(PALETTE),
        "count": 0.5 / max_count + 0.5 / (max_count + 1),
        "colour": 0.5 * 0.5 + 0.5 / len(PALETTE),
    }
    chance = {kind: per_kind[kind] for kind in questions}
    chance["overall"] = float(np.mean(list(chance.values())))
    return chance


def render_grid_scenes(
    rng: np.random.Generator,
    colors: np.ndarray,
    counts: np.ndarray,
    image_size: int,
    square_size: int,
    noise_std: float,
) -> np.ndarray:
    """float32 [B, image_size, image_size, 3] in [0, 1]: row b shows counts[b] squares, square j of colour index
    colors[b, j] (into SCENE_COLORS; int [B, S], entries j >= counts[b] unused), each in its own grid cell (see the
    module docstring), on a grey background of random brightness in [0.05, 0.45], colours jittered by +-0.1 per
    channel, plus Gaussian noise of std `noise_std`, clipped to [0, 1]."""
    batch, slots = colors.shape
    grid = image_size // (2 * square_size)
    cell = image_size // grid
    if slots > grid * grid:
        raise ValueError(f"{slots} squares do not fit the {grid}x{grid} cells of image_size={image_size}")
    background = rng.uniform(0.05, 0.45, size=(batch, 1, 1, 1)).astype(np.float32)
    images = np.broadcast_to(background, (batch, image_size, image_size, 3)).copy()
    cells = np.argsort(rng.random((batch, grid * grid)), axis=1)[:, :slots]  # distinct cells per row
    offsets = rng.integers(0, cell - square_size, size=(batch, slots, 2))  # leaves >= 1 pixel to the next cell
    corners = np.stack([cells // grid, cells % grid], axis=-1) * cell + offsets
    jitter = rng.uniform(-0.1, 0.1, size=(batch, slots, 3)).astype(np.float32)
    for slot in range(slots):
        rows = np.flatnonzero(counts > slot)
        if len(rows):
            painted = images[rows]
            _paint(painted, corners[rows, slot], square_size, SCENE_COLORS[colors[rows, slot]] + jitter[rows, slot])
            images[rows] = painted
    if noise_std > 0:
        images += np.float32(noise_std) * rng.standard_normal(size=images.shape, dtype=np.float32)
    return np.clip(images, 0.0, 1.0, out=images)


def _other_colors(rng: np.random.Generator, shape: tuple[int, int], excluded: np.ndarray) -> np.ndarray:
    """int [B, S] colour indices into SCENE_COLORS, uniform over the colours other than excluded int [B]."""
    draw = rng.integers(0, len(SCENE_COLORS) - 1, size=shape)
    return draw + (draw >= excluded[:, None])


class ImageQuestionSource(RelationImageSource):
    """Procedural image questions (see the module docstring). Options as for the "images" source, except
    `directions` (2 or 4) replaces num_classes; `questions` (a tuple of KINDS, default ("position",)) and
    `max_count` (1-9, the most squares a count or colour scene holds; >= 3 with "colour") choose the questions."""

    name: ClassVar[str] = "image_questions"
    KINDS: ClassVar[tuple[str, ...]] = KINDS
    question_kinds = staticmethod(question_kinds)
    OPTIONS: ClassVar[dict[str, Any]] = {
        "image_size": 32,
        "directions": 4,
        "square_size": None,
        "num_distractors": 4,
        "noise_std": 0.1,
        "questions": ("position",),
        "max_count": 4,
    }

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        directions = options["directions"]
        if directions not in (2, 4):
            raise ValueError(f"directions must be 2 (left/right) or 4 (also top/bottom), got {directions!r}")
        super()._configure(seq_len, {**options, "num_classes": directions})
        self.directions = directions
        questions = options["questions"]
        questions = (questions,) if isinstance(questions, str) else tuple(questions)
        if not questions or any(kind not in KINDS for kind in questions) or len(set(questions)) < len(questions):
            raise ValueError(
                f"questions must be distinct names from {KINDS}, at least one; got {options['questions']!r}"
            )
        self.questions = questions
        self.max_count = check_int("max_count", options["max_count"], 1)
        cells = (self.image_size // (2 * self.square_size)) ** 2
        if self.max_count > min(9, cells):
            raise ValueError(
                f"max_count={self.max_count} must be at most 9 (one digit) and at most the {cells} grid cells of "
                f"image_size={self.image_size} with square_size={self.square_size}"
            )
        if "colour" in questions and self.max_count < 3:
            raise ValueError(
                f"questions with 'colour' need max_count >= 3 (three colours present), got {self.max_count}"
            )
        self.vocab_size = POSITION_VOCAB_SIZE if questions == ("position",) else len(WORDS)
        self.question_length = QUESTION_LENGTH

    @property
    def element_spec(self) -> ElementSpec:
        b, s, t = self.batch_size, self.image_size, self.question_length
        return {
            "images": ((b, s, s, 3), np.dtype(np.float32)),
            "inputs": ((b, t), np.dtype(np.int32)),
            "targets": ((b, t), np.dtype(np.int32)),
            "weights": ((b, t), np.dtype(np.float32)),
        }

    def question_only_chance(self) -> dict[str, float]:
        """`question_only_chance` of this source's questions and max_count."""
        return question_only_chance(self.questions, self.max_count)

    def _position_rows(self, rng: np.random.Generator, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, inputs int32 [b, 10], answer token ids [b]) of b position questions."""
        geometry = sample_half_geometry(rng, b, self.image_size, self.square_size, self.directions)
        # Two different palette colours per row: the first uniform, the second uniform over the others.
        first = rng.integers(0, len(PALETTE), size=b)
        second = (first + rng.integers(1, len(PALETTE), size=b)) % len(PALETTE)
        palette = np.stack(list(PALETTE.values()))
        images = render_relation_images(
            rng,
            geometry,
            self.image_size,
            self.square_size,
            self.num_distractors,
            self.noise_std,
            target_colors=(palette[first], palette[second]),
            distractor_colors=QUESTION_DISTRACTOR_COLORS,
        )
        direction = rng.integers(0, self.directions, size=b)
        answer = np.where(answer_is_first(geometry["red"], geometry["blue"], direction), first, second)
        inputs = encode_questions(QUESTION, np.array([TOKEN[d] for d in DIRECTIONS], np.int32)[direction])
        return images, inputs, np.array([TOKEN[c] for c in PALETTE], np.int32)[answer]

    def _count_rows(self, rng: np.random.Generator, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, inputs, answer token ids) of b count questions (half of all squares, half of one colour)."""
        m = self.max_count
        of_colour = rng.integers(0, 2, size=b).astype(bool)
        asked = rng.integers(0, len(PALETTE), size=b)
        total = rng.integers(1, m + 1, size=b)  # "how many squares"
        matching = rng.integers(0, m + 1, size=b)  # "how many <colour> squares"
        others = rng.integers(0, m - matching + 1)  # the other squares of a colour question, <= m in all
        colors = rng.integers(0, len(SCENE_COLORS), size=(b, m))
        slot = np.arange(m)[None, :]
        colour_scene = np.where(slot < matching[:, None], asked[:, None], _other_colors(rng, (b, m), asked))
        colors = np.where(of_colour[:, None], colour_scene, colors)
        counts = np.where(of_colour, matching + others, total)
        images = render_grid_scenes(rng, colors, counts, self.image_size, self.square_size, self.noise_std)
        inputs = np.where(
            of_colour[:, None],
            encode_questions(COUNT_COLOUR, np.array([TOKEN[c] for c in PALETTE], np.int32)[asked]),
            encode_questions(COUNT_ALL),
        )
        answers = np.array([TOKEN[d] for d in DIGITS], np.int32)[np.where(of_colour, matching, total)]
        return images, inputs, answers

    def _colour_rows(self, rng: np.random.Generator, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, inputs, answer token ids) of b colour questions (half "is there a <c> square", half "which
        colour is missing")."""
        m = self.max_count
        palette_tokens = np.array([TOKEN[c] for c in PALETTE], np.int32)
        missing_form = rng.integers(0, 2, size=b).astype(bool)
        asked = rng.integers(0, len(PALETTE), size=b)
        present = rng.integers(0, 2, size=b).astype(bool)
        count = rng.integers(1, m + 1, size=b)
        slot = np.arange(m)[None, :]
        # is there a <c> square: no square has colour c, except square 0 when the answer is yes
        presence = _other_colors(rng, (b, m), asked)
        presence[:, 0] = np.where(present, asked, presence[:, 0])
        # which colour is missing: the three other palette colours once each (slots 0-2), then squares of the present
        # palette colours or the distractors
        absent = rng.integers(0, len(PALETTE), size=b)
        others = (absent[:, None] + np.arange(1, len(PALETTE))[None, :]) % len(PALETTE)  # [b, 3]
        extra = _other_colors(rng, (b, m), absent)
        missing = np.where(slot < 3, np.pad(others, ((0, 0), (0, max(0, m - 3))))[:, :m], extra)
        extra_count = rng.integers(0, m - 3 + 1, size=b)
        colors = np.where(missing_form[:, None], missing, presence)
        counts = np.where(missing_form, 3 + extra_count, count)
        images = render_grid_scenes(rng, colors, counts, self.image_size, self.square_size, self.noise_std)
        inputs = np.where(
            missing_form[:, None],
            encode_questions(COLOUR_MISSING),
            encode_questions(COLOUR_PRESENT, palette_tokens[asked]),
        )
        answers = np.where(missing_form, palette_tokens[absent], np.where(present, TOKEN["yes"], TOKEN["no"])).astype(
            np.int32
        )
        return images, inputs, answers

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b = self.global_batch_size
        makers = {"position": self._position_rows, "count": self._count_rows, "colour": self._colour_rows}
        if len(self.questions) == 1:  # no kind draw: the position-only stream is the one it always was
            images, inputs, answers = makers[self.questions[0]](rng, b)
        else:
            kind = rng.integers(0, len(self.questions), size=b)
            images = np.empty((b, self.image_size, self.image_size, 3), np.float32)
            inputs = np.empty((b, QUESTION_LENGTH), np.int32)
            answers = np.empty((b,), np.int32)
            for index, name in enumerate(self.questions):
                rows = np.flatnonzero(kind == index)
                if len(rows):
                    images[rows], inputs[rows], answers[rows] = makers[name](rng, len(rows))
        targets = np.concatenate([inputs[:, 1:], answers[:, None]], axis=1)
        weights = np.zeros(inputs.shape, np.float32)
        weights[:, -1] = 1.0
        return {"images": images, "inputs": inputs, "targets": targets, "weights": weights}
