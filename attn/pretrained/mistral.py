"""Mistral (`MistralForCausalLM`) checkpoints as an `attn.models.DecoderLM`: Llama's structure (attn.pretrained.llama)
with GQA, no biases, and a sliding window on every layer.

`sliding_window=W` (transformers' sliding_window_overlay: key j visible from query i when i - W < j <= i) becomes the
softmax layer's window (W - 1, 0); `sliding_window=null` is full causal attention. The layer clips its window to the
sequence (attn.core.validation.clip_window), so a 4096 window runs on short prompts unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attn.models.decoder import DecoderLM
from attn.pretrained import llama
from attn.pretrained.architecture import Architecture, positive_int
from attn.pretrained.layouts import TensorRule

NAME = "MistralForCausalLM"

_TRANSLATED = (llama._TRANSLATED - {"attention_bias", "mlp_bias"}) | {"sliding_window"}


def sliding_window(config: Mapping[str, Any], architecture: str) -> int | None:
    """config.json `sliding_window` as a positive int, or None (absent or null: full attention)."""
    if config.get("sliding_window") is None:
        return None
    return positive_int(config, "sliding_window", architecture)


def build_model(config: Mapping[str, Any], dtype: Any) -> DecoderLM:
    """DecoderLM with Mistral's structure from its config.json; ValueError for a setting it cannot reproduce."""
    window = sliding_window(config, NAME)
    layers = positive_int(config, "num_hidden_layers", NAME)
    return llama.build_decoder(
        config,
        dtype,
        architecture=NAME,
        translated=_TRANSLATED,
        qkv_bias=False,
        out_bias=False,
        windows=None if window is None else [window] * layers,
    )


def tensor_rules(model: DecoderLM, config: Mapping[str, Any]) -> list[TensorRule]:
    """Where each DecoderLM parameter sits in a MistralForCausalLM checkpoint (Llama's names, no biases)."""
    return llama.decoder_rules(model, qkv_bias=False, out_bias=False, mlp_bias=False)


MISTRAL = Architecture(name=NAME, model_type="mistral", build_model=build_model, tensor_rules=tensor_rules)
