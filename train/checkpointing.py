"""Checkpoints of the train state, data-iterator state, RNG and config, on orbax ``CheckpointManager``.

Each step directory ``<directory>/<step>/`` holds three orbax items:

- ``state``: the train state pytree (``StandardSave``), restored straight onto the current mesh by passing
  abstract arrays with shardings, whatever mesh wrote it;
- ``data``: the data-iterator state of every process (JSON), so each process resumes its own shard;
- ``meta``: JSON with the step, the run config, the RNG key data (uint32 words) and the path and shape of
  every state leaf, checked before restoring so a different model gives a readable error, not a crash
  deep inside tensorstore.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp*`` and renames it when complete, so a crash
mid-save never leaves a half-written step that ``latest_step`` would report.

Integrity: ``meta`` also records a 64-bit checksum of every state array (``state_checksums``: computed on
the devices from the array's bits, so it does not depend on the mesh), the SHA-256 of the ``data`` item and
of ``meta`` itself, and which leaves held nan/inf. ``restore`` recomputes and compares them; a checkpoint
that fails (or that orbax cannot read: a truncated or deleted file) raises ``CheckpointDamaged``, and
``restore()`` without a step falls back to the newest checkpoint that verifies (``skipped`` lists the
damaged ones). A failed asynchronous save is reported by ``poll`` (call it every step) as
``CheckpointSaveError`` with the step, the reason and the newest checkpoint on disk.

Several processes: orbax's background save threads meet at barriers (all writes done, then the rename by
process 0). A process whose write fails never arrives, so the others would wait there for orbax's 20-minute
timeout. Here those barriers are ``AbortableBarrier``s on the coordination service's key-value store: the
failing process publishes its reason, every barrier of every process gives up at once, and ``poll`` (a
collective) stops every process at the same step with the same line, naming the process that failed.

After a failed save, tensorstore writes still in flight may finish once orbax has closed the asyncio loop that
awaited them; the ``RuntimeError('Event loop is closed')`` of those callbacks goes to ``sys.unraisablehook``,
which a Checkpointer filters (only that error), so a failed save prints nothing but its one line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from .distributed import AbortableBarrier, BarrierAborted

_FORMAT_VERSION = 2  # 2: checksums of the state arrays and SHA-256 of the data and meta items
DAMAGED_SUFFIX = "-damaged"  # damaged step directories are moved from <directory>/<step> to <directory>-damaged/


class CheckpointDamaged(RuntimeError):
    """A checkpoint that cannot be read or does not match the checksums recorded when it was written.

    Attributes:
      step: the checkpoint's step (None when the message covers several checkpoints).
      path: its step directory.
      reason: what failed, in a few words.
    """

    def __init__(self, message: str, *, step: int | None = None, path: str | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.step, self.path, self.reason = step, path, reason


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (full disk, read-only workdir, ...); the message is one line.

    Attributes:
      step: the step whose save failed (None if unknown).
      reason: the operating system's words for it ("no space left on device"), or the error's first line.
      last_step: the newest checkpoint that is on disk, or None.
      process: with several processes, the index of the process whose write failed (None: single process).
    """

    def __init__(self, step: int | None, reason: str, last_step: int | None, *, process: int | None = None) -> None:
        which = f"checkpoint {step}" if step is not None else "a checkpoint"
        where = f" on process {process}" if process is not None else ""
        last = f"the last checkpoint on disk is {last_step}" if last_step is not None else "no checkpoint is on disk"
        super().__init__(f"{which} could not be written{where}: {reason}; {last}")
        self.step, self.reason, self.last_step, self.process = step, reason, last_step, process


def _path_str(path: tuple[Any, ...]) -> str:
    """'params/layers_0/attention/query/kernel' style name of a pytree path."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def _shapes(tree: Any) -> dict[str, list[int]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(path): [int(d) for d in np.shape(leaf)] for path, leaf in leaves}


def jsonable(obj: Any) -> Any:
    """Plain-JSON copy of ``obj`` (numpy/jax scalars and arrays become numbers and lists)."""

    def default(x: Any) -> Any:
        if isinstance(x, np.generic | np.ndarray | jax.Array):
            return np.asarray(x).tolist()
        if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
            return x.to_dict()
        if isinstance(x, Mapping):
            return dict(x)
        if isinstance(x, set | frozenset):
            return sorted(x)
        return str(x)

    return json.loads(json.dumps(obj, default=default))


def _allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON value, in process order (a collective when there are several processes)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[: int(n)].tobytes().decode()) for row, n in zip(gathered, np.ravel(lengths), strict=True)]


def _to_host(x: Any) -> np.ndarray:
    """Full value of a possibly multi-process array, as numpy, on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _as_abstract(path: tuple[Any, ...], leaf: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None or not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise ValueError(
            f"abstract_state leaf {_path_str(path)!r} is {leaf!r}; expected a jax.ShapeDtypeStruct with "
            ".sharding set (or a jax.Array), so the checkpoint can be restored onto the current mesh"
        )
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _find_mesh(abstract: Any) -> jax.sharding.Mesh | None:
    for leaf in jax.tree_util.tree_leaves(abstract):
        if isinstance(leaf.sharding, NamedSharding):
            return leaf.sharding.mesh
    return None


# -- integrity: checksums of arrays and JSON -----------------------------------------------------------

_CHECKSUM_SEEDS = (0x243F6A88, 0x85A308D3)  # two independent 32-bit lanes (hex digits of pi)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 in which every input bit flips about half of
    the output bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words: [*x.shape] for 1-, 2- and 4-byte dtypes (zero-extended),
    [*x.shape, 2] for 8-byte dtypes."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4 or size == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
    raise ValueError(f"a state array has dtype {x.dtype}; expected a 1-, 2-, 4- or 8-byte dtype to checksum")


def _leaf_summary(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(uint32[2] checksum, bool finite) of one array.

    Lane ``j`` is ``sum_i fmix32(word_i ^ fmix32(i + seed_j)) mod 2**32`` over the flat index ``i`` of every
    word, computed in the array's own shape (no reshape, so no resharding) with exact integer sums: the
    result is the same on any mesh and any reduction order. Changing any one word changes both lanes.
    """
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    lanes = [jnp.sum(_fmix32(words ^ _fmix32(index + jnp.uint32(seed))), dtype=jnp.uint32) for seed in _CHECKSUM_SEEDS]
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack(lanes), finite


_summaries = jax.jit(lambda leaves: [_leaf_summary(x) for x in leaves])


def state_checksums(tree: Any) -> tuple[dict[str, str], list[str]]:
    """Checksums of every array of ``tree`` and the paths of the leaves holding nan/inf.

    Args:
      tree: pytree of arrays (``jax.Array``, possibly sharded over several processes, or numpy).

    Returns:
      ``({path: 16 hex digits}, [paths of leaves with a nan or inf])``. The checksum depends only on the
      array's shape, dtype and values, not on its sharding. With several processes this is a collective.
    """
    leaves = [(_path_str(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
    groups: dict[tuple[int, ...], list[int]] = {}  # one jitted call per set of devices the leaves live on
    arrays = []
    for i, (_, leaf) in enumerate(leaves):
        array = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        arrays.append(array)
        groups.setdefault(tuple(sorted(d.id for d in array.sharding.device_set)), []).append(i)
    checksums: dict[str, str] = {}
    nonfinite: list[str] = []
    for indices in groups.values():
        for i, (lanes, finite) in zip(indices, _summaries([arrays[i] for i in indices]), strict=True):
            path = leaves[i][0]
            checksums[path] = "".join(f"{int(lane):08x}" for lane in _to_host(lanes))
            if not bool(_to_host(finite)):
                nonfinite.append(path)
    return checksums, sorted(nonfinite)


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _save_failure_reason(error: BaseException) -> str:
    """'no space left on device' for an OSError anywhere in the exception chain (or a tensorstore error that
    carries an ``os_error_code``), else the error's first line."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        if code is None:
            match = re.search(r"os_error_code='?(\d+)", str(current))
            code = int(match.group(1)) if match else None
        if code in errno.errorcode:
            return os.strerror(code).lower()
        current = current.__cause__ or current.__context__
    return _first_line(error)


def _is_closed_loop_callback(unraisable: Any) -> bool:
    """Whether an unraisable exception is tensorstore handing a finished write to an asyncio loop that is closed.

    Tensorstore runs a future's done-callbacks on its own threads; the callback of an awaited future calls the
    awaiting loop's ``call_soon_threadsafe``, which raises ``RuntimeError('Event loop is closed')`` once orbax
    has closed that loop (after a failed save, writes still in flight finish later). Tensorstore passes the error
    to ``sys.unraisablehook`` (``PyErr_WriteUnraisable(NULL)``), whose default prints a bare traceback. Nothing
    is lost: no coroutine is left to receive the result, and a failed save is reported by ``poll``/``wait``.
    """
    error = unraisable.exc_value
    if unraisable.object is not None or not isinstance(error, RuntimeError) or str(error) != "Event loop is closed":
        return False
    return any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(unraisable.exc_traceback))


def _quiet_closed_loop_callbacks() -> None:
    """Installs (once) a ``sys.unraisablehook`` that drops ``_is_closed_loop_callback`` errors and passes every
    other unraisable exception to the hook that was there before."""
    if getattr(sys.unraisablehook, "_drops_closed_loop_callbacks", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook._drops_closed_loop_callbacks = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


_NAMESPACES: dict[str, int] = {}  # checkpoint directory -> Checkpointers made for it in this process


def _barrier_namespace(directory: str) -> str:
    """A key-value-store prefix for the save barriers of one Checkpointer: the same on every process (each
    process makes its Checkpointers in the same order) and different for every Checkpointer of a run."""
    count = _NAMESPACES.get(directory, 0)
    _NAMESPACES[directory] = count + 1
    return f"attn_checkpoints/{hashlib.sha256(directory.encode()).hexdigest()[:16]}/{count}"


class Checkpointer:
    """Saves and restores training checkpoints in ``directory`` (orbax ``CheckpointManager``).

    Args:
      directory: where step directories go; created if missing.
      keep: how many of the newest checkpoints to keep (older ones are deleted after a save).
      save_every: ``save`` writes only on steps that are multiples of this, unless ``force=True``.
      async_save: write in a background thread; ``save`` returns once the arrays are copied to host.
      keep_every: additionally keep every checkpoint whose step is a multiple of this (None: off).

    Attributes:
      skipped: ``[(step, reason), ...]`` of the damaged checkpoints the last ``restore()`` passed over.

    Call ``save``/``poll``/``restore``/``wait`` from every process: orbax coordinates the hosts. The first
    Checkpointer of a process puts a filter in front of ``sys.unraisablehook`` that drops only tensorstore's late
    callbacks into a closed asyncio loop (see the module docstring).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int,
        save_every: int,
        async_save: bool = True,
        keep_every: int | None = None,
    ) -> None:
        if int(keep) < 1:
            raise ValueError(f"keep={keep} must be >= 1 (number of checkpoints to keep)")
        if int(save_every) < 1:
            raise ValueError(f"save_every={save_every} must be >= 1 (steps between checkpoints)")
        if keep_every is not None and int(keep_every) < 1:
            raise ValueError(f"keep_every={keep_every} must be None or >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = int(keep)
        self.save_every = int(save_every)
        self.async_save = bool(async_save)
        self.skipped: list[tuple[int, str]] = []
        self._pending: int | None = None  # the step of an asynchronous save not yet known to have finished
        self._failed = False  # a save failed and was reported: closing must not raise it again or wait on it
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            keep_period=keep_every,
            save_interval_steps=self.save_every,
            enable_async_checkpointing=self.async_save,
            create=True,
            # Leftovers of saves that crashed before their atomic rename are never valid: drop them.
            cleanup_tmp_directories=True,
        )
        _quiet_closed_loop_callbacks()
        self._barrier: AbortableBarrier | None = None
        if jax.process_count() > 1:
            self._barrier = AbortableBarrier(_barrier_namespace(self.directory), describe=_save_failure_reason)
            options.async_options = ocp.AsyncOptions(barrier_sync_fn=self._barrier)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- queries -----------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest fully written step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All fully written steps, ascending."""
        return sorted(self._manager.all_steps())

    def step_path(self, step: int) -> str:
        """The directory of checkpoint ``step``."""
        return os.path.join(self.directory, str(int(step)))

    def last_good_step(self, before: int | None = None) -> int | None:
        """The newest checkpoint (older than ``before``, if given) whose train state was finite when saved.

        Checkpoints whose ``meta`` cannot be read or fails its SHA-256 do not count. The trainer saves only
        after the step's loss was checked, so this is the last checkpoint with a finite loss *and* finite
        parameters and optimizer state.
        """
        for step in sorted(self.all_steps(), reverse=True):
            if before is not None and step >= before:
                continue
            try:
                meta = self.read_meta(step)
            except Exception:  # noqa: BLE001 - an unreadable checkpoint is not a good one
                continue
            if self._meta_problem(meta) is None and not meta.get("nonfinite"):
                return step
        return None

    # -- save --------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        state: Any,
        data_state: Mapping[str, Any] | None,
        rng: jax.Array | None,
        config: Mapping[str, Any] | None,
        force: bool = False,
    ) -> bool:
        """Saves a checkpoint for ``step`` if ``step % save_every == 0`` or ``force``.

        Args:
          step: training step (the number of optimizer steps the state has taken).
          state: pytree of ``jax.Array`` (sharded as in training); any structure orbax can save.
          data_state: this process's data-iterator state; JSON-serialisable dict.
          rng: a PRNG key, raw (uint32 [..., 2]) or typed (``jax.random.key``), or None. Saved as key data.
          config: the run config as a dict (``ConfigDict.to_dict()``), stored as JSON for reference.
          force: save even off the ``save_every`` grid (preemption, end of training).

        Returns:
          True when a save was started (with ``async_save`` it may still be in flight: see ``poll``/``wait``);
          False when the step is off the grid or already saved.

        Raises:
          CheckpointSaveError: this save, or a previous asynchronous one, failed.
        """
        step = int(step)
        if self._pending is not None:
            self.wait()  # orbax would wait for the previous save anyway; this way its failure names its step
        if not force and step % self.save_every:
            return False
        if step in self._manager.all_steps():
            return False
        rng_meta = None
        if rng is not None:
            typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
            key_data = jax.random.key_data(rng) if typed else rng
            key_data = _to_host(key_data)
            rng_meta = {
                "impl": str(jax.random.key_impl(rng)) if typed else None,
                "dtype": str(key_data.dtype),
                "shape": list(key_data.shape),
                "data": key_data.ravel().tolist(),
            }
        checksums, nonfinite = state_checksums(state)
        data = {"process_count": jax.process_count(), "states": _allgather_json(jsonable(data_state))}
        meta = {
            "format": _FORMAT_VERSION,
            "step": step,
            "config": jsonable(dict(config) if config is not None else {}),
            "rng": rng_meta,
            "shapes": _shapes(state),
            "checksums": checksums,
            "nonfinite": nonfinite,
            "data_sha256": _sha256_json(data),
        }
        meta["meta_sha256"] = _sha256_json(meta)
        try:
            started = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,
            )
        except Exception as error:
            failure = self._failure(error)
            if self._barrier is not None and failure[0] == jax.process_index():
                self._barrier.abort(failure[1])  # the other processes' save threads must not wait for this one
            raise self._save_error(step, failure) from error
        if started and self.async_save:
            self._pending = step
        return started

    def poll(self) -> None:
        """Raises ``CheckpointSaveError`` at once if an asynchronous save has failed; cheap, never blocks.

        Call it every step: a full disk or a read-only workdir then stops the run at the next step, not at
        the next save. With several processes this is a collective while a save is in flight (the processes
        agree on the outcome, so they all stop at the same step).
        """
        if self._pending is None:
            return
        finished = not self._manager.is_saving_in_progress()
        failure = self._barrier.aborted() if self._barrier is not None else None
        if failure is None and finished:
            try:
                self._manager.wait_until_finished()  # returns at once: the save thread has ended
                self._manager.check_for_errors()
            except Exception as error:  # noqa: BLE001 - reported as CheckpointSaveError below
                failure = self._failure(error)
        if jax.process_count() > 1:  # every process's view, so all stop at this step with the same line
            flags = multihost_utils.process_allgather(np.array([finished, failure is not None], np.bool_))
            flags = np.asarray(flags).reshape(-1, 2)
            finished = bool(np.all(flags[:, 0]))
            if np.any(flags[:, 1]):  # which process failed and why: the lowest-numbered failure any process saw
                failure = min(tuple(seen) for seen in _allgather_json(failure) if seen is not None)
        if failure is not None:
            step, self._pending = self._pending, None
            raise self._save_error(step, failure)
        if finished:
            self._pending = None

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are finished; ``CheckpointSaveError`` if one failed."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as error:
            step, self._pending = self._pending, None
            raise self._save_error(step, self._failure(error)) from error
        self._pending = None

    def _failure(self, error: BaseException) -> tuple[int | None, str]:
        """(process whose write failed, reason) of a save error; the process is None with a single process.

        With several processes, an error that is (or was caused by) ``BarrierAborted`` is another process's
        failure (or this one's, published by its save thread): that process and its reason."""
        if self._barrier is None:
            return None, _save_failure_reason(error)
        seen, current = set(), error
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            if isinstance(current, BarrierAborted):
                return current.process, current.reason
            current = current.__cause__ or current.__context__
        return jax.process_index(), _save_failure_reason(error)

    def _save_error(self, step: int | None, failure: tuple[int | None, str]) -> CheckpointSaveError:
        self._failed = True
        try:
            self._manager.reload()
            on_disk = [s for s in self._manager.all_steps() if s != step]
        except Exception:  # noqa: BLE001 - the directory itself may be gone; say what is known
            on_disk = []
        process, reason = failure
        return CheckpointSaveError(step, reason, max(on_disk) if on_disk else None, process=process)

    # -- restore -----------------------------------------------------------------------------------

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The ``meta`` JSON of ``step`` (default: latest): step, config, rng, shapes, checksums."""
        step = self._resolve_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(
        self,
        step: int | None = None,
        *,
        abstract_state: Any,
        check_meta: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[Any, dict[str, Any] | None, jax.Array | None, dict[str, Any]]:
        """Restores ``step`` (default: the newest checkpoint that verifies) onto the shardings of ``abstract_state``.

        Every restore is verified: the ``meta`` and ``data`` items against their SHA-256 and every state array
        against the checksum recorded at save time. Without ``step``, damaged checkpoints are passed over
        (newest first) and listed in ``self.skipped``.

        Args:
          step: which checkpoint; None for the newest that verifies.
          abstract_state: the train state's structure as ``jax.ShapeDtypeStruct`` leaves with ``.sharding``
            set (``jax.Array`` leaves also work); the restored arrays get these shapes, dtypes and
            shardings, so a checkpoint written on any mesh restores onto the current one.
          check_meta: called with a candidate's (verified) meta before its arrays are read; whatever it
            raises (e.g. a config that differs from the saved one) propagates.

        Returns:
          ``(state, data_state, rng, meta)``: the state; this process's data-iterator state; the RNG in the
          form it was saved (typed key or raw uint32 key data; replicated on the state's mesh); and the
          meta dict (``step``, ``config``, ``shapes``, ``rng``, ``checksums``).

        Raises:
          FileNotFoundError: no checkpoint (or not this step) in the directory.
          ValueError: the checkpoint's state tree differs from ``abstract_state`` (names the first
            differing path and both shapes).
          CheckpointDamaged: ``step`` is damaged, or (``step=None``) every checkpoint is.
        """
        abstract = jax.tree_util.tree_map_with_path(_as_abstract, abstract_state)
        self.skipped = []
        if step is not None:
            return self._restore_verified(self._resolve_step(step), abstract, check_meta)
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        for candidate in steps:
            try:
                return self._restore_verified(candidate, abstract, check_meta)
            except CheckpointDamaged as error:
                self.skipped.append((candidate, error.reason))
        listing = "; ".join(f"{s}: {reason}" for s, reason in self.skipped)
        raise CheckpointDamaged(
            f"every checkpoint in {self.directory} is damaged ({listing}); move the folder away to start over"
        )

    def _restore_verified(
        self, step: int, abstract: Any, check_meta: Callable[[dict[str, Any]], None] | None
    ) -> tuple[Any, dict[str, Any] | None, jax.Array | None, dict[str, Any]]:
        path = self.step_path(step)

        def damaged(reason: str) -> CheckpointDamaged:
            return CheckpointDamaged(f"checkpoint {path} is damaged: {reason}", step=step, path=path, reason=reason)

        try:
            meta = self.read_meta(step)
        except Exception as error:  # noqa: BLE001 - a missing or garbled meta item
            raise damaged(f"its meta item cannot be read ({_first_line(error)})") from None
        problem = self._meta_problem(meta)
        if problem is not None:
            raise damaged(problem)
        if check_meta is not None:
            check_meta(meta)
        self._check_shapes(step, meta.get("shapes", {}), _shapes(abstract))
        problem = None
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()),
            )
        except Exception as error:  # noqa: BLE001 - truncated, deleted or garbled files
            problem = f"its arrays cannot be read ({_first_line(error)})"
        if jax.process_count() > 1:  # every process must pass over the same checkpoints
            failed = multihost_utils.process_allgather(np.array([problem is not None], np.bool_))
            if np.any(failed) and problem is None:
                problem = "its arrays cannot be read on another process"
        if problem is not None:
            raise damaged(problem)
        if "data_sha256" in meta and _sha256_json(restored["data"]) != meta["data_sha256"]:
            raise damaged("its data-iterator state does not match the SHA-256 recorded when it was saved")
        if "checksums" in meta:
            checksums, _ = state_checksums(restored["state"])
            wrong = sorted(name for name, value in checksums.items() if meta["checksums"].get(name) != value)
            if wrong:
                which = f"{wrong[0]} and {len(wrong) - 1} more arrays do" if len(wrong) > 1 else f"{wrong[0]} does"
                raise damaged(f"{which} not match the checksum recorded when it was saved")
        return restored["state"], self._pick_data_state(restored["data"]), self._rng(meta, abstract), meta

    @staticmethod
    def _meta_problem(meta: Mapping[str, Any]) -> str | None:
        """Why ``meta`` cannot be trusted, or None (format-1 checkpoints carry no hashes to check)."""
        if "meta_sha256" not in meta:
            return None if meta.get("format", 1) < 2 else "its meta item has no SHA-256"
        rest = {key: value for key, value in meta.items() if key != "meta_sha256"}
        if _sha256_json(rest) != meta["meta_sha256"]:
            return "its meta item does not match the SHA-256 recorded when it was saved"
        return None

    def set_aside(self, step: int) -> str:
        """Moves damaged checkpoint ``step`` to ``<directory>-damaged/<step>`` (kept for inspection, out of the
        way of ``latest_step`` and of saving that step again); returns where it went. Call on every process."""
        source = self.step_path(step)
        target_dir = self.directory + DAMAGED_SUFFIX
        target, n = os.path.join(target_dir, str(step)), 1
        while os.path.exists(target):
            target, n = os.path.join(target_dir, f"{step}.{n}"), n + 1
        if jax.process_index() == 0:
            os.makedirs(target_dir, exist_ok=True)
            os.rename(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"attn_checkpoint_set_aside_{step}")
        self._manager.reload()
        return target

    def _resolve_step(self, step: int | None) -> int:
        steps = self._manager.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
            return max(steps)
        if int(step) not in steps:
            raise FileNotFoundError(
                f"step={step} has no finished checkpoint in {self.directory}; available: {sorted(steps)}"
            )
        return int(step)

    def _check_shapes(self, step: int, saved: dict[str, list[int]], current: dict[str, list[int]]) -> None:
        where = f"checkpoint {os.path.join(self.directory, str(step))} was written for a different model config"
        for path, shape in current.items():
            if path not in saved:
                raise ValueError(
                    f"{where}: {path} with shape {tuple(shape)} is in this model but not in the checkpoint"
                )
            if list(saved[path]) != list(shape):
                raise ValueError(
                    f"{where}: {path} has shape {tuple(saved[path])} in the checkpoint but {tuple(shape)} in this model"
                )
        for path, shape in saved.items():
            if path not in current:
                raise ValueError(
                    f"{where}: {path} with shape {tuple(shape)} is in the checkpoint but not in this model"
                )

    @staticmethod
    def _pick_data_state(data: Mapping[str, Any]) -> dict[str, Any] | None:
        states = list(data["states"])
        index, count = jax.process_index(), jax.process_count()
        if len(states) == count:
            return states[index]
        if all(s == states[0] for s in states):
            return states[0]
        raise ValueError(
            f"the checkpoint holds differing data-iterator states of {len(states)} processes, but this run "
            f"has {count} processes; resume with {len(states)} processes or restart the data pipeline"
        )

    @staticmethod
    def _rng(meta: Mapping[str, Any], abstract: Any) -> jax.Array | None:
        info = meta.get("rng")
        if info is None:
            return None
        data = np.asarray(info["data"], dtype=info["dtype"]).reshape(info["shape"])
        mesh = _find_mesh(abstract)
        if mesh is not None:
            sharding = NamedSharding(mesh, PartitionSpec())
            key_data = jax.make_array_from_callback(data.shape, sharding, lambda index: data[index])
        else:
            key_data = jnp.asarray(data)
        if info["impl"] is not None:
            return jax.random.wrap_key_data(key_data, impl=info["impl"])
        return key_data

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Waits for pending saves (``CheckpointSaveError`` if one failed), then releases orbax's threads.

        After a save failure was reported, closing neither waits for nor raises that failure again."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:
                if not self._failed:
                    raise

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
