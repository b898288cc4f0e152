"""The data-source protocol shared by every pipeline in `train.data`, plus argument checks.

A source yields per-process batches: dicts of numpy arrays whose leading axis is the per-process batch size
`batch_size // process_count`. Every source only says how to build GLOBAL batch `i` (all processes' rows) from
its generator `np.random.default_rng([seed, split_id, i, 0])`; the pipeline around it is grain's
(https://github.com/google/grain): the global rows are a `grain.MapDataset` (row r is row r % batch_size of
global batch r // batch_size), sharded by process with `rows[process_index::process_count]`, batched with
`MapDataset.batch`, and iterated through `to_iter_dataset(grain.ReadOptions(...))`, which prefetches in
background threads when `prefetch > 0`. So batch `i` of a process is a pure function of
`(seed, split, i, process_index)`, the processes' rows are disjoint and together form the single-process
batch, and the iterator state is grain's (JSON) state: resuming from a checkpoint is exact.
"""

from __future__ import annotations

import abc
import collections
import difflib
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

SPLITS = ("train", "valid")

# name -> (per-process shape, dtype)
ElementSpec = dict[str, tuple[tuple[int, ...], np.dtype]]


def token_prediction_spec(batch_size: int, seq_len: int) -> ElementSpec:
    """The batch of a token-prediction source: "inputs" and "targets" int32 and "weights" float32, each
    [batch_size, seq_len] (weights 0 where a position is not scored)."""
    shape = (batch_size, seq_len)
    return {
        "inputs": (shape, np.dtype(np.int32)),
        "targets": (shape, np.dtype(np.int32)),
        "weights": (shape, np.dtype(np.float32)),
    }


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
    """A deterministic, resumable stream of per-process batches, iterated by grain.

    Subclasses set `name` and `OPTIONS` (option name -> default, the keys `make_source` accepts), implement
    `element_spec` and `_make_batch(rng, step)` (GLOBAL batch `step`: `global_batch_size` rows), and take their
    options in `_configure(seq_len, options)` (the merged options dict; the constructor arguments shared by
    every source are parsed once, here). They may set `num_batches` (None: an endless stream; an int makes the
    source finite: `next_batch` then raises StopIteration after that many batches).

    Attributes:
      split: "train" or "valid".
      seed: the non-negative int seed.
      global_batch_size: rows per step over all processes.
      batch_size: rows per step on this process (`global_batch_size // process_count`).
      process_index, process_count: this process's place in a multi-host job.
      vocab_size: token vocabulary of sequence sources (None for image sources).
      prefetch: batches grain builds ahead in a background thread (0: none; see `set_prefetch`).
    """

    name: ClassVar[str] = "base"
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        *,
        split: str = "train",
        batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        seq_len: int | None = None,
        **options: Any,
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
        self.prefetch = 0
        self._step = 0
        self._batches: Any = None  # the grain MapDataset of this process's batches, built on first use
        self._iterator: Any = None  # its grain DatasetIterator, positioned at self._step
        self._configure(seq_len, check_options(self.name, options, self.OPTIONS))

    # --- what subclasses provide -------------------------------------------------------------------
    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        """Checks and stores seq_len and the source's options (all of OPTIONS, defaults merged in); this default
        keeps seq_len as given and takes no options."""
        self.seq_len = seq_len

    @property
    @abc.abstractmethod
    def element_spec(self) -> ElementSpec:
        """Maps each batch key to its per-process (shape, dtype)."""

    @abc.abstractmethod
    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        """Builds GLOBAL batch `step` (`global_batch_size` rows on the leading axis of every array) from `rng`
        (`rng_for(step)`); grain takes this process's rows of it."""

    # --- the grain pipeline ------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Index of the batch the next `next_batch` call returns."""
        return self._step

    def rng_for(self, step: int) -> np.random.Generator:
        """The generator of global batch `step`; depends on nothing else (the same on every process)."""
        return np.random.default_rng([self.seed, SPLITS.index(self.split), step, 0])

    def grain_dataset(self) -> Any:
        """This process's batches as a `grain.MapDataset` (random access: `dataset[i]` is batch i)."""
        if self._batches is None:
            import grain  # deferred: grain imports orbax and JAX, which `import train.data` does not need

            # Grain's elements are row numbers: it shards them by process and groups them into batches; batch_fn
            # then gathers each batch's rows from the global batch in one indexing step (per-row Python is slow).
            global_rows = _GlobalRows(self)
            shard = grain.MapDataset.range(len(global_rows))[self.process_index :: self.process_count]
            self._batches = shard.batch(self.batch_size, drop_remainder=True, batch_fn=global_rows.gather)
        return self._batches

    def _grain_iterator(self) -> Any:
        if self._iterator is None:
            import grain

            threads = 1 if self.prefetch else 0  # batch building is serialised by _GlobalRows; one thread suffices
            read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self.prefetch)
            self._iterator = iter(self.grain_dataset().to_iter_dataset(read))
            if self._step:
                self._iterator.set_state({"next_index": self._step})
        return self._iterator

    def _drop_iterator(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()  # stops its prefetch thread
        self._iterator = None

    def set_prefetch(self, prefetch: int) -> None:
        """Builds up to `prefetch` batches ahead in a background thread (0: on demand); batches are unchanged."""
        prefetch = check_int("prefetch", prefetch, 0)
        if prefetch != self.prefetch:
            self._drop_iterator()
            self.prefetch = prefetch

    # --- the protocol --------------------------------------------------------------------------------
    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """Batch number `step` without moving the iterator (random access; same result as iterating)."""
        step = check_int("step", step, 0)
        if self.num_batches is not None and step >= self.num_batches:
            raise ValueError(f"step must be < num_batches={self.num_batches} for this finite source, got {step}")
        return self.grain_dataset()[step]

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next per-process batch; raises StopIteration when a finite source is exhausted."""
        if self.num_batches is not None and self._step >= self.num_batches:
            raise StopIteration
        batch = next(self._grain_iterator())
        self._step += 1
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_batch()

    def reset(self) -> None:
        """Goes back to batch 0 (e.g. before each evaluation pass over a finite valid source)."""
        self._drop_iterator()
        self._step = 0

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable iterator state: {"source", "split", "seed", "step", "iterator": grain's state}."""
        return {
            "source": self.name,
            "split": self.split,
            "seed": self.seed,
            "step": self._step,
            "iterator": self._grain_iterator().get_state(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a `get_state` result; the next batch is then exactly the one that would have followed.

        "step" is required; "iterator" (grain's iterator state) is restored into grain when present (a state
        without it resumes at "step"). "source", "split" and "seed", when present, must match this source
        (a mismatch means the checkpoint belongs to a different data stream).
        """
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError(f"state must be a mapping with a 'step' entry (from get_state), got {state!r}")
        for key, mine in (("source", self.name), ("split", self.split), ("seed", self.seed)):
            if key in state and state[key] != mine:
                raise ValueError(f"state[{key!r}]={state[key]!r} does not match this source's {key} {mine!r}")
        step = check_int("state['step']", state["step"], 0)
        iterator_state = state.get("iterator", {"next_index": step})
        if not isinstance(iterator_state, Mapping) or iterator_state.get("next_index", step) != step:
            raise ValueError(
                f"state['iterator']={iterator_state!r} must be grain's iterator state at step {step} "
                f"(a mapping with next_index={step})"
            )
        self._drop_iterator()
        self._step = 0
        self._grain_iterator().set_state(dict(iterator_state))
        self._step = step

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, batch_size={self.global_batch_size}, "
            f"seed={self.seed}, process={self.process_index}/{self.process_count}, step={self._step})"
        )


class _GlobalRows:
    """The row stream of `source`: row r is row r % global_batch_size of global batch r // global_batch_size.

    Global batches come from `_make_batch` (so row r is a pure function of (seed, split, r)); they are built under
    a lock (sources need not be thread-safe with grain's prefetch thread) and the last few are kept.
    """

    _KEEP = 4

    def __init__(self, source: DataSource) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._built: collections.OrderedDict[int, dict[str, np.ndarray]] = collections.OrderedDict()

    def __len__(self) -> int:
        rows = self._source.global_batch_size
        batches = self._source.num_batches
        return (sys.maxsize // rows if batches is None else batches) * rows

    def gather(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Rows `indices` of the row stream, stacked in order: each key [len(indices), ...]."""
        steps, rows = np.divmod(np.asarray(indices, dtype=np.int64), self._source.global_batch_size)
        out: dict[str, np.ndarray] = {}
        for step in np.unique(steps):  # one step unless a batch straddles global batches
            here = steps == step
            for key, value in self._global_batch(int(step)).items():
                if key not in out:
                    out[key] = np.empty((len(rows), *value.shape[1:]), value.dtype)
                out[key][here] = value[rows[here]]
        return out

    def _global_batch(self, step: int) -> dict[str, np.ndarray]:
        with self._lock:
            if step in self._built:
                self._built.move_to_end(step)
                return self._built[step]
            source = self._source
            batch = source._make_batch(source.rng_for(step), step)
            for key, value in batch.items():
                if np.ndim(value) == 0 or len(value) != source.global_batch_size:
                    raise ValueError(
                        f"data source {source.name!r}: _make_batch returned {key!r} with shape {np.shape(value)} "
                        f"for step {step}; expected global_batch_size={source.global_batch_size} rows on axis 0 "
                        "(grain takes this process's rows)"
                    )
            self._built[step] = batch
            if len(self._built) > self._KEEP:
                self._built.popitem(last=False)
            return batch
