"""Reading and writing the tensors of a Hugging Face checkpoint directory with the `safetensors` package.

    files = SafetensorsFiles(directory)        # model.safetensors, or model.safetensors.index.json and its shards
    files.shape("lm_head.weight"); files.read("lm_head.weight", (slice(0, 8), slice(None)))   # only that block
    write_safetensors(directory, {"name": array, ...}, max_shard_bytes=...)                 # one file or shards

Reading is lazy: `read` takes one block of one tensor through safetensors' slices (`safe_open(...,
framework="numpy").get_slice`), so a sharded load never holds more than the block a device needs. Dtypes that numpy
lacks (bfloat16, float8) are read from the same bytes through a memory map of the file with `ml_dtypes` types.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# Safetensors dtypes numpy does not know, read through a memory map.
_EXTRA_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsFiles(contextlib.AbstractContextManager):
    """The tensors of a checkpoint directory, by name, over one or several safetensors files (closed by `close` or
    on leaving a `with` block).

    Raises FileNotFoundError naming the files it looked for when the directory has neither `model.safetensors` nor
    `model.safetensors.index.json`, or when the index names a shard that is missing.
    """

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, Mapping):
                raise ValueError(f"{index} has no 'weight_map' object mapping tensor names to shard files")
            self.file_of = {name: self.directory / file for name, file in weight_map.items()}
        elif single.is_file():
            self.file_of = {}
        else:
            raise FileNotFoundError(f"{self.directory} has no {SINGLE_FILE} and no {INDEX_FILE}")
        self._stack = contextlib.ExitStack()
        self._handles: dict[pathlib.Path, Any] = {}
        self._headers: dict[pathlib.Path, tuple[int, dict[str, Any]]] = {}
        if not self.file_of:
            handle = self._open(single)
            self.file_of = {name: single for name in handle.keys()}
        for file in sorted(set(self.file_of.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{index} names the shard {file.name}, which is missing from {self.directory}")

    def _open(self, file: pathlib.Path) -> Any:
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="numpy"))
        return self._handles[file]

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self.file_of)

    def _slice(self, name: str) -> Any:
        if name not in self.file_of:
            raise KeyError(name)
        return self._open(self.file_of[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> np.dtype:
        """The tensor's numpy dtype (bfloat16 and float8 as `ml_dtypes` types)."""
        code = self._slice(name).get_dtype()
        if code in _EXTRA_DTYPES:
            return np.dtype(_EXTRA_DTYPES[code])
        return np.dtype(_numpy_type(code))

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The block `index` (one slice per axis; None = the whole tensor) of tensor `name`, as a numpy array."""
        piece = self._slice(name)
        shape = tuple(piece.get_shape())
        index = tuple(slice(0, n) for n in shape) if index is None else tuple(index)
        if piece.get_dtype() in _EXTRA_DTYPES:
            return np.array(self._memmap(name)[index])
        if not shape:
            return np.asarray(self._open(self.file_of[name]).get_tensor(name))
        return np.asarray(piece[index])

    def _memmap(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map of its file (for dtypes safetensors' numpy reader refuses)."""
        file = self.file_of[name]
        if file not in self._headers:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                self._headers[file] = (8 + length, json.loads(handle.read(length)))
        start, header = self._headers[file]
        entry = header[name]
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_EXTRA_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        if end == begin:  # an empty tensor has no bytes to map
            return np.zeros(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def _numpy_type(code: str) -> Any:
    if code not in _NUMPY_DTYPES:
        known = sorted(_NUMPY_DTYPES) + sorted(_EXTRA_DTYPES)
        raise ValueError(f"safetensors dtype {code!r} is not supported; expected one of {known}")
    return _NUMPY_DTYPES[code]


def write_safetensors(
    directory: str | pathlib.Path, tensors: Mapping[str, np.ndarray], *, max_shard_bytes: int | None = None
) -> list[pathlib.Path]:
    """Writes `tensors` (name -> numpy array) as `model.safetensors`, or, when they exceed `max_shard_bytes`, as
    `model-0000i-of-0000n.safetensors` shards (tensors in name order, a shard closed before it would exceed the
    limit) plus `model.safetensors.index.json`, the layout `transformers`' save_pretrained writes (metadata
    {"format": "pt"}). Returns the files written."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive or None")
    arrays = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
    total = sum(array.nbytes for array in arrays.values())
    metadata = {"format": "pt"}
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(arrays, str(directory / SINGLE_FILE), metadata=metadata)
        return [directory / SINGLE_FILE]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in arrays.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(file), metadata=metadata)
        files.append(file)
        weight_map.update({name: file.name for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return files
