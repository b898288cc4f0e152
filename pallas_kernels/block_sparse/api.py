"""`block_sparse_attention`: the public entry of the block-sparse kernels — checks arguments, picks a backend.

    out_i = sum_j P_ij v_j,  P = softmax over the keys j of the key blocks selected for i's query block
            (and j <= q_offset + i when causal);  lse_i = log sum_j exp(s_ij)      (equations: reference.py)

Index format (shared with attn.core.block_sparse): q [B, Tq, H, D], k and v [B, Tk, KVH, D] with H % KVH == 0
(query head h reads kv head h // (H / KVH)); block_indices int [B|1, H|1, ceil(Tq / block_size), S]: the key
blocks each (batch row, query head, query block) attends to, in any order, padded with -1; duplicates count
once; blocks entirely above the causal diagonal are skipped even if selected. A query row that sees no key gets
output 0 and lse -inf. The last partial block of either sequence is padded inside; padded keys get no weight.

Backends: "gpu" (Pallas on Triton, gpu.py; verified in the interpreter and lowered to Triton IR, never run on a
GPU here) and "tpu" (Pallas Mosaic with scalar-prefetched index lists, tpu.py; verified in the TPU interpreter and
lowered to Mosaic, never run on a TPU here). backend=None takes the platform's; on a CPU it is "gpu" run in the
interpreter. interpret=None compiles when the platform matches the backend and interprets otherwise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash.api import check_qkv

Array = jax.Array


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_block_indices(block_indices: Any, batch: int, heads: int, num_q_blocks: int, num_k_blocks: int) -> Array:
    shape = _shape(block_indices)
    ok = len(shape) == 4 and shape[0] in (1, batch) and shape[1] in (1, heads) and shape[2] == num_q_blocks
    if not ok:
        raise ValueError(
            f"block_indices shape {shape} must be [B|1, H|1, num_q_blocks, max_selected] = "
            f"[{batch}|1, {heads}|1, {num_q_blocks}, S]"
        )
    if not jnp.issubdtype(jnp.result_type(block_indices), jnp.integer):
        raise ValueError(f"block_indices must be an integer array, got dtype {jnp.result_type(block_indices)}")
    if not isinstance(block_indices, jax.core.Tracer):
        values = np.asarray(block_indices)
        bad = (values < -1) | (values >= num_k_blocks)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"block_indices{list(where)}={int(values[where])} is out of range; expected -1 (padding) or a key "
                f"block in [0, {num_k_blocks}) (num_k_blocks = ceil(kv_len / block_size))"
            )
    indices = jnp.asarray(block_indices, jnp.int32)
    if shape[-1] == 0:  # no slot at all: every query row sees no key
        indices = jnp.full((*shape[:3], 1), -1, jnp.int32)
    return indices


def _resolve(backend: str | None, interpret: Any) -> tuple[str, Any]:
    platform = jax.default_backend()
    on_gpu = platform in ("gpu", "cuda", "rocm")
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu"
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"backend={backend!r} is not supported; expected None, 'gpu' or 'tpu'")
    if interpret is None:
        interpret = not (on_gpu if backend == "gpu" else platform == "tpu")
    return backend, interpret


def block_sparse_attention(
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
    interpret: Any = None,
    backend: str | None = None,
) -> Array | tuple[Array, Array]:
    """Exact softmax attention over the selected key blocks of each query block, on Pallas kernels.

    Args:
      q: [B, Tq, H, D]; k, v: [B, Tk, KVH, D] (floating, D <= 256, H a multiple of KVH).
      block_indices: int [B|1, H|1, ceil(Tq / block_size), S], key block ids padded with -1 (module docstring).
      block_size: tokens per query and key block (positive int).
      causal: key j visible from query i only if j <= q_offset + i (token level inside diagonal blocks).
      q_offset: int or int scalar array (may be traced), position of query 0 relative to key 0.
      scale: logits multiplier, default D ** -0.5.
      return_lse: also return lse f32 [B, H, Tq] (differentiable; -inf for rows that see no key).
      interpret: None (compile on the backend's platform, interpret elsewhere), True/False, or TPU InterpretParams.
      backend: None (from the platform), "gpu" or "tpu".
    Returns:
      out [B, Tq, H, D] in q.dtype, or (out, lse) when return_lse. Differentiable in q, k and v.
    """
    check_qkv(q, k, v)
    batch, q_len, heads, head_dim = _shape(q)
    kv_len = _shape(k)[1]
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal={causal!r} must be a bool")
    if not (_is_int(q_offset) or (np.shape(q_offset) == () and jnp.issubdtype(jnp.result_type(q_offset), jnp.integer))):
        raise ValueError(f"q_offset={q_offset!r} must be an int or an int scalar array (position of query 0)")
    if scale is not None and not (isinstance(scale, (int, float, np.floating)) and np.isfinite(scale)):
        raise ValueError(f"scale={scale!r} must be None or a finite number")
    num_q_blocks, num_k_blocks = -(-q_len // block_size), -(-kv_len // block_size)
    indices = _check_block_indices(block_indices, batch, heads, num_q_blocks, num_k_blocks)
    name, interpret = _resolve(backend, interpret)
    options = dict(
        block_size=int(block_size),
        causal=bool(causal),
        scale=float(head_dim**-0.5 if scale is None else scale),
        interpret=interpret,
    )
    if name == "gpu":
        from pallas_kernels.block_sparse.gpu import block_sparse_attention_gpu

        out, lse = block_sparse_attention_gpu(q, k, v, indices, q_offset, **options)
    else:
        from pallas_kernels.block_sparse.tpu import block_sparse_attention_tpu

        out, lse = block_sparse_attention_tpu(q, k, v, indices, q_offset, **options)
    return (out, lse) if return_lse else out
