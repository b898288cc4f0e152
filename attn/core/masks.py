"""The mask description shared by every attention op and kernel.

A `Mask` says which (query, key) pairs may attend without building a `[q_len, kv_len]` array. References call
`materialize` to get a dense boolean mask; kernels call `tile` for one block at a time and `block_bounds` to skip
blocks that are fully masked. All parts combine with logical AND:

  causal          kv_idx <= q_idx  (q_idx counts from `q_offset`, e.g. the cache index while decoding)
  prefix_lengths  with causal: keys before the prefix length are also visible (prefix-LM)
  window          (left, right): q_idx - left <= kv_idx <= q_idx + right
  q_lengths       query rows at or beyond the length are padding (fully masked; their output is zero)
  kv_lengths      keys at or beyond the length are padding
  segment ids     q_segment_ids[b, i] == kv_segment_ids[b, j] (packed sequences)
  block_mask      block_mask[..., q_idx // bq, kv_idx // bk] with block_size = (bq, bk)
  mask_fn         any jnp-traceable function of broadcast (q_idx, kv_idx) integer arrays returning bool
  dense           an explicit boolean [B|1, H|1, q_len, kv_len] array (accepted, never built internally)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attn.core.validation import normalize_window, shape_of

Array = jax.Array


def _array_leaf(x: Any) -> bool:
    """Whether a Mask field holds an array to validate (not None, not the placeholder leaf JAX unflattens with)."""
    return x is not None and type(x) is not object


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """Structured attention mask. Array fields are pytree leaves; flags and callables are static.

    Attributes:
      causal: keep keys at or before the query position.
      q_lengths: int [batch], number of valid queries per row.
      kv_lengths: int [batch], number of valid keys per row.
      q_segment_ids: int [batch, q_len]; kv_segment_ids: int [batch, kv_len]. Attend only within a segment.
      window: (left, right) sliding window, or None.
      prefix_lengths: int or int [batch]; with `causal`, the prefix is attended bidirectionally (prefix-LM).
      block_mask: bool [nq_blocks, nk_blocks] or [batch|1, heads|1, nq_blocks, nk_blocks].
      block_size: (bq, bk) of `block_mask`.
      mask_fn: f(q_idx, kv_idx) -> bool on broadcast int32 arrays (must be hashable: a plain function).
      dense: bool [batch|1, heads|1, q_len, kv_len].
    """

    q_lengths: Array | None = None
    kv_lengths: Array | None = None
    q_segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    prefix_lengths: Array | int | None = None
    block_mask: Array | None = None
    dense: Array | None = None
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    window: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))
    block_size: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))
    mask_fn: Callable[[Array, Array], Array] | None = dataclasses.field(default=None, metadata=dict(static=True))

    def __post_init__(self):
        object.__setattr__(self, "window", normalize_window(self.window))
        if self.prefix_lengths is not None and not self.causal:
            raise ValueError("prefix_lengths is set but causal=False; a prefix-LM mask needs causal=True")
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError(
                "q_segment_ids and kv_segment_ids must be given together (pass the same array twice for self-attention)"
            )
        if (self.block_mask is None) != (self.block_size is None):
            raise ValueError(f"block_mask and block_size must be given together, got block_size={self.block_size!r}")
        if self.block_size is not None:
            bs = self.block_size
            if not (isinstance(bs, tuple) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
                raise ValueError(f"block_size={bs!r} must be a pair (bq, bk) of positive ints")
        # JAX rebuilds pytrees with bare object() leaves inside transformations (custom_vjp's backward): no shapes.
        if _array_leaf(self.block_mask) and len(shape_of(self.block_mask)) not in (2, 4):
            raise ValueError(f"block_mask must have rank 2 or 4, got shape {shape_of(self.block_mask)}")
        if _array_leaf(self.dense) and len(shape_of(self.dense)) != 4:
            raise ValueError(
                f"dense mask must have shape [batch|1, heads|1, q_len, kv_len], got {shape_of(self.dense)}"
            )

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_args(
        cls,
        *,
        causal: bool = False,
        mask: Mask | Array | None = None,
        window: Any = None,
        segment_ids: Array | tuple[Array, Array] | None = None,
    ) -> Mask | None:
        """Merges the functional keyword arguments into one Mask (None when nothing masks)."""
        if mask is not None and not isinstance(mask, Mask) and not shape_of(mask):  # True, False, a 0-d array
            raise ValueError(
                f"mask={mask!r} is a scalar, which would mask nothing (True) or everything (False); pass "
                "attn.Mask(causal=True) for a causal mask, a boolean array [batch|1, heads|1, q_len, kv_len] "
                "(True = attend), or None for no mask"
            )
        base = mask if isinstance(mask, Mask) else cls()
        updates: dict[str, Any] = {}
        if mask is not None and not isinstance(mask, Mask):
            dense = jnp.asarray(mask)
            if dense.dtype != jnp.bool_:
                raise ValueError(f"mask must be an attn.Mask or a boolean array, got dtype {dense.dtype}")
            while dense.ndim < 4:
                dense = dense[None]
            if base.dense is not None:
                dense = dense & base.dense
            updates["dense"] = dense
        if causal:
            updates["causal"] = True
        if window is not None:
            w = normalize_window(window)
            if base.window is not None:  # intersect two windows
                w = (min(w[0], base.window[0]), min(w[1], base.window[1]))
            updates["window"] = w
        if segment_ids is not None:
            q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
            updates["q_segment_ids"], updates["kv_segment_ids"] = q_seg, kv_seg
        out = dataclasses.replace(base, **updates) if updates else base
        return None if out.is_empty() else out

    def replace(self, **updates: Any) -> Mask:
        return dataclasses.replace(self, **updates)

    def is_empty(self) -> bool:
        """True when the mask allows every pair."""
        return (
            not self.causal
            and self.window is None
            and self.mask_fn is None
            and all(getattr(self, f) is None for f in _ARRAY_FIELDS)
        )

    @property
    def is_causal(self) -> bool:
        return self.causal

    # ------------------------------------------------------------------ evaluation
    def tile(
        self,
        q_start: Any,
        q_size: int,
        kv_start: Any,
        kv_size: int,
        *,
        q_offset: Any = 0,
    ) -> Array:
        """Boolean mask of one tile: rows q_start..q_start+q_size, columns kv_start..kv_start+kv_size.

        `q_start`/`kv_start` are local indices into the q/kv arrays (they may be traced); the query's absolute
        position is `q_offset + local index`. Returns bool [B|1, H|1, q_size, kv_size].
        """
        q_local = q_start + jnp.arange(q_size, dtype=jnp.int32)
        kv_idx = kv_start + jnp.arange(kv_size, dtype=jnp.int32)
        q_idx = q_local + q_offset
        qi, kj = q_idx[:, None], kv_idx[None, :]
        allowed = jnp.ones((q_size, kv_size), jnp.bool_)[None, None]

        if self.causal:
            causal = kj <= qi
            if self.prefix_lengths is not None:
                prefix = jnp.asarray(self.prefix_lengths, jnp.int32).reshape(-1, 1, 1, 1)
                causal = causal[None, None] | (kj[None, None] < prefix)
            allowed = allowed & causal
        if self.window is not None:
            left, right = self.window
            allowed = allowed & (kj >= qi - left) & (kj <= qi + right)
        if self.q_lengths is not None:
            q_len = jnp.asarray(self.q_lengths, jnp.int32).reshape(-1, 1, 1, 1)
            allowed = allowed & (q_local[:, None] < q_len)
        if self.kv_lengths is not None:
            kv_len = jnp.asarray(self.kv_lengths, jnp.int32).reshape(-1, 1, 1, 1)
            allowed = allowed & (kj < kv_len)
        if self.q_segment_ids is not None:
            q_seg = jax.lax.dynamic_slice_in_dim(jnp.asarray(self.q_segment_ids), q_start, q_size, axis=1)
            kv_seg = jax.lax.dynamic_slice_in_dim(jnp.asarray(self.kv_segment_ids), kv_start, kv_size, axis=1)
            allowed = allowed & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
        if self.block_mask is not None:
            bq, bk = self.block_size
            bm = jnp.asarray(self.block_mask, jnp.bool_)
            if bm.ndim == 2:
                bm = bm[None, None]
            rows = jnp.clip(q_idx // bq, 0, bm.shape[2] - 1)
            cols = jnp.clip(kv_idx // bk, 0, bm.shape[3] - 1)
            allowed = allowed & bm[:, :, rows][:, :, :, cols]
        if self.mask_fn is not None:
            allowed = allowed & jnp.asarray(self.mask_fn(qi, kj), jnp.bool_)
        if self.dense is not None:
            dense = jnp.asarray(self.dense, jnp.bool_)
            dense = jax.lax.dynamic_slice_in_dim(dense, q_start, q_size, axis=2) if dense.shape[2] != 1 else dense
            dense = jax.lax.dynamic_slice_in_dim(dense, kv_start, kv_size, axis=3) if dense.shape[3] != 1 else dense
            allowed = allowed & dense
        return allowed

    def materialize(self, q_len: int, kv_len: int, *, q_offset: Any = 0) -> Array:
        """Dense boolean mask bool [B|1, H|1, q_len, kv_len] (for references and tests)."""
        return self.tile(0, q_len, 0, kv_len, q_offset=q_offset)

    def block_bounds(self, q_start: int, q_size: int, *, q_offset: int = 0) -> tuple[int, int]:
        """Static [lo, hi) range of key indices any query of the block may see (from causal and window).

        Kernels iterate only over key blocks that intersect this range; other parts of the mask are applied
        per tile. Returns (0, huge) when neither causal nor window restricts it.
        """
        lo, hi = 0, 2**31 - 1
        first, last = q_offset + q_start, q_offset + q_start + q_size - 1
        if self.causal and self.prefix_lengths is None:
            hi = last + 1
        if self.window is not None:
            left, right = self.window
            lo = max(lo, first - left)
            hi = min(hi, last + right + 1)
        return lo, hi


_ARRAY_FIELDS = (
    "q_lengths",
    "kv_lengths",
    "q_segment_ids",
    "kv_segment_ids",
    "prefix_lengths",
    "block_mask",
    "dense",
)
