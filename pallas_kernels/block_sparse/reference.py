"""Dense jnp reference of `block_sparse_attention`: the oracle every block-sparse kernel is tested against.

    selected[b, h, qb, kb] = kb in block_indices[b|0, h|0, qb, :]            (-1 ignored, duplicates count once)
    visible[b, h, i, j]    = selected[b, h, i // bs, j // bs] AND (not causal OR j <= q_offset + i)
    s = scale q_i . k_j (kv head h // G), -inf where not visible;  P = softmax_j(s);  out = P v
    lse_i = log sum_j exp(s_ij)   (-inf and out 0 for a row that sees no key)

Computed in float32 over the whole [Tq, Tk] matrix (time and memory O(B H Tq Tk)), output in q.dtype; out and lse
are both differentiable. Pure jnp, independent of the kernels' index lists and blocked layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_visibility(
    block_indices: Array, block_size: int, q_len: int, kv_len: int, *, causal: bool = False, q_offset: int = 0
) -> Array:
    """bool [B|1, H|1, Tq, Tk]: which keys each query sees, from int block_indices [B|1, H|1, nq, S]."""
    nk = -(-kv_len // block_size)
    idx = jnp.asarray(block_indices)
    selected = jnp.any(idx[..., :, None] == jnp.arange(nk)[None, :], axis=-2)  # [B|1, H|1, nq, nk]
    visible = jnp.repeat(jnp.repeat(selected, block_size, axis=2), block_size, axis=3)[:, :, :q_len, :kv_len]
    if causal:
        visible = visible & (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + q_offset)
    return visible


def block_sparse_attention_reference(
    q: Array,
    k: Array,
    v: Array,
    *,
    block_indices: Array,
    block_size: int,
    causal: bool = False,
    q_offset: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Dense masked softmax attention (see the module docstring).

    q [B, Tq, H, D]; k, v [B, Tk, KVH, D]; block_indices int [B|1, H|1, ceil(Tq / bs), S]. Returns out
    [B, Tq, H, D] in q.dtype, or (out, lse f32 [B, H, Tq]) when return_lse.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    f32 = jnp.float32
    qg = q.astype(f32).reshape(batch, q_len, kv_heads, groups, head_dim)
    s = jnp.einsum("bikgd,bjkd->bkgij", qg, k.astype(f32), precision="highest")
    s = s.reshape(batch, heads, q_len, kv_len) * scale
    visible = token_visibility(block_indices, block_size, q_len, kv_len, causal=causal, q_offset=q_offset)
    s = jnp.where(visible, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1))
    m = jnp.where(m == -jnp.inf, 0.0, m)
    e = jnp.exp(s - m[..., None])
    denom = jnp.sum(e, axis=-1)
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)
    probs = (e / safe[..., None]).reshape(batch, kv_heads, groups, q_len, kv_len)
    out = jnp.einsum("bkgij,bjkd->bikgd", probs, v.astype(f32), precision="highest")
    out = out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
    if not return_lse:
        return out
    return out, jnp.where(empty, -jnp.inf, m + jnp.log(safe))
