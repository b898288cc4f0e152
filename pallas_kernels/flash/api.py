"""`flash_attention`: the public entry of the flash kernels — checks arguments, normalises them, picks a backend.

    out = softmax(mask(softcap(scale q k^T) + bias + u v_f^T), sink) v      (equations: flash/reference.py)

Shapes: q [B, Tq, H, D]; k, v [B, Tk, KVH, D] with H % KVH == 0 (GQA/MQA read kv head h // (H / KVH));
D <= 256; any Tq, Tk >= 1. Options: causal (top-left aligned, j <= i), window (left, right) or int w = (w, w),
segment_ids (q_ids [B, Tq], kv_ids [B, Tk]), bias [B|1, H|1, Tq, Tk], bias_factors (u [B|1, Tq, H|1, R],
v [B|1, Tk, H|1, R]) never materialised, softcap > 0, sinks [H] (softmax-denominator-only logits), scale
(default D ** -0.5). Differentiable in q, k, v, bias, both bias factors and sinks. return_stats adds
{"lse": f32 [B, H, Tq], "key_mass": f32 [B, H, Tk]} (column sums of P): lse is differentiable (in the same
inputs), key_mass is a statistic (stop_gradient).

Backends: "gpu" (Pallas on Triton, gpu.py) and "tpu" (Pallas Mosaic, tpu.py), with the same normalised
signature. block_sizes: None for the backend's defaults or a dict of ints; GPU keys (flash/gpu_plan.py):
block_q, block_k, block_q_dkv, block_k_dkv, block_q_dq, block_k_dq (powers of two >= 16), num_warps,
num_stages; TPU keys: see flash/tpu.py. A key the chosen backend does not know is an error.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash.gpu_plan import BLOCK_SIZE_KEYS, TUNING_KEYS

Array = jax.Array
MAX_HEAD_DIM = 256


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_qkv(q: Array, k: Array, v: Array) -> None:
    """Ranks, float dtypes and matching dims of q [B, Tq, H, D], k and v [B, Tk, KVH, D] (H % KVH == 0, D <= 256)
    for the attention kernels; a ValueError naming the argument otherwise."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if np.ndim(x) != 4:
            raise ValueError(f"{name} must have rank 4 [batch, length, heads, head_dim], got shape {_shape(x)}")
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"{name} must be a floating array, got dtype {jnp.result_type(x)}")
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if ks != vs:
        raise ValueError(f"k and v must have the same shape [batch, kv_len, kv_heads, head_dim], got k {ks}, v {vs}")
    if ks[0] != qs[0]:
        raise ValueError(f"batch sizes differ: q has {qs[0]}, k and v have {ks[0]}; expected equal")
    if ks[3] != qs[3]:
        raise ValueError(f"head_dim mismatch: q has {qs[3]}, k and v have {ks[3]}; expected equal")
    if not 1 <= qs[3] <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim={qs[3]} is not supported; expected 1 <= head_dim <= {MAX_HEAD_DIM}")
    if qs[1] < 1 or ks[1] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got q_len={qs[1]}, kv_len={ks[1]}")
    if ks[2] < 1 or qs[2] % ks[2] != 0:
        raise ValueError(
            f"num_heads={qs[2]} (q) must be a multiple of num_kv_heads={ks[2]} (k, v); expected MHA, GQA or MQA"
        )


def _normalize_window(window: Any) -> tuple[int, int] | None:
    if window is None:
        return None
    pair = (window, window) if isinstance(window, (int, np.integer)) and not isinstance(window, bool) else window
    ok = (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 0 for w in pair)
    )
    if not ok:
        raise ValueError(f"window={window!r} must be an int w >= 0 or a pair (left, right) of ints >= 0")
    return (int(pair[0]), int(pair[1]))


def _check_segment_ids(segment_ids: Any, batch: int, q_len: int, kv_len: int) -> tuple[Array, Array] | None:
    if segment_ids is None:
        return None
    if not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
        raise ValueError(
            f"segment_ids must be a pair (q_segment_ids [B, Tq], kv_segment_ids [B, Tk]), got {type(segment_ids)}"
        )
    q_seg, kv_seg = (jnp.asarray(s) for s in segment_ids)
    if q_seg.shape != (batch, q_len) or kv_seg.shape != (batch, kv_len):
        raise ValueError(
            f"segment_ids shapes {q_seg.shape} and {kv_seg.shape} do not match "
            f"(batch, q_len)=({batch}, {q_len}) and (batch, kv_len)=({batch}, {kv_len})"
        )
    for s in (q_seg, kv_seg):
        if not jnp.issubdtype(s.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integer arrays, got dtype {s.dtype}")
    return q_seg, kv_seg


def _check_bias(bias: Any, batch: int, heads: int, q_len: int, kv_len: int) -> None:
    if bias is None:
        return
    bs = _shape(bias)
    ok = len(bs) == 4 and bs[0] in (1, batch) and bs[1] in (1, heads) and bs[2:] == (q_len, kv_len)
    if not ok:
        raise ValueError(f"bias shape {bs} must be [B|1, H|1, Tq, Tk] = [{batch}|1, {heads}|1, {q_len}, {kv_len}]")


def _check_bias_factors(factors: Any, batch: int, heads: int, q_len: int, kv_len: int) -> tuple[Array, Array] | None:
    if factors is None:
        return None
    if not (isinstance(factors, (tuple, list)) and len(factors) == 2):
        raise ValueError(f"bias_factors must be a pair (u [B|1, Tq, H|1, R], v [B|1, Tk, H|1, R]), got {type(factors)}")
    u, vf = factors
    us, vs = _shape(u), _shape(vf)
    ok = (
        len(us) == 4
        and len(vs) == 4
        and us[0] in (1, batch)
        and vs[0] in (1, batch)
        and us[2] in (1, heads)
        and vs[2] in (1, heads)
        and us[1] == q_len
        and vs[1] == kv_len
        and us[3] == vs[3]
        and us[3] >= 1
    )
    if not ok:
        raise ValueError(
            f"bias_factors shapes u {us}, v {vs} must be u [B|1, Tq, H|1, R] = [{batch}|1, {q_len}, {heads}|1, R] "
            f"and v [B|1, Tk, H|1, R] = [{batch}|1, {kv_len}, {heads}|1, R] with the same R >= 1"
        )
    return u, vf


def _check_block_sizes(block_sizes: Any, backend: str) -> dict[str, int] | None:
    """Common checks here; the GPU keys are checked here too, the TPU keys by tpu.py (its own set)."""
    if block_sizes is None:
        return None
    if not isinstance(block_sizes, dict):
        raise ValueError(f"block_sizes must be None or a dict of ints, got {type(block_sizes).__name__}")
    known = BLOCK_SIZE_KEYS + TUNING_KEYS
    for key, value in block_sizes.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"block_sizes[{key!r}]={value!r} must be a positive int")
        if backend != "gpu":
            continue
        if key not in known:
            raise ValueError(
                f"block_sizes key {key!r} is unknown for the GPU kernel; expected keys among {', '.join(known)}"
            )
        if key in BLOCK_SIZE_KEYS and (value < 16 or value & (value - 1)):
            raise ValueError(f"block_sizes[{key!r}]={value!r} must be a power of two >= 16")
    return {key: int(value) for key, value in block_sizes.items()}


def _resolve_backend(backend: str | None, interpret: Any) -> str:
    if backend is not None:
        if backend not in ("gpu", "tpu"):
            raise ValueError(f"backend={backend!r} is not supported; expected None, 'gpu' or 'tpu'")
        return backend
    if interpret is not False and interpret is not None:
        return "gpu"
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    raise ValueError(
        f"no Pallas flash attention kernel for platform '{platform}'; pass backend='gpu' or 'tpu' with "
        "interpret=True to emulate it"
    )


def flash_attention(
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
    block_sizes: dict[str, int] | None = None,
    backend: str | None = None,
    interpret: Any = False,
) -> Array | tuple[Array, dict[str, Array]]:
    """Memory-efficient softmax attention on Pallas kernels (see the module docstring for the options).

    Args:
      q: [B, Tq, H, D]; k, v: [B, Tk, KVH, D] (floating, D <= 256).
      causal / window / segment_ids: visibility (all combined with AND); fully masked kv blocks are skipped.
      bias: [B|1, H|1, Tq, Tk] additive logits bias. bias_factors: (u, v) low-rank bias u v^T per head.
      softcap: logits soft cap (> 0). sinks: float [H] per-head sink logits. scale: default D ** -0.5.
      return_stats: also return {"lse": f32 [B, H, Tq], "key_mass": f32 [B, H, Tk]} (lse differentiable,
        key_mass stop_gradient).
      block_sizes: kernel tiling (None = backend defaults). backend: None (from the platform), "gpu" or "tpu".
      interpret: run the kernels in the Pallas interpreter (True for "gpu"; TPU interpret params for "tpu").
    Returns:
      out [B, Tq, H, D] in q.dtype, or (out, stats) when return_stats.
    """
    check_qkv(q, k, v)
    batch, q_len, heads, head_dim = _shape(q)
    kv_len = _shape(k)[1]
    window = _normalize_window(window)
    segs = _check_segment_ids(segment_ids, batch, q_len, kv_len)
    _check_bias(bias, batch, heads, q_len, kv_len)
    factors = _check_bias_factors(bias_factors, batch, heads, q_len, kv_len)
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap={softcap!r} must be None or a number > 0")
    if sinks is not None and _shape(sinks) != (heads,):
        raise ValueError(f"sinks shape {_shape(sinks)} must be [H] = [{heads}] (one logit per query head)")
    if scale is not None and not (isinstance(scale, (int, float)) and np.isfinite(scale)):
        raise ValueError(f"scale={scale!r} must be None or a finite number")
    name = _resolve_backend(backend, interpret)
    blocks = _check_block_sizes(block_sizes, name)

    args = (
        q,
        k,
        v,
        None if segs is None else segs[0],
        None if segs is None else segs[1],
        None if bias is None else jnp.asarray(bias),
        None if factors is None else jnp.asarray(factors[0]),
        None if factors is None else jnp.asarray(factors[1]),
        None if sinks is None else jnp.asarray(sinks, jnp.float32),
    )
    options = dict(
        causal=bool(causal),
        window=window,
        softcap=None if softcap is None else float(softcap),
        scale=float(head_dim**-0.5 if scale is None else scale),
        return_stats=bool(return_stats),
        block_sizes=blocks,
        interpret=interpret,
    )
    if name == "gpu":
        from pallas_kernels.flash.gpu import flash_attention_gpu

        result = flash_attention_gpu(*args, **options)
    else:
        from pallas_kernels.flash import tpu  # written alongside; imported lazily so GPU use never needs it

        result = tpu.flash_attention_tpu(*args, **options)
    if not return_stats:
        return result
    out, lse, key_mass = result
    return out, {"lse": lse, "key_mass": key_mass}
