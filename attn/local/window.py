"""`window`: non-overlapping window attention over 1-D, 2-D or 3-D token layouts, the baseline of Swin
("Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", Liu et al., 2021; not a seed paper)
that halo, CSWin, HiLo, DaViT and GNA's blocked mode build on.

The token grid is partitioned into windows of window_size per axis, and each token attends to the tokens of its
own window only:

    o_i = sum_{j : win(j) = win(i)} softmax_j(q_i k_j^T / sqrt(D) [+ rpb[h, j - i + w - 1]]) v_j
    win(i) = floor((i + (w - shift) mod w) / w)            per axis

`shift` (per axis, 0 <= shift < window_size) moves the window boundaries to positions = shift (mod w). This is
exactly Swin's shifted windows (cyclic roll by -shift, window partition, and the attention mask that keeps
wrapped-around regions apart), computed without the roll: the border windows are simply partial. Extents that are
not a multiple of the window are padded at the end (and, with a shift, at the start); padded keys are masked out,
so a border window is smaller rather than padded (Swin pads with zeros that are attended to).
`rpb` adds Swin's learned relative position bias, float [H, 2w - 1 per axis].

Implemented with `attn.core.windows.window_attention` (a reshape into windows and softmax attention batched over
windows, masked keys only where padding exists). With shift = 0 and window_size dividing the extent it equals
`F.neighborhood_attention(kernel_size=w, stride=w)`.

Shapes: x [B, *spatial, E] -> same. Time O(B N prod(w) H D), memory O(B N prod(w) H). window_size = spatial
shape, shift = 0, rpb = False reduces exactly to plain softmax attention. No causal masking, no decoding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.core.layer import AttentionCall, SpatialAttentionLayer
from attn.core.neighborhood import IntPerAxis
from attn.core.validation import int_or_pair, non_negative_int, optional, positive, positive_int
from attn.core.windows import dense_window_probs, window_attention, window_plan
from attn.registry import register

Array = jax.Array


def _relative_index(window: tuple[int, ...]) -> np.ndarray:
    """int32 [T, T] (T = prod(window)): flat index into a [prod(2w - 1)] table of the offset key - query."""
    coords = np.stack(np.meshgrid(*[np.arange(w) for w in window], indexing="ij"), -1).reshape(-1, len(window))
    offset = coords[None, :, :] - coords[:, None, :] + np.asarray(window) - 1
    index = np.zeros(offset.shape[:2], np.int64)
    for axis, w in enumerate(window):
        index = index * (2 * w - 1) + offset[..., axis]
    return index.astype(np.int32)


@register(
    "window",
    family="local",
    paper="Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (baseline; not a seed paper)",
    catalog=None,
    input_kind="spatial",
    supports_causal=False,
    supports_decode=False,
    summary="non-overlapping (optionally shifted) window attention over 1-D/2-D/3-D grids, Swin-style",
    option_docs={
        "window_size": "window size per spatial axis (int or tuple); tokens attend within their window",
        "shift": "window offset per axis, 0 <= shift < window_size (Swin's shifted windows; 0 = none)",
        "rpb": "learned relative position bias (Swin), [heads, 2 * window_size - 1 per axis]",
        "scale": "logit scale (None = 1/sqrt(head_dim))",
    },
    fidelity="paper",
    reference="Liu et al. 2021 (Swin), Sec. 3.2: window and shifted-window self-attention with relative position bias",
    validators={
        "window_size": int_or_pair(positive_int),
        "shift": int_or_pair(non_negative_int),
        "scale": optional(positive),
    },
)
class WindowAttention(SpatialAttentionLayer):
    """Window attention: x [B, *spatial, E] -> [B, *spatial, E]."""

    window_size: IntPerAxis = 7
    shift: IntPerAxis = 0
    rpb: bool = False
    scale: float | None = None

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, *S, H, D], k/v [B, *S, KVH, D] -> [B, *S, H, D]; sows the dense weights float32 [B, H, N, N] when
        captured (N = prod(S))."""
        spatial = tuple(q.shape[1:-2])
        window = window_plan(spatial, self.window_size, self.shift, window_name="window_size")[0]
        bias = None
        if self.rpb:
            table = self.param(
                "rpb",
                nn.with_logical_partitioning(
                    nn.initializers.truncated_normal(0.02), ("heads",) + (None,) * len(window)
                ),
                (self.num_heads, *(2 * w - 1 for w in window)),
                self.param_dtype,
            )
            flat = jnp.asarray(table, jnp.float32).reshape(self.num_heads, -1)
            bias = jnp.take(flat, jnp.asarray(_relative_index(window)), axis=1)[None]

        capture = self.wants_weights()
        result = window_attention(
            q,
            k,
            v,
            window=window,
            shift=self.shift,
            bias=bias,
            scale=self.scale,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
            return_probs=capture,
            implementation=self.implementation,
        )
        if capture:
            result, aux = result
            self.sow_capture("attention_weights", dense_window_probs(aux["probs"], spatial, window, self.shift))
        return result
