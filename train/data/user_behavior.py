"""Synthetic user-behaviour sequences for click-through-rate prediction, with planted interests.

Items 0 .. num_items - 1 belong to categories `item_categories(num_items, num_categories)`: item i is in category
i mod C (C = num_categories), the same in both splits. Each example is one user:

    interests   K distinct categories drawn uniformly (K = num_interests)            the planted interest
    behaviour j with probability interest_rate: a uniform item of a uniform interest category,
                otherwise a uniform item of any category (noise)                      j = 0 .. L - 1 (L = seq_len)
    label       1 with probability positive_fraction (balanced at 0.5)
    target      label 1: a uniform item of a uniform interest category;
                label 0: a uniform item of a uniform category outside the interests

so label = 1 exactly when category(target) is one of the user's interests, and the model can only tell by
comparing the target with the behaviours it attends to (the interests are not in the model's inputs).

Batch keys (B = per-process batch, L = seq_len, K = num_interests):
  behaviours            int32 [B, L]   item ids
  behaviour_categories  int32 [B, L]   their categories
  target                int32 [B]      candidate item id
  target_category       int32 [B]      its category
  interests             int32 [B, K]   the planted interest categories (ground truth, not a model input)
  labels                int32 [B]      click in {0, 1}
  weights               float32 [B]    1

Deterministic and resumable like every source: batch i is a function of (seed, split, i, process_index).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_fraction, check_int


def item_categories(num_items: int, num_categories: int) -> np.ndarray:
    """int32 [num_items]: the category of each item, item i -> i mod num_categories."""
    return (np.arange(num_items) % num_categories).astype(np.int32)


class UserBehaviorSource(DataSource):
    """Behaviour sequences of users with planted interest categories and a target item (see the module docstring).

    Options: num_items (>= 2 * num_categories, so every category holds >= 2 items), num_categories (>= 2),
    num_interests (K, in [1, num_categories - 1]), interest_rate (share of behaviours from the interests, in (0, 1)),
    positive_fraction (in (0, 1)).
    """

    name: ClassVar[str] = "user_behavior"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "num_items": 64,
        "num_categories": 8,
        "num_interests": 2,
        "interest_rate": 0.6,
        "positive_fraction": 0.5,
    }
    num_classes = 2

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        num_items, num_categories, num_interests, interest_rate, positive_fraction = (
            options["num_items"],
            options["num_categories"],
            options["num_interests"],
            options["interest_rate"],
            options["positive_fraction"],
        )
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.num_categories = check_int("num_categories", num_categories, 2)
        self.num_items = check_int("num_items", num_items, 2 * self.num_categories)
        self.num_interests = check_int("num_interests", num_interests, 1)
        if self.num_interests >= self.num_categories:
            raise ValueError(
                f"num_interests={self.num_interests} must be < num_categories={self.num_categories} (a negative "
                "target needs a category outside the interests)"
            )
        self.interest_rate = check_fraction("interest_rate", interest_rate)
        self.positive_fraction = check_fraction("positive_fraction", positive_fraction)
        self.categories = item_categories(self.num_items, self.num_categories)

    @property
    def element_spec(self) -> ElementSpec:
        b, n, k = self.batch_size, self.seq_len, self.num_interests
        i32 = np.dtype(np.int32)
        return {
            "behaviours": ((b, n), i32),
            "behaviour_categories": ((b, n), i32),
            "target": ((b,), i32),
            "target_category": ((b,), i32),
            "interests": ((b, k), i32),
            "labels": ((b,), i32),
            "weights": ((b,), np.dtype(np.float32)),
        }

    def _item_of(self, rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
        """A uniform item of each category in `categories` (any shape): category c holds items c, c + C, ..."""
        c = self.num_categories
        per_category = (self.num_items - 1 - categories) // c + 1
        return (categories + c * np.floor(rng.random(categories.shape) * per_category).astype(np.int64)).astype(
            np.int32
        )

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, n, k, c = self.global_batch_size, self.seq_len, self.num_interests, self.num_categories
        # K distinct interests per user: the first K of a random permutation of the categories.
        order = np.argsort(rng.random((b, c)), axis=1).astype(np.int32)
        interests, others = order[:, :k], order[:, k:]
        from_interest = rng.random((b, n)) < self.interest_rate
        planted = np.take_along_axis(interests, rng.integers(0, k, size=(b, n)), axis=1)
        behaviour_categories = np.where(from_interest, planted, rng.integers(0, c, size=(b, n))).astype(np.int32)
        behaviours = self._item_of(rng, behaviour_categories)
        labels = (rng.random(b) < self.positive_fraction).astype(np.int32)
        positive = interests[np.arange(b), rng.integers(0, k, size=b)]
        negative = others[np.arange(b), rng.integers(0, c - k, size=b)]
        target_category = np.where(labels == 1, positive, negative).astype(np.int32)
        return {
            "behaviours": behaviours,
            "behaviour_categories": behaviour_categories,
            "target": self._item_of(rng, target_category),
            "target_category": target_category,
            "interests": interests,
            "labels": labels,
            "weights": np.ones(b, np.float32),
        }
