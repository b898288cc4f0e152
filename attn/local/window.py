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

Implemented with a reshape into windows and the reference softmax attention batched over windows (masked keys
only where padding exists). With shift = 0 and window_size dividing the extent it equals
`F.neighborhood_attention(kernel_size=w, stride=w)`.

Shapes: x [B, *spatial, E] -> same. Time O(B N prod(w) H D), memory O(B N prod(w) H). window_size = spatial
shape, shift = 0, rpb = False reduces exactly to plain softmax attention. No causal masking, no decoding.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.core.layer import SpatialAttentionLayer
from attn.core.masks import Mask
from attn.core.neighborhood import IntPerAxis, per_axis
from attn.registry import register

Array = jax.Array


def window_partition_plan(
    spatial: tuple[int, ...], window_size: IntPerAxis, shift: IntPerAxis
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Validated (window, front padding, back padding) per axis for partitioning `spatial` into windows."""
    rank = len(spatial)
    window = per_axis("window_size", window_size, rank, int)
    shifts = per_axis("shift", shift, rank, int)
    for axis, (n, w, s) in enumerate(zip(spatial, window, shifts, strict=True)):
        if not 1 <= w <= n:
            raise ValueError(
                f"window_size={window} must be between 1 and the extent on every axis; axis {axis} has "
                f"window {w} and extent {n} (spatial shape {spatial})"
            )
        if not 0 <= s < w:
            raise ValueError(f"shift={shifts} must satisfy 0 <= shift < window_size={window} (axis {axis} has {s})")
    front = tuple((w - s) % w for w, s in zip(window, shifts, strict=True))
    back = tuple((-(f + n)) % w for n, w, f in zip(spatial, window, front, strict=True))
    return window, front, back


def to_windows(x: Array | np.ndarray, window: tuple[int, ...], front: tuple[int, ...], back: tuple[int, ...], fill=0):
    """[B, *S, *rest] -> [B, num_windows, prod(window), *rest], padding each spatial axis by (front, back)."""
    xp = np if isinstance(x, np.ndarray) else jnp
    rank = len(window)
    rest = x.shape[1 + rank :]
    pad = [(0, 0)] + list(zip(front, back, strict=True)) + [(0, 0)] * len(rest)
    x = xp.pad(x, pad, constant_values=fill)
    padded = x.shape[1 : 1 + rank]
    counts = [p // w for p, w in zip(padded, window, strict=True)]
    split = [x.shape[0]] + [d for c, w in zip(counts, window, strict=True) for d in (c, w)] + list(rest)
    x = x.reshape(split)
    order = [0] + [1 + 2 * a for a in range(rank)] + [2 + 2 * a for a in range(rank)]
    order += list(range(1 + 2 * rank, 1 + 2 * rank + len(rest)))
    x = x.transpose(order)
    return x.reshape(x.shape[0], math.prod(counts), math.prod(window), *rest)


def from_windows(
    y: Array, spatial: tuple[int, ...], window: tuple[int, ...], front: tuple[int, ...], back: tuple[int, ...]
) -> Array:
    """Inverse of `to_windows`: [B, num_windows, prod(window), *rest] -> [B, *spatial, *rest]."""
    rank = len(window)
    rest = y.shape[3:]
    padded = [n + f + b for n, f, b in zip(spatial, front, back, strict=True)]
    counts = [p // w for p, w in zip(padded, window, strict=True)]
    y = y.reshape(y.shape[0], *counts, *window, *rest)
    order = [0] + [d for a in range(rank) for d in (1 + a, 1 + rank + a)]
    order += list(range(1 + 2 * rank, 1 + 2 * rank + len(rest)))
    y = y.transpose(order).reshape(y.shape[0], *padded, *rest)
    crop = (slice(None),) + tuple(slice(f, f + n) for f, n in zip(front, spatial, strict=True))
    return y[crop]


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
)
class WindowAttention(SpatialAttentionLayer):
    """Window attention: x [B, *spatial, E] -> [B, *spatial, E]."""

    window_size: IntPerAxis = 7
    shift: IntPerAxis = 0
    rpb: bool = False
    scale: float | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        context: Array | None = None,
        mask: Mask | None = None,
        positions: Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> Array:
        self.check_input(x, context)
        self.check_call(mask, positions, decode)
        batch, *spatial, features = x.shape
        spatial = tuple(spatial)
        window, front, back = window_partition_plan(spatial, self.window_size, self.shift)
        q, k, v = self.spatial_qkv(x)
        qw, kw, vw = (to_windows(t, window, front, back) for t in (q, k, v))
        num_windows, size = qw.shape[1], qw.shape[2]
        qw, kw, vw = (t.reshape(batch * num_windows, size, *t.shape[3:]) for t in (qw, kw, vw))

        key_mask = None
        if any(front) or any(back):
            real = to_windows(np.ones((1, *spatial), bool), window, front, back, fill=False)[0]  # [nW, T]
            key_mask = jnp.asarray(np.tile(real, (batch, 1))[:, None, None, :])
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
        result = F.softmax_attention(
            qw,
            kw,
            vw,
            mask=key_mask,
            bias=bias,
            scale=self.scale,
            dropout_rate=0.0 if deterministic else self.dropout_rate,
            dropout_rng=self.dropout_rng(deterministic),
            return_probs=capture,
            implementation=self.implementation,
        )
        if capture:
            result, aux = result
            self.sow(
                "intermediates", "attention_weights", self.dense_weights(aux["probs"], spatial, window, front, back)
            )
        y = from_windows(result.reshape(batch, num_windows, size, *result.shape[2:]), spatial, window, front, back)
        return self.spatial_out(y, features)

    def dense_weights(self, probs: Array, spatial, window, front, back) -> Array:
        """Window probabilities [B * nW, H, T, T] -> float32 [B, H, N, N] over the original tokens."""
        tokens = math.prod(spatial)
        index = np.arange(tokens).reshape(1, *spatial)
        slots = to_windows(index, window, front, back, fill=tokens)[0]  # [nW, T]; padding -> out of range
        num_windows, size = slots.shape
        probs = probs.reshape(-1, num_windows, self.num_heads, size, size).transpose(0, 2, 1, 3, 4)
        dense = jnp.zeros((probs.shape[0], self.num_heads, tokens, tokens), jnp.float32)
        return dense.at[:, :, slots[:, :, None], slots[:, None, :]].add(probs.astype(jnp.float32), mode="drop")
