"""`decode_partials`: the public entry of the split-KV decode kernel — checks arguments, picks a backend.

    partial s of query i = softmax attention over the filled cache slots of split s (equations: decode/reference.py)

Shapes: q [B, Tq, H, D] (Tq = the few decoded tokens); k [B, L, KVH, D], v [B, L, KVH, Dv] float, or uint8
per-token codes (bits 8, 4 or 2: [B, L, KVH, D bits / 8], n = 8 / bits channels per byte, the first channel in the
lowest bits) with float32 k_scale, k_zero, v_scale, v_zero [B, L, KVH, 1] (x = code * scale + zero); lengths int
[B, KVH] filled slots per (batch, kv head), ragged. H % KVH == 0 (GQA/MQA: kv head h // (H / KVH)). causal: the
queries are the last Tq filled slots (query i sees slots < n - (Tq - 1 - i)). Returns o float32 [S, B, Tq, H, Dv]
and lse float32 [S, B, Tq, H] (-inf and 0 for an empty split), to be merged by log-sum-exp (this package imports
nothing from `attn`; `attn.core.lse_merge.merge_partials` does the merge, `attn.core.kv_cache` dispatches here).

num_splits S: the grid's splits per (batch, kv head); work_units: the units the stream-K share balances over
(default B * KVH * S; `partition.py`); block_k: key tile (power of two >= 16). Backend "gpu": Pallas on Triton
(gpu.py); backend "tpu": Pallas Mosaic (tpu.py; it reads memory tiles of max(block_k, 128) slots). backend None picks
"tpu" on a TPU and "gpu" elsewhere. `interpret=True` runs the chosen kernel in its Pallas interpreter on any platform
(the CPU tests; for "tpu" also a pltpu.InterpretParams).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode.gpu import decode_partials_gpu
from pallas_kernels.decode.partition import effective_block, tiles_per_split
from pallas_kernels.decode.tpu import decode_partials_tpu

Array = jax.Array

BITS = (8, 4, 2)
BACKENDS = ("gpu", "tpu")


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _check(q, k, v, lengths, scales, bits, num_splits, work_units, block_k) -> None:
    if len(_shape(q)) != 4 or not jnp.issubdtype(jnp.result_type(q), jnp.floating):
        raise ValueError(
            f"q must be a float array [batch, q_len, heads, head_dim], got {_shape(q)} {jnp.result_type(q)}"
        )
    batch, _, heads, dim = _shape(q)
    for name, x in (("k", k), ("v", v)):
        if len(_shape(x)) != 4 or _shape(x)[0] != batch:
            raise ValueError(f"{name} must be [batch={batch}, length, kv_heads, width], got shape {_shape(x)}")
    if _shape(k)[:3] != _shape(v)[:3]:
        raise ValueError(f"k {_shape(k)} and v {_shape(v)} must share [batch, length, kv_heads]")
    kv_heads = _shape(k)[2]
    if heads % kv_heads:
        raise ValueError(f"num_heads={heads} (q) must be a multiple of num_kv_heads={kv_heads} (k, v)")
    if _shape(lengths) != (batch, kv_heads):
        raise ValueError(f"lengths has shape {_shape(lengths)}; expected [batch, kv_heads] = {(batch, kv_heads)}")
    if bits is None:
        if any(s is not None for s in scales):
            raise ValueError("k_scale / k_zero / v_scale / v_zero are given but bits is None; pass bits for codes")
        if _shape(k)[3] != dim:
            raise ValueError(f"head_dim mismatch: q has {dim}, k has {_shape(k)[3]}")
    else:
        if bits not in BITS:
            raise ValueError(f"bits={bits!r} must be one of {BITS}")
        per_byte = 8 // bits
        for name, x in (("k", k), ("v", v)):
            if jnp.result_type(x) != jnp.uint8:
                raise ValueError(f"{name} must hold uint8 codes with bits={bits}, got dtype {jnp.result_type(x)}")
        if _shape(k)[3] * per_byte != dim:
            raise ValueError(
                f"k codes {_shape(k)} hold {_shape(k)[3] * per_byte} channels with bits={bits}; q has {dim}"
            )
        for name, x in zip(("k_scale", "k_zero", "v_scale", "v_zero"), scales, strict=True):
            if x is None or _shape(x) != (*_shape(k)[:3], 1):
                raise ValueError(
                    f"{name} must be float32 [B, L, KVH, 1] (one per token), got {None if x is None else _shape(x)}"
                )
    for name, value in (("num_splits", num_splits), ("block_k", block_k)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k} must be a power of two >= 16 (a Triton tile)")
    if work_units is not None and (not isinstance(work_units, int) or work_units <= 0):
        raise ValueError(f"work_units={work_units!r} must be a positive int or None")


def decode_partials(
    q: Array,
    k: Array,
    v: Array,
    lengths: Array,
    *,
    k_scale: Array | None = None,
    k_zero: Array | None = None,
    v_scale: Array | None = None,
    v_zero: Array | None = None,
    bits: int | None = None,
    num_splits: int,
    work_units: int | None = None,
    block_k: int = 64,
    causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    backend: str | None = None,
    interpret: Any = False,
) -> tuple[Array, Array]:
    """Per-split partial results of decode attention (see the module docstring)."""
    scales = (k_scale, k_zero, v_scale, v_zero)
    _check(q, k, v, lengths, scales, bits, num_splits, work_units, block_k)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r} must be a positive float or None")
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend={backend!r} is not supported; expected None or one of {BACKENDS}")
    platform = jax.devices()[0].platform
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu"
    if not interpret and platform != backend:
        raise ValueError(
            f"the split-KV decode kernel for backend={backend!r} needs a {backend.upper()} (platform is "
            f"{platform!r}); pass interpret=True to run it in the Pallas interpreter"
        )
    batch, _, heads, dim = _shape(q)
    kv_heads = _shape(k)[2]
    lengths = jnp.asarray(lengths, jnp.int32)
    units = batch * kv_heads * num_splits if work_units is None else work_units
    share = tiles_per_split(
        lengths, block=effective_block(block_k, _shape(k)[1]), num_splits=num_splits, work_units=units
    )
    kernel = decode_partials_gpu
    if backend == "tpu":
        kernel = functools.partial(decode_partials_tpu, work_units=units)
    return kernel(
        q,
        k,
        v,
        lengths,
        *(None if x is None else jnp.asarray(x, jnp.float32) for x in scales),
        share,
        bits=bits,
        num_splits=num_splits,
        block_k=block_k,
        causal=causal,
        scale=float(dim**-0.5 if scale is None else scale),
        softcap=None if softcap is None else float(softcap),
        interpret=interpret,
    )
