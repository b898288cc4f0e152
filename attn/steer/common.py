"""What the steering systems share: the model's geometry, head selections {layer: heads}, emphasised spans as token
masks, and head profiling (scoring each head, or each layer's heads together, on a small labelled set).

A head selection ("head config", as PASTA calls it) maps a block index to the heads steered in it:
{0: [1, 3], 2: [0]}. Layers are the model's `layers_<i>` blocks; the rules select their self-attention
("*/attention") only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.models.fields import per_layer_mechanisms

HeadConfig = dict[int, tuple[int, ...]]
SELF_ATTENTION = "*/attention"


def model_geometry(model: Any) -> tuple[int, int]:
    """(num_layers, num_heads) of a token model (DecoderLM, Encoder: fields num_layers and num_heads)."""
    layers, heads = getattr(model, "num_layers", None), getattr(model, "num_heads", None)
    if not isinstance(layers, int) or not isinstance(heads, int):
        raise ValueError(
            f"model={type(model).__name__} must be a token model with int fields num_layers and num_heads "
            "(e.g. attn.models.DecoderLM)"
        )
    return layers, heads


def require_weights(model: Any, system: str, layers: Sequence[int]) -> None:
    """ValueError naming `model` when a selected layer's mechanism has no attention probability matrix (the
    system's rule needs logits or weights)."""
    names = per_layer_mechanisms(model.attention, model.num_layers)
    for layer in layers:
        spec = attn.get(names[layer])
        if not spec.has_attention_weights:
            raise ValueError(
                f"model: {system} steers attention logits/weights, but layer {layer} uses mechanism {names[layer]!r}, "
                "which has no attention probability matrix (spec has_attention_weights=False); use a softmax-family "
                "mechanism in the steered layers"
            )


def check_head_config(head_config: Mapping[Any, Any], num_layers: int, num_heads: int) -> HeadConfig:
    """{layer: heads} with int layers in [0, num_layers) and heads in [0, num_heads), sorted; empty entries dropped.
    ValueError naming head_config, the bad layer or head, and the valid range."""
    if not isinstance(head_config, Mapping):
        raise ValueError(f"head_config={head_config!r} must be a mapping {{layer: [heads]}}")
    out: HeadConfig = {}
    for layer, heads in head_config.items():
        try:
            index = int(layer)
        except (TypeError, ValueError):
            raise ValueError(f"head_config has layer {layer!r}; layers are block indices (int)") from None
        if not 0 <= index < num_layers:
            raise ValueError(
                f"head_config has layer {layer!r}, out of range: the model has {num_layers} layers "
                f"(0..{num_layers - 1})"
            )
        values = (heads,) if isinstance(heads, (int, np.integer)) else tuple(heads)
        bad = [
            h for h in values if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not 0 <= h < num_heads
        ]
        if bad:
            raise ValueError(
                f"head_config[{layer!r}]={list(values)} holds {bad}, out of range: the model has {num_heads} heads "
                f"per layer (0..{num_heads - 1})"
            )
        if values:
            out[index] = tuple(sorted({int(h) for h in values}))
    return dict(sorted(out.items()))


def span_mask(spans: Any, batch: int, seq_len: int, *, name: str = "spans") -> jax.Array:
    """Emphasised tokens as a float32 array [batch, seq_len] (1 inside a span).

    spans: a float/bool mask [batch, seq_len], or per row a (start, stop) pair or a list of pairs (0 <= start <
    stop <= seq_len), or None for a row with no span. ValueError naming `name` for a span outside the sequence.
    """
    if hasattr(spans, "shape"):  # numpy or jax (also traced) arrays
        if tuple(spans.shape) != (batch, seq_len):
            raise ValueError(
                f"{name} as a mask has shape {tuple(spans.shape)}; expected [batch, seq_len] = {(batch, seq_len)}"
            )
        return (jnp.asarray(spans) != 0).astype(jnp.float32)
    rows = list(spans)
    if len(rows) != batch:
        raise ValueError(f"{name} has {len(rows)} rows; the batch has {batch}")
    mask = np.zeros((batch, seq_len), np.float32)
    for i, row in enumerate(rows):
        if row is None:
            continue
        pairs = [row] if len(row) == 2 and all(isinstance(v, (int, np.integer)) for v in row) else list(row)
        for pair in pairs:
            start, stop = (int(v) for v in pair)
            if not 0 <= start < stop <= seq_len:
                raise ValueError(
                    f"{name}[{i}]=({start}, {stop}) lies outside the sequence: need 0 <= start < stop <= "
                    f"seq_len={seq_len}"
                )
            mask[i, start:stop] = 1.0
    return jnp.asarray(mask)


# ---------------------------------------------------------------------------------------------------- profiling
def profile_heads(score: Callable[[HeadConfig], float], num_layers: int, num_heads: int) -> np.ndarray:
    """score({layer: (head,)}) for every single head: float64 [num_layers, num_heads] (PASTA's per-head profiling:
    steer one head alone, measure the task on a small set)."""
    return np.array([[score({layer: (head,)}) for head in range(num_heads)] for layer in range(num_layers)])


def profile_layers(score: Callable[[HeadConfig], float], num_layers: int, num_heads: int) -> np.ndarray:
    """score({layer: all heads}) per layer: float64 [num_layers] (the coarse step of a coarse-to-fine search)."""
    return np.array([score({layer: tuple(range(num_heads))}) for layer in range(num_layers)])


def top_heads(scores: np.ndarray, k: int) -> HeadConfig:
    """The k best heads of scores [L, H] (ties broken by lower layer, then lower head) as {layer: heads}."""
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k={k!r} must be a non-negative int")
    flat = np.asarray(scores, np.float64).reshape(-1)
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:k]
    config: dict[int, list[int]] = {}
    for i in order:
        config.setdefault(i // scores.shape[1], []).append(i % scores.shape[1])
    return {layer: tuple(sorted(heads)) for layer, heads in sorted(config.items())}
