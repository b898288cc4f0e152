"""Multiple-instance learning bags: a bag is positive when it holds at least one planted positive instance.

Each example is a bag of `seq_len` instance feature vectors (the first `lengths[b]` valid, the rest zero padding).
Instances are drawn around fixed prototypes in R^F (F = `feature_dim`), which depend on the seed only (the same for
both splits):

    negative prototypes  p_1 .. p_M      M = num_clusters, each a random unit direction times `signal`
    positive prototype   p_+             another random unit direction times `signal`
    instance             x = p + noise * e,   e ~ N(0, I_F)

A bag's label (int32, 1 = positive) is drawn with probability `positive_fraction`; a positive bag holds k positive
instances, k uniform in [1, max_positives], at random valid positions, and every other valid instance comes from a
random negative prototype. Negative bags hold only negative instances. So the label is decided by a few instances
(standard MIL: y = max_n y_n), and `instance_labels` keeps the ground truth of every instance for localisation
scores (does the model's attention point at the positive instances?).

Batch keys (B = per-process batch, N = seq_len, F = feature_dim):
  instances        float32 [B, N, F]   zero beyond lengths[b]
  lengths          int32 [B]           valid instances per bag, uniform in [min_instances, N] (N when None)
  labels           int32 [B]           bag labels in {0, 1}
  instance_labels  int32 [B, N]        1 for the planted positive instances, 0 elsewhere (also on padding)
  weights          float32 [B]         1

Deterministic and resumable like every source: batch i is a function of (seed, split, i, process_index).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_fraction, check_int

# The prototypes come from their own generator so that they are the same in both splits and every batch.
_PROTOTYPE_STREAM = 0x3111


def _check_positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def mil_prototypes(seed: int, feature_dim: int, num_clusters: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """(negative prototypes float32 [num_clusters, F], positive prototype float32 [F]), random unit directions
    scaled by `signal`, a function of `seed` alone."""
    rng = np.random.default_rng([seed, _PROTOTYPE_STREAM])
    directions = rng.standard_normal((num_clusters + 1, feature_dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    directions = (signal * directions).astype(np.float32)
    return directions[:num_clusters], directions[num_clusters]


class MILBagSource(DataSource):
    """Bags of instance feature vectors with a few planted positive instances (see the module docstring).

    Options: feature_dim (F, >= 2), num_clusters (negative prototypes, >= 1), max_positives (>= 1, at most the
    smallest bag), positive_fraction (in (0, 1)), min_instances (None = every bag has seq_len instances),
    signal (prototype norm, > 0), noise (instance noise std, > 0).
    """

    name: ClassVar[str] = "mil_bags"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "feature_dim": 16,
        "num_clusters": 4,
        "max_positives": 2,
        "positive_fraction": 0.5,
        "min_instances": None,
        "signal": 2.0,
        "noise": 1.0,
    }
    num_classes = 2

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        feature_dim, num_clusters, max_positives, positive_fraction, min_instances, signal, noise = (
            options["feature_dim"],
            options["num_clusters"],
            options["max_positives"],
            options["positive_fraction"],
            options["min_instances"],
            options["signal"],
            options["noise"],
        )
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.feature_dim = check_int("feature_dim", feature_dim, 2)
        self.num_clusters = check_int("num_clusters", num_clusters, 1)
        self.min_instances = self.seq_len if min_instances is None else check_int("min_instances", min_instances, 1)
        if self.min_instances > self.seq_len:
            raise ValueError(f"min_instances={self.min_instances} must be <= seq_len={self.seq_len} (the bag size)")
        self.max_positives = check_int("max_positives", max_positives, 1)
        if self.max_positives > self.min_instances:
            raise ValueError(
                f"max_positives={self.max_positives} must be <= the smallest bag ({self.min_instances} instances)"
            )
        self.positive_fraction = check_fraction("positive_fraction", positive_fraction)
        self.signal = _check_positive_number("signal", signal)
        self.noise = _check_positive_number("noise", noise)
        self.negative_prototypes, self.positive_prototype = mil_prototypes(
            self.seed, self.feature_dim, self.num_clusters, self.signal
        )

    @property
    def element_spec(self) -> ElementSpec:
        b, n, f = self.batch_size, self.seq_len, self.feature_dim
        return {
            "instances": ((b, n, f), np.dtype(np.float32)),
            "lengths": ((b,), np.dtype(np.int32)),
            "labels": ((b,), np.dtype(np.int32)),
            "instance_labels": ((b, n), np.dtype(np.int32)),
            "weights": ((b,), np.dtype(np.float32)),
        }

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, n, f = self.global_batch_size, self.seq_len, self.feature_dim
        lengths = rng.integers(self.min_instances, n + 1, size=b).astype(np.int32)
        labels = (rng.random(b) < self.positive_fraction).astype(np.int32)
        counts = np.where(labels == 1, rng.integers(1, self.max_positives + 1, size=b), 0)
        valid = np.arange(n)[None, :] < lengths[:, None]
        # Positive positions: the `counts[b]` valid positions of smallest random priority.
        priority = np.where(valid, rng.random((b, n)), 2.0)
        rank = np.argsort(np.argsort(priority, axis=1), axis=1)
        instance_labels = (rank < counts[:, None]).astype(np.int32)
        clusters = rng.integers(0, self.num_clusters, size=(b, n))
        centres = np.where(
            instance_labels[..., None] == 1, self.positive_prototype[None, None, :], self.negative_prototypes[clusters]
        )
        instances = centres + np.float32(self.noise) * rng.standard_normal((b, n, f), dtype=np.float32)
        instances = np.where(valid[..., None], instances, 0.0).astype(np.float32)
        return {
            "instances": instances,
            "lengths": lengths,
            "labels": labels,
            "instance_labels": instance_labels,
            "weights": np.ones(b, np.float32),
        }
