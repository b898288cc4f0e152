"""Qwen2 (`Qwen2ForCausalLM`) checkpoints as an `attn.models.DecoderLM`: Llama's structure (attn.pretrained.llama)
with biases on the q/k/v projections and none on the output projection, and per-layer sliding windows.

Which layers slide follows transformers' Qwen2Config: `layer_types` when config.json lists it ("full_attention" or
"sliding_attention" per layer), else layer i slides when `use_sliding_window` is true and i >= `max_window_layers`.
A sliding layer uses `sliding_window=W` only when `use_sliding_window` is true (W - 1 keys to the left, as in
attn.pretrained.mistral); otherwise every layer is full causal attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attn.models.decoder import DecoderLM
from attn.pretrained import llama
from attn.pretrained.architecture import Architecture, positive_int
from attn.pretrained.layouts import TensorRule

NAME = "Qwen2ForCausalLM"

_TRANSLATED = (llama._TRANSLATED - {"attention_bias", "mlp_bias"}) | {
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
}
LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(config: Mapping[str, Any]) -> list[int | None]:
    """Per layer, the sliding window W or None (full attention), as Qwen2Config and Qwen2Attention decide it."""
    layers = positive_int(config, "num_hidden_layers", NAME)
    use_window = config.get("use_sliding_window", False)
    if not isinstance(use_window, bool):
        raise ValueError(f"config.json use_sliding_window={use_window!r} of {NAME}: expected true or false")
    window = None
    if use_window and config.get("sliding_window") is not None:
        window = positive_int(config, "sliding_window", NAME)
    types = config.get("layer_types")
    if types is None:
        first = config.get("max_window_layers", 28)
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise ValueError(f"config.json max_window_layers={first!r} of {NAME}: expected a non-negative integer")
        types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ValueError(
            f"config.json layer_types={types!r} of {NAME}: expected a list of num_hidden_layers={layers} entries, "
            f"each one of {LAYER_TYPES}"
        )
    return [window if kind == "sliding_attention" else None for kind in types]


def build_model(config: Mapping[str, Any], dtype: Any) -> DecoderLM:
    """DecoderLM with Qwen2's structure from its config.json; ValueError for a setting it cannot reproduce."""
    windows = layer_windows(config)
    return llama.build_decoder(
        config,
        dtype,
        architecture=NAME,
        translated=_TRANSLATED,
        qkv_bias=True,
        out_bias=False,
        windows=None if all(w is None for w in windows) else windows,
    )


def tensor_rules(model: DecoderLM, config: Mapping[str, Any]) -> list[TensorRule]:
    """Where each DecoderLM parameter sits in a Qwen2ForCausalLM checkpoint (Llama's names, q/k/v biases)."""
    return llama.decoder_rules(model, qkv_bias=True, out_bias=False, mlp_bias=False)


QWEN2 = Architecture(name=NAME, model_type="qwen2", build_model=build_model, tensor_rules=tensor_rules)
