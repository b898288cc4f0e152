"""Static plan of the GPU flash attention kernels: block sizes, padded shapes, warps, and BlockSpec helpers.

Block-size keys (all powers of two >= 16; each is clipped to the padded length it tiles):

    block_q, block_k          forward kernel: query rows per program, keys per inner-loop step (default 128, 64)
    block_q_dkv, block_k_dkv  dK/dV kernel (and key_mass kernel): q rows per step, keys per program (64, 128)
    block_q_dq, block_k_dq    dQ kernel: query rows per program, keys per step (128, 64)
    num_warps                 Triton warps per program (default 4 when the padded head_dim <= 64, else 8)
    num_stages                software-pipelining depth of the inner loops (default 3 when head_dim <= 128, else 2)

Sequences are padded (in the wrapper, only when needed) to a multiple of the largest block along them, the head
dim to a power of two >= 16 and the bias-factor rank to a power of two >= 16, so every tile a kernel loads is a
power-of-two shape (a Triton requirement). Padded keys are masked; padded queries are masked and sliced off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jax.experimental import pallas as pl

from pallas_kernels.flash.tiling import MaskSpec

BLOCK_SIZE_KEYS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")
TUNING_KEYS = ("num_warps", "num_stages")
DEFAULT_BLOCKS = {
    "block_q": 128,
    "block_k": 64,
    "block_q_dkv": 64,
    "block_k_dkv": 128,
    "block_q_dq": 128,
    "block_k_dq": 64,
}
MIN_BLOCK = 16


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_dim(n: int) -> int:
    """Power of two >= max(n, 16): the width a feature axis (head_dim, bias rank) is padded to."""
    return max(MIN_BLOCK, next_power_of_2(n))


@dataclasses.dataclass(frozen=True)
class GpuPlan:
    """Everything static about one call of the GPU kernels (hashable, so it can be a custom_vjp static arg)."""

    spec: MaskSpec
    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    q_len_padded: int
    kv_len_padded: int
    head_dim_padded: int
    num_warps: int
    num_stages: int
    interpret: Any

    def compiler_params(self, num_warps: int | None = None) -> Any:
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=num_warps or self.num_warps, num_stages=self.num_stages)


def make_plan(spec: MaskSpec, head_dim: int, block_sizes: dict[str, int] | None, interpret: Any) -> GpuPlan:
    """Clips the requested blocks to the sequence lengths and derives the padded shapes."""
    sizes = dict(DEFAULT_BLOCKS)
    sizes.update({k: v for k, v in (block_sizes or {}).items() if k in BLOCK_SIZE_KEYS})
    q_cap = padded_dim(spec.q_len)
    kv_cap = padded_dim(spec.kv_len)
    for key in BLOCK_SIZE_KEYS:
        sizes[key] = min(sizes[key], q_cap if key.startswith("block_q") else kv_cap)
    q_mult = max(sizes["block_q"], sizes["block_q_dkv"], sizes["block_q_dq"])
    kv_mult = max(sizes["block_k"], sizes["block_k_dkv"], sizes["block_k_dq"])
    q_len_padded = -(-spec.q_len // q_mult) * q_mult
    kv_len_padded = -(-spec.kv_len // kv_mult) * kv_mult
    head_dim_padded = padded_dim(head_dim)
    tuning = block_sizes or {}
    num_warps = tuning.get("num_warps", 4 if head_dim_padded <= 64 else 8)
    num_stages = tuning.get("num_stages", 3 if head_dim_padded <= 128 else 2)
    spec = dataclasses.replace(spec, q_padded=q_len_padded != spec.q_len, kv_padded=kv_len_padded != spec.kv_len)
    return GpuPlan(
        spec=spec,
        q_len_padded=q_len_padded,
        kv_len_padded=kv_len_padded,
        head_dim_padded=head_dim_padded,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        **sizes,
    )


def broadcast_index(shape: tuple[int, ...], batch_axis: int, head_axis: int) -> Callable[[Any, Any], tuple]:
    """(b, h) -> (b or 0, h or 0): the block coordinates of an operand that may broadcast over batch or heads."""
    per_batch = shape[batch_axis] > 1
    per_head = shape[head_axis] > 1
    return lambda b, h: (b if per_batch else 0, h if per_head else 0)


def query_block_specs(q, k, q_seg, kv_seg, bias, u, vf, groups: int, bq: int) -> list:
    """BlockSpecs of q, k, v, segment ids, bias and bias factors for the kernels whose grid is (q block i, b, h):
    one [bq] block of queries of head h against the whole key range of its kv head h // groups."""
    dim, kv_len = q.shape[-1], k.shape[1]
    specs = [
        pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, kv_len, None, dim), lambda i, b, h: (b, 0, h // groups, 0)),
        pl.BlockSpec((None, kv_len, None, dim), lambda i, b, h: (b, 0, h // groups, 0)),
        None if q_seg is None else pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
        None if kv_seg is None else pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
    ]
    if bias is None:
        specs.append(None)
    else:
        bidx = broadcast_index(bias.shape, 0, 1)
        specs.append(pl.BlockSpec((None, None, bq, kv_len), lambda i, b, h: (*bidx(b, h), i, 0)))
    if u is None:
        specs += [None, None]
    else:
        rank = u.shape[-1]
        uidx, vidx = broadcast_index(u.shape, 0, 2), broadcast_index(vf.shape, 0, 2)
        specs.append(pl.BlockSpec((None, bq, None, rank), lambda i, b, h: (uidx(b, h)[0], i, uidx(b, h)[1], 0)))
        specs.append(pl.BlockSpec((None, kv_len, None, rank), lambda i, b, h: (vidx(b, h)[0], 0, vidx(b, h)[1], 0)))
    return specs
