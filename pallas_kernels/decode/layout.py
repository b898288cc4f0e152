"""Query and output layouts shared by the split-KV decode kernels (gpu.py, tpu.py): queries of the heads that share
a kv head stacked as rows, head_dim split into n channel planes (channels j::n), and zero padding to tile sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def pad_axis(x: Array | None, axis: int, size: int) -> Array | None:
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def query_planes(q: Array, kv_heads: int, planes: int, rows: int, width: int) -> Array:
    """q [B, Tq, H, D] -> [B, KVH, n, R, W]: rows g Tq + i of the heads sharing each kv head, channels j::n."""
    batch, q_len, heads, dim = q.shape
    group = heads // kv_heads
    grouped = q.reshape(batch, q_len, kv_heads, group, dim).transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, -1, dim)
    stacked = jnp.stack([grouped[..., j::planes] for j in range(planes)], axis=2)
    return pad_axis(pad_axis(stacked, 3, rows), 4, width)


def unplane(o: Array, q_len: int, group: int, value_dim: int, planes: int) -> Array:
    """o [B, KVH, S, n, R, W] -> [S, B, Tq, H, Dv] (rows g Tq + i back to heads, planes interleaved)."""
    batch, kv_heads, splits = o.shape[:3]
    o = o[:, :, :, :, : group * q_len, : value_dim // planes]
    o = o.reshape(batch, kv_heads, splits, planes, group, q_len, value_dim // planes)
    o = o.transpose(2, 0, 5, 1, 4, 6, 3)  # [S, B, Tq, KVH, G, W, n]
    return o.reshape(splits, batch, q_len, kv_heads * group, value_dim)
