"""`neighborhood`: neighborhood attention (NA) over 1-D, 2-D or 3-D token layouts, from "Faster Neighborhood
Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level" (Hassani et al., catalog [75];
NA itself is from "Neighborhood Attention Transformer").

Each token attends to the kernel_size nearest tokens per axis; near a border the window shifts inward, so every
query sees exactly prod(kernel_size) keys (unlike a zero-padded sliding window):

    q, k, v = x W_q, x W_k, x W_v                               x [B, *spatial, E], heads H, kv heads KVH
    o_i = sum_{j in NB(i)} softmax_j(q_i k_j^T / sqrt(D) + rpb[h, j - i + k - 1]) v_j
    y = concat_h(o) W_o                                          -> [B, *spatial, E]

with NB(i) the neighborhood of `attn.core.neighborhood` (NATTEN semantics) and rpb NAT's learned relative
position bias, float [H, 2k - 1 per axis] (option `rpb`). `causal` (per axis) keeps keys at or before the query.

Shapes: x [B, *spatial, E] -> same. Time O(B N prod(k) H D), memory O(B N prod(k) (KVH D + H)) for N tokens.
Reduces exactly to plain softmax attention over the flattened tokens with kernel_size = spatial shape, rpb=False,
causal=False. No decoding (a spatial layer has no KV cache).

"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core.layer import AttentionCall, SpatialAttentionLayer
from attn.core.neighborhood import normalize_neighborhood_args, window_probs_to_dense
from attn.core.validation import choice, int_or_pair, optional, positive, positive_int
from attn.registry import register

Array = jax.Array


NEIGHBORHOOD_OPTION_DOCS = {
    "kernel_size": "window size per spatial axis (int or tuple); every query sees exactly this many keys per axis",
    "causal": "per-axis causal masking (bool or tuple): only keys at or before the query along that axis",
    "rpb": "learned relative position bias of NAT, [heads, 2 * kernel_size - 1 per axis], added to the logits",
    "scale": "logit scale (None = 1/sqrt(head_dim))",
}

# Per-option checks; how kernel, dilation and stride fit the grid is checked per call (attn.core.neighborhood).
NEIGHBORHOOD_VALIDATORS = {
    "kernel_size": int_or_pair(positive_int),
    "causal": int_or_pair(choice(True, False)),
    "scale": optional(positive),
}


@register(
    "neighborhood",
    family="local",
    paper="Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level",
    catalog=75,
    op=F.neighborhood_attention,
    input_kind="spatial",
    supports_causal=True,
    supports_decode=False,
    summary="1-D/2-D/3-D neighborhood attention (NATTEN semantics) with NAT relative position bias",
    option_docs=NEIGHBORHOOD_OPTION_DOCS,
    fidelity="official-code",
    reference="NATTEN (github.com/SHI-Labs/NATTEN, the authors' library) neighborhood semantics and NAT's relative "
    "position bias",
    validators=NEIGHBORHOOD_VALIDATORS,
)
class NeighborhoodAttention(SpatialAttentionLayer):
    """Neighborhood attention: x [B, *spatial, E] -> [B, *spatial, E]. Subclasses add dilation and stride by
    overriding `neighborhood_args`."""

    kernel_size: int | tuple[int, ...] = 7
    causal: bool | tuple[bool, ...] = False
    rpb: bool = True
    scale: float | None = None

    def neighborhood_args(self, spatial: tuple[int, ...]) -> dict[str, Any]:
        """kernel_size, dilation, stride, causal of the core op for this token layout."""
        return dict(kernel_size=self.kernel_size, dilation=1, stride=1, causal=self.causal)

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, *S, H, D], k/v [B, *S, KVH, D] -> [B, *S, H, D]; sows the dense weights float32 [B, H, N, N] when
        captured (N = prod(S))."""
        spatial = tuple(q.shape[1:-2])
        args = self.neighborhood_args(spatial)
        kernel, _, _, _ = normalize_neighborhood_args(spatial, **args)
        rpb = None
        if self.rpb:
            rpb = self.param(
                "rpb",
                nn.with_logical_partitioning(
                    nn.initializers.truncated_normal(0.02), ("heads",) + (None,) * len(spatial)
                ),
                (self.num_heads, *(2 * size - 1 for size in kernel)),
                self.param_dtype,
            )
        capture = self.wants_weights()
        result = F.neighborhood_attention(
            q,
            k,
            v,
            **args,
            rpb=rpb,
            scale=self.scale,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
            return_probs=capture,
            implementation=self.implementation,
        )
        if capture:
            result, aux = result
            dense = window_probs_to_dense(aux["probs"], aux["key_indices"], math.prod(spatial))
            self.sow_capture("attention_weights", dense.astype(jnp.float32))
        return result
