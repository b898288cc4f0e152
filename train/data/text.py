"""Byte-level text (vocabulary 256) from local files.

The default corpus is the Python standard library source tree of the running interpreter (every `*.py`
under `sysconfig.get_paths()["stdlib"]`, `site-packages` skipped), so every machine has real text with no
download. A user path may be a file or a directory (all regular files under it, or those matching `glob`).

Files go to the train or valid split by a stable hash of their relative path (about `valid_fraction` of
the files, at least one each side); a single file is split by bytes instead (the last `valid_fraction`).
Each split is the files' bytes joined by a separator byte 0, kept as one read-only uint8 array and cached
per process, so building the source again is cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_fraction, check_int, token_prediction_spec
from .records import RECORD_FORMATS, read_records

SEPARATOR = 0
VOCAB_SIZE = 256
FORMATS = ("files", *RECORD_FORMATS)
_SKIP_DIRS = ("site-packages", "dist-packages")


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A byte corpus split by file.

    Attributes:
      root: the resolved file or directory the corpus was read from.
      train, valid: read-only uint8 [num_bytes] arrays (files joined by byte 0).
      train_files, valid_files: relative paths (posix) of the files in each split, sorted.
    """

    root: str
    train: np.ndarray
    valid: np.ndarray
    train_files: tuple[str, ...]
    valid_files: tuple[str, ...]

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.valid


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter (the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def load_corpus(
    path: str | os.PathLike | None = None,
    *,
    glob: str | None = None,
    valid_fraction: float = 0.02,
    format: str = "files",
    field: str = "text",
) -> Corpus:
    """Loads (or returns the cached) byte corpus at `path`; None or "" means the Python standard library.

    format="files": the bytes of the file(s) themselves. format="jsonl" or "parquet": the string `field` of every
    record of the file(s) (a directory: its `*.jsonl` / `*.parquet` files, or those matching `glob`), records joined
    by byte 0 in file order; the last round(valid_fraction * records) records (at least one) are the valid split.
    Raises FileNotFoundError if `path` does not exist, ValueError if it holds no matching files or records.
    """
    valid_fraction = check_fraction("valid_fraction", valid_fraction, high=0.5)
    glob = glob or None
    if format not in FORMATS:
        raise ValueError(f"format={format!r} must be one of {FORMATS}")
    if format != "files" and (path is None or os.fspath(path) == ""):
        raise ValueError(f"format={format!r} needs data.path, the {format} file or a directory of them")
    if path is None or os.fspath(path) == "":
        return _load(str(stdlib_root()), glob or "*.py", valid_fraction, True)
    resolved = Path(os.path.expanduser(os.fspath(path))).resolve()
    if not resolved.exists():
        raise FileNotFoundError(f"data.path {os.fspath(path)!r} does not exist (resolved to {str(resolved)!r})")
    if format != "files":
        return _load_records(str(resolved), glob or f"*.{format}", valid_fraction, format, field)
    return _load(str(resolved), glob, valid_fraction, False)


def corpus_text(path: str | os.PathLike | None = None, split: str = "valid") -> str:
    """A split ("train" or "valid") of the byte corpus at `path` (None: the Python standard library sources) as text,
    files separated by a newline: what evaluators tokenise with a checkpoint's own tokenizer."""
    if split not in ("train", "valid"):
        raise ValueError(f"split={split!r} must be 'train' or 'valid'")
    corpus = load_corpus(path)
    data = corpus.valid if split == "valid" else corpus.train  # files joined by byte 0
    return bytes(data).replace(b"\0", b"\n").decode("utf-8", errors="replace")


def _valid_score(relative: str) -> float:
    # A stable hash (unlike hash()) so the split is the same on every machine and Python run.
    digest = hashlib.blake2b(relative.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _list_files(root: Path, glob: str | None, skip_installed: bool) -> list[tuple[str, Path]]:
    if root.is_file():
        return [(root.name, root)]
    found = []
    for file in root.rglob(glob or "*"):
        relative = file.relative_to(root)
        if skip_installed and any(part in _SKIP_DIRS for part in relative.parts):
            continue
        if file.is_file():
            found.append((relative.as_posix(), file))
    return sorted(found)


def _join(paths: list[Path]) -> np.ndarray:
    data = bytes([SEPARATOR]).join(p.read_bytes() for p in paths)
    array = np.frombuffer(data, dtype=np.uint8)
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=8)
def _load(root_str: str, glob: str | None, valid_fraction: float, skip_installed: bool) -> Corpus:
    root = Path(root_str)
    files = _list_files(root, glob, skip_installed)
    if not files:
        raise ValueError(f"data.path {root_str!r} holds no regular files matching glob={glob!r}")
    if len(files) == 1:
        data = _join([files[0][1]])
        cut = len(data) - max(1, int(round(valid_fraction * len(data))))
        if cut < 1:
            raise ValueError(f"data.path {root_str!r} has {len(data)} bytes; need at least 2 to split")
        name = (files[0][0],)
        return Corpus(root_str, data[:cut], data[cut:], name, name)
    scores = np.array([_valid_score(rel) for rel, _ in files])
    in_valid = scores < valid_fraction
    if not in_valid.any():
        in_valid[np.argmin(scores)] = True
    if in_valid.all():
        in_valid[np.argmax(scores)] = False
    train = [f for f, v in zip(files, in_valid, strict=True) if not v]
    valid = [f for f, v in zip(files, in_valid, strict=True) if v]
    return Corpus(
        root_str,
        _join([p for _, p in train]),
        _join([p for _, p in valid]),
        tuple(rel for rel, _ in train),
        tuple(rel for rel, _ in valid),
    )


@functools.lru_cache(maxsize=8)
def _load_records(root_str: str, glob: str, valid_fraction: float, format: str, field: str) -> Corpus:
    files = _list_files(Path(root_str), glob, False)
    if not files:
        raise ValueError(f"data.path {root_str!r} holds no files matching glob={glob!r}")
    texts = read_records([file for _, file in files], format, field)
    num_valid = max(1, int(round(valid_fraction * len(texts))))
    if len(texts) - num_valid < 1:
        raise ValueError(f"data.path {root_str!r} has {len(texts)} {format} record(s); need at least 2 to split")
    names = tuple(rel for rel, _ in files)

    def join(part: list[str]) -> np.ndarray:
        array = np.frombuffer(bytes([SEPARATOR]).join(text.encode("utf-8") for text in part), dtype=np.uint8)
        array.flags.writeable = False
        return array

    return Corpus(root_str, join(texts[:-num_valid]), join(texts[-num_valid:]), names, names)


def random_windows(data: np.ndarray, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """`batch` windows of `length` bytes at uniform random starts: uint8 [batch, length]."""
    starts = rng.integers(0, len(data) - length + 1, size=batch)
    return data[starts[:, None] + np.arange(length)]


def strided_windows(data: np.ndarray, first: int, batch: int, length: int, stride: int, count: int):
    """Windows number first..first+batch-1 of `data[w*stride : w*stride+length]`, w < count.

    Returns (`data`'s dtype [batch, length], bool [batch] row is real); rows past `count` are zeros and False.
    """
    index = first + np.arange(batch)
    real = index < count
    starts = np.where(real, index, 0) * stride
    windows = data[starts[:, None] + np.arange(length)]
    return np.where(real[:, None], windows, 0).astype(data.dtype), real


def check_corpus_length(data: np.ndarray, needed: int, split: str, seq_len: int) -> None:
    if len(data) < needed:
        raise ValueError(
            f"seq_len={seq_len} needs at least {needed} bytes but the {split} split has {len(data)}; "
            "use a smaller seq_len, a larger corpus (data.path) or a larger data.valid_fraction"
        )


def eval_batch_count(num_windows: int, global_batch: int, limit: int | None) -> int:
    # Every process walks the same number of batches (the last one padded with weight-0 rows), so
    # multi-host evaluation stays in lock-step.
    total = -(-num_windows // global_batch)
    return total if limit is None else min(total, check_int("num_batches", limit, 1))


class TextSource(DataSource):
    """Next-byte prediction on the byte corpus.

    Batch keys (B = per-process batch, T = seq_len):
      inputs  int32 [B, T]   bytes window[:-1] of a (T+1)-byte window, values in [0, 256)
      targets int32 [B, T]   bytes window[1:] (inputs shifted left by one)
      weights float32 [B, T] 1, or 0 on the padding rows of the last valid batch

    split="train": endless stream of windows at random offsets of the train split.
    split="valid": finite walk over the valid split in consecutive windows (window w covers bytes
    [w*T, w*T + T]; every byte after the first is predicted exactly once), `num_batches` of them
    (default: all; the last batch is padded with weight-0 rows). Call `reset()` before each pass.
    """

    name: ClassVar[str] = "text"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "path": None,
        "glob": None,
        "valid_fraction": 0.02,
        "num_batches": None,
        "format": "files",
        "field": "text",
    }

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        split = self.split
        path, glob, valid_fraction, num_batches = (
            options["path"],
            options["glob"],
            options["valid_fraction"],
            options["num_batches"],
        )
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.vocab_size = VOCAB_SIZE
        self.corpus = load_corpus(
            path, glob=glob, valid_fraction=valid_fraction, format=options["format"], field=options["field"]
        )
        self._data = self.corpus.split(split)
        check_corpus_length(self._data, self.seq_len + 1, split, self.seq_len)
        if split == "valid":
            self._num_windows = (len(self._data) - 1) // self.seq_len
            self.num_batches = eval_batch_count(self._num_windows, self.global_batch_size, num_batches)

    @property
    def element_spec(self) -> ElementSpec:
        return token_prediction_spec(self.batch_size, self.seq_len)

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        length = self.seq_len + 1
        if self.split == "train":
            windows = random_windows(self._data, rng, self.global_batch_size, length)
            real = np.ones(self.global_batch_size, dtype=bool)
        else:
            first = step * self.global_batch_size
            windows, real = strided_windows(
                self._data, first, self.global_batch_size, length, self.seq_len, self._num_windows
            )
        windows = windows.astype(np.int32)
        weights = np.broadcast_to(real[:, None], (self.global_batch_size, self.seq_len)).astype(np.float32)
        return {
            "inputs": np.ascontiguousarray(windows[:, :-1]),
            "targets": np.ascontiguousarray(windows[:, 1:]),
            "weights": weights,
        }
