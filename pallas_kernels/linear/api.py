"""`lightning_attention`: causal linear attention with an optional per-head decay, as Pallas kernels (Lightning
Attention-2 tiling, Qin et al. 2024), for GPU (Triton) and TPU (Mosaic), differentiable in every float input.

    S_t = lambda_h S_{t-1} + k_t v_t^T,     o_t = q_t S_t                  (S_{-1} = initial_state, default 0)

computed chunk by chunk (C tokens): O_n = [(Q_n K_n^T) ⊙ W] V_n + lam ⊙ (Q_n S_{n-1}), with W[i, j] = lambda^(i-j)
(j <= i), lam_i = lambda^(i+1), and S_n = lambda^C S_{n-1} + (gam ⊙ K_n)^T V_n, gam_j = lambda^(C-1-j) — the
"recurrent"/"chunked" forms of attn/core/linear_scan.py with no feature map and no normalisation (the caller applies
those). Time O(T C (Dk + Dv) + T Dk Dv) per head, memory O(T (Dk + Dv)): linear in T, no T x T array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.linear.gpu import gpu_chunk_size, lightning_attention_gpu
from pallas_kernels.linear.tpu import lightning_attention_tpu, tpu_chunk_size
from pallas_kernels.linear.validation import check_lightning_args

Array = jax.Array

BACKENDS = ("gpu", "tpu")


def resolve_backend(backend: str | None, interpret: bool) -> str:
    """backend=None picks the default device's kernel ("gpu"/"tpu"); under interpret=True it means "gpu"."""
    if backend is None:
        if interpret:
            return "gpu"
        platform = jax.default_backend()
        if platform in BACKENDS:
            return platform
        raise ValueError(
            f"no Pallas lightning attention kernel for platform '{platform}'; pass backend='gpu' or 'tpu' with "
            "interpret=True to emulate it"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; expected None, 'gpu' or 'tpu'")
    return backend


def lightning_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    decay: Array | None = None,
    initial_state: Array | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> Array | tuple[Array, Array]:
    """Causal linear attention (no feature map, no normaliser) with an optional per-head decay.

    Args:
      q: [B, T, H, Dk] queries. k: [B, T, KVH, Dk] keys. v: [B, T, KVH, Dv] values. H % KVH == 0 (GQA/MQA: query
        head h reads kv head h // (H // KVH); K/V are never repeated in memory). Dk, Dv <= 256; any T >= 1.
      decay: None (lambda = 1) or float [H] (or a scalar) in (0, 1]: per-head decay of the state per token.
      initial_state: float [B, H, Dk, Dv], the state before the first token (default 0), e.g. the final state of
        the previous piece of the sequence.
      return_state: also return the state after the last token, float32 [B, H, Dk, Dv].
      chunk_size: tokens per chunk. GPU: a power of two >= 16, default min(64, next power of two >= T, >= 16).
        TPU: a multiple of 8, default min(128, T rounded up to 8). T is zero-padded to a multiple of it.
      backend: None (the default device's kernel; "gpu" under interpret=True), "gpu" or "tpu".
      interpret: run the kernel in Pallas interpret mode (CPU emulation, for tests).
    Returns:
      out [B, T, H, Dv] in q.dtype, or (out, final_state f32 [B, H, Dk, Dv]) when return_state. Gradients flow to
      q, k, v, decay and initial_state. Internally float32 (raw q.k and dO.v products in the input dtype with
      float32 accumulation).
    """
    batch, _, heads, key_dim, value_dim, _ = check_lightning_args(q, k, v, decay, initial_state)
    backend = resolve_backend(backend, interpret)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}; expected None or a positive int")
    length = q.shape[1]
    chunk = gpu_chunk_size(chunk_size, length) if backend == "gpu" else tpu_chunk_size(chunk_size, length)
    kernel = lightning_attention_gpu if backend == "gpu" else lightning_attention_tpu

    dtype = jnp.result_type(q, k, v)
    log_decay = (
        jnp.zeros((heads,), jnp.float32)
        if decay is None
        else jnp.log(jnp.broadcast_to(jnp.asarray(decay, jnp.float32), (heads,)))
    )
    state = (
        jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
        if initial_state is None
        else jnp.asarray(initial_state).astype(jnp.float32)
    )
    out, final = kernel(q.astype(dtype), k.astype(dtype), v.astype(dtype), log_decay, state, chunk, interpret)
    out = out.astype(q.dtype)
    return (out, final) if return_state else out
