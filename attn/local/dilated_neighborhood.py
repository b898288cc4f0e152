"""`dilated_neighborhood`: dilated neighborhood attention (DiNA), from "Dilated Neighborhood Attention
Transformer" (Hassani and Shi, catalog [131]).

DiNA is neighborhood attention on a dilated grid: with dilation d per axis, query i attends to the kernel_size
keys nearest to it among the tokens of its own dilation group {j : j = i mod d} (spaced d apart), the window
shifting inward at the borders so every query sees exactly prod(kernel_size) keys:

    o_i = sum_{j in NB_d(i)} softmax_j(q_i k_j^T / sqrt(D) + rpb[h, (j - i) / d + k - 1]) v_j

The receptive field grows to kernel_size * d per layer at the cost of kernel_size keys. DiNAT alternates NA
(local, d = 1) and DiNA (sparse global) layers; here that is the model's per-layer `attention` and
`attention_options`, e.g.

    ViT(..., pool="mean", attention=("neighborhood", "dilated_neighborhood") * 2,
        attention_options=({"kernel_size": 3}, {"kernel_size": 3}) * 2)

`dilation=None` (default) picks DiNAT's per-stage choice, the largest dilation that fits:
d = max(1, extent // kernel_size) per axis (e.g. 8 for a 56x56 map with kernel 7).

Shapes: x [B, *spatial, E] -> same. Time O(B N prod(k) H D), memory O(B N prod(k) (KVH D + H)).
dilation=1 gives `neighborhood` exactly; with kernel_size = spatial shape, dilation=1, rpb=False it is plain
softmax attention. No decoding.
"""

from __future__ import annotations

from typing import Any

from attn import functional as F
from attn.core.neighborhood import IntPerAxis, normalize_neighborhood_args
from attn.core.validation import int_or_pair, optional, positive_int
from attn.local.neighborhood import NEIGHBORHOOD_OPTION_DOCS, NeighborhoodAttention
from attn.registry import register


@register(
    "dilated_neighborhood",
    family="local",
    paper="Dilated Neighborhood Attention Transformer",
    catalog=131,
    op=F.neighborhood_attention,
    input_kind="spatial",
    supports_causal=True,
    supports_decode=False,
    summary="DiNA: neighborhood attention on a dilated grid (sparse global context), alternated with NA layers",
    option_docs={
        **NEIGHBORHOOD_OPTION_DOCS,
        "dilation": "dilation per axis (int or tuple); None = the largest that fits, extent // kernel_size",
    },
    fidelity="official-code",
    reference="NATTEN (github.com/SHI-Labs/NATTEN, the authors' library) dilated window semantics; DiNAT's per-stage "
    "dilation rule",
    validators={"dilation": optional(int_or_pair(positive_int))},
)
class DilatedNeighborhoodAttention(NeighborhoodAttention):
    """Dilated neighborhood attention: x [B, *spatial, E] -> [B, *spatial, E]."""

    dilation: IntPerAxis | None = None

    def neighborhood_args(self, spatial: tuple[int, ...]) -> dict[str, Any]:
        if self.dilation is None:
            kernel, _, _, _ = normalize_neighborhood_args(spatial, self.kernel_size, 1, 1, self.causal)
            dilation = tuple(max(1, n // k) for n, k in zip(spatial, kernel, strict=True))
        else:
            dilation = self.dilation
        return dict(kernel_size=self.kernel_size, dilation=dilation, stride=1, causal=self.causal)
