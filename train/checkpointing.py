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
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

_FORMAT_VERSION = 1


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


def _jsonable(obj: Any) -> Any:
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


class Checkpointer:
    """Saves and restores training checkpoints in ``directory`` (orbax ``CheckpointManager``).

    Args:
      directory: where step directories go; created if missing.
      keep: how many of the newest checkpoints to keep (older ones are deleted after a save).
      save_every: ``save`` writes only on steps that are multiples of this, unless ``force=True``.
      async_save: write in a background thread; ``save`` returns once the arrays are copied to host.
      keep_every: additionally keep every checkpoint whose step is a multiple of this (None: off).

    Call ``save``/``restore``/``wait`` from every process: orbax coordinates the hosts.
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
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            keep_period=keep_every,
            save_interval_steps=self.save_every,
            enable_async_checkpointing=self.async_save,
            create=True,
            # Leftovers of saves that crashed before their atomic rename are never valid: drop them.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- queries -----------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest fully written step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All fully written steps, ascending."""
        return sorted(self._manager.all_steps())

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
          True when a save was started (with ``async_save`` it may still be in flight: see ``wait``);
          False when the step is off the grid or already saved.

        Raises:
          Whatever a previous asynchronous save raised, so failures are never silent.
        """
        step = int(step)
        self._manager.check_for_errors()
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
        meta = {
            "format": _FORMAT_VERSION,
            "step": step,
            "config": _jsonable(dict(config) if config is not None else {}),
            "rng": rng_meta,
            "shapes": _shapes(state),
        }
        data = {"process_count": jax.process_count(), "states": _allgather_json(_jsonable(data_state))}
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are finished; raises the error if one failed."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    # -- restore -----------------------------------------------------------------------------------

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The ``meta`` JSON of ``step`` (default: latest): step, config, rng, shapes."""
        step = self._resolve_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(
        self, step: int | None = None, *, abstract_state: Any
    ) -> tuple[Any, dict[str, Any] | None, jax.Array | None, dict[str, Any]]:
        """Restores ``step`` (default: the latest) onto the shardings of ``abstract_state``.

        Args:
          step: which checkpoint; None for the latest.
          abstract_state: the train state's structure as ``jax.ShapeDtypeStruct`` leaves with ``.sharding``
            set (``jax.Array`` leaves also work); the restored arrays get these shapes, dtypes and
            shardings, so a checkpoint written on any mesh restores onto the current one.

        Returns:
          ``(state, data_state, rng, meta)``: the state; this process's data-iterator state; the RNG in the
          form it was saved (typed key or raw uint32 key data; replicated on the state's mesh); and the
          meta dict (``step``, ``config``, ``shapes``, ``rng``).

        Raises:
          FileNotFoundError: no checkpoint (or not this step) in the directory.
          ValueError: the checkpoint's state tree differs from ``abstract_state`` (names the first
            differing path and both shapes).
        """
        step = self._resolve_step(step)
        abstract = jax.tree_util.tree_map_with_path(_as_abstract, abstract_state)
        meta = self.read_meta(step)
        self._check_shapes(step, meta.get("shapes", {}), _shapes(abstract))
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()),
        )
        return restored["state"], self._pick_data_state(restored["data"]), self._rng(meta, abstract), meta

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
        """Waits for pending saves, then releases orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
