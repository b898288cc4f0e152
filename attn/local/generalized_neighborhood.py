"""`generalized_neighborhood`: generalized neighborhood attention (GNA), from "Generalized Neighborhood Attention:
Multi-dimensional Sparse Attention at the Speed of Light" (Hassani et al., catalog [125]).

GNA adds a stride s per axis to (dilated) neighborhood attention: queries are grouped in tiles of s along each
axis and every query of a tile uses the window of the tile's leader (its center, the right one of the two
centers when s is even; the last query of the tile when causal). One family covers

    s = 1                      sliding window (neighborhood attention, [75]; with dilation, DiNA [131])
    1 < s < kernel_size        strided sliding window: query tiles share a key window (block-sparse friendly)
    s = kernel_size            blocked, non-overlapping window attention (when kernel_size divides the extent)
    kernel_size = extent       full self-attention along that axis

    o_i = sum_{j in NB_{k,d,s}(i)} softmax_j(q_i k_j^T / sqrt(D) [+ rpb]) v_j

with NB the window of `attn.core.neighborhood` (NATTEN semantics; even kernel sizes allowed, stride <= kernel).
GNA as published has no positional bias (its models use RoPE), so `rpb` defaults to False here.
The paper's analytical speedup model (tiles visited vs FLOPs) is `python -m eval.gna_speedup`.

Shapes: x [B, *spatial, E] -> same. Time O(B N prod(k) H D), memory O(B N prod(k) (KVH D + H)).
stride=1, dilation=1 gives `neighborhood`; kernel_size = spatial shape with rpb=False gives plain softmax
attention. No decoding.
"""

from __future__ import annotations

from typing import Any

from attn import functional as F
from attn.core.neighborhood import IntPerAxis
from attn.core.validation import int_or_pair, positive_int
from attn.local.neighborhood import NEIGHBORHOOD_OPTION_DOCS, NeighborhoodAttention
from attn.registry import register


@register(
    "generalized_neighborhood",
    family="local",
    paper="Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light",
    catalog=125,
    op=F.neighborhood_attention,
    input_kind="spatial",
    supports_causal=True,
    supports_decode=False,
    summary="GNA: neighborhood attention with stride (sliding, strided-sliding and blocked windows) and dilation",
    option_docs={
        **NEIGHBORHOOD_OPTION_DOCS,
        "dilation": "dilation per axis (int or tuple)",
        "stride": "stride per axis (int or tuple, 1 <= stride <= kernel_size): query tiles sharing one window",
    },
    fidelity="official-code",
    reference="NATTEN 0.20+ (github.com/SHI-Labs/NATTEN, the authors' library) stride and dilation semantics; the "
    "speedup model reproduces the paper's Fig. 3 (eval.gna_speedup)",
    validators={"dilation": int_or_pair(positive_int), "stride": int_or_pair(positive_int)},
)
class GeneralizedNeighborhoodAttention(NeighborhoodAttention):
    """Generalized (strided, dilated) neighborhood attention: x [B, *spatial, E] -> [B, *spatial, E]."""

    rpb: bool = False
    dilation: IntPerAxis = 1
    stride: IntPerAxis = 1

    def neighborhood_args(self, spatial: tuple[int, ...]) -> dict[str, Any]:
        return dict(kernel_size=self.kernel_size, dilation=self.dilation, stride=self.stride, causal=self.causal)
