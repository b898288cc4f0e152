"""`s2_attention`: Sparsely-Sharded (S2) attention, from "Efficient LLM Training and Serving with Heterogeneous
Context Sharding among Attention Heads" (Lin et al., catalog [54]; the paper's code is DKernel, linxihui/dkernel,
also the block-sparse attention of Phi-3-small).

Every head attends to a different shard of the context, and the shards of all heads together cover it. Queries and
keys are grouped into blocks of `block_size` tokens; with query block bq = i // block_size, key block bk = j //
block_size and the head's pattern index g (its kv head: query heads that share a kv head share its pattern, so
the KV cache of a kv head only needs the blocks of its own shard):

    allowed_g(i, j) = j <= i  and  [ bq - bk < local_blocks                            (local blocks)
                                     or (bk + g + stride_offset) mod vert_stride == 0 ]  (the head's strided shard)
    o_h = softmax(q_h k_g^T / sqrt(D) + (-inf where not allowed_g)) v_g,   g = h // (H / KVH)

(DKernel writes the shard test as (bk + g * step + offset) mod vert_stride == 0 with step = max(1, vert_stride //
num_heads); when the heads cover the context, num_kv_heads >= vert_stride and step = 1. The vLLM/Phi-3-small
version uses offset 1; DKernel's current default is 0.) Kv head g keeps the keys of block residue class
-(g + stride_offset) mod vert_stride, so the union over heads of the strided shards is every block, and the union
of the head patterns is the full causal mask (this needs num_kv_heads >= vert_stride, which is checked).

The pattern is an `attn.Mask` with causal=True and a per-head block mask bool [1, H, nb, nb] with block_size
(block_size, block_size), so block-sparse kernels can skip the blocks a head does not see; the reference path
evaluates it densely. Decoding uses the base KV cache: the mask is evaluated at absolute query positions (q_offset)
over the cache length. Positions, GQA/MQA, softcap and the other `softmax` options are inherited.

Shapes: x [B, T, E] -> [B, T, E]. Time per head O(T (local_blocks + T / (vert_stride block_size)) block_size D)
with a block-sparse kernel (O(T^2) in the dense reference path), KV footprint per kv head about 1 / vert_stride of
the context plus the local window. vert_stride = 1 (or local_blocks >= the number of blocks) reduces exactly to
causal `softmax` attention. The layer is always causal (S2 is a decoder pattern); cross-attention is not supported.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.validation import non_negative_int, positive_int
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array


def check_s2_cover(*, vert_stride: int, stride_offset: int, num_kv_heads: int) -> None:
    """ValueError naming the option when the head shards cannot cover the context (the values themselves are
    checked by the layer's validators)."""
    if stride_offset >= vert_stride:
        raise ValueError(f"stride_offset={stride_offset!r} must be an int in [0, vert_stride={vert_stride})")
    if num_kv_heads < vert_stride:
        raise ValueError(
            f"vert_stride={vert_stride} needs at least {vert_stride} distinct head patterns for the heads' shards to "
            f"cover the context together, but num_kv_heads={num_kv_heads} (query heads share their kv head's "
            f"pattern); use vert_stride <= {num_kv_heads} or more kv heads"
        )


def s2_block_mask(
    num_blocks: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    local_blocks: int,
    vert_stride: int,
    stride_offset: int = 0,
) -> np.ndarray:
    """The per-head block pattern, bool [1, num_heads, num_blocks, num_blocks] (query block, key block).

    Includes the block-level causal constraint bq >= bk; the token-level one inside diagonal blocks comes from
    the Mask's causal flag.
    """
    q_block = np.arange(num_blocks)[:, None]
    k_block = np.arange(num_blocks)[None, :]
    kv_index = np.arange(num_heads) // (num_heads // num_kv_heads)  # pattern of each query head
    strided = (k_block[None] + kv_index[:, None, None] + stride_offset) % vert_stride == 0  # [H, 1, nb]
    allowed = (q_block >= k_block) & ((q_block - k_block < local_blocks) | strided)
    return allowed[None]


def s2_mask(
    kv_len: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    local_blocks: int,
    vert_stride: int,
    stride_offset: int = 0,
    base: Mask | None = None,
) -> Mask:
    """`base` (padding, segments, cache fill, ...) AND causal AND the S2 per-head block pattern over kv_len keys.

    Queries are absolute positions < kv_len (self-attention, or decoding over a cache of kv_len slots).
    """
    base = Mask() if base is None else base
    if base.block_mask is not None:
        raise ValueError(
            "s2_attention builds its own per-head block_mask; the given mask already has one (block_size="
            f"{base.block_size}); pass padding, segments or a mask_fn instead"
        )
    blocks = s2_block_mask(
        math.ceil(kv_len / block_size),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        local_blocks=local_blocks,
        vert_stride=vert_stride,
        stride_offset=stride_offset,
    )
    return base.replace(causal=True, block_mask=blocks, block_size=(block_size, block_size))


@register(
    "s2_attention",
    family="local",
    paper="Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention Heads",
    catalog=54,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_gqa=False,
    supports_decode=True,
    summary="S2: each kv head sees local blocks plus its own strided block shard; the heads together cover the "
    "causal context",
    option_docs={
        "block_size": "tokens per query/key block of the sparse pattern (DKernel default 64)",
        "local_blocks": "number of most recent key blocks (the query's own included) every head sees",
        "vert_stride": "stride of the strided key blocks; kv head g sees blocks with (b + g + stride_offset) % "
        "vert_stride == 0 (needs num_kv_heads >= vert_stride; 1 = dense causal)",
        "stride_offset": "offset of the head shards, in [0, vert_stride) (DKernel 0; vLLM/Phi-3-small 1)",
    },
    fidelity="official-code",
    reference="github.com/linxihui/dkernel (DKernel): local blocks plus a vertical-stride block shard per kv head; "
    "stride_offset 0 (DKernel) or 1 (vLLM / Phi-3-small)",
    validators={
        "block_size": positive_int,
        "local_blocks": positive_int,
        "vert_stride": positive_int,
        "stride_offset": non_negative_int,
    },
    has_attention_weights=True,
)
class S2Attention(MultiHeadAttention):
    """S2-Attention: causal multi-head attention whose heads see heterogeneous strided block shards.
    x [B, T, E] -> [B, T, E]."""

    block_size: int = 64
    local_blocks: int = 4
    vert_stride: int = 4
    stride_offset: int = 0

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.cross:
            raise ValueError(
                f"s2_attention is causal self-attention; got a context of shape {call.context.shape} (cross-attention "
                "is not supported)"
            )
        check_s2_cover(vert_stride=self.vert_stride, stride_offset=self.stride_offset, num_kv_heads=self.kv_heads)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The softmax layer's positions and cache, then the call's mask AND causal AND the S2 per-head block
        pattern over the k.shape[1] keys (the cache length when decoding)."""
        q, k, v, call = super().prepare(q, k, v, call)
        pattern = s2_mask(
            k.shape[1],
            num_heads=self.num_heads,
            num_kv_heads=self.kv_heads,
            block_size=self.block_size,
            local_blocks=self.local_blocks,
            vert_stride=self.vert_stride,
            stride_offset=self.stride_offset,
            base=call.mask,
        )
        return q, k, v, call.replace(mask=pattern)
