"""The committed Hugging Face fixtures (tests/fixtures/hf, made by make_fixtures.py with transformers) and one cached
load of each, shared by the tests of attn.pretrained."""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import numpy as np
from safetensors import safe_open

from attn import pretrained

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
NAMES = ("gpt2", "llama", "llama_linear", "llama_dynamic", "llama_yarn", "llama_llama3", "mistral", "qwen2")


def fixture_dir(name: str) -> pathlib.Path:
    return ROOT / name


def reference(name: str) -> dict[str, np.ndarray]:
    """input_ids int64 [1, T], logits float32 [1, T, V] and greedy int64 [1, T + N] that transformers computed."""
    with np.load(fixture_dir(name) / "reference.npz") as data:
        return {key: data[key] for key in data.files}


@functools.cache
def loaded(name: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """pretrained.load of fixture `name` (model, params, tokenizer, hf_config), loaded once per test session."""
    return pretrained.load(fixture_dir(name))


def tensor_bytes(directory: pathlib.Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (safetensors dtype, shape, raw bytes) over every safetensors file of `directory`: names, dtypes and
    shapes from the safetensors package, the bytes from the offsets of the file's header (the format's spec)."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        raw = file.read_bytes()
        header_length = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_length])
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                begin, end = header[name]["data_offsets"]
                data = raw[8 + header_length + begin : 8 + header_length + end]
                out[name] = (piece.get_dtype(), piece.get_shape(), data)
    return out
