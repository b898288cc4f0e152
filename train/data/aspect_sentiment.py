"""Aspect-level sentiment, procedurally: the label is the polarity of a few opinion words tied to one aspect.

Each row is `[query aspect, SEP, sentence]` of seq_len tokens. The sentence (seq_len - 2 tokens) is cut into
`num_mentions` equal segments; each segment holds one aspect mention (distinct aspect ids) followed, within the
next `window` positions, by `evidence_words` opinion words of that mention's polarity; every other position is a
neutral filler word. The query aspect (token 0) is the first mention's aspect, so the label (int32, 1 = positive,
0 = negative) is the polarity of the opinion words after *that* mention; the other mentions' polarities are drawn
independently, so counting polarity words over the sentence cannot solve the task: the model must tie the opinion
words to the queried aspect, as aspect-level sentiment classification does.

Vocabulary (vocab_size = 2 + A + 2 O + F): 0 padding (also the "erased word" id), 1 SEP, then A aspect ids, O
positive words, O negative words, F fillers (A = num_aspects, O = num_opinion_words, F = num_fillers).

Batch keys (B = per-process batch, T = seq_len):
  inputs            int32 [B, T]    the tokens
  labels            int32 [B]       polarity of the queried aspect's opinion words
  lengths           int32 [B]       T (no padding)
  weights           float32 [B]     1
  aspect_positions  int32 [B]       position of the queried aspect's mention in the row
  evidence          int32 [B, T]    1 at the queried aspect's opinion words (the planted evidence), else 0
  context           int32 [B, T]    1 at the context words of the queried aspect: the sentence without that mention

Deterministic and resumable like every source: batch i is a function of (seed, split, i, process_index).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_int

PAD = 0  # padding and the id erased words are replaced with
SEP = 1
PREFIX = 2  # query aspect + SEP before the sentence


class AspectSentimentSource(DataSource):
    """Sentences with aspect mentions and their opinion words; the queried aspect's polarity is the label (see the
    module docstring).

    Options: num_aspects (A >= num_mentions), num_opinion_words (O >= 1 per polarity), num_fillers (F >= 1),
    num_mentions (>= 1 aspect mentions per sentence), window (>= evidence_words positions after a mention),
    evidence_words (>= 1 opinion words per mention). seq_len - 2 must fit num_mentions segments of window + 1.
    """

    name: ClassVar[str] = "aspect_sentiment"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "num_aspects": 8,
        "num_opinion_words": 8,
        "num_fillers": 32,
        "num_mentions": 2,
        "window": 3,
        "evidence_words": 2,
    }
    num_classes = 2

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        num_aspects, num_opinion_words, num_fillers, num_mentions, window, evidence_words = (
            options["num_aspects"],
            options["num_opinion_words"],
            options["num_fillers"],
            options["num_mentions"],
            options["window"],
            options["evidence_words"],
        )
        self.seq_len = check_int("seq_len", seq_len, PREFIX + 2)
        self.num_mentions = check_int("num_mentions", num_mentions, 1)
        self.num_aspects = check_int("num_aspects", num_aspects, self.num_mentions)
        self.num_opinion_words = check_int("num_opinion_words", num_opinion_words, 1)
        self.num_fillers = check_int("num_fillers", num_fillers, 1)
        self.evidence_words = check_int("evidence_words", evidence_words, 1)
        self.window = check_int("window", window, self.evidence_words)
        self.segment = (self.seq_len - PREFIX) // self.num_mentions
        if self.segment < self.window + 1:
            needed = PREFIX + self.num_mentions * (self.window + 1)
            raise ValueError(
                f"seq_len={self.seq_len} leaves {self.segment}-token segments for num_mentions={self.num_mentions}; "
                f"each needs window + 1 = {self.window + 1} tokens (expected seq_len >= {needed})"
            )
        self.first_aspect = PREFIX
        self.first_positive = self.first_aspect + self.num_aspects
        self.first_negative = self.first_positive + self.num_opinion_words
        self.first_filler = self.first_negative + self.num_opinion_words
        self.vocab_size = self.first_filler + self.num_fillers

    @property
    def element_spec(self) -> ElementSpec:
        b, t = self.batch_size, self.seq_len
        i32 = np.dtype(np.int32)
        return {
            "inputs": ((b, t), i32),
            "labels": ((b,), i32),
            "lengths": ((b,), i32),
            "weights": ((b,), np.dtype(np.float32)),
            "aspect_positions": ((b,), i32),
            "evidence": ((b, t), i32),
            "context": ((b, t), i32),
        }

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, t, m = self.global_batch_size, self.seq_len, self.num_mentions
        inputs = (self.first_filler + rng.integers(0, self.num_fillers, size=(b, t))).astype(np.int32)
        evidence = np.zeros((b, t), np.int32)
        aspect_positions = np.zeros(b, np.int32)
        polarities = rng.integers(0, 2, size=(b, m))  # mention 0 is the queried one
        for row in range(b):
            aspects = rng.choice(self.num_aspects, size=m, replace=False)
            segments = rng.permutation(m)
            inputs[row, 0] = self.first_aspect + aspects[0]
            inputs[row, 1] = SEP
            for mention in range(m):
                start = PREFIX + segments[mention] * self.segment
                position = start + rng.integers(0, self.segment - self.window)
                inputs[row, position] = self.first_aspect + aspects[mention]
                offsets = rng.choice(self.window, size=self.evidence_words, replace=False) + 1
                first = self.first_positive if polarities[row, mention] == 1 else self.first_negative
                words = first + rng.integers(0, self.num_opinion_words, size=self.evidence_words)
                inputs[row, position + offsets] = words
                if mention == 0:
                    aspect_positions[row] = position
                    evidence[row, position + offsets] = 1
        context = np.zeros((b, t), np.int32)
        context[:, PREFIX:] = 1
        context[np.arange(b), aspect_positions] = 0
        return {
            "inputs": inputs,
            "labels": polarities[:, 0].astype(np.int32),
            "lengths": np.full(b, t, np.int32),
            "weights": np.ones(b, np.float32),
            "aspect_positions": aspect_positions,
            "evidence": evidence,
            "context": context,
        }
