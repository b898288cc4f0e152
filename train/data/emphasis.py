"""Emphasised-sentence recall: a synthetic task where one sentence of the context decides the answer.

The context is n "sentences" of 3 tokens, sentence i at input positions [3i, 3i + 3):

    ID_i  FLAG  PAIR(key, value)    FLAG = PLAIN, or MARK on an emphasised sentence

(one token per key-value pair, so a value question is a single attention lookup: the query key against the pair
tokens, the value read from the matching one; naming the sentence needs its id, two positions back).

followed by q questions of 3 tokens, `QA key answer` ("the value of key?") or `QW key answer` ("which sentence
holds key?", answered with the sentence's id). With S the sequence of length T + 1 = 3n + 3q, inputs = S[:T],
targets = S[1:], and weights are 1 at the q question keys, whose targets are the answers (teacher forcing: earlier
answers are in the inputs). The last question is about the key sentence; its answer is the last target.

Rows with a conflict: a second sentence (the distractor) holds the key sentence's key with a different value; the
key sentence and one other sentence (the decoy, with another key) carry MARK, so "the marked sentence holding the
key" is the key sentence. Questions never ask QA about the conflicting key except as the last question of an
`answer_conflict` row.

Formats (option `format`):
  mixed            (training) a quarter of the rows have a conflict and end with `QW key` (answer: the key
                   sentence's id); the others have no conflict (every key once), MARK on a random sentence
                   (uninformative). Other questions are QA (probability 0.7) or QW about other sentences. The model
                   learns to find the marked key sentence when asked which, and never sees a conflict in a value
                   question.
  answer_conflict  (steering evaluation) conflict rows whose questions are all QA; the last asks the conflicting
                   key, and its answer is the key sentence's value. The emphasised span is the key sentence:
                   steering toward it should decide the answer.
  identify         the same rows with the last question QW (the model names the key sentence itself).

Every batch also holds `key_sentence` int32 [B] (the index of the key sentence) and `emphasis` float32 [B, T] (1 on
its three tokens), the span a user (or the model itself) would emphasise.

Token ids: 0 PLAIN, 1 MARK, 2 QA, 3 QW, ids [4, 4 + n), keys [4 + n, 4 + n + s), values [4 + n + s, 4 + n + 2s),
pairs [4 + n + 2s, 4 + n + 2s + s^2) (PAIR(k, v) = 4 + n + 2s + k s + v) with n = num_sentences, s = num_symbols and
q = num_questions; vocab_size = 4 + n + 2s + s^2. Needs num_sentences >= num_questions + 2 and num_symbols >=
num_sentences.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_int, token_prediction_spec

FORMATS = ("mixed", "answer_conflict", "identify")
SENTENCE = 3  # tokens per sentence: id, flag, pair(key, value)
QUESTION = 3  # tokens per question: QA or QW, key, answer
QA_SHARE = 0.7  # probability that a question other than the last is a value question in training rows


class EmphasisSource(DataSource):
    """Emphasised-sentence recall (see the module docstring). seq_len must be 3 * num_sentences + 3 *
    num_questions - 1."""

    name: ClassVar[str] = "emphasis_qa"
    OPTIONS: ClassVar[dict[str, Any]] = {"num_sentences": 6, "num_symbols": 8, "num_questions": 4, "format": "mixed"}
    PLAIN, MARK, QA, QW, FIRST_ID = 0, 1, 2, 3, 4

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        num_sentences, num_symbols, num_questions, format = (
            options["num_sentences"],
            options["num_symbols"],
            options["num_questions"],
            options["format"],
        )
        self.num_questions = check_int("num_questions", num_questions, 1)
        self.num_sentences = check_int("num_sentences", num_sentences, self.num_questions + 2)
        self.num_symbols = check_int("num_symbols", num_symbols, self.num_sentences)
        if format not in FORMATS:
            raise ValueError(f"format={format!r} must be one of {FORMATS}")
        self.format = format
        self.seq_len = check_int("seq_len", seq_len, 1)
        want = SENTENCE * self.num_sentences + QUESTION * self.num_questions - 1
        if self.seq_len != want:
            raise ValueError(
                f"seq_len={seq_len} must be 3 * num_sentences + 3 * num_questions - 1 = {want} "
                f"(num_sentences={self.num_sentences}, num_questions={self.num_questions})"
            )
        self.first_key = self.FIRST_ID + self.num_sentences
        self.first_value = self.first_key + self.num_symbols
        self.first_pair = self.first_value + self.num_symbols
        self.vocab_size = self.first_pair + self.num_symbols**2

    @property
    def element_spec(self) -> ElementSpec:
        shape = (self.batch_size, self.seq_len)
        return {
            **token_prediction_spec(self.batch_size, self.seq_len),
            "emphasis": (shape, np.dtype(np.float32)),
            "key_sentence": ((self.batch_size,), np.dtype(np.int32)),
        }

    def sentence_span(self, index: int) -> tuple[int, int]:
        """The input positions [start, stop) of sentence `index`."""
        return SENTENCE * index, SENTENCE * index + SENTENCE

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, n, s, q, t = self.global_batch_size, self.num_sentences, self.num_symbols, self.num_questions, self.seq_len
        rows = np.arange(b)
        keys = np.argsort(rng.random((b, s)), axis=1)[:, :n]  # [b, n] distinct key symbols per row
        values = rng.integers(0, s, size=(b, n))
        order = np.argsort(rng.random((b, n)), axis=1)  # a random order of the sentences per row
        key_sentence, distractor, decoy = order[:, 0], order[:, 1], order[:, 2]
        asked = np.concatenate([order[:, 2 : 2 + q - 1], key_sentence[:, None]], axis=1)  # [b, q] sentences asked
        conflict = rng.random(b) < 0.25 if self.format == "mixed" else np.ones(b, bool)
        keys[rows[conflict], distractor[conflict]] = keys[rows[conflict], key_sentence[conflict]]
        shift = rng.integers(1, s, size=b)
        values[rows[conflict], distractor[conflict]] = (
            values[rows[conflict], key_sentence[conflict]] + shift[conflict]
        ) % s
        flags = np.full((b, n), self.PLAIN)
        flags[rows, np.where(conflict, key_sentence, rng.integers(0, n, size=b))] = self.MARK
        flags[rows[conflict], decoy[conflict]] = self.MARK
        if self.format == "mixed":
            which = rng.random((b, q)) >= QA_SHARE
            which[:, -1] = np.where(conflict, True, which[:, -1])
        else:
            which = np.zeros((b, q), bool)
            which[:, -1] = self.format == "identify"
        seq = np.zeros((b, t + 1), dtype=np.int64)
        context = SENTENCE * n
        seq[:, 0:context:SENTENCE] = self.FIRST_ID + np.arange(n)
        seq[:, 1:context:SENTENCE] = flags
        seq[:, 2:context:SENTENCE] = self.first_pair + keys * s + values
        answers = np.where(which, self.FIRST_ID + asked, self.first_value + np.take_along_axis(values, asked, axis=1))
        seq[:, context::QUESTION] = np.where(which, self.QW, self.QA)
        seq[:, context + 1 :: QUESTION] = self.first_key + np.take_along_axis(keys, asked, axis=1)
        seq[:, context + 2 :: QUESTION] = answers
        weights = np.zeros((b, t), dtype=np.float32)
        weights[:, context + 1 :: QUESTION] = 1.0
        emphasis = np.zeros((b, t), dtype=np.float32)
        emphasis[rows[:, None], SENTENCE * key_sentence[:, None] + np.arange(SENTENCE)] = 1.0
        return {
            "inputs": np.ascontiguousarray(seq[:, :-1], dtype=np.int32),
            "targets": np.ascontiguousarray(seq[:, 1:], dtype=np.int32),
            "weights": weights,
            "emphasis": emphasis,
            "key_sentence": key_sentence.astype(np.int32),
        }
