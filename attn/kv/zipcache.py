"""ZipCache [172] (He et al. 2024, "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
Identification"): a mixed-precision quantized KV cache; the tokens with the highest normalized attention keep
`bits_high`-bit codes, the others `bits_low`-bit codes, both in channel-separable token-wise quantization.

Saliency, per (batch, kv head), of a key at position j when n tokens have been seen:

    s_j = sum_{i sees j} sum_{h in group} a_{h,i,j} / (n - j)       accumulated attention over the number of queries
                                                                    that could attend to it (causal: n - j)

Plain accumulated attention favours early tokens (more queries see them); the normalization removes that bias.
Channel-separable token-wise quantization of x [T, D] (keys and values alike):

    c_d  = sqrt(max_t |x_{t,d}|)                                    one scale per channel (from the prompt)
    x~_t = Q_b(x_t / c) * c                                         Q_b: per-token min/max, b bits
                                                                    (attn.core.cache.quantize, axis="token")

|x~_{t,d} - x_{t,d}| <= c_d (max_d' x_{t,d'}/c_d' - min_d' x_{t,d'}/c_d') / (2 (2^b - 1)).

Schedule (the official streaming mode): the prompt (the first decode call on an empty cache) is compressed at once:
its floor(r P) least salient tokens per (batch, kv head) go to `bits_low`, the rest to `bits_high` (r =
`low_ratio`). Generated tokens wait in a full-precision window; each time `gap` of them have gathered, they are
compressed the same way (saliency from the attention they received while waiting; a call that completes several
gaps at once compresses them together). Attention reads the dequantized
stores, the window and the call's own tokens, causally at original positions.

Storage (the cache protocol, attn.core.cache): the high-precision store is the layer's KVCache (per-token codes
[B, C_h, KVH, D b_h / 8] with float32 scale and zero point, per-head lengths and original positions); side state
holds the low-precision store ("low_key", "low_value": codes over C_l slots, "low_lengths", "low_positions"), the
window ("window_key", "window_value" [B, gap, KVH, D] in the layer's dtype, "window_mass"), and the channel scales
("key_channel_scale", "value_channel_scale" float32 [B, 1, KVH, D]). For a cache created on N tokens:
C_l = floor(r N), C_h = ceil((1 - r) N) + N // gap + 1 (each compression rounds its low count down). Tokens beyond
N are not stored: create the cache at the longest length to decode.

Official code (ThisisBillhe/ZipCache, zipcache/models/modeling_llama.py LlamaFlashAttention2 with
compress_function.py): values use `channel_separate_mixed_tokenwiseQ` (this quantizer); keys use
`mixed_channelwiseQ` (per-channel min/max over the tokens of each precision class) there, here the same
channel-separable token-wise quantizer as values (the quantizer the paper introduces, Sec. 4.1), so the cache is
stored per token and gathers per head. The prompt's saliency uses every prompt query (the exact normalized score;
the official code approximates it with 5% recent + 5% random probe queries for FlashAttention); generated tokens
are ranked by their normalized accumulated attention in the window (the official code uses the raw attention of
the step that triggers the compression). Channel scales come from the prompt and serve every later compression.
bits_high = bits_low = 16 stores float32 values: decoding then equals the forward (exact attention); low_ratio = 0
keeps every token at bits_high.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core import pipeline
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS
from attn.core.validation import choice, in_range, positive_int
from attn.kv.policy_layer import PolicyAttention
from attn.kv.snapkv import PER_HEAD_POSITIONS, descending_rank
from attn.registry import register

Array = jax.Array

EXACT_BITS = 16  # a store of float32 values instead of codes

SIDE_VARIABLES = (
    "low_key",
    "low_value",
    "low_lengths",
    "low_positions",
    "window_key",
    "window_value",
    "window_mass",
    "key_channel_scale",
    "value_channel_scale",
    "window_count",
)


def channel_scale(x: Array, valid: Array) -> Array:
    """c = sqrt(max_t |x_t|) per channel over the valid tokens: x [B, T, KVH, D], valid bool [B, T, KVH] -> float32
    [B, 1, KVH, D] (1 where a channel is all zero)."""
    peak = jnp.max(jnp.where(valid[..., None], jnp.abs(x.astype(jnp.float32)), 0.0), axis=1, keepdims=True)
    return jnp.where(peak > 0, jnp.sqrt(peak), 1.0)


def quantize_separable(x: Array, scale: Array, bits: int) -> cache_lib.QuantizedArray | Array:
    """Channel-separable token-wise codes of x [B, T, KVH, D] with channel scales [B, 1, KVH, D] (bits=16: x itself
    in float32, exact storage)."""
    if bits == EXACT_BITS:
        return x.astype(jnp.float32)
    return cache_lib.quantize(x.astype(jnp.float32) / scale, bits, "token")


def dequantize_separable(stored: cache_lib.QuantizedArray | Array, scale: Array) -> Array:
    """float32 [B, T, KVH, D]: the values `quantize_separable` encoded."""
    if not isinstance(stored, cache_lib.QuantizedArray):
        return stored
    return stored.dequantize().astype(jnp.float32) * scale


def normalized_saliency(mass: Array, positions: Array, seen: Array) -> Array:
    """s_j = mass_j / (seen - p_j): accumulated attention mass [B, KVH, T] of keys at positions [B, KVH, T] over the
    number of queries that could see them (seen: tokens seen, int32 [])."""
    return mass / jnp.maximum(seen - positions, 1).astype(jnp.float32)


def split_by_saliency(saliency: Array, chosen: Array, ratio: float) -> tuple[Array, Array]:
    """(low, high) bool [B, KVH, T]: among the chosen entries (bool [B, KVH, T], the same count m in every head), the
    floor(ratio m) least salient (ties: the earlier entry counts as less salient) and the rest."""
    count = jnp.sum(chosen, axis=-1, keepdims=True)
    return split_lowest(saliency, chosen, jnp.floor(ratio * count.astype(jnp.float32) + 1e-6).astype(jnp.int32))


def split_lowest(saliency: Array, chosen: Array, n_low: Array) -> tuple[Array, Array]:
    """(low, high) bool [B, KVH, T]: the n_low (int32 [B, KVH, 1]) least salient chosen entries (ties: the earlier
    entry counts as less salient) and the other chosen entries."""
    rank_from_bottom = descending_rank(jnp.where(chosen, -saliency, -jnp.inf))
    low = chosen & (rank_from_bottom < n_low)
    return low, chosen & ~low


def append_entries(
    store: Any, lengths: Array, positions: Array, codes: Any, take: Array, pos: Array
) -> tuple[Any, Array, Array]:
    """Appends, per (batch, kv head), the entries of codes [B, T, KVH, ...] (per-token QuantizedArray or array)
    where take bool [B, KVH, T] holds, in order, after the `lengths` [B, KVH] filled slots of `store`
    [B, C, KVH, ...]; pos int32 [B, KVH, T] are their original positions. Entries past the capacity are dropped."""
    order, count = cache_lib.ordered_keep(take, take.shape[-1])
    moved = cache_lib.gather_entries(codes, order)  # [B, T, KVH, ...] per head in order
    moved_pos = jnp.take_along_axis(pos, order, axis=-1)
    slot = lengths[..., None] + jnp.arange(take.shape[-1])  # [B, KVH, T]
    capacity = positions.shape[-1]
    slot = jnp.where(jnp.arange(take.shape[-1]) < count[..., None], slot, capacity)  # unused: dropped
    b, g = jnp.indices(slot.shape[:2])
    b, g = b[..., None], g[..., None]

    def write(into: Array, src: Array) -> Array:
        return into.at[b, slot, g].set(jnp.swapaxes(src, 1, 2), mode="drop")

    if isinstance(store, cache_lib.QuantizedArray):
        store = store.replace(
            codes=write(store.codes, moved.codes),
            scale=write(store.scale, moved.scale),
            zero=write(store.zero, moved.zero),
        )
    else:
        store = write(store, moved)
    positions = positions.at[b, g, slot].set(moved_pos, mode="drop")
    return store, jnp.minimum(lengths + count, capacity), positions


@dataclasses.dataclass(frozen=True)
class ZipCacheLayout:
    """Capacities of the two stores for a cache created on `length` tokens (see the module docstring)."""

    length: int
    low_ratio: float
    gap: int

    @property
    def low_capacity(self) -> int:
        return int(math.floor(self.low_ratio * self.length + 1e-6))

    @property
    def high_capacity(self) -> int:
        return int(math.ceil((1.0 - self.low_ratio) * self.length - 1e-6)) + self.length // self.gap + 1


@register(
    "zipcache",
    family="kv",
    paper="ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification",
    catalog=172,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="mixed-precision KV cache: salient tokens (normalized attention) at high bits, the rest at low bits",
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "position": "rope or none (per-head saliency keeps different positions in every head's stores)",
        "window": "must be None (every cached token is attended)",
        "cache_bits": "must be None (ZipCache's storage is set by bits_high / bits_low)",
        "bits_high": "bits per code of the salient tokens (4 in the paper; 16: exact float32 storage)",
        "bits_low": "bits per code of the other tokens (2 in the paper)",
        "low_ratio": "share r of each compressed group stored at bits_low (the official unimportant_ratio)",
        "gap": "generated tokens kept in full precision until this many have gathered (streaming_gap)",
    },
    validators={
        **SOFTMAX_VALIDATORS,
        "position": choice(*PER_HEAD_POSITIONS),
        "bits_high": choice(*cache_lib.QUANT_BITS, EXACT_BITS),
        "bits_low": choice(*cache_lib.QUANT_BITS, EXACT_BITS),
        "low_ratio": in_range(0.0, 1.0),
        "gap": positive_int,
    },
    fidelity="official-code",
    reference=(
        "arXiv 2405.14256 Sec. 4 (channel-separable token-wise quantization, normalized attention saliency); "
        "github.com/ThisisBillhe/ZipCache zipcache/models/modeling_llama.py and "
        "CompressUtils/compress_function.py (true_channel_separate_mixedprec_tokenwise_compress)"
    ),
    has_attention_weights=True,
)
class ZipCacheAttention(PolicyAttention):
    """ZipCache: softmax attention whose decode cache stores salient tokens at `bits_high` and the rest at `bits_low`
    bits (see the module docstring). x [B, T, E] -> [B, T, E]."""

    bits_high: int = 4
    bits_low: int = 2
    low_ratio: float = 0.4
    gap: int = 64

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if self.cache_bits is not None:
            raise ValueError(f"cache_bits={self.cache_bits!r} must be None for zipcache: its storage is set by bits")
        if self.bits_low > self.bits_high:
            raise ValueError(f"bits_low={self.bits_low} must be at most bits_high={self.bits_high}")
        if self.bits_low != EXACT_BITS and self.head_dim % (8 // self.bits_low):
            raise ValueError(
                f"head_dim={self.head_dim} must be a multiple of {8 // self.bits_low} ({self.bits_low}-bit codes "
                "pack per byte along head_dim)"
            )

    def layout(self, length: int) -> ZipCacheLayout:
        """The capacities of the two stores for a cache created on `length` tokens."""
        return ZipCacheLayout(length, self.low_ratio, self.gap)

    def split(self, mass: Array, saliency: Array, chosen: Array) -> tuple[Array, Array]:
        """(low, high) bool [B, KVH, T] of the chosen pending entries, from their accumulated attention mass and
        normalized saliency [B, KVH, T]: the floor(low_ratio m) least salient go to bits_low."""
        del mass
        return split_by_saliency(saliency, chosen, self.low_ratio)

    def cache_policy(self) -> cache_lib.CachePolicy:
        raise NotImplementedError("zipcache manages its two stores itself (policy_attend); it has no CachePolicy")

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The creating decode call allocates both stores for this call's length and runs the causal forward; later
        decode calls take positions from the cache index."""
        if call.decode and cache_lib.load(self) is None:
            self.create(k, v, k.shape[1])
            return super().prepare(q, k, v, call.replace(decode=False))
        return super().prepare(q, k, v, call)

    def create(self, k: Array, v: Array, length: int) -> None:
        layout = self.layout(length)
        batch, _, kv_heads = k.shape[:3]

        def zeros(x: Array, n: int, bits: int) -> cache_lib.QuantizedArray | Array:
            empty = jnp.zeros((batch, n, kv_heads, x.shape[-1]), jnp.float32)
            return quantize_separable(empty, jnp.ones((batch, 1, kv_heads, x.shape[-1])), bits)

        high = layout.high_capacity
        cache_lib.store(
            self,
            cache_lib.KVCache(
                keys=zeros(k, high, self.bits_high),
                values=zeros(v, high, self.bits_high),
                index=jnp.array(0, jnp.int32),
                lengths=jnp.zeros((batch, kv_heads), jnp.int32),
                positions=jnp.zeros((batch, kv_heads, high), jnp.int32),
            ),
        )
        low = layout.low_capacity
        state = {
            "low_key": zeros(k, low, self.bits_low),
            "low_value": zeros(v, low, self.bits_low),
            "low_lengths": jnp.zeros((batch, kv_heads), jnp.int32),
            "low_positions": jnp.zeros((batch, kv_heads, low), jnp.int32),
            "window_key": jnp.zeros((batch, self.gap, kv_heads, k.shape[-1]), k.dtype),
            "window_value": jnp.zeros((batch, self.gap, kv_heads, v.shape[-1]), v.dtype),
            "window_mass": jnp.zeros((batch, kv_heads, self.gap), jnp.float32),
            "key_channel_scale": jnp.ones((batch, 1, kv_heads, k.shape[-1]), jnp.float32),
            "value_channel_scale": jnp.ones((batch, 1, kv_heads, v.shape[-1]), jnp.float32),
            "window_count": jnp.array(0, jnp.int32),
        }
        names = (
            ("window_key", cache_lib.KV_AXES),
            ("window_value", cache_lib.KV_AXES),
            ("low_lengths", cache_lib.LENGTHS_AXES),
            ("low_positions", cache_lib.POSITIONS_AXES),
        )
        cache_lib.store_state(self, cache_lib.RecurrentState(state=state, index=None, names=names))

    def policy_attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """A decode call: q [B, L, H, D], this chunk's k, v [B, L, KVH, D] (before RoPE) -> [B, L, H, Dv]; attends
        over both stores, the window and the chunk, then compresses the prompt or a full window."""
        store = cache_lib.load(self)
        side = cache_lib.load_state(self, SIDE_VARIABLES, shared_index=True).state
        batch, length, kv_heads = k.shape[:3]
        index, gap = store.index, self.gap
        prefill = index == 0
        # the window holds positions index - filled .. index - 1 (tokens since the last compression)
        window_filled = jnp.where(prefill, 0, side["window_count"])
        chunk_pos = index + jnp.arange(length, dtype=jnp.int32)
        window_pos = index - window_filled + jnp.arange(gap, dtype=jnp.int32)
        pending_pos = jnp.broadcast_to(jnp.concatenate([window_pos, chunk_pos]), (batch, kv_heads, gap + length))
        pending_valid = jnp.concatenate([jnp.arange(gap) < window_filled, jnp.ones((length,), bool)])
        pending_valid = jnp.broadcast_to(pending_valid, (batch, kv_heads, gap + length))
        pending_k = jnp.concatenate([side["window_key"], k.astype(side["window_key"].dtype)], axis=1)
        pending_v = jnp.concatenate([side["window_value"], v.astype(side["window_value"].dtype)], axis=1)

        # channel scales: from the prompt at the prefill, kept afterwards
        valid_tokens = jnp.swapaxes(pending_valid, 1, 2)
        key_scale = jnp.where(prefill, channel_scale(pending_k, valid_tokens), side["key_channel_scale"])
        value_scale = jnp.where(prefill, channel_scale(pending_v, valid_tokens), side["value_channel_scale"])

        high_k = dequantize_separable(store.keys, side["key_channel_scale"])
        high_v = dequantize_separable(store.values, side["value_channel_scale"])
        low_k = dequantize_separable(side["low_key"], side["key_channel_scale"])
        low_v = dequantize_separable(side["low_value"], side["value_channel_scale"])
        slots_high, slots_low = high_k.shape[1], low_k.shape[1]
        keys = jnp.concatenate([high_k.astype(k.dtype), low_k.astype(k.dtype), pending_k.astype(k.dtype)], axis=1)
        values = jnp.concatenate([high_v.astype(v.dtype), low_v.astype(v.dtype), pending_v.astype(v.dtype)], axis=1)
        positions = jnp.concatenate([store.positions, side["low_positions"], pending_pos], axis=-1)
        valid = jnp.concatenate(
            [
                jnp.arange(slots_high) < store.lengths[..., None],
                jnp.arange(slots_low) < side["low_lengths"][..., None],
                pending_valid,
            ],
            axis=-1,
        )
        cands = cache_lib.Candidates(
            keys=keys,
            values=values,
            stored_keys=None,
            stored_values=None,
            positions=positions,
            valid=valid,
            index=index + length,
        )
        q_pos = call.q_positions
        visible = valid[:, :, None, :] & (positions[:, :, None, :] <= q_pos[:, None, :, None])
        q, rotated, bias = self.cache_positions(q, cands, q_pos)
        call = call.replace(mask=Mask(dense=cache_lib.head_mask(visible, self.num_heads)), bias=bias)
        call = call.replace(kv_positions=positions)
        logits = self.attention_logits(q, rotated, call)
        weights = self.attention_weights(logits, call)
        y = self.mix(self.attention_dropout(weights, call.deterministic), values).astype(q.dtype)

        # saliency of the pending tokens: normalized attention received so far
        mass = cache_lib.kv_head_mass(pipeline.key_mass(weights), kv_heads)[..., slots_high + slots_low :]
        pending_mass = jnp.concatenate([side["window_mass"], jnp.zeros((batch, kv_heads, length))], axis=-1) + mass
        seen = index + length
        saliency = normalized_saliency(pending_mass, pending_pos, seen)
        # the prompt is compressed whole; later, the oldest `gap` pending tokens once that many have gathered
        rank = jnp.cumsum(pending_valid, axis=-1)
        whole_gaps = (window_filled + length) // gap * gap  # a chunk longer than gap compresses several at once
        chosen = pending_valid & jnp.where(prefill, True, rank <= whole_gaps)
        low, high = self.split(pending_mass, saliency, chosen)
        k_codes = (
            quantize_separable(pending_k, key_scale, self.bits_high),
            quantize_separable(pending_k, key_scale, self.bits_low),
        )
        v_codes = (
            quantize_separable(pending_v, value_scale, self.bits_high),
            quantize_separable(pending_v, value_scale, self.bits_low),
        )
        keys_high, lengths_high, pos_high = append_entries(
            store.keys, store.lengths, store.positions, k_codes[0], high, pending_pos
        )
        values_high, _, _ = append_entries(store.values, store.lengths, store.positions, v_codes[0], high, pending_pos)
        keys_low, lengths_low, pos_low = append_entries(
            side["low_key"], side["low_lengths"], side["low_positions"], k_codes[1], low, pending_pos
        )
        values_low, _, _ = append_entries(
            side["low_value"], side["low_lengths"], side["low_positions"], v_codes[1], low, pending_pos
        )
        # what stays pending slides to the front of the window
        rest = pending_valid & ~chosen
        order, _ = cache_lib.ordered_keep(rest, gap)
        window_k = cache_lib.gather_entries(pending_k, order)
        window_v = cache_lib.gather_entries(pending_v, order)
        window_mass = jnp.take_along_axis(pending_mass, order, axis=-1)
        cache_lib.store(
            self,
            store.replace(keys=keys_high, values=values_high, index=seen, lengths=lengths_high, positions=pos_high),
        )
        state = {
            **side,
            "low_key": keys_low,
            "low_value": values_low,
            "low_lengths": lengths_low,
            "low_positions": pos_low,
            "window_key": window_k,
            "window_value": window_v,
            "window_mass": window_mass,
            "key_channel_scale": key_scale,
            "value_channel_scale": value_scale,
            "window_count": window_filled + length - jnp.sum(chosen[0, 0], dtype=jnp.int32),
        }
        cache_lib.store_state(self, cache_lib.RecurrentState(state=state, index=None))
        return y
