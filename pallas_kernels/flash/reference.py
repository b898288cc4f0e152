"""Dense jnp reference of `flash_attention`: what every flash kernel (GPU and TPU) is checked against.

    s[b,h,i,j] = scale * q[b,i,h] . k[b,j,h // G]                 (G = H / KVH, K/V grouped, never repeated)
    s = softcap * tanh(s / softcap)                                (if softcap)
    s += bias[b,h,i,j] + sum_r u[b,i,h,r] v_f[b,j,h,r]             (if bias / bias_factors; broadcast over 1-axes)
    s = -inf where not visible: causal j <= i; window (l, r): i - l <= j <= i + r; q_seg[b,i] == kv_seg[b,j]
    m = max(max_j s, sink_h);  P = exp(s - m) / (sum_j exp(s - m) + exp(sink_h - m))
    out = P v;  lse = m + log(denominator) (-inf for a row with no visible key and no sink; out is 0 there)
    key_mass[b,h,j] = sum_i P[b,h,i,j]

Computed in float32, output in q.dtype. Time O(B H Tq Tk D), memory O(B H Tq Tk).
The lse is differentiable (as the kernels'); key_mass is a statistic (stop_gradient).
Pure jnp: it does not import the rest of the project (tests compare it to attn.core.reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _window_pair(window: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if window is None:
        return None
    if isinstance(window, int):
        return (window, window)
    return (int(window[0]), int(window[1]))


def visibility(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    segment_ids: tuple[Array, Array] | None = None,
) -> Array:
    """bool [B|1, 1, Tq, Tk]: which keys each query may see (queries at absolute positions 0 .. Tq - 1)."""
    qi = jnp.arange(q_len)[:, None]
    kj = jnp.arange(kv_len)[None, :]
    visible = jnp.ones((q_len, kv_len), jnp.bool_)
    if causal:
        visible = visible & (kj <= qi)
    pair = _window_pair(window)
    if pair is not None:
        visible = visible & (kj >= qi - pair[0]) & (kj <= qi + pair[1])
    visible = visible[None, None]
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        visible = visible & (jnp.asarray(q_seg)[:, None, :, None] == jnp.asarray(kv_seg)[:, None, None, :])
    return visible


def flash_attention_reference(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    segment_ids: tuple[Array, Array] | None = None,
    window: int | tuple[int, int] | None = None,
    bias: Array | None = None,
    bias_factors: tuple[Array, Array] | None = None,
    softcap: float | None = None,
    sinks: Array | None = None,
    scale: float | None = None,
    return_stats: bool = False,
) -> Array | tuple[Array, dict[str, Array]]:
    """Dense softmax attention with the options of `flash_attention` (see the module docstring for the equations).

    q [B, Tq, H, D]; k, v [B, Tk, KVH, D]. Returns out [B, Tq, H, D] in q.dtype, or (out, {"lse": f32 [B, H, Tq],
    "key_mass": f32 [B, H, Tk]}) when return_stats.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    f32 = jnp.float32

    qg = q.astype(f32).reshape(batch, q_len, kv_heads, groups, head_dim)
    s = jnp.einsum("bikgd,bjkd->bkgij", qg, k.astype(f32)).reshape(batch, heads, q_len, kv_len) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if bias is not None:
        s = s + bias.astype(f32)
    if bias_factors is not None:
        u, vf = bias_factors
        s = s + jnp.einsum("bihr,bjhr->bhij", u.astype(f32), vf.astype(f32))
    visible = visibility(q_len, kv_len, causal=causal, window=window, segment_ids=segment_ids)
    s = jnp.where(visible, s, -jnp.inf)

    m = jnp.max(s, axis=-1)
    if sinks is not None:
        m = jnp.maximum(m, sinks.astype(f32)[None, :, None])
    m = jnp.where(m == -jnp.inf, 0.0, m)
    e = jnp.exp(s - m[..., None])
    denom = jnp.sum(e, axis=-1)
    if sinks is not None:
        denom = denom + jnp.exp(sinks.astype(f32)[None, :, None] - m)
    safe = jnp.where(denom == 0.0, 1.0, denom)
    probs = e / safe[..., None]
    pg = probs.reshape(batch, kv_heads, groups, q_len, kv_len)
    out = jnp.einsum("bkgij,bjkd->bikgd", pg, v.astype(f32)).reshape(batch, q_len, heads, head_dim)
    out = out.astype(q.dtype)
    if not return_stats:
        return out
    lse = jnp.where(denom == 0.0, -jnp.inf, m + jnp.log(safe))
    return out, {"lse": lse, "key_mass": jax.lax.stop_gradient(jnp.sum(probs, axis=2))}
