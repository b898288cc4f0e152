"""KIVI [230] (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"): the decode cache
stores keys quantized per channel and values quantized per token, with the most recent tokens in full precision.

    keys      quantized per channel in groups of G tokens (min/max over the G tokens of each channel), positions
              below s_K(n) = R * floor(n / R); the rest, n - s_K(n) < R tokens, in full precision
    values    quantized per token in groups of G channels, positions below s_V(n) = max(n - R, 0); the latest
              min(n, R) tokens in full precision
    codes     x ~ Q(x) = round((x - min) / step) * step + min, step = (max - min) / (2^b - 1), |x - Q(x)| <= step / 2

with n the tokens in the cache, G = group_size, R = residual (a multiple of G), b = bits. This is the paper's
Algorithm 1 (arXiv 2402.02750, Sec. 3.3) and the official code (jy-yuan/KIVI, models/llama_kivi.py
LlamaAttention_KIVI and quant/new_pack.py): the prefill quantizes keys up to the last multiple of R and values up to
the last R tokens; every decode step appends to both full-precision parts, then moves all R residual keys into the
quantized part once R are there, and the oldest value once more than R are there. Keys are stored after RoPE, as in
the official code, so quantization sees the rotated channels.

A decode call attends over the cache as it stood before the call (quantized and full-precision parts dequantized
into one key and one value per position) plus the call's own tokens in full precision, causally:

    o_t = softmax(q_t [K~_{<n}; K_{n..t}]^T / sqrt(D)) [V~_{<n}; V_{n..t}]      n = tokens cached before the call

where K~_j = Q(k_j) for j < s_K(n), else k_j, and V~_j = Q(v_j) for j < s_V(n), else v_j. For one token per call this
is the official decode (the incoming token joins the residual before the product; quantization follows it), and for
a prompt on an empty cache it is the official prefill (exact attention); a chunk of several tokens on a filled cache
(which the official code does not serve) sees itself in full precision. The forward (decode=False) is exact causal
attention, the prefill's. bits=16 or a residual >= the decoded length store everything exactly: decoding then
equals the forward.

Storage (the cache protocol, attn.core.cache): a KVCache whose keys and values are `QuantizedArray`s (2, 4 or 8 bit
codes packed along head_dim; key scales [B, N / G, KVH, D], value scales [B, N, KVH, D / G]) over N slots (the
creating call's length rounded up to a multiple of G: positions past it are not stored, so create the cache at the
longest length to decode), and
its side state "residual_key" [B, R, KVH, D] and "residual_value" [B, R, KVH, Dv] in the layer's dtype (slot i holds
position s_K(n) + i, respectively s_V(n) + i). The split points follow from the cache index n, so nothing else is
stored. Memory per element: b / 8 bytes of codes plus 8 / G bytes of float32 scale and zero point, against 2 (bf16)
or 4 (fp32) bytes dense, plus the R-token residual.

Differences from the official code, none of which changes a dequantized value beyond float rounding: codes pack four
2-bit (two 4-bit) codes per uint8 instead of 32 / b per int32, scale and zero point are float32 instead of the
activations' float16, and a constant group gets step 1 instead of a division by zero.

Cost per decode call: O(N + R + L) reads (the quantized part is dequantized on read; a fused kernel multiplies codes
directly). Exact softmax attention: bits=16, or residual >= every decoded length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import choice, positive_int
from attn.kv.policy_layer import PolicyAttention
from attn.registry import register

Array = jax.Array

KIVI_BITS = (2, 4, 8, 16)
RESIDUAL_VARIABLES = ("residual_key", "residual_value")


def key_split(index: Array, residual: int) -> Array:
    """s_K(n): keys at positions below R * floor(n / R) are stored quantized (int32 [])."""
    return (index // residual) * residual


def value_split(index: Array, residual: int) -> Array:
    """s_V(n): values at positions below max(n - R, 0) are stored quantized (int32 [])."""
    return jnp.maximum(index - residual, 0)


def _window(resid: Array, count: Array, chunk: Array, length: int) -> Array:
    """Positions split, split+1, ... of the exact entries: resid [B, R, ...] (first `count` valid) then chunk
    [B, L, ...] -> [B, length, ...] (entries past count + L repeat the last chunk entry; never read)."""
    s = jnp.arange(length)
    from_resid = jnp.take(resid, jnp.clip(s, 0, resid.shape[1] - 1), axis=1)
    from_chunk = jnp.take(chunk.astype(resid.dtype), jnp.clip(s - count, 0, chunk.shape[1] - 1), axis=1)
    return jnp.where((s < count).reshape(1, length, *([1] * (chunk.ndim - 2))), from_resid, from_chunk)


def _scatter(stored: Array, values: Array, start: Array, count: Array) -> Array:
    """stored [B, N, ...] with values [B, W, ...] written at slots start..start+count-1 (the rest of values
    dropped)."""
    s = jnp.arange(values.shape[1])
    slots = jnp.where(s < count, start + s, stored.shape[1])  # out of range: dropped
    return stored.at[:, slots].set(values.astype(stored.dtype), mode="drop")


@dataclasses.dataclass(frozen=True)
class KiviStorage:
    """KIVI's two storages for one layer: `bits` (16: exact), `group` G, `residual` R (see the module docstring).
    Arrays: keys [B, *, KVH, D], values [B, *, KVH, Dv]."""

    bits: int
    group: int
    residual: int

    def quantize_keys(self, k: Array) -> Array | cache_lib.QuantizedArray:
        """Per channel, groups of G tokens (k's length a multiple of G)."""
        return k if self.bits == 16 else cache_lib.quantize(k, self.bits, "channel", group=self.group)

    def quantize_values(self, v: Array) -> Array | cache_lib.QuantizedArray:
        """Per token, groups of G channels."""
        return v if self.bits == 16 else cache_lib.quantize(v, self.bits, "token", group=self.group)

    def empty(self, k: Array, v: Array, length: int) -> tuple[cache_lib.KVCache, cache_lib.RecurrentState]:
        """The zero storage for `length` tokens: the quantized KVCache (N = length rounded up to G slots) and the
        full-precision residual side state."""
        batch, _, kv_heads = k.shape[:3]
        slots = -(-length // self.group) * self.group
        zeros = lambda x, n: jnp.zeros((batch, n, kv_heads, x.shape[-1]), x.dtype)  # noqa: E731
        store = cache_lib.KVCache(
            keys=self.quantize_keys(zeros(k, slots)),
            values=self.quantize_values(zeros(v, slots)),
            index=jnp.array(0, jnp.int32),
        )
        names = tuple((name, cache_lib.KV_AXES) for name in RESIDUAL_VARIABLES)
        resid = {"residual_key": zeros(k, self.residual), "residual_value": zeros(v, self.residual)}
        return store, cache_lib.RecurrentState(state=resid, index=None, names=names)

    def read(self, store: cache_lib.KVCache, resid: cache_lib.RecurrentState) -> tuple[Array, Array]:
        """(keys [B, N, KVH, D], values [B, N, KVH, Dv]): what attention reads at positions 0..N-1 (dequantized
        below the split points, the residual above; slots at or past the index are not valid)."""
        keys, values = cache_lib.read(store.keys), cache_lib.read(store.values)
        pos = jnp.arange(keys.shape[1])

        def merge(stored: Array, recent: Array, split: Array) -> Array:
            from_recent = jnp.take(recent, jnp.clip(pos - split, 0, self.residual - 1), axis=1)
            return jnp.where((pos < split)[None, :, None, None], stored.astype(recent.dtype), from_recent)

        index = store.index
        return (
            merge(keys, resid.state["residual_key"], key_split(index, self.residual)),
            merge(values, resid.state["residual_value"], value_split(index, self.residual)),
        )

    def advance(
        self, store: cache_lib.KVCache, resid: cache_lib.RecurrentState, k: Array, v: Array
    ) -> tuple[cache_lib.KVCache, cache_lib.RecurrentState]:
        """The storage after appending k [B, L, KVH, D], v [B, L, KVH, Dv]: entries that fall below the split
        points of the index n + L are quantized (keys in whole groups of G, aligned at multiples of G) and move
        out of the residual."""
        old, length = store.index, k.shape[1]
        new = old + length
        width = -(-(self.residual + length) // self.group) * self.group
        rest = {}

        def move(
            stored: Any, recent: Array, chunk: Array, split: Callable[[Array, int], Array], quantize: Callable
        ) -> tuple[Any, Array]:
            start, stop = split(old, self.residual), split(new, self.residual)
            window = _window(recent, old - start, chunk, width)  # exact entries at positions start, start+1, ...
            moved = quantize(window)
            if isinstance(moved, cache_lib.QuantizedArray):
                stride = self.group if moved.axis == "channel" else 1  # key scales: one per G tokens
                stored = stored.replace(
                    codes=_scatter(stored.codes, moved.codes, start, stop - start),
                    scale=_scatter(stored.scale, moved.scale, start // stride, (stop - start) // stride),
                    zero=_scatter(stored.zero, moved.zero, start // stride, (stop - start) // stride),
                )
            else:
                stored = _scatter(stored, moved, start, stop - start)
            kept = jnp.take(window, jnp.clip(stop - start + jnp.arange(self.residual), 0, width - 1), axis=1)
            return stored, kept

        keys, rest["residual_key"] = move(store.keys, resid.state["residual_key"], k, key_split, self.quantize_keys)
        values, rest["residual_value"] = move(
            store.values, resid.state["residual_value"], v, value_split, self.quantize_values
        )
        return store.replace(keys=keys, values=values, index=new), resid.replace(state=rest)


@register(
    "kivi",
    family="kv",
    paper="KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
    catalog=230,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="decode cache with keys quantized per channel, values per token (2-bit), a full-precision recent residual",
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "window": "must be None (every cached token is attended)",
        "cache_bits": "must be None (KIVI's storage is set by bits)",
        "bits": "bits per quantized key/value code: 2 (KIVI-2), 4 (KIVI-4), 8, or 16 (exact storage)",
        "group_size": "G: tokens per key quantization group (per channel), channels per value group (per token)",
        "residual": "R: recent tokens kept in full precision (a multiple of group_size)",
    },
    validators={
        **SOFTMAX_VALIDATORS,
        "bits": choice(*KIVI_BITS),
        "group_size": positive_int,
        "residual": positive_int,
    },
    fidelity="official-code",
    reference=(
        "arXiv 2402.02750 Sec. 3.3 (Algorithm 1); github.com/jy-yuan/KIVI models/llama_kivi.py "
        "(LlamaAttention_KIVI.forward) and quant/new_pack.py (group quantization along the last dimension)"
    ),
    has_attention_weights=True,
)
class KiviAttention(PolicyAttention):
    """KIVI: softmax attention whose decode cache stores keys per channel and values per token in `bits`-bit codes
    with the latest tokens in full precision (see the module docstring). x [B, T, E] -> [B, T, E]."""

    bits: int = 2
    group_size: int = 32
    residual: int = 128

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if self.cache_bits is not None:
            raise ValueError(f"cache_bits={self.cache_bits!r} must be None for kivi: its storage is set by bits")
        if self.residual % self.group_size:
            raise ValueError(
                f"residual={self.residual} must be a multiple of group_size={self.group_size} (keys move from the "
                "residual in whole groups)"
            )
        if self.head_dim % self.group_size:
            raise ValueError(
                f"head_dim={self.head_dim} must be a multiple of group_size={self.group_size} (values are quantized "
                "per token in groups of group_size channels)"
            )

    def storage(self) -> KiviStorage:
        return KiviStorage(self.bits, self.group_size, self.residual)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The creating decode call allocates the storage for this call's length and runs the exact causal forward
        (Flax convention); later decode calls take positions from the cache index."""
        if call.decode and cache_lib.load(self) is None:
            store, resid = self.storage().empty(k, v, k.shape[1])
            cache_lib.store(self, store)
            cache_lib.store_state(self, resid)
            return super().prepare(q, k, v, call.replace(decode=False))
        return super().prepare(q, k, v, call)

    def policy_attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """A decode call: q [B, L, H, D], this chunk's k, v [B, L, KVH, D] (before RoPE) -> [B, L, H, Dv]; attends
        over the stored entries (as read before the call) and the chunk, then appends the chunk to the storage."""
        storage = self.storage()
        store = cache_lib.load(self)
        resid = cache_lib.load_state(self, RESIDUAL_VARIABLES, shared_index=True)
        batch, length = q.shape[:2]
        q_pos = call.q_positions
        if self.position == "rope":  # keys are stored rotated, as the official code caches them
            q, k = self.rotate(q, k, q_pos)
        keys, values = storage.read(store, resid)
        slots = keys.shape[1]
        positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(slots), (batch, slots)), q_pos], axis=1)  # [B, E]
        valid = jnp.concatenate([jnp.arange(slots) < store.index, jnp.ones((length,), bool)])  # [E]
        visible = valid[None, None, :] & (positions[:, None, :] <= q_pos[:, :, None])  # [B, L, E]
        mask = Mask(dense=jnp.broadcast_to(visible[:, None], (batch, self.num_heads, length, slots + length)))
        bias = None if self.position == "rope" else self.position_bias(q, q_pos, positions, Mask(causal=True))
        call = call.replace(mask=mask, bias=bias, kv_positions=positions)
        keys = jnp.concatenate([keys.astype(k.dtype), k], axis=1)
        values = jnp.concatenate([values.astype(v.dtype), v], axis=1)
        y = SoftmaxAttentionLayer.attend(self, q, keys, values, call)
        store, resid = storage.advance(store, resid, k, v)
        cache_lib.store(self, store)
        cache_lib.store_state(self, resid)
        return y
