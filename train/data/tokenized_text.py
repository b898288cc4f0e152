"""Text tokenised with a Hugging Face tokenizer (tokenizer.json): the corpus of the "text" source as token ids.

The files, their train/valid split and the windows are those of `train.data.text` (the Python standard library
sources by default, or `path`); each split's first `max_bytes` bytes are decoded as UTF-8 (undecodable bytes become
U+FFFD), split into files at the separator byte 0, tokenised file by file, and joined by the tokenizer's first
special token if it has one (else by nothing). The token array is cached per process. Tokenising costs about 3 s per
MiB on one core, hence the `max_bytes` cap.
"""

from __future__ import annotations

import functools
import os
from typing import Any, ClassVar

import numpy as np

from .base import check_int
from .text import SEPARATOR, TextSource, check_corpus_length, eval_batch_count, load_corpus


def _tokenizer_file(tokenizer: str) -> str:
    path = os.path.expanduser(str(tokenizer))
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer={tokenizer!r}: no tokenizer.json at {path!r}")
    return path


@functools.lru_cache(maxsize=8)
def tokenize_split(
    tokenizer_file: str,
    path: str | None,
    glob: str | None,
    valid_fraction: float,
    max_bytes: int,
    split: str,
    format: str = "files",
    field: str = "text",
) -> tuple[np.ndarray, int]:
    """(token ids int32 [n] of the first `max_bytes` bytes of `split` of the text corpus, vocabulary size).

    The corpus is `load_corpus(path, glob=..., valid_fraction=..., format=..., field=...)`; its files (or records)
    are tokenised one by one and joined by the tokenizer's first special token."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_file)
    data = load_corpus(path, glob=glob, valid_fraction=valid_fraction, format=format, field=field)
    data = data.split(split)[:max_bytes]
    files = bytes(data).split(bytes([SEPARATOR]))
    texts = [file.decode("utf-8", errors="replace") for file in files]
    special = [token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special]
    joiner = [tokenizer.token_to_id(special[0])] if special else []
    ids: list[int] = []
    for i, encoding in enumerate(tokenizer.encode_batch(texts, add_special_tokens=False)):
        ids.extend(([] if i == 0 else joiner) + encoding.ids)
    array = np.asarray(ids, dtype=np.int32)
    array.flags.writeable = False
    return array, tokenizer.get_vocab_size()


class TokenizedTextSource(TextSource):
    """Next-token prediction on the tokenised text corpus.

    Batch keys (B = per-process batch, T = seq_len): inputs int32 [B, T] token ids in [0, vocab_size), targets
    int32 [B, T] (inputs shifted left by one), weights float32 [B, T] (0 on padding rows of the last valid batch);
    train windows at random offsets, valid windows consecutive, as the "text" source.
    Options: those of "text", plus `tokenizer` (a tokenizer.json or a directory holding one; required) and
    `max_bytes` (bytes of each split that are tokenised).
    """

    name: ClassVar[str] = "tokenized_text"
    OPTIONS: ClassVar[dict[str, Any]] = {**TextSource.OPTIONS, "tokenizer": None, "max_bytes": 1 << 20}

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        split, tokenizer = self.split, options["tokenizer"]
        if not tokenizer:
            raise ValueError("tokenizer=None: the tokenized_text source needs data.tokenizer (a tokenizer.json path)")
        max_bytes = check_int("max_bytes", options["max_bytes"], 2)
        super()._configure(seq_len, options)
        path = options.get("path")
        self._data, self.vocab_size = tokenize_split(
            _tokenizer_file(tokenizer),
            None if path is None else os.fspath(path),
            options.get("glob"),
            float(options.get("valid_fraction", 0.02)),
            max_bytes,
            split,
            options["format"],
            options["field"],
        )
        check_corpus_length(self._data, self.seq_len + 1, split, self.seq_len)
        if split == "valid":
            self._num_windows = (len(self._data) - 1) // self.seq_len
            self.num_batches = eval_batch_count(self._num_windows, self.global_batch_size, options.get("num_batches"))
