"""Tile math shared by the flash attention kernels: visible block ranges, per-tile masks, logits and probabilities.

Every function here works on values already loaded from refs (plain jnp arrays of one tile), so the forward,
backward and statistics kernels compute the logits of a tile the same way:

    s = scale * q k^T;  s = softcap * tanh(s / softcap) (if softcap);  s += bias + u v_f^T (if given)
    visible(i, j) = causal: j <= i  AND  window (l, r): i - l <= j <= i + r  AND  j < kv_len, i < q_len
                    AND  segment: q_seg[i] == kv_seg[j]
    p = exp(s - lse) on visible entries, 0 elsewhere (rows with lse = -inf see no key)

Block ranges turn causal/window into loop bounds so that fully masked kv (or q) blocks are never visited.
Indices are int32 and may be traced (program ids); divisions use `lax.div` on non-negative operands, which lowers
to Triton as well as to XLA.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static part of the mask and logits transform (hashable: used as a jit/custom_vjp static argument).

    Attributes:
      causal: key j visible from query i only if j <= i.
      window: (left, right) with i - left <= j <= i + right, or None.
      softcap: logits soft cap (> 0) or None.
      scale: multiplier of q k^T.
      q_len / kv_len: true (unpadded) lengths; rows/columns at or beyond them are padding.
      q_padded / kv_padded: whether the arrays the kernels see are longer than q_len / kv_len.
    """

    causal: bool
    window: tuple[int, int] | None
    softcap: float | None
    scale: float
    q_len: int
    kv_len: int
    q_padded: bool
    kv_padded: bool


def cdiv(a: Array | int, b: int) -> Array | int:
    """Ceiling division of a non-negative (possibly traced) int by a static positive int."""
    if isinstance(a, int):
        return -(-a // b)
    return lax.div(a + (b - 1), jnp.int32(b))


def kv_block_range(spec: MaskSpec, q_start: Array, block_q: int, block_k: int) -> tuple[Array, Array]:
    """[lo, hi) range of kv block indices that queries q_start .. q_start + block_q - 1 may see."""
    end = jnp.int32(spec.kv_len)
    if spec.causal:
        end = jnp.minimum(end, q_start + block_q)
    lo = jnp.int32(0)
    if spec.window is not None:
        left, right = spec.window
        end = jnp.minimum(end, q_start + block_q + right)
        lo = lax.div(jnp.maximum(q_start - left, 0), jnp.int32(block_k))
    hi = cdiv(jnp.maximum(end, 0), block_k)
    return lo, hi


def q_block_range(spec: MaskSpec, kv_start: Array, block_k: int, block_q: int) -> tuple[Array, Array]:
    """[lo, hi) range of q block indices whose queries may see keys kv_start .. kv_start + block_k - 1."""
    end = jnp.int32(spec.q_len)
    start = jnp.int32(0)
    if spec.causal:
        start = jnp.maximum(start, kv_start)
    if spec.window is not None:
        left, right = spec.window
        start = jnp.maximum(start, kv_start - right)
        end = jnp.minimum(end, kv_start + block_k + left)
    lo = lax.div(start, jnp.int32(block_q))
    hi = cdiv(jnp.maximum(end, 0), block_q)
    return lo, hi


def tile_mask(spec: MaskSpec, q_idx: Array, kv_idx: Array, q_seg: Array | None, kv_seg: Array | None) -> Array | None:
    """bool [bq, bk] visibility of one tile (None when nothing can be masked), q_idx [bq], kv_idx [bk] int32."""
    qi, kj = q_idx[:, None], kv_idx[None, :]
    conds = []
    if spec.causal:
        conds.append(kj <= qi)
    if spec.window is not None:
        left, right = spec.window
        conds.append(kj >= qi - left)
        conds.append(kj <= qi + right)
    if spec.kv_padded:
        conds.append(kj < spec.kv_len)
    if spec.q_padded:
        conds.append(qi < spec.q_len)
    if q_seg is not None:
        conds.append(q_seg[:, None] == kv_seg[None, :])
    if not conds:
        return None
    mask = conds[0]
    for c in conds[1:]:
        mask = mask & c
    # Broadcast to the full tile: a lone q-padding condition has shape [bq, 1].
    return jnp.broadcast_to(mask, (q_idx.shape[0], kv_idx.shape[0]))


def dot(a: Array, b: Array, *, trans_a: bool = False, trans_b: bool = False) -> Array:
    """float32 product of two tiles; float32 inputs use full IEEE precision (Triton would default to TF32)."""
    precision = lax.Precision.HIGHEST if jnp.float32 in (a.dtype, b.dtype) else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def tile_logits(
    spec: MaskSpec, q: Array, k: Array, bias: Array | None, u: Array | None, vf: Array | None
) -> tuple[Array, Array | None]:
    """Logits f32 [bq, bk] of one tile (before masking) and tanh(scale q k^T / softcap) (None without softcap).

    q [bq, D], k [bk, D]; bias [bq, bk]; u [bq, R], vf [bk, R] (low-rank bias factors).
    """
    s = dot(q, k, trans_b=True) * spec.scale
    capped = None
    if spec.softcap is not None:
        capped = jnp.tanh(s / spec.softcap)
        s = spec.softcap * capped
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if u is not None:
        s = s + dot(u, vf, trans_b=True)
    return s, capped


def tile_probs(s: Array, lse: Array, mask: Array | None) -> Array:
    """Probabilities exp(s - lse) of one tile from the saved row log-sum-exp lse [bq]; masked entries are 0."""
    # A row with no visible key has lse = -inf; every entry of it is masked, so any finite stand-in works.
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    p = jnp.exp(s - lse[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    return p


def logits_grad(spec: MaskSpec, ds: Array, capped: Array | None) -> Array:
    """Gradient w.r.t. scale * q k^T given the gradient ds w.r.t. the final logits (through the soft cap)."""
    if capped is None:
        return ds
    return ds * (1.0 - capped * capped)
