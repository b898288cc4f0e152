"""The cache protocol of every decoding layer: KV caches, cache policies, quantized storage, recurrent state.

A layer that decodes keeps its state in the flax "cache" collection as one of two pytrees:

  KVCache         keys [B, L, KVH, D] and values [B, L, KVH, Dv] (float, or `QuantizedArray` codes), the number
                  of tokens seen (`index`, the absolute position of the next token) and, for a cache that a
                  policy manages, the filled slots per (batch, kv head) `lengths` int32 [B, KVH] (ragged per head),
                  the original positions of the kept entries `positions` int32 [B, KVH, L] and the statistics the
                  policy asks for (`key_mass` float32 [B, KVH, L]: attention each kept key has received;
                  `key_history` uint32 [B, KVH, L]: a per-step flag of each kept key over the latest 32 steps,
                  bit 0 the latest; `key_recent` float32 [B, KVH, L]: attention from recent queries, in the form
                  the policy defines, e.g. a decayed sum).
                  The dense cache leaves lengths/positions unset: every head holds tokens 0..index-1 in order.
  RecurrentState  any state pytree (linear attention's [B, H, Dk, Dv] sums, titans' memory weights) and `index`;
                  with index None, side state kept next to a KVCache and sharing its index (RC-MHA's convolution
                  histories, Combiner's cached queries, RIPO's per-slot attributes).

Each field is one variable of the layer's "cache" collection (`KV_VARIABLES`; a RecurrentState's state keys plus
`RECURRENT_INDEX`), so the dense cache keeps its variable names ("cached_key", "cached_value", "cache_index").
`load(module)` reads a cache, `store(module, cache)` creates or overwrites its variables; `axes(cache)` gives the
logical axis names of every leaf (`KV_AXES`): batch, cache_length, kv_heads, head_dim (the trainer's rules shard
"batch" and "kv_heads"; "cache_length" stays unsharded).

A `CachePolicy` decides what a KV cache keeps. At every decode call the layer gathers the cached entries and the
incoming chunk into `Candidates` (C + L entries per (batch, kv head)); the policy answers

  visible(candidates, q_positions) -> bool [B, KVH, Tq, C + L]   which entries each query attends to
  keep(candidates) -> (indices [B, KVH, C], counts [B, KVH])     which entries the cache stores next, in order

and may override `observe` (how a call's attention weights update the statistics) and `merge` (fold evicted
entries into kept ones before the gather: the candidates' keys/values and stored forms are what it rewrites).
`stats` names the statistics the layer must accumulate for it ("key_mass", "key_history"). A
policy that compacts only every N steps allocates its budget plus N slots and keeps everything in between (its
`keep` sees `candidates.index`); per-head budgets are ragged `counts`. The cache is allocated at `capacity` slots,
never at the generated length. Quantization is the storage of the cache (the layer's `cache_bits`); KIVI
(attn/kv/kivi.py) keeps its quantized older entries in the KVCache (keys per channel, values per token) and its
full-precision recent window as side state sharing the cache's index.

Packed layout (optional, for ragged per-head budgets): `PackedKV` keeps the entries of all kv heads of a layer back to
back in one flat buffer keys [B, N, D] / values [B, N, Dv], N the sum of the per-head budgets, with each head's segment
`offsets`, `capacities` and `lengths` [B, KVH] and per-slot `positions` / statistics [B, N] (variables
`PACKED_VARIABLES`; see "packed layout" below). A policy that uses it (Ada-KV, attn/kv/adakv.py) updates it with
`packed_select` / `pack_counts`, and attention reads it with `split_kv_decode.packed_split_kv_attention`.

Quantized storage: `quantize(x, bits, axis, group)` -> `QuantizedArray` of unsigned codes with a float32 scale and
zero point (asymmetric min/max: x ~ code * scale + zero, |error| <= scale / 2), per token (over the last axis) or per
channel (over the token axis 1), optionally in groups of `group` channels (per token) or `group` tokens (per channel);
8-bit codes are uint8, 4-bit and 2-bit codes are packed two or four per uint8 along the last axis (channel
c in bits [b * (c % n), b * (c % n + 1)) of byte c // n, n = 8 / b codes per byte: the even channel in the low
nibble). A cache stores per-token codes, so entries gather with their scales.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from attn.core import pipeline

Array = jax.Array

QUANT_BITS = (2, 4, 8)
QUANT_AXES = ("token", "channel")

# Logical axis names of the cache leaves.
KV_AXES = ("batch", "cache_length", "kv_heads", "head_dim")
LENGTHS_AXES = ("batch", "kv_heads")
POSITIONS_AXES = ("batch", "kv_heads", "cache_length")


# ---------------------------------------------------------------------------------------------- quantized storage
@struct.dataclass
class QuantizedArray:
    """Unsigned integer codes of a float array x [B, T, ..., D]: x ~ dequantize() = code * scale + zero.

    codes: uint8 [B, T, ..., D * bits / 8] (bits=8: one code per byte; 4 and 2: two or four codes per byte along the
    last axis, the lowest bits holding the first channel); scale, zero: float32, [B, T, ..., D / group]
    (axis="token": one pair per token and group of `group` channels, [..., 1] without groups) or
    [B, T / group, ..., D] (axis="channel": one pair per channel and group of `group` tokens, [B, 1, ..., D]
    without groups). The group size is the ratio of the codes' and the scales' extents.
    """

    codes: Array
    scale: Array
    zero: Array
    bits: int = struct.field(pytree_node=False)
    axis: str = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False, default=jnp.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-1], self.codes.shape[-1] * (8 // self.bits))

    def dequantize(self) -> Array:
        """The float array [B, T, ..., D] in `dtype`."""
        codes = unpack_codes(self.codes, self.bits).astype(jnp.float32)
        scale, zero = self.scale, self.zero
        axis = -1 if self.axis == "token" else 1
        group = codes.shape[axis] // scale.shape[axis]
        if group > 1 and scale.shape[axis] > 1:
            scale, zero = jnp.repeat(scale, group, axis=axis), jnp.repeat(zero, group, axis=axis)
        return (codes * scale + zero).astype(self.dtype)

    def tokens(self, fn: Any) -> QuantizedArray:
        """Applies `fn` (an op along the token axis 1: gather, slice, concatenate partner) to codes, scale and
        zero; only per-token storage can be rearranged token by token."""
        if self.axis != "token":
            raise ValueError(f"axis={self.axis!r}: only per-token codes can be gathered or written token by token")
        return self.replace(codes=fn(self.codes), scale=fn(self.scale), zero=fn(self.zero))


def pack_codes(codes: Array, bits: int) -> Array:
    """uint8 codes [..., D] below 2**bits -> bytes [..., D * bits / 8]: 8 / bits codes per byte along the last axis,
    channel c in bits [bits * (c % n), bits * (c % n + 1)) of byte c // n (n = 8 / bits)."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = grouped[..., 0]
    for j in range(1, per_byte):
        packed = packed | (grouped[..., j] << (bits * j))
    return packed


def unpack_codes(packed: Array, bits: int) -> Array:
    """The inverse of `pack_codes`: bytes [..., W] -> uint8 codes [..., W * 8 / bits]."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    mask = 2**bits - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per_byte)]
    return jnp.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def quantize(x: Array, bits: int, axis: str = "token", group: int | None = None) -> QuantizedArray:
    """x [B, T, ..., D] -> QuantizedArray with `bits` in (2, 4, 8), min/max over D per token (axis="token") or over T
    per channel (axis="channel"); `group` splits that axis into groups of `group` channels (token) or tokens
    (channel), each with its own scale and zero point (None: one group). 4-bit codes need an even D, 2-bit codes a
    D divisible by 4 (the codes of a byte belong to one token)."""
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits!r} must be one of {QUANT_BITS}")
    if axis not in QUANT_AXES:
        raise ValueError(f"axis={axis!r} must be one of {QUANT_AXES}")
    per_byte = 8 // bits
    if x.shape[-1] % per_byte:
        raise ValueError(
            f"{bits}-bit codes pack {per_byte} channels per byte; the last axis of x {x.shape} must be a multiple of "
            f"{per_byte}"
        )
    reduce = -1 if axis == "token" else 1
    extent = x.shape[reduce]
    group = extent if group is None else group
    if not isinstance(group, int) or group <= 0 or extent % group:
        raise ValueError(
            f"group={group!r} must be a positive int dividing the {'channel' if axis == 'token' else 'token'} axis "
            f"of x {x.shape} (length {extent})"
        )
    xf = x.astype(jnp.float32)
    reduce = reduce % x.ndim
    split = (*xf.shape[:reduce], extent // group, group, *xf.shape[reduce + 1 :])
    grouped = xf.reshape(split)  # the reduced axis becomes (groups, group)
    low = jnp.min(grouped, axis=reduce + 1, keepdims=True)
    high = jnp.max(grouped, axis=reduce + 1, keepdims=True)
    levels = 2**bits - 1
    scale = jnp.where(high > low, (high - low) / levels, 1.0)
    codes = jnp.clip(jnp.round((grouped - low) / scale), 0, levels).astype(jnp.uint8).reshape(xf.shape)
    scale, low = jnp.squeeze(scale, reduce + 1), jnp.squeeze(low, reduce + 1)
    return QuantizedArray(codes=pack_codes(codes, bits), scale=scale, zero=low, bits=bits, axis=axis, dtype=x.dtype)


def read(x: Array | QuantizedArray) -> Array:
    """The float array of a stored leaf (dequantized if quantized)."""
    return x.dequantize() if isinstance(x, QuantizedArray) else x


def nbytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (a cache collection, a KVCache)."""
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------- the KV cache
@struct.dataclass
class KVCache:
    """A KV cache (see the module docstring). keys [B, L, KVH, D], values [B, L, KVH, Dv]: arrays or
    QuantizedArray; index int32 []; lengths int32 [B, KVH] | None; positions int32 [B, KVH, L] | None;
    key_mass float32 [B, KVH, L] | None; key_history uint32 [B, KVH, L] | None."""

    keys: Any
    values: Any
    index: Array
    lengths: Array | None = None
    positions: Array | None = None
    key_mass: Array | None = None
    key_history: Array | None = None
    key_recent: Array | None = None

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def filled(self) -> Array:
        """int32 [B, KVH]: the filled slots of every (batch, kv head)."""
        if self.lengths is not None:
            return self.lengths
        batch, _, kv_heads = self.keys.shape[:3]
        return jnp.full((batch, kv_heads), self.index, jnp.int32)

    def slot_positions(self) -> Array:
        """int32 [B, KVH, L]: the original position of every slot (arange for the dense cache)."""
        if self.positions is not None:
            return self.positions
        batch, length, kv_heads = self.keys.shape[:3]
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, kv_heads, length))


KV_VARIABLES = {
    "keys": "cached_key",
    "values": "cached_value",
    "index": "cache_index",
    "lengths": "cache_lengths",
    "positions": "cache_positions",
    "key_mass": "cache_key_mass",
    "key_history": "cache_key_history",
    "key_recent": "cache_key_recent",
}
STATS = ("key_mass", "key_history", "key_recent")


def empty_kv(
    keys: Array,
    values: Array,
    capacity: int,
    *,
    ragged: bool = False,
    stats: tuple[str, ...] = (),
    bits: int | None = None,
) -> KVCache:
    """A zero KVCache with `capacity` slots for keys [B, *, KVH, D] / values [B, *, KVH, Dv] of this dtype.

    ragged: also per-head lengths and positions (a policy-managed cache); stats: the statistics to keep;
    bits: quantized storage (per-token codes) or None."""
    batch, _, kv_heads = keys.shape[:3]

    def zeros(x: Array) -> Any:
        z = jnp.zeros((batch, capacity, *x.shape[2:]), x.dtype)
        return z if bits is None else quantize(z, bits, "token")

    unknown = sorted(set(stats) - set(STATS))
    if unknown:
        raise ValueError(f"stats={stats!r} names unknown statistics {unknown}; expected some of {STATS}")
    ragged = ragged or bool(stats)
    return KVCache(
        keys=zeros(keys),
        values=zeros(values),
        index=jnp.array(0, jnp.int32),
        lengths=jnp.zeros((batch, kv_heads), jnp.int32) if ragged else None,
        positions=jnp.zeros((batch, kv_heads, capacity), jnp.int32) if ragged else None,
        key_mass=jnp.zeros((batch, kv_heads, capacity), jnp.float32) if "key_mass" in stats else None,
        key_history=jnp.zeros((batch, kv_heads, capacity), jnp.uint32) if "key_history" in stats else None,
        key_recent=jnp.zeros((batch, kv_heads, capacity), jnp.float32) if "key_recent" in stats else None,
    )


def axes(cache: KVCache) -> KVCache:
    """The logical axis names of every leaf of `cache`, as a KVCache of tuples (quantized leaves: the codes' and
    scales' axes are those of the keys)."""

    def of(leaf: Any, names: tuple[str, ...]) -> Any:
        if leaf is None:
            return None
        if isinstance(leaf, QuantizedArray):
            return leaf.replace(codes=names, scale=names, zero=names)
        return names

    return KVCache(
        keys=of(cache.keys, KV_AXES),
        values=of(cache.values, KV_AXES),
        index=(),
        lengths=of(cache.lengths, LENGTHS_AXES),
        positions=of(cache.positions, POSITIONS_AXES),
        key_mass=of(cache.key_mass, POSITIONS_AXES),
        key_history=of(cache.key_history, POSITIONS_AXES),
        key_recent=of(cache.key_recent, POSITIONS_AXES),
    )


def load(module: nn.Module) -> KVCache | None:
    """The KVCache of `module`'s "cache" collection, or None before the creating call."""
    if not module.has_variable("cache", KV_VARIABLES["keys"]):
        return None
    fields = {
        field: module.get_variable("cache", name) if module.has_variable("cache", name) else None
        for field, name in KV_VARIABLES.items()
    }
    return KVCache(**fields)


def store(module: nn.Module, cache: KVCache) -> None:
    """Creates or overwrites the variables of `cache` in `module`'s "cache" collection (None fields are left out);
    keys and values carry their logical axis names."""
    for field, name in KV_VARIABLES.items():
        value = getattr(cache, field)
        if value is None:
            continue
        if field in ("keys", "values") and not isinstance(value, QuantizedArray):
            value = nn.with_logical_constraint(value, KV_AXES)
        module.put_variable("cache", name, value)


# ---------------------------------------------------------------------------------------------- policies
@struct.dataclass
class Candidates:
    """The cached entries followed by an incoming chunk: E = C + L entries per (batch, kv head).

    keys [B, E, KVH, D] and values [B, E, KVH, Dv] (float, what attention reads); stored_keys / stored_values: the
    same entries in the cache's storage form (arrays or QuantizedArray), what `keep` gathers; positions int32
    [B, KVH, E] original positions; valid bool [B, KVH, E]; key_mass float32 [B, KVH, E] or None; key_history
    uint32 [B, KVH, E] or None (0 for the chunk); key_recent float32 [B, KVH, E] or None (0 for the chunk);
    index int32 []: tokens seen including the chunk (the position of the next token); capacity: C."""

    keys: Array
    values: Array
    stored_keys: Any
    stored_values: Any
    positions: Array
    valid: Array
    index: Array
    key_mass: Array | None = None
    key_history: Array | None = None
    key_recent: Array | None = None
    capacity: int = struct.field(pytree_node=False, default=0)


def candidates(cache: KVCache, k: Array, v: Array, bits: int | None = None) -> Candidates:
    """The entries of `cache` followed by the chunk k [B, L, KVH, D], v [B, L, KVH, Dv] at positions index..index+L-1
    (stored as `bits`-bit per-token codes when bits is set, so attention reads what the cache keeps)."""
    batch, length, kv_heads = k.shape[:3]
    if bits is not None:
        k_stored, v_stored = quantize(k, bits), quantize(v, bits)
        k, v = k_stored.dequantize(), v_stored.dequantize()
        stored_keys = _concat(cache.keys, k_stored)
        stored_values = _concat(cache.values, v_stored)
    else:
        stored_keys, stored_values = _concat(cache.keys, k), _concat(cache.values, v)
    chunk_pos = cache.index + jnp.arange(length, dtype=jnp.int32)
    positions = jnp.concatenate(
        [cache.slot_positions(), jnp.broadcast_to(chunk_pos, (batch, kv_heads, length))], axis=-1
    )
    slot = jnp.arange(cache.capacity, dtype=jnp.int32)
    valid = jnp.concatenate([slot < cache.filled()[..., None], jnp.ones((batch, kv_heads, length), bool)], axis=-1)
    key_mass = None
    if cache.key_mass is not None:
        key_mass = jnp.concatenate([cache.key_mass, jnp.zeros((batch, kv_heads, length), jnp.float32)], axis=-1)
    key_history = None
    if cache.key_history is not None:
        chunk_history = jnp.zeros((batch, kv_heads, length), jnp.uint32)
        key_history = jnp.concatenate([cache.key_history, chunk_history], axis=-1)
    key_recent = None
    if cache.key_recent is not None:
        key_recent = jnp.concatenate([cache.key_recent, jnp.zeros((batch, kv_heads, length), jnp.float32)], axis=-1)
    return Candidates(
        keys=jnp.concatenate([read(cache.keys).astype(k.dtype), k], axis=1),
        values=jnp.concatenate([read(cache.values).astype(v.dtype), v], axis=1),
        stored_keys=stored_keys,
        stored_values=stored_values,
        positions=positions,
        valid=valid,
        index=cache.index + length,
        key_mass=key_mass,
        key_history=key_history,
        key_recent=key_recent,
        capacity=cache.capacity,
    )


def _concat(stored: Any, chunk: Any) -> Any:
    if isinstance(stored, QuantizedArray):
        return stored.replace(
            codes=jnp.concatenate([stored.codes, chunk.codes], axis=1),
            scale=jnp.concatenate([stored.scale, chunk.scale], axis=1),
            zero=jnp.concatenate([stored.zero, chunk.zero], axis=1),
        )
    return jnp.concatenate([stored, chunk.astype(stored.dtype)], axis=1)


def gather_entries(x: Any, indices: Array) -> Any:
    """Entries of x [B, E, KVH, ...] (array or per-token QuantizedArray) at indices int32 [B, KVH, C], per
    (batch, kv head) -> [B, C, KVH, ...]."""
    if isinstance(x, QuantizedArray):
        return x.tokens(lambda a: gather_entries(a, indices))
    index = jnp.swapaxes(indices, 1, 2)  # [B, C, KVH]
    index = index.reshape(*index.shape, *([1] * (x.ndim - 3)))
    return jnp.take_along_axis(x, index, axis=1)


def select(indices: Array, counts: Array, cands: Candidates) -> KVCache:
    """The KVCache that keeps entries `indices` int32 [B, KVH, C] of `cands` (the first counts [B, KVH] of them
    valid, in the given order)."""
    take_heads = lambda a: jnp.take_along_axis(a, indices, axis=-1)  # noqa: E731 - [B, KVH, E] -> [B, KVH, C]
    return KVCache(
        keys=gather_entries(cands.stored_keys, indices),
        values=gather_entries(cands.stored_values, indices),
        index=cands.index,
        lengths=counts.astype(jnp.int32),
        positions=take_heads(cands.positions),
        key_mass=None if cands.key_mass is None else take_heads(cands.key_mass),
        key_history=None if cands.key_history is None else take_heads(cands.key_history),
        key_recent=None if cands.key_recent is None else take_heads(cands.key_recent),
    )


def ordered_keep(keep: Array, capacity: int) -> tuple[Array, Array]:
    """(indices int32 [B, KVH, capacity], counts int32 [B, KVH]) of the entries where keep bool [B, KVH, E] is True,
    in their original order (the kept entries first; the rest pad the slots and are marked unfilled). Entries
    beyond `capacity` are dropped, the latest first."""
    counts = jnp.sum(keep, axis=-1, dtype=jnp.int32)
    order = jnp.argsort(~keep, axis=-1, stable=True).astype(jnp.int32)
    return order[..., :capacity], jnp.minimum(counts, capacity)


def head_mask(visible: Array, num_heads: int) -> Array:
    """bool [B, KVH, Tq, E] per kv head -> [B, H, Tq, E] per query head (query head h reads kv head h // group)."""
    group = num_heads // visible.shape[1]
    return jnp.repeat(visible, group, axis=1)


def kv_head_mass(mass: Array, kv_heads: int) -> Array:
    """Per-query-head key mass float32 [B, H, E] -> per kv head [B, KVH, E] (summed over each head's group)."""
    batch, heads, length = mass.shape
    return jnp.sum(mass.reshape(batch, kv_heads, heads // kv_heads, length), axis=2)


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """What a KV cache keeps (see the module docstring). Subclasses set `capacity` and implement `visible` and
    `keep`; `stats` lists the statistics they read (`STATS`), `storage_bits` quantizes what they store."""

    stats: ClassVar[tuple[str, ...]] = ()

    @property
    def capacity(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define capacity (slots per (batch, kv head))")

    def visible(self, cands: Candidates, q_positions: Array) -> Array:
        """bool [B, KVH, Tq, E]: entries query i (at original position q_positions [B, Tq]) attends to."""
        raise NotImplementedError(f"{type(self).__name__} must implement visible(candidates, q_positions)")

    def keep(self, cands: Candidates) -> tuple[Array, Array]:
        """(indices int32 [B, KVH, capacity], counts int32 [B, KVH]): the entries the cache stores next."""
        raise NotImplementedError(f"{type(self).__name__} must implement keep(candidates)")

    def observe(self, cands: Candidates, weights: Array) -> Candidates:
        """Folds this call's attention weights [B, H, Tq, E] (query heads) into the candidates' statistics before
        `keep` (default: key_mass += the weight each entry received, summed over the queries and the query heads of
        its kv head)."""
        mass = kv_head_mass(pipeline.key_mass(weights), cands.positions.shape[1])
        return cands.replace(key_mass=cands.key_mass + mass)

    def merge(self, cands: Candidates, indices: Array, counts: Array) -> Candidates:
        """Folds evicted entries into kept ones before the gather (default: none)."""
        return cands

    def step(self, cands: Candidates) -> KVCache:
        """The cache after this call: keep, merge, gather."""
        indices, counts = self.keep(cands)
        return select(indices, counts, self.merge(cands, indices, counts))


# ---------------------------------------------------------------------------------------------- recurrent state
@struct.dataclass
class RecurrentState:
    """A recurrent decoding state: `state` (any pytree: linear attention's [B, H, Dk, Dv] sums, a memory's weights)
    and index int32 [] (tokens seen), or None for side state that lives next to the layer's KVCache and shares its
    index. `names` (static) gives the logical axis names of every state leaf, keyed like the state dict."""

    state: dict[str, Array]
    index: Array | None
    names: tuple[tuple[str, tuple[str, ...]], ...] = struct.field(pytree_node=False, default=())


RECURRENT_INDEX = "cache_index"


def load_state(module: nn.Module, keys: tuple[str, ...], *, shared_index: bool = False) -> RecurrentState | None:
    """The RecurrentState of `module` whose state holds the variables `keys`, or None before the creating call.

    shared_index: side state of a KVCache (its index is the cache's; the returned state has index None)."""
    if not all(module.has_variable("cache", key) for key in keys):
        return None
    if shared_index:
        return RecurrentState(state={key: module.get_variable("cache", key) for key in keys}, index=None)
    if not module.has_variable("cache", RECURRENT_INDEX):
        return None
    state = {key: module.get_variable("cache", key) for key in keys}
    return RecurrentState(state=state, index=module.get_variable("cache", RECURRENT_INDEX))


def store_state(module: nn.Module, state: RecurrentState) -> None:
    """Creates or overwrites the state's variables (each state key is a variable, plus "cache_index" unless the
    index is None); leaves named in `state.names` carry those logical axes."""
    names = dict(state.names)
    index = {} if state.index is None else {RECURRENT_INDEX: state.index}
    for key, value in {**state.state, **index}.items():
        if key in names:
            value = nn.with_logical_constraint(value, names[key])
        module.put_variable("cache", key, value)


# ---------------------------------------------------------------------------------------------- packed layout
# An optional layout for a policy whose heads keep different numbers of entries (ragged budgets, e.g. Ada-KV): the
# kept entries of all kv heads of a layer lie back to back in one flat buffer of `size` slots per batch row, head g
# in the segment [offsets[b, g], offsets[b, g] + capacities[b, g]) of which the first lengths[b, g] slots are
# filled. The segments' sizes are the policy's per-head budgets (data-dependent, set at the prefill); their sum is at
# most `size`, a static bound the policy chooses (the sum of its per-head budgets, plus any rounding slack), so the
# memory is the sum of the budgets, not kv_heads x the largest one. Attention reads it segment by segment
# (`attn.core.split_kv_decode.packed_split_kv_attention`: each split gathers the same local slots of every head's
# segment), never a padded per-head copy of the whole cache. A policy updates it with `packed_select` (every flat
# slot says which entry it holds next: an old slot or an entry of the incoming chunk); `pack_counts` places a
# selection of the chunk's entries (a prefill) in new segments. Variables: `PACKED_VARIABLES`.
PACKED_AXES = ("batch", "cache_length", "head_dim")
PACKED_SLOT_AXES = ("batch", "cache_length")


@struct.dataclass
class PackedKV:
    """A packed KV cache (see "packed layout" above). keys [B, N, D], values [B, N, Dv] (arrays or per-token
    QuantizedArray); index int32 [] (tokens seen); offsets, capacities, lengths int32 [B, KVH] (each kv head's
    segment start, size and filled slots); positions int32 [B, N] (original position of each slot's entry);
    key_mass float32 [B, N] | None, key_history uint32 [B, N] | None, key_recent float32 [B, N] | None."""

    keys: Any
    values: Any
    index: Array
    offsets: Array
    capacities: Array
    lengths: Array
    positions: Array
    key_mass: Array | None = None
    key_history: Array | None = None
    key_recent: Array | None = None

    @property
    def size(self) -> int:
        """N: the flat slots per batch row (the sum of the segments' sizes is at most N)."""
        return self.positions.shape[1]

    def slot_heads(self) -> tuple[Array, Array, Array]:
        """(head int32 [B, N], local int32 [B, N], filled bool [B, N]): the kv head whose segment holds each flat
        slot, the slot's index inside that segment, and whether it holds a kept entry (slots after the last segment
        get head KVH - 1 and are never filled)."""
        return slot_segments(self.offsets, self.capacities, self.lengths, self.size)


PACKED_VARIABLES = {
    "keys": "packed_key",
    "values": "packed_value",
    "index": "cache_index",
    "offsets": "packed_offsets",
    "capacities": "packed_capacities",
    "lengths": "cache_lengths",
    "positions": "packed_positions",
    "key_mass": "packed_key_mass",
    "key_history": "packed_key_history",
    "key_recent": "packed_key_recent",
}


def segment_offsets(capacities: Array) -> Array:
    """int32 [B, KVH]: the start of each head's segment (exclusive cumulative sum of capacities [B, KVH])."""
    capacities = jnp.asarray(capacities, jnp.int32)
    return jnp.cumsum(capacities, axis=-1) - capacities


def slot_segments(offsets: Array, capacities: Array, lengths: Array, size: int) -> tuple[Array, Array, Array]:
    """(head, local, filled) of every flat slot [B, size] for segments offsets / capacities / lengths [B, KVH]."""
    slot = jnp.arange(size, dtype=jnp.int32)
    ends = offsets + capacities  # [B, KVH]
    kv_heads = offsets.shape[-1]
    head = jnp.minimum(jnp.sum(slot[None, :, None] >= ends[:, None, :], axis=-1, dtype=jnp.int32), kv_heads - 1)
    take = lambda a: jnp.take_along_axis(a, head, axis=1)  # noqa: E731 - [B, KVH] -> [B, N]
    local = slot[None, :] - take(offsets)
    filled = (local >= 0) & (local < take(lengths)) & (local < take(capacities))
    return head, local, filled


def segment_slots(offsets: Array, start: Array | int, size: int, total: int) -> Array:
    """int32 [B, size, KVH]: the flat slots of local slots start..start + size - 1 of every head's segment (clipped
    to [0, total); the caller masks slots past a head's length)."""
    local = start + jnp.arange(size, dtype=jnp.int32)
    return jnp.clip(offsets[:, None, :] + local[None, :, None], 0, total - 1)


def gather_slots(x: Any, slots: Array) -> Any:
    """Rows of a flat buffer x [B, N, ...] (array or per-token QuantizedArray) at slots int32 [B, *S] -> [B, *S, ...]
    (e.g. slots [B, C, KVH] from `segment_slots` gives a [B, C, KVH, D] block that attention reads)."""
    if isinstance(x, QuantizedArray):
        return x.tokens(lambda a: gather_slots(a, slots))
    flat = slots.reshape(slots.shape[0], -1)
    out = jnp.take_along_axis(x, flat.reshape(*flat.shape, *([1] * (x.ndim - 2))), axis=1)
    return out.reshape(*slots.shape, *x.shape[2:])


def empty_packed(
    keys: Array,
    values: Array,
    size: int,
    *,
    stats: tuple[str, ...] = (),
    bits: int | None = None,
) -> PackedKV:
    """A zero PackedKV of `size` flat slots for keys [B, *, KVH, D] / values [B, *, KVH, Dv] of this dtype, every
    segment empty (capacities 0); stats, bits as `empty_kv`."""
    batch, _, kv_heads = keys.shape[:3]
    unknown = sorted(set(stats) - set(STATS))
    if unknown:
        raise ValueError(f"stats={stats!r} names unknown statistics {unknown}; expected some of {STATS}")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size={size!r} must be a positive int (flat slots per batch row)")

    def zeros(x: Array) -> Any:
        z = jnp.zeros((batch, size, x.shape[-1]), x.dtype)
        return z if bits is None else quantize(z, bits, "token")

    heads = jnp.zeros((batch, kv_heads), jnp.int32)
    slots = lambda dtype: jnp.zeros((batch, size), dtype)  # noqa: E731
    return PackedKV(
        keys=zeros(keys),
        values=zeros(values),
        index=jnp.array(0, jnp.int32),
        offsets=heads,
        capacities=heads,
        lengths=heads,
        positions=slots(jnp.int32),
        key_mass=slots(jnp.float32) if "key_mass" in stats else None,
        key_history=slots(jnp.uint32) if "key_history" in stats else None,
        key_recent=slots(jnp.float32) if "key_recent" in stats else None,
    )


def load_packed(module: nn.Module) -> PackedKV | None:
    """The PackedKV of `module`'s "cache" collection, or None before the creating call."""
    if not module.has_variable("cache", PACKED_VARIABLES["keys"]):
        return None
    fields = {
        field: module.get_variable("cache", name) if module.has_variable("cache", name) else None
        for field, name in PACKED_VARIABLES.items()
    }
    return PackedKV(**fields)


def store_packed(module: nn.Module, packed: PackedKV) -> None:
    """Creates or overwrites the variables of `packed` (None fields are left out); float keys and values carry the
    logical axes `PACKED_AXES`."""
    for field, name in PACKED_VARIABLES.items():
        value = getattr(packed, field)
        if value is None:
            continue
        if field in ("keys", "values") and not isinstance(value, QuantizedArray):
            value = nn.with_logical_constraint(value, PACKED_AXES)
        module.put_variable("cache", name, value)


def _chunk_rows(x: Any) -> Any:
    """A chunk's entries [B, L, KVH, ...] as flat rows [B, KVH * L, ...] (row g * L + j: entry j of head g)."""

    def rows(a: Array) -> Array:
        a = jnp.swapaxes(a, 1, 2)
        return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])

    return x.tokens(rows) if isinstance(x, QuantizedArray) else rows(x)


def packed_select(
    packed: PackedKV,
    chunk: Candidates,
    source: Array,
    lengths: Array,
    *,
    offsets: Array | None = None,
    capacities: Array | None = None,
) -> PackedKV:
    """The next packed cache: flat slot n holds entry source[b, n] int32 [B, N] of [the N packed slots, then the
    chunk's entries, row N + g * L + j for entry j of kv head g] (chunk: `candidates` of an empty cache and the
    chunk, L = its entries per head; their stored forms, positions and statistics are gathered); lengths [B, KVH]
    the new filled counts; offsets / capacities: new segments (default: unchanged); index: the chunk's."""
    size = packed.size

    def pick(old: Any, new: Any) -> Any:
        if old is None:
            return None
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=1), old, _chunk_rows(new))
        return gather_slots(both, source)

    def per_head(a: Array | None) -> Array | None:  # [B, KVH, L] -> [B, KVH * L, 1] rows, as the chunk's entries
        return None if a is None else jnp.swapaxes(a, 1, 2)[..., None]

    def stat(old: Array | None, new: Array | None) -> Array | None:
        return None if old is None else pick(old[..., None], per_head(new))[..., 0]

    if int(source.shape[1]) != size:
        raise ValueError(f"source has shape {source.shape}; expected [batch, size] = [{packed.keys.shape[0]}, {size}]")
    return packed.replace(
        keys=pick(packed.keys, chunk.stored_keys),
        values=pick(packed.values, chunk.stored_values),
        index=chunk.index,
        offsets=packed.offsets if offsets is None else offsets.astype(jnp.int32),
        capacities=packed.capacities if capacities is None else capacities.astype(jnp.int32),
        lengths=lengths.astype(jnp.int32),
        positions=stat(packed.positions, chunk.positions),
        key_mass=stat(packed.key_mass, chunk.key_mass),
        key_history=stat(packed.key_history, chunk.key_history),
        key_recent=stat(packed.key_recent, chunk.key_recent),
    )


def pack_counts(packed: PackedKV, chunk: Candidates, indices: Array, counts: Array, capacities: Array) -> PackedKV:
    """A packed cache holding, in new segments of `capacities` [B, KVH] slots, the first counts [B, KVH] of the
    chunk's entries indices int32 [B, KVH, K] per head (a policy's `keep` on a prefill's candidates, as `select`
    takes them); every other slot is left unfilled."""
    offsets = segment_offsets(capacities)
    head, local, _ = slot_segments(offsets, capacities, counts, packed.size)
    length = chunk.positions.shape[-1]
    take = lambda a: jnp.take_along_axis(a, head, axis=1)  # noqa: E731 - [B, KVH] -> [B, N]
    kept = (local < take(jnp.minimum(counts, capacities))) & (local >= 0)
    per_slot = jnp.take_along_axis(
        indices.reshape(indices.shape[0], -1),
        head * indices.shape[-1] + jnp.clip(local, 0, indices.shape[-1] - 1),
        axis=1,
    )  # the chunk entry of each slot's head at its local index
    source = jnp.where(kept, packed.size + head * length + per_slot, jnp.arange(packed.size, dtype=jnp.int32))
    return packed_select(packed, chunk, source, jnp.minimum(counts, capacities), offsets=offsets, capacities=capacities)
