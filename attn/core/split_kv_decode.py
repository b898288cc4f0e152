"""Split-KV decode attention: a few queries against a long KV cache, the cache cut into S splits whose partial
softmax results are merged exactly by log-sum-exp (`attn.core.lse_merge`).

    split s covers cache slots [s C, (s + 1) C)                 C = chunk tokens, S = ceil(capacity / C)
    (o_s, lse_s) = softmax attention of the queries over the visible, filled slots of split s
    out, lse     = merge_partials(o_s, lse_s over s)             (empty splits: lse_s = -inf, no contribution)

Shapes: q [B, Tq, H, D] (Tq = 1 or a few decoded tokens); keys [B, L, KVH, D] and values [B, L, KVH, Dv] (float
arrays or per-token `QuantizedArray` codes, dequantised split by split with `QuantizedArray.dequantize`); lengths
int32 [B, KVH] filled slots per (batch, kv head) (ragged: a policy cache keeps a different number per head), or
None for all L. Query head h reads kv head h // (H / KVH) (GQA/MQA, keys never repeated). An optional `Mask`
(causal, window, kv_lengths, ...) is evaluated per split with the queries at absolute positions q_offset + i.

The partition (`plan_splits`), after LeanAttention's stream-K decomposition (arXiv 2405.10480): the work
is B * KVH * ceil(L / block) tiles of `block` cache slots; over `work_units` units (SMs, cores) each unit gets
ceil(total tiles / units) tiles (the balanced share, within one tile), and a split is that many consecutive tiles
of one (batch, kv head), so B * KVH * S ~ work_units units of equal work. Unlike LeanAttention a unit never spans
two heads (the grid is (batch, kv head, split), as in Flash-Decoding); ragged lengths are balanced at run time by
the Pallas kernel (`pallas_kernels.decode`), which spreads the filled tiles of all heads over the units.

XLA execution: the splits are computed one after another in a `lax.fori_loop` whose trip count is the number of
splits that hold any filled slot (ceil(max length / C)), so a cache allocated at max_len but filled to n costs
O(n), not O(max_len) as the dense masked decode does; each split is one contiguous dynamic slice of the cache, and
its partial uses the pipeline's own stages (`pipeline.scores`, `softmax_weights`, `mix`), so S = 1 is the dense
decode exactly. Time O(B H Tq n D); extra memory O(S B Tq H Dv) for the partials plus one split of K and V.
Without num_splits / work_units a split holds DEFAULT_CHUNK = 512 slots (the fastest of 64-, 512- and capacity/16-
slot splits measured on CPU; larger slices cost more to copy out of the cache).

Fidelity: "official-code" for the partition and "paper" for the merge. Checked against LeanAttention's text (arXiv
2405.10480: abstract and introduction, the softmax re-scaling as an associative reduction and the stream-K
decomposition) and its official code in ONNX Runtime (onnxruntime/contrib_ops/cuda/bert/lean_attention:
lean_api.cc get_num_splits_and_buffer_sizes, tiles per CTA = ceil(total tiles / grid); lean_fwd_kernel.h, the
host CTA of a head reduces its partials). Differences, by design: a split never spans two heads, partials are merged
by a separate log-sum-exp reduction instead of a host block, and XLA runs the splits in sequence.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core import pipeline
from attn.core.lse_merge import merge_partials
from attn.core.masks import Mask

Array = jax.Array

__all__ = [
    "SplitPlan",
    "packed_split_kv_attention",
    "packed_split_kv_decode",
    "plan_splits",
    "split_kv_attention",
    "split_kv_decode",
]

DEFAULT_BLOCK = 128  # tile granularity (cache slots) of the partition
DEFAULT_CHUNK = 512  # slots per split when neither num_splits nor work_units is given (fastest on CPU, see below)


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """A static split of a cache of `capacity` slots: `num_splits` splits of `chunk` slots (the last may hang over
    the end; its slice is shifted back and the overlap masked), from tiles of `block` slots."""

    num_splits: int
    chunk: int
    block: int
    capacity: int


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


def plan_splits(
    batch: int,
    kv_heads: int,
    capacity: int,
    *,
    num_splits: int | None = None,
    work_units: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> SplitPlan:
    """The split of a [batch, capacity, kv_heads] cache (see the module docstring).

    num_splits: splits per (batch, kv head) (C = block * ceil(tiles / num_splits)); or work_units: the stream-K
    share, C = block * min(tiles per head, ceil(batch * kv_heads * tiles per head / work_units)). At most one of
    the two; neither gives C = DEFAULT_CHUNK slots (rounded to whole tiles). A split count above the number of
    tiles gives one tile per split."""
    for name, value in (("batch", batch), ("kv_heads", kv_heads), ("capacity", capacity), ("block", block)):
        _positive_int(name, value)
    if num_splits is not None and work_units is not None:
        raise ValueError(f"num_splits={num_splits!r} and work_units={work_units!r}: give at most one of them")
    tiles = math.ceil(capacity / block)
    if num_splits is not None:
        chunk_tiles = math.ceil(tiles / _positive_int("num_splits", num_splits))
    elif work_units is not None:
        units = _positive_int("work_units", work_units)
        chunk_tiles = min(tiles, math.ceil(batch * kv_heads * tiles / units))
    else:
        chunk_tiles = min(tiles, max(1, DEFAULT_CHUNK // block))
    chunk = min(chunk_tiles * block, capacity)
    return SplitPlan(num_splits=math.ceil(capacity / chunk), chunk=chunk, block=block, capacity=capacity)


def _check_inputs(q: Array, keys: Any, values: Any, lengths: Array | None) -> None:
    for name, x in (("keys", keys), ("values", values)):
        if isinstance(x, cache_lib.QuantizedArray) and x.axis != "token":
            raise ValueError(
                f"{name} is quantized per {x.axis!r}; split-KV decoding reads per-token codes (axis='token') split "
                "by split"
            )
    if q.ndim != 4:
        raise ValueError(f"q must have rank 4 [batch, q_len, heads, head_dim], got shape {q.shape}")
    k_shape, v_shape = tuple(keys.shape), tuple(values.shape)
    if len(k_shape) != 4 or k_shape[:3] != v_shape[:3] or k_shape[0] != q.shape[0] or k_shape[3] != q.shape[3]:
        raise ValueError(
            f"keys {k_shape} and values {v_shape} must be [batch, length, kv_heads, head_dim] matching q {q.shape}"
        )
    if q.shape[2] % k_shape[2]:
        raise ValueError(f"num_heads={q.shape[2]} (q) must be a multiple of num_kv_heads={k_shape[2]} (keys)")
    if lengths is not None and tuple(jnp.shape(lengths)) != (k_shape[0], k_shape[2]):
        raise ValueError(
            f"lengths has shape {jnp.shape(lengths)}; expected [batch, kv_heads] = {k_shape[0], k_shape[2]}"
        )


def _slice_tokens(x: Any, start: Array, size: int) -> Array:
    """Cache slots [start, start + size) of keys/values [B, L, KVH, D] (codes dequantised), float."""
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)  # noqa: E731
    if isinstance(x, cache_lib.QuantizedArray):
        return x.tokens(take).dequantize()
    return take(x)


def _merged_splits(
    q: Array, split: Any, num_splits: int, live_splits: Array, value_dim: int, return_lse: bool, *, unroll_one: bool
) -> Array | tuple[Array, Array]:
    """Runs `split(s, (o_parts, lse_parts))` for s < live_splits over float32 partials [S, B, Tq, H, Dv] / [S, B, Tq,
    H] (-inf lse: an empty split) and merges them by log-sum-exp: out [B, Tq, H, Dv] in q.dtype (+ lse f32 [B, H, Tq]
    with return_lse). unroll_one: with a single split, call it once outside a loop."""
    batch, q_len, heads, _ = q.shape
    acc = pipeline.accumulation_dtype(q)
    o_parts = jnp.zeros((num_splits, batch, q_len, heads, value_dim), acc)
    lse_parts = jnp.full((num_splits, batch, q_len, heads), -jnp.inf, acc)
    if unroll_one and num_splits == 1:
        o_parts, lse_parts = split(jnp.asarray(0, jnp.int32), (o_parts, lse_parts))
    else:
        o_parts, lse_parts = jax.lax.fori_loop(0, live_splits, split, (o_parts, lse_parts))
    out, lse = merge_partials(o_parts, lse_parts, axis=0)  # [B, Tq, H, Dv], [B, Tq, H]
    out = out.astype(q.dtype)
    if return_lse:
        return out, jnp.swapaxes(lse, 1, 2).astype(jnp.float32)
    return out


def split_kv_attention(
    q: Array,
    keys: Any,
    values: Any,
    *,
    lengths: Array | None = None,
    mask: Mask | None = None,
    q_offset: Any = 0,
    scale: float | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    work_units: int | None = None,
    block: int = DEFAULT_BLOCK,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Softmax attention of q [B, Tq, H, D] over keys [B, L, KVH, D] / values [B, L, KVH, Dv] by splits.

    lengths: int32 [B, KVH] filled slots per (batch, kv head) (None: all L); mask: an optional `Mask` evaluated
    with queries at q_offset + i; scale (default D ** -0.5), softcap as in `softmax_attention`; num_splits /
    work_units / block: the partition (`plan_splits`). Returns out [B, Tq, H, Dv] in q.dtype, and with return_lse
    also lse float32 [B, H, Tq] (-inf where a query sees no key; its output is 0)."""
    _check_inputs(q, keys, values, lengths)
    batch, q_len, heads, _ = q.shape
    capacity, kv_heads = keys.shape[1], keys.shape[2]
    plan = plan_splits(batch, kv_heads, capacity, num_splits=num_splits, work_units=work_units, block=block)
    group = heads // kv_heads
    # [B, H, 1, 1] filled slots of each query head's kv head
    head_lengths = None if lengths is None else jnp.repeat(jnp.asarray(lengths, jnp.int32), group, axis=1)
    live_length = jnp.asarray(capacity, jnp.int32)
    if lengths is not None:
        live_length = jnp.minimum(live_length, jnp.max(lengths))
    if mask is not None and mask.kv_lengths is not None:
        live_length = jnp.minimum(live_length, jnp.max(jnp.asarray(mask.kv_lengths, jnp.int32)))
    live_splits = jnp.clip((live_length + plan.chunk - 1) // plan.chunk, 0, plan.num_splits)
    value_dim = values.shape[-1]

    def split(s: Array, partials: tuple[Array, Array]) -> tuple[Array, Array]:
        o_parts, lse_parts = partials
        first = s * plan.chunk
        start = jnp.minimum(first, capacity - plan.chunk)  # the last split's slice ends at the capacity
        k = _slice_tokens(keys, start, plan.chunk)
        v = _slice_tokens(values, start, plan.chunk)
        logits = pipeline.scores(q, k, scale=scale, softcap=softcap)  # [B, H, Tq, C]
        slot = start + jnp.arange(plan.chunk, dtype=jnp.int32)
        visible = (slot >= first)[None, None, None, :]  # slots before `first` belong to the previous split
        if head_lengths is not None:
            visible = visible & (slot[None, None, None, :] < head_lengths[:, :, None, None])
        if mask is not None:
            visible = visible & mask.tile(0, q_len, start, plan.chunk, q_offset=q_offset)
        logits = jnp.where(visible, logits, -jnp.inf)
        weights, lse = pipeline.softmax_weights(logits)
        o = pipeline.mix(weights, v)  # [B, Tq, H, Dv] float32
        o_parts = jax.lax.dynamic_update_index_in_dim(o_parts, o.astype(o_parts.dtype), s, 0)
        lse_parts = jax.lax.dynamic_update_index_in_dim(lse_parts, jnp.swapaxes(lse, 1, 2), s, 0)
        return o_parts, lse_parts

    return _merged_splits(q, split, plan.num_splits, live_splits, value_dim, return_lse, unroll_one=True)


def split_kv_decode(
    q: Array,
    cache: cache_lib.KVCache,
    *,
    mask: Mask | None = None,
    q_offset: Any = 0,
    scale: float | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    work_units: int | None = None,
    block: int = DEFAULT_BLOCK,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Split-KV attention of q [B, Tq, H, D] over every filled slot of `cache` (a `KVCache`: its per (batch, kv
    head) `filled()` lengths, float or per-token quantized keys/values); other arguments as `split_kv_attention`.
    Returns out [B, Tq, H, Dv] (and lse float32 [B, H, Tq] with return_lse)."""
    if not isinstance(cache, cache_lib.KVCache):
        raise ValueError(f"cache must be an attn.core.cache.KVCache, got {type(cache).__name__}")
    return split_kv_attention(
        q,
        cache.keys,
        cache.values,
        lengths=cache.filled(),
        mask=mask,
        q_offset=q_offset,
        scale=scale,
        softcap=softcap,
        num_splits=num_splits,
        work_units=work_units,
        block=block,
        return_lse=return_lse,
    )


def packed_split_kv_attention(
    q: Array,
    keys: Any,
    values: Any,
    offsets: Array,
    lengths: Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Split-KV attention of q [B, Tq, H, D] over a packed cache (`attn.core.cache.PackedKV`'s layout): keys
    [B, N, D] / values [B, N, Dv] (arrays or per-token QuantizedArray), kv head g of row b in the flat slots
    offsets[b, g] + 0..lengths[b, g]-1 (offsets, lengths int32 [B, KVH]). Every query sees every filled entry of its
    kv head (h // (H / KVH)); no other mask (a policy's cache holds only past entries: the chunk being decoded is
    attended separately and merged by `merge_partials`).

    Split s gathers local slots [s C, (s + 1) C) of every head's segment (one [B, C, KVH, D] block, C = chunk,
    clipped to the buffer, slots past a head's length masked) and its partial uses the pipeline's stages, as
    `split_kv_attention`'s splits do; the trip count is ceil(max lengths / C), so the cost follows the longest head
    and the extra memory is one block, not a padded per-head copy of the cache. Returns out [B, Tq, H, Dv] in
    q.dtype, and with return_lse lse float32 [B, H, Tq] (-inf where a head holds no entry; its output is 0)."""
    chunk = _positive_int("chunk", chunk)
    for name, x in (("keys", keys), ("values", values)):
        if isinstance(x, cache_lib.QuantizedArray) and x.axis != "token":
            raise ValueError(f"{name} is quantized per {x.axis!r}; a packed cache stores per-token codes")
    if q.ndim != 4 or len(keys.shape) != 3 or len(values.shape) != 3:
        raise ValueError(
            f"q {q.shape}, keys {tuple(keys.shape)}, values {tuple(values.shape)}: expected q [batch, q_len, heads, "
            "head_dim] and packed keys / values [batch, slots, dim]"
        )
    batch, q_len, heads, _ = q.shape
    total = keys.shape[1]
    if keys.shape[0] != batch or tuple(values.shape[:2]) != tuple(keys.shape[:2]) or keys.shape[2] != q.shape[3]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must match q {q.shape}")
    lengths = jnp.asarray(lengths, jnp.int32)
    offsets = jnp.asarray(offsets, jnp.int32)
    if lengths.ndim != 2 or lengths.shape[0] != batch or offsets.shape != lengths.shape:
        raise ValueError(f"offsets {offsets.shape} and lengths {lengths.shape} must both be [batch, kv_heads]")
    kv_heads = lengths.shape[1]
    if heads % kv_heads:
        raise ValueError(f"num_heads={heads} (q) must be a multiple of kv_heads={kv_heads} (lengths)")
    chunk = min(chunk, total)
    num_splits = math.ceil(total / chunk)
    head_lengths = jnp.repeat(lengths, heads // kv_heads, axis=1)[:, :, None, None]  # [B, H, 1, 1]
    live_splits = jnp.clip((jnp.max(lengths) + chunk - 1) // chunk, 0, num_splits)

    def split(s: Array, partials: tuple[Array, Array]) -> tuple[Array, Array]:
        o_parts, lse_parts = partials
        slots = cache_lib.segment_slots(offsets, s * chunk, chunk, total)  # [B, C, KVH]
        k = cache_lib.read(cache_lib.gather_slots(keys, slots))
        v = cache_lib.read(cache_lib.gather_slots(values, slots))
        logits = pipeline.scores(q, k, scale=scale, softcap=softcap)  # [B, H, Tq, C]
        local = s * chunk + jnp.arange(chunk, dtype=jnp.int32)
        logits = jnp.where(local[None, None, None, :] < head_lengths, logits, -jnp.inf)
        weights, lse = pipeline.softmax_weights(logits)
        o = pipeline.mix(weights, v)  # [B, Tq, H, Dv] float32
        o_parts = jax.lax.dynamic_update_index_in_dim(o_parts, o.astype(o_parts.dtype), s, 0)
        lse_parts = jax.lax.dynamic_update_index_in_dim(lse_parts, jnp.swapaxes(lse, 1, 2), s, 0)
        return o_parts, lse_parts

    return _merged_splits(q, split, num_splits, live_splits, values.shape[-1], return_lse, unroll_one=False)


def packed_split_kv_decode(
    q: Array,
    cache: cache_lib.PackedKV,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """`packed_split_kv_attention` of q [B, Tq, H, D] over every filled slot of a `PackedKV` (keys as stored, no
    position applied: a layer that rotates keys reads them itself)."""
    if not isinstance(cache, cache_lib.PackedKV):
        raise ValueError(f"cache must be an attn.core.cache.PackedKV, got {type(cache).__name__}")
    return packed_split_kv_attention(
        q, cache.keys, cache.values, cache.offsets, cache.lengths, scale=scale, softcap=softcap, chunk=chunk,
        return_lse=return_lse,
    )  # fmt: skip
