"""The dense KV cache: every token's keys and values, in order, on the cache protocol (`attn.core.cache.KVCache`).

Flax convention: the first call with decode=True, when no cache exists yet, creates a zero cache whose length is
the length of that call's input (so `model.init(rng, tokens[:, :max_len], decode=True)` or
`attn.models.init_cache` sizes it) and computes an ordinary forward. Every later decode call writes its chunk
[B, L, KVH, D] at `cache_index`, attends over the filled part and advances the index by L. The dense cache stores
only keys, values and the index (variables "cached_key", "cached_value", "cache_index"); its per-head lengths are
the index and its positions 0..index-1 (`KVCache.filled`, `KVCache.slot_positions`).

Decode dispatch: `decode_attention` is the attention of a decode call against the cache (the softmax layer's fused
path uses it): split-KV decoding (`attn.core.split_kv_decode`: the cache in splits merged by log-sum-exp, only the
filled splits computed; on a GPU, the Pallas kernel `pallas_kernels.decode`) or today's dense masked decode
(`softmax_attention` over every slot). implementation=None on CPU/TPU, for a decode step against a cache of at
least SPLIT_MIN_CAPACITY slots, chooses at run time (`lax.cond`): split-KV while the filled slots are at most
SPLIT_MAX_FILL of the cache (a cache allocated for the whole generation, early on), dense otherwise (on CPU the
dense decode is faster per scored slot, so it wins on a fuller cache; measured by `python -m eval.bench_decode`,
benchmarks/results/decode_cpu.json); below SPLIT_MIN_CAPACITY always dense. On a GPU it keeps the flash path (the
decode kernel is interpret-verified only, so it runs on request). implementation="split_kv" forces split-KV
on every decode step (prefill calls, such as the creating call, stay dense; a logits bias is an error); any other
implementation ("xla", "pallas", ...) goes to `softmax_attention` as before.

`cached_attention` is the attention over every filled slot of a cache with per (batch, kv head) lengths and no other
mask, returning the lse too: a policy layer's split-KV route (attn/kv/policy_layer.py) attends its cached entries with
it (the Pallas decode kernel on a GPU, split-KV on XLA elsewhere) and merges the incoming chunk by log-sum-exp.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core import dispatch
from attn.core.lse_merge import merge_partials
from attn.core.masks import Mask
from attn.core.softmax import softmax_attention
from attn.core.split_kv_decode import plan_splits, split_kv_attention

Array = jax.Array


def cache_is_initialized(module: nn.Module) -> bool:
    return module.has_variable("cache", cache_lib.KV_VARIABLES["keys"])


def current_index(module: nn.Module) -> Array | int:
    """The index the next chunk will be written at (0 while the cache is being created)."""
    if not cache_is_initialized(module):
        return 0
    return module.get_variable("cache", cache_lib.KV_VARIABLES["index"])


def write(module: nn.Module, k: Array, v: Array) -> tuple[Array, Array, Array | None]:
    """Stores k, v [B, L, KVH, D] at the cache index.

    Returns (all keys, all values, index before the write); the index is None on the creating call, when the
    given k, v are returned unchanged.
    """
    cache = cache_lib.load(module)
    if cache is None:
        cache_lib.store(module, cache_lib.empty_kv(k, v, k.shape[1]))
        return k, v, None
    start = cache.index
    keys = jax.lax.dynamic_update_slice_in_dim(cache.keys, k.astype(cache.keys.dtype), start, 1)
    values = jax.lax.dynamic_update_slice_in_dim(cache.values, v.astype(cache.values.dtype), start, 1)
    cache_lib.store(module, cache.replace(keys=keys, values=values, index=start + k.shape[1]))
    return keys, values, start


def decode_mask(mask: Mask | None, batch: int, start: Array, length: int) -> Mask:
    """Restricts `mask` to the filled part of the cache (keys before start + length)."""
    if mask is not None and mask.q_segment_ids is not None:
        raise ValueError("segment ids are not supported with decode=True (decode one sequence per batch row)")
    filled = jnp.full((batch,), start + length, jnp.int32)
    mask = mask if mask is not None else Mask()
    if mask.kv_lengths is not None:
        filled = jnp.minimum(filled, jnp.asarray(mask.kv_lengths, jnp.int32))
    return mask.replace(kv_lengths=filled)


# ---------------------------------------------------------------------------------------------- decode dispatch
# Smallest cache (slots) for which implementation=None takes split-KV decoding on CPU/TPU; see the module docstring.
SPLIT_MIN_CAPACITY = 4096
# implementation=None runs split-KV (a runtime lax.cond) while the filled slots are at most this fraction of the
# cache: split-KV computes only the filled splits, dense scores every slot but is faster per scored slot on CPU
# (eval.bench_decode: on a full cache split-KV measured 0.7-0.9x of dense from 4K to 16K slots, mixed at 32K).
SPLIT_MAX_FILL = 0.25
# Most queries a call may decode at once on the split-KV path (a longer chunk is a prefill: dense attention).
MAX_DECODE_QUERIES = 16


def is_decode(q: Array, keys: Any) -> bool:
    """Whether q [B, Tq, H, D] against keys [B, L, KVH, D] is a decode step: at most MAX_DECODE_QUERIES queries
    against a longer cache (the creating call and long chunks are prefills)."""
    return q.shape[1] <= MAX_DECODE_QUERIES and q.shape[1] < keys.shape[1]


def kernel_unavailable(keys: Any, mask: Mask | None, lengths: Array | None) -> str | None:
    """Why the Pallas decode kernel cannot serve a split-KV call (None when it can)."""
    if dispatch.platform() != "gpu":
        return f"the Pallas decode kernel needs a GPU, platform is {dispatch.platform()!r}"
    if isinstance(keys, cache_lib.QuantizedArray) and keys.scale.shape[-1] != 1:
        return "the decode kernel reads one scale per token (no channel groups)"
    if mask is not None:
        parts = ("q_lengths", "q_segment_ids", "prefix_lengths", "block_mask", "dense")
        extra = [f for f in parts if getattr(mask, f) is not None]
        if extra or mask.window is not None or mask.mask_fn is not None:
            return f"mask parts {extra or ['window or mask_fn']} are not supported by the decode kernel"
    if lengths is None and (mask is None or mask.kv_lengths is None):
        return "the decode kernel needs the filled lengths (mask.kv_lengths or lengths)"
    return None


def decode_choice(q: Array, keys: Any, bias: Array | None, implementation: str | None) -> str:
    """ "split_kv" or "dense" for an attention call against a cache (see the module docstring)."""
    if implementation == "split_kv":
        if bias is not None:
            raise ValueError(
                "implementation='split_kv' does not support a logits bias (relative positions: position='alibi', "
                "'t5' or 'shaw'); use position='rope' or 'none', or implementation=None"
            )
        return "split_kv" if is_decode(q, keys) else "dense"
    if implementation is not None or bias is not None or not is_decode(q, keys) or dispatch.platform() == "gpu":
        return "dense"
    return "split_kv" if keys.shape[1] >= SPLIT_MIN_CAPACITY else "dense"


def decode_attention(
    q: Array,
    keys: Any,
    values: Any,
    *,
    mask: Mask | None = None,
    q_offset: Any = 0,
    lengths: Array | None = None,
    bias: Array | None = None,
    window: int | tuple[int, int] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    implementation: str | None = None,
) -> Array:
    """Attention of decoded queries q [B, Tq, H, D] against cached keys [B, L, KVH, D] / values [B, L, KVH, Dv]
    (arrays or per-token `QuantizedArray`); mask evaluated with queries at q_offset + i; lengths int32 [B, KVH]
    filled slots per (batch, kv head) or None; bias, window, scale, softcap as in `softmax_attention`; num_splits:
    the split-KV partition (None: `plan_splits`' default). Returns [B, Tq, H, Dv] in q.dtype."""
    full_mask = Mask.from_args(mask=mask, window=window)

    def dense() -> Array:
        dense_mask = full_mask
        if lengths is not None:
            visible = jnp.arange(keys.shape[1], dtype=jnp.int32) < jnp.asarray(lengths, jnp.int32)[..., None]
            per_head = cache_lib.head_mask(visible[:, :, None, :], q.shape[2])  # [B, H, 1, L]
            base = dense_mask if dense_mask is not None else Mask()
            dense_mask = base.replace(dense=per_head if base.dense is None else base.dense & per_head)
        return softmax_attention(
            q, cache_lib.read(keys), cache_lib.read(values), mask=dense_mask, bias=bias, scale=scale,
            softcap=softcap, q_offset=q_offset, implementation=None if implementation == "split_kv" else implementation,
        )  # fmt: skip

    if decode_choice(q, keys, bias, implementation) == "dense":
        return dense()
    if kernel_unavailable(keys, full_mask, lengths) is None:
        return _kernel_decode(q, keys, values, full_mask, lengths, scale, softcap, num_splits)

    def split() -> Array:
        return split_kv_attention(
            q, keys, values, lengths=lengths, mask=full_mask, q_offset=q_offset, scale=scale, softcap=softcap,
            num_splits=num_splits,
        )  # fmt: skip

    if implementation == "split_kv":
        return split()
    # implementation=None: split-KV while the filled part is at most SPLIT_MAX_FILL of the cache, else dense
    live = jnp.asarray(keys.shape[1], jnp.int32)
    if lengths is not None:
        live = jnp.minimum(live, jnp.max(lengths))
    if full_mask is not None and full_mask.kv_lengths is not None:
        live = jnp.minimum(live, jnp.max(jnp.asarray(full_mask.kv_lengths, jnp.int32)))
    return jax.lax.cond(live <= int(SPLIT_MAX_FILL * keys.shape[1]), split, dense)


def _kernel_decode(q, keys, values, mask, lengths, scale, softcap, num_splits) -> Array:
    """Split-KV decoding on the Pallas GPU kernel: partials from `pallas_kernels.decode`, merged by lse_merge."""
    batch, kv_heads = keys.shape[0], keys.shape[2]
    if lengths is None:
        lengths = jnp.broadcast_to(jnp.asarray(mask.kv_lengths, jnp.int32)[:, None], (batch, kv_heads))
    elif mask is not None and mask.kv_lengths is not None:
        lengths = jnp.minimum(lengths, jnp.asarray(mask.kv_lengths, jnp.int32)[:, None])
    causal = mask is not None and mask.causal
    return _kernel_partials(q, keys, values, lengths, causal, scale, softcap, num_splits)[0].astype(q.dtype)


def _kernel_partials(q, keys, values, lengths, causal, scale, softcap, num_splits, interpret=False):
    """(out float32 [B, Tq, H, Dv], lse float32 [B, Tq, H]): the decode kernel's partials merged by log-sum-exp."""
    from pallas_kernels.decode import decode_partials

    plan = plan_splits(keys.shape[0], keys.shape[2], keys.shape[1], num_splits=num_splits)
    stored = {}
    if isinstance(keys, cache_lib.QuantizedArray):
        stored = dict(k_scale=keys.scale, k_zero=keys.zero, v_scale=values.scale, v_zero=values.zero, bits=keys.bits)
        keys, values = keys.codes, values.codes
    o_parts, lse_parts = decode_partials(
        q, keys, values, lengths, num_splits=plan.num_splits, causal=causal, scale=scale, softcap=softcap,
        interpret=interpret, **stored,
    )  # fmt: skip
    return merge_partials(o_parts, lse_parts, axis=0)


def cached_attention(
    q: Array,
    keys: Any,
    values: Any,
    lengths: Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    interpret: bool = False,
) -> tuple[Array, Array]:
    """Split-KV attention of q [B, Tq, H, D] over every filled slot of keys [B, L, KVH, D] / values [B, L, KVH, Dv]
    (arrays or per-token `QuantizedArray`), lengths int32 [B, KVH] filled slots per (batch, kv head), no other mask:
    a policy cache's entries, all older than the queries. On a GPU (or with interpret=True, the kernel in its Pallas
    interpreter) the Pallas decode kernel, which reads per-token codes itself (a float / quantized mix is dequantised
    first); elsewhere `split_kv_attention`. Returns (out float32 [B, Tq, H, Dv], lse float32 [B, H, Tq]; -inf and 0
    for a query head whose kv head holds nothing)."""
    lengths = jnp.asarray(lengths, jnp.int32)
    if interpret or kernel_unavailable(keys, None, lengths) is None:
        if isinstance(keys, cache_lib.QuantizedArray) != isinstance(values, cache_lib.QuantizedArray):
            keys, values = cache_lib.read(keys), cache_lib.read(values)
        out, lse = _kernel_partials(q, keys, values, lengths, False, scale, softcap, num_splits, interpret)
        return out, jnp.swapaxes(lse, 1, 2)
    out, lse = split_kv_attention(
        q, keys, values, lengths=lengths, scale=scale, softcap=softcap, num_splits=num_splits, return_lse=True
    )
    return out.astype(jnp.float32), lse
