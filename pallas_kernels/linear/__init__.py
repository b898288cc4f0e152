"""Causal linear attention kernels (Lightning Attention-2 tiling) for GPU (Pallas on Triton) and TPU (Pallas Mosaic).

Entry point: `lightning_attention` (api.py); pure-jnp reference: `lightning_attention_reference` (reference.py).
"""

from pallas_kernels.linear.api import lightning_attention
from pallas_kernels.linear.reference import lightning_attention_reference

__all__ = ["lightning_attention", "lightning_attention_reference"]
