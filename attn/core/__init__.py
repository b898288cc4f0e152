"""Shared pieces every mechanism reuses: masks, positions, the reference softmax, the layer base, the KV cache."""

from attn.core.masks import Mask
from attn.core.reference import reference_softmax_attention

__all__ = ["Mask", "reference_softmax_attention"]
