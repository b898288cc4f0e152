"""Dense jnp reference of the decode kernels' partials (ground truth of tests/pallas_kernels/test_decode_kernel.py).

For every split s with slot range [start_s, stop_s) of its (batch, kv head) (`partition.split_bounds`):

    s_ij  = scale q_i . k_j  (softcap * tanh(s / softcap) if softcap)
    vis_ij = start_s <= j < stop_s  AND  (causal: j < n - (Tq - 1 - i), the queries being the last Tq of n filled)
    lse_s,i = log sum_{vis} exp(s_ij)   (-inf when nothing is visible)
    o_s,i   = sum_{vis} exp(s_ij - lse_s,i) v_j   (0 when nothing is visible)

q [B, Tq, H, D]; k [B, L, KVH, D], v [B, L, KVH, Dv] float (quantized caches are dequantised by the caller);
lengths int [B, KVH]; the key tile is block_k clipped to the padded cache length, as in the kernel.
Returns o float32 [S, B, Tq, H, Dv] and lse float32 [S, B, Tq, H]. Time and memory O(S B H Tq L): tests only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.decode.partition import effective_block, split_bounds, tiles_per_split

Array = jax.Array


def decode_partials_reference(
    q: Array,
    k: Array,
    v: Array,
    lengths: Array,
    *,
    num_splits: int,
    work_units: int,
    block_k: int,
    causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[Array, Array]:
    """Per-split partials of softmax attention (see the module docstring)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    lengths = jnp.asarray(lengths, jnp.int32)
    block = effective_block(block_k, kv_len)
    share = tiles_per_split(lengths, block=block, num_splits=num_splits, work_units=work_units)
    start, stop = split_bounds(lengths, share, block=block, num_splits=num_splits)  # [S, B, KVH]
    kh = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    vh = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kh, precision=lax.Precision.HIGHEST) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    per_head = lambda x: jnp.repeat(x, group, axis=-1)[..., None, None]  # noqa: E731 - [.., KVH] -> [.., H, 1, 1]
    slot = jnp.arange(kv_len, dtype=jnp.int32)
    visible = (slot >= per_head(start)) & (slot < per_head(stop))  # [S, B, H, 1, L]
    if causal:
        query = jnp.arange(q_len, dtype=jnp.int32)[:, None]
        visible = visible & (slot < per_head(lengths)[None] - (q_len - 1 - query))
    masked = jnp.where(visible, logits[None], -jnp.inf)  # [S, B, H, Tq, L]
    top = jnp.max(masked, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(masked - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    empty = total == 0.0
    safe = jnp.where(empty, 1.0, total)
    lse = jnp.where(empty, -jnp.inf, top + jnp.log(safe))[..., 0]  # [S, B, H, Tq]
    o = jnp.einsum("sbhqk,bkhd->sbqhd", weights / safe, vh, precision=lax.Precision.HIGHEST)
    return o, jnp.swapaxes(lse, 2, 3)
