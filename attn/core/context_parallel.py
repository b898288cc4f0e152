"""Context parallelism: exact softmax attention with the sequence split over a mesh axis (`jax.shard_map`).

Two schemes, both exactly softmax attention over the whole sequence (forward and gradients; JAX transposes the
collectives for the backward pass):

ring_attention (Ring Attention, Liu et al. 2023; zig-zag load balancing as in Llama 3's context parallelism and
  ring-flash-attention): every device keeps its query block and passes its key/value block around the ring of
  the `axis` devices with `ppermute`; after P steps every query block has seen every key block, and the P partial
  results are combined by their log-sum-exp with the shared associative merge (attn.core.lse_merge.merge).
  With `load_balance=True` (causal) the sequence is cut into 2P chunks and device i holds chunks i and 2P-1-i
  (zig-zag), so each device has the same number of visible (query chunk, key chunk) pairs. Every chunk is a
  contiguous run of positions, so a pair is fully visible, the causal diagonal or skipped (`lax.switch` on the
  chunk indices), and each block's mask is structured: a causal flag, the segment ids (which travel with the
  keys) and the key chunk's real length (padding) — never a dense block mask.
ulysses_attention (DeepSpeed-Ulysses, Jacobs et al. 2023): an all-to-all turns the sequence-sharded q/k/v
  [B, T/P, H, D] into head-sharded [B, T, H/P, D], each device runs ordinary attention over the full sequence for
  its heads, and a second all-to-all turns the output back. Needs H % P == 0; key/value heads are repeated to the
  query heads when KVH % P != 0 (GQA/MQA).

Both take global arrays q [B, T, H, D], k/v [B, T, KVH, D] (sharded along T over `axis` or not; the result is
sharded along T), `causal`, `segment_ids` int [B, T], and pad T up to a multiple of P (2P for the zig-zag) with
keys no query sees. Per device, the ring holds O(T/P) keys at a time and the Ulysses step O(T) keys for H/P heads:
activation memory per device falls as 1/P for both. Each per-device block runs with the given `implementation`:
None picks the Pallas flash kernel on GPU/TPU (attn.core.kernels.flash_unavailable says where it cannot) and
`softmax_attention`'s fastest path elsewhere. The ring's merge weights every block by exp(lse_block - lse), so it
needs the block's lse with its gradient: the kernel's backward takes the lse cotangent g as delta_i = dO_i . O_i - g_i.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, PartitionSpec

from attn.core import dispatch, kernels
from attn.core.lse_merge import merge
from attn.core.masks import Mask
from attn.core.softmax import softmax_attention
from attn.core.validation import check_qkv

Array = jax.Array

__all__ = ["context_axis_size", "ring_attention", "ulysses_attention", "zigzag_permutation"]


def context_axis_size(axis: str = "context") -> int:
    """Size of `axis` in the mesh set by `jax.set_mesh` (1 when no mesh is set or it has no such axis)."""
    return int(jax.sharding.get_abstract_mesh().shape.get(axis, 1))


def _axis_size(mesh: Mesh, axis: str) -> int:
    _check_auto(mesh, axis)
    if axis not in mesh.shape:
        raise ValueError(f"axis={axis!r} is not an axis of the mesh; expected one of {list(mesh.shape)}")
    return int(mesh.shape[axis])


def _check_auto(mesh: Any, axis: str) -> None:
    """The mesh's axes must be Auto (as the trainer builds them): on Explicit axes (jax.make_mesh's default) the
    permutations and padding around the shard_map would need explicit out-shardings."""
    if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        raise ValueError(
            f"mesh has Explicit axes {mesh.axis_names}; context-parallel attention needs Auto axes: "
            f"jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names)) (axis={axis!r})"
        )


def _check_segments(segment_ids: Array | None, q: Array) -> None:
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(
            f"segment_ids of shape {tuple(segment_ids.shape)} must be int [batch, length] = {tuple(q.shape[:2])}"
        )


def _check_self_attention(q: Array, k: Array) -> None:
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"context-parallel attention is self-attention over one sequence: q length {q.shape[1]} != k length "
            f"{k.shape[1]}"
        )


def _pad_length(x: Array, length: int, value: Any = 0) -> Array:
    pad = length - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def zigzag_permutation(length: int, parts: int) -> jax.Array:
    """int [length]: the global token order of the zig-zag layout, `length` a multiple of 2 * parts.

    The sequence is cut into 2P equal chunks and device i holds chunks i and 2P-1-i, so under a causal mask every
    device has the same amount of visible work. `x[:, zigzag_permutation(T, P)]` sharded in P equal blocks gives
    device i its two chunks; `jnp.argsort` of it undoes the order.
    """
    if length % (2 * parts):
        raise ValueError(f"length={length} must be a multiple of 2 * parts = {2 * parts} for the zig-zag layout")
    chunk = length // (2 * parts)
    order = []
    for i in range(parts):
        order += [i, 2 * parts - 1 - i]
    return jnp.concatenate([jnp.arange(c * chunk, (c + 1) * chunk) for c in order])


def _flash_lse_call(scale, q, k, v, mask, return_lse):
    return kernels.flash_attention_call(
        q, k, v, mask, bias=None, scale=scale, softcap=None, sinks=None, return_lse=return_lse
    )


def _block(q, k, v, mask, scale, implementation):
    """(o float32 [B, Tq, H, Dv], lse float32 [B, Tq, H]) of q over one key block under a structured `mask`: the
    Pallas flash kernel where `implementation` (None or "pallas") and the platform allow it, else
    `softmax_attention(implementation=...)`; (0, -inf) for rows with no visible key."""
    if implementation in (None, "pallas"):
        reason = kernels.flash_unavailable(q, v, mask, dropout_rate=0.0, return_probs=False, q_offset=0)
        if reason is None:
            dispatch.log_choice_once("ring_attention block", "pallas", "flash kernel (its lse carries a gradient)")
            out, aux = _flash_lse_call(q.shape[-1] ** -0.5 if scale is None else float(scale), q, k, v, mask, True)
            return out.astype(jnp.float32), jnp.swapaxes(aux["lse"], 1, 2).astype(jnp.float32)
    out, aux = softmax_attention(q, k, v, mask=mask, scale=scale, return_lse=True, implementation=implementation)
    return out.astype(jnp.float32), jnp.swapaxes(aux["lse"], 1, 2).astype(jnp.float32)


def ring_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mesh: Mesh,
    axis: str = "context",
    causal: bool = False,
    segment_ids: Array | None = None,
    scale: float | None = None,
    load_balance: bool | None = None,
    implementation: str | None = None,
    batch_axes: str | tuple[str, ...] | None = None,
) -> Array:
    """Ring attention over mesh axis `axis`: q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, Dv] in q.dtype.

    Args:
      mesh: the device mesh; `axis` names the axis the sequence is split over (P devices). Other mesh axes are
        not used (the arrays are replicated over them).
      causal: key j visible to query i only if j <= i. segment_ids: int [B, T], attend only within a segment.
      scale: logit scale (default 1/sqrt(D)).
      load_balance: zig-zag layout (default: on when causal and P > 1); off keeps P contiguous blocks.
      implementation: the per-block backend: None (the Pallas flash kernel on GPU/TPU where it serves the block,
        else the fastest `softmax_attention` path), "pallas" (the kernel; raises where it cannot run), "xla",
        "xla_blockwise", "cudnn" as in `softmax_attention`.
      batch_axes: mesh axes the batch is split over (e.g. ("data", "fsdp") in the trainer), None: replicated.
    """
    check_qkv(q, k, v)
    _check_self_attention(q, k)
    _check_segments(segment_ids, q)
    parts = _axis_size(mesh, axis)
    balance = causal and parts > 1 if load_balance is None else bool(load_balance)
    batch, length = q.shape[:2]
    chunks = 2 * parts if balance else parts
    padded = -(-length // chunks) * chunks
    segments = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    q, k, v, segments = (_pad_length(x, padded) for x in (q, k, v, segments))
    order = zigzag_permutation(padded, parts) if balance else None
    if order is not None:
        q, k, v, segments = (jnp.take(x, order, axis=1) for x in (q, k, v, segments))

    body = functools.partial(
        _ring_body, axis=axis, parts=parts, causal=causal, scale=scale, pieces=2 if balance else 1, length=length,
        use_segments=segment_ids is not None, implementation=implementation,
    )  # fmt: skip
    seq = PartitionSpec(batch_axes, axis)
    out = jax.shard_map(body, mesh=mesh, in_specs=(seq,) * 4, out_specs=seq, check_vma=False)(q, k, v, segments)
    if order is not None:
        out = jnp.take(out, jnp.argsort(order), axis=1)
    return out[:, :length]


def _ring_body(q, k, v, segments, *, axis, parts, causal, scale, pieces, length, use_segments, implementation):
    """Per device: q/k/v [B, T/P, ...], segments [B, T/P]; `pieces` query/key chunks per block (2 for the zig-zag
    layout: device d holds global chunks d and 2P-1-d; 1 for contiguous blocks: chunk d).

    Every chunk is a contiguous run of positions, so each (query chunk, key chunk) pair is fully visible (key
    chunk earlier, or not causal), the causal diagonal (the same chunk: plain top-left causal), or skipped (key
    chunk later, or all padding): a structured Mask (causal flag, segment ids, the key chunk's real length) that
    the flash kernel takes, with no dense block mask. The key block held at ring step s came from device
    (d - s) mod P. The P steps are one `lax.scan`; each step ends by passing the key/value block on, so the last
    step's pass is one block of traffic more than strictly needed."""
    batch, local, heads, _ = q.shape
    piece = local // pieces
    me = jax.lax.axis_index(axis)
    ring = [(i, (i + 1) % parts) for i in range(parts)]

    def chunk(device, a):
        return device if a == 0 else 2 * parts - 1 - device

    def pair(q, k, v, q_seg, kv_seg, q_chunk, kv_chunk):
        real = jnp.clip(length - kv_chunk * piece, 0, piece)  # keys of the chunk before the padding
        fields = {"kv_lengths": jnp.full((batch,), real, jnp.int32)} if length < local * parts else {}
        if use_segments:
            fields.update(q_segment_ids=q_seg, kv_segment_ids=kv_seg)

        def empty(*_):
            return (
                jnp.zeros((batch, piece, heads, v.shape[-1]), jnp.float32),
                jnp.full((batch, piece, heads), -jnp.inf, jnp.float32),
            )

        def full(q, k, v):
            return _block(q, k, v, Mask(**fields), scale, implementation)

        def diagonal(q, k, v):
            return _block(q, k, v, Mask(causal=True, **fields), scale, implementation)

        if not causal:
            return jax.lax.cond(real > 0, full, empty, q, k, v)
        index = jnp.where((real == 0) | (kv_chunk > q_chunk), 0, jnp.where(kv_chunk == q_chunk, 2, 1))
        return jax.lax.switch(index, (empty, full, diagonal), q, k, v)

    pair = jax.checkpoint(pair)

    def step(carry, s):
        o, lse, k, v, kv_seg = carry
        source = (me - s) % parts
        outs, lses = [], []
        for a in range(pieces):
            qa = slice(a * piece, (a + 1) * piece)
            o_a = jnp.zeros((batch, piece, heads, v.shape[-1]), jnp.float32)
            lse_a = jnp.full((batch, piece, heads), -jnp.inf, jnp.float32)
            for b in range(pieces):
                kb = slice(b * piece, (b + 1) * piece)
                o_ab, lse_ab = pair(
                    q[:, qa], k[:, kb], v[:, kb], segments[:, qa], kv_seg[:, kb], chunk(me, a), chunk(source, b)
                )
                o_a, lse_a = merge(o_a, lse_a, o_ab, lse_ab)
            outs.append(o_a)
            lses.append(lse_a)
        o, lse = merge(o, lse, jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1))
        passed = (k, v, kv_seg) if use_segments else (k, v)
        passed = tuple(jax.lax.ppermute(x, axis, ring) for x in passed)
        k, v = passed[:2]
        kv_seg = passed[2] if use_segments else kv_seg
        return (o, lse, k, v, kv_seg), None

    o = jnp.zeros((batch, local, heads, v.shape[-1]), jnp.float32)
    lse = jnp.full((batch, local, heads), -jnp.inf, jnp.float32)
    (o, *_), _ = jax.lax.scan(step, (o, lse, k, v, segments), jnp.arange(parts))
    return o.astype(q.dtype)


def ulysses_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mesh: Mesh,
    axis: str = "context",
    causal: bool = False,
    segment_ids: Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    batch_axes: str | tuple[str, ...] | None = None,
) -> Array:
    """Ulysses (all-to-all) attention over mesh axis `axis`: q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, Dv].

    Arguments as in `ring_attention`; H must be a multiple of the axis size P. Each device attends over the whole
    sequence for H/P heads with `softmax_attention(implementation=...)` (structured masks, so kernels apply).
    """
    heads, kv_heads = check_qkv(q, k, v)
    _check_self_attention(q, k)
    _check_segments(segment_ids, q)
    parts = _axis_size(mesh, axis)
    if heads % parts:
        raise ValueError(
            f"ulysses_attention splits the {heads} query heads over the {parts} devices of axis {axis!r}: "
            f"num_heads must be a multiple of {parts} (use ring_attention otherwise)"
        )
    if kv_heads % parts:  # GQA/MQA with fewer kv heads than devices: give every query head its own copy
        k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
    batch, length = q.shape[:2]
    padded = -(-length // parts) * parts
    segments = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    q, k, v, segments = (_pad_length(x, padded) for x in (q, k, v, segments))
    lengths = jnp.full((batch,), length, jnp.int32)

    def body(q, k, v, segments, lengths):
        to_heads = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=2, concat_axis=1, tiled=True)
        q, k, v = to_heads(q), to_heads(k), to_heads(v)
        segments = jax.lax.all_gather(segments, axis, axis=1, tiled=True)
        mask = Mask(causal=causal, kv_lengths=lengths, q_segment_ids=segments, kv_segment_ids=segments)
        out = softmax_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)
        return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)

    seq = PartitionSpec(batch_axes, axis)
    out = jax.shard_map(
        body, mesh=mesh, in_specs=(seq, seq, seq, seq, PartitionSpec(batch_axes)), out_specs=seq, check_vma=False
    )(q, k, v, segments, lengths)
    return out[:, :length]
