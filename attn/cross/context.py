"""Checks and layouts of the context that cross-modal mechanisms attend to.

A video context is frame-major: context [B, F * P, Ec] holds the P tokens of frame 0, then those of frame 1, ...
(F frames of P tokens each). Every error names the argument, its value and what was expected.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attn.core.validation import OptionValidator

Array = jax.Array

# num_kv_heads of mechanisms without key/value projections (their keys and values are the inputs themselves).
NO_KV_PROJECTIONS = OptionValidator(
    lambda v: v is None, "None (this mechanism has no key/value projections to group)", "None"
)


def require_context(name: str, context: Array | None, layout: str) -> None:
    """ValueError unless a context was given to mechanism `name` (a cross-attention mechanism has no self mode)."""
    if context is None:
        raise ValueError(f"{name} is a cross-attention mechanism: it needs context {layout}; got context=None")


def check_context_width(layer: nn.Module, context: Array, projection: str = "key") -> None:
    """ValueError when context's width differs from the width the layer's `projection` kernel was built for
    ([Ec, heads, head_dim]); nothing to check before the parameters exist (init)."""
    kernel = layer.variables.get("params", {}).get(projection, {}).get("kernel")
    if kernel is None:
        return
    kernel = nn.unbox(kernel)
    if kernel.shape[0] != context.shape[-1]:
        raise ValueError(
            f"context has width {context.shape[-1]} (shape {tuple(context.shape)}), but the parameters of "
            f"{projection!r} were built for context width {kernel.shape[0]}; expected [batch, context_length, "
            f"{kernel.shape[0]}]"
        )


def tokens_per_frame(context: Array, num_frames: Any) -> int:
    """P = context_length / num_frames for a frame-major context [B, F * P, Ec]; ValueError naming num_frames and
    the context when F does not divide the context length."""
    length = context.shape[1]
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames <= 0:
        raise ValueError(f"num_frames={num_frames!r} must be a positive int")
    if length % num_frames:
        raise ValueError(
            f"num_frames={num_frames} does not divide the context length {length} (context shape "
            f"{tuple(context.shape)}); expected context [batch, num_frames * tokens_per_frame, embed], frame-major"
        )
    return length // num_frames
