"""The data-source protocol shared by every pipeline in `train.data`, plus argument checks.

A source yields per-process batches: dicts of numpy arrays whose leading axis is the per-process batch size
`batch_size // process_count`. Batch number `i` is a pure function of `(seed, split, i, process_index)`
(its generator is `np.random.default_rng([seed, split_id, i, process_index])`), so the iterator state is
just the step counter and resuming from a checkpoint is exact. Different processes draw different rows.
"""

from __future__ import annotations

import abc
import difflib
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np

SPLITS = ("train", "valid")

# name -> (per-process shape, dtype)
ElementSpec = dict[str, tuple[tuple[int, ...], np.dtype]]


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Returns `value` as an int, or raises ValueError naming `name` if it is not an int >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_fraction(name: str, value: Any, *, low: float = 0.0, high: float = 1.0) -> float:
    """Returns `value` as a float strictly inside (low, high), or raises ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{name} must be a number in ({low}, {high}), got {value!r}")
    if not low < float(value) < high:
        raise ValueError(f"{name} must be in ({low}, {high}), got {value}")
    return float(value)


def check_options(source: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Merges `options` over `defaults`; an unknown option raises ValueError naming it and the valid ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"unknown option(s) for data source {source!r}: {', '.join(hints)}; "
            f"valid options: {sorted(defaults) or 'none'}"
        )
    return {**defaults, **options}


class DataSource(abc.ABC):
    """A deterministic, resumable stream of per-process batches.

    Subclasses set `name` and `OPTIONS` (option name -> default, the keys `make_source` accepts), implement
    `element_spec` and `_make_batch(rng, step)`, and may set `num_batches` (None means an endless stream;
    an int makes the source finite: `next_batch` then raises StopIteration after that many batches).

    Attributes:
      split: "train" or "valid".
      seed: the non-negative int seed.
      global_batch_size: rows per step over all processes.
      batch_size: rows per step on this process (`global_batch_size // process_count`).
      process_index, process_count: this process's place in a multi-host job.
      vocab_size: token vocabulary of sequence sources (None for image sources).
    """

    name: ClassVar[str] = "base"
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        *,
        split: str,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        batch_size = check_int("batch_size", batch_size, 1)
        process_count = check_int("process_count", process_count, 1)
        process_index = check_int("process_index", process_index, 0)
        if process_index >= process_count:
            raise ValueError(f"process_index must be < process_count={process_count}, got {process_index}")
        if batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by process_count={process_count} "
                "(each process yields batch_size // process_count rows)"
            )
        self.split = split
        self.seed = check_int("seed", seed, 0)
        self.global_batch_size = batch_size
        self.batch_size = batch_size // process_count
        self.process_index = process_index
        self.process_count = process_count
        self.num_batches: int | None = None
        self.vocab_size: int | None = None
        self._step = 0

    # --- what subclasses provide -------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def element_spec(self) -> ElementSpec:
        """Maps each batch key to its per-process (shape, dtype)."""

    @abc.abstractmethod
    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        """Builds batch `step` from `rng` (already seeded from seed, split, step and process index)."""

    # --- the protocol --------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Index of the batch the next `next_batch` call returns."""
        return self._step

    def rng_for(self, step: int) -> np.random.Generator:
        """The generator of batch `step` on this process; depends on nothing else."""
        return np.random.default_rng([self.seed, SPLITS.index(self.split), step, self.process_index])

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """Batch number `step` without moving the iterator (random access; same result as iterating)."""
        step = check_int("step", step, 0)
        if self.num_batches is not None and step >= self.num_batches:
            raise ValueError(f"step must be < num_batches={self.num_batches} for this finite source, got {step}")
        return self._make_batch(self.rng_for(step), step)

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next per-process batch; raises StopIteration when a finite source is exhausted."""
        if self.num_batches is not None and self._step >= self.num_batches:
            raise StopIteration
        batch = self.batch_at(self._step)
        self._step += 1
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_batch()

    def reset(self) -> None:
        """Goes back to batch 0 (e.g. before each evaluation pass over a finite valid source)."""
        self._step = 0

    def get_state(self) -> dict[str, int | str]:
        """JSON-serialisable iterator state: {"source", "split", "seed", "step"}."""
        return {"source": self.name, "split": self.split, "seed": self.seed, "step": self._step}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a `get_state` result; the next batch is then exactly the one that would have followed.

        Only "step" is required; "source", "split" and "seed", when present, must match this source
        (a mismatch means the checkpoint belongs to a different data stream).
        """
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError(f"state must be a mapping with a 'step' entry (from get_state), got {state!r}")
        for key, mine in (("source", self.name), ("split", self.split), ("seed", self.seed)):
            if key in state and state[key] != mine:
                raise ValueError(f"state[{key!r}]={state[key]!r} does not match this source's {key} {mine!r}")
        self._step = check_int("state['step']", state["step"], 0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, batch_size={self.global_batch_size}, "
            f"seed={self.seed}, process={self.process_index}/{self.process_count}, step={self._step})"
        )
