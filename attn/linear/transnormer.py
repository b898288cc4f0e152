"""`transnormer`: NormAttention and DiagAttention of TransNormer ([178] "The Devil in Linear Transformer").

NormAttention (use_diag=False) replaces the scaling of linear attention — the denominator phi(q) . sum phi(k),
which the paper shows gives unbounded gradients — by a normalisation of the output:

    q = phi(x W_q), k = phi(c W_k), v = c W_v,  phi = 1 + elu
    O = XNorm(phi(Q) (phi(K)^T V))                      (non-causal; no N x N matrix)
    o_t = XNorm(sum_{s<=t} (q_t . k_s) v_s)             (causal, computed by the chunked-scan core)

with XNorm applied to each token's concatenated head outputs ("srms" = SimpleRMSNorm, as in the authors'
transnormer_t1/t2 configurations; "rmsnorm" / "layernorm" with learned parameters).

DiagAttention (use_diag=True) fights attention dilution in the early layers by confining softmax attention to
non-overlapping diagonal blocks of `diag_block_size` tokens (causal inside the block for decoders):

    o_i = softmax_{j in block(i), j allowed} (q_i . k_j / sqrt(D)) v_j

The paper uses DiagAttention in the lower half of the layers and NormAttention in the upper half; pass
attention_options=[{"use_diag": True}] * (L // 2) + [{}] * (L - L // 2) to the model.

Shapes: x [B, T, E] -> [B, T, E]. NormAttention: time O(B H T (C D + D^2)), memory O(B H T (C + D)); decode state
[B, H, D, D] in "cache". DiagAttention: time and memory O(B H T b D) with block b; decoding keeps the usual KV
cache and attends to the current block (O(cache length) per token, like `softmax`). DiagAttention with
diag_block_size >= T is exactly `softmax` (position="none") attention; NormAttention does not reduce to softmax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core import kv_cache
from attn.core.feature_maps import FEATURE_MAPS
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.validation import choice, positive, positive_int
from attn.linear.linear import BASE_OPTION_DOCS, LinearAttentionBase
from attn.registry import register

Array = jax.Array


@functools.cache
def same_block(block_size: int):
    """Mask function (q_idx, kv_idx) -> q and kv lie in the same block; cached so that it hashes stably under jit."""

    def allowed(q_idx: Array, kv_idx: Array) -> Array:
        return q_idx // block_size == kv_idx // block_size

    return allowed


@register(
    "transnormer",
    family="linear",
    paper="The Devil in Linear Transformer",
    catalog=178,
    op=F.linear_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="NormAttention (output norm instead of the linear-attention denominator) or block-diagonal DiagAttention",
    option_docs={
        "feature_map": "phi of NormAttention: 'elu_plus_one' (1 + elu), 'relu', 'identity' or 'silu'",
        "output_norm": "NormAttention's XNorm over the concatenated heads: 'srms', 'rmsnorm' or 'layernorm'",
        "use_diag": "DiagAttention (block-diagonal softmax) instead of NormAttention; the paper's lower layers",
        "diag_block_size": "block size of DiagAttention",
        **BASE_OPTION_DOCS,
    },
    fidelity="paper",
    reference="the paper's NormAttention (output norm instead of the scaling) and DiagAttention (block-diagonal "
    "softmax); srms as in the authors' transnormer_t1/t2 configurations",
    validators={
        "chunk_size": positive_int,
        "eps": positive,
        "feature_map": choice(*FEATURE_MAPS),
        "output_norm": choice("srms", "rmsnorm", "layernorm"),
        "diag_block_size": positive_int,
    },
)
class TransNormerAttention(LinearAttentionBase):
    """TransNormer's NormAttention, or DiagAttention when use_diag. x [B, T, E] -> [B, T, E]."""

    feature_map: str = "elu_plus_one"
    output_norm: str = "srms"
    use_diag: bool = False
    diag_block_size: int = 64

    mechanism_name = "transnormer"

    def map_features(self, q: Array, k: Array, q_pos: Array, k_pos: Array) -> tuple[Array, Array]:
        phi = FEATURE_MAPS[self.feature_map]
        return phi(q), phi(k)

    def finish(self, y: Array) -> Array:
        return self.norm_heads(y, self.output_norm)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """NormAttention: the base positions and decode index. DiagAttention: unchanged (its KV cache keeps its
        own index, written in `diag_attention`)."""
        if self.use_diag:
            return q, k, v, call
        return super().prepare(q, k, v, call)

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        if not self.use_diag:
            return super().attend(q, k, v, call)
        causal, q_lengths, kv_lengths = self.mask_parts(call)
        return self.diag_attention(
            q,
            k,
            v,
            causal=causal,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            decode=call.decode,
            deterministic=call.deterministic,
        )

    def diag_attention(
        self,
        q: Array,
        k: Array,
        v: Array,
        *,
        causal: bool,
        q_lengths: Array | None,
        kv_lengths: Array | None,
        decode: bool,
        deterministic: bool,
    ) -> Array:
        """Softmax attention inside diagonal blocks: q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, D]."""
        if q.shape[1] != k.shape[1]:
            raise ValueError(
                f"DiagAttention is self-attention: got {q.shape[1]} queries and {k.shape[1]} keys (use_diag=False for "
                "cross-attention)"
            )
        dropout = dict(
            dropout_rate=self.effective_dropout(deterministic),
            dropout_rng=self.dropout_rng(deterministic),
            implementation=self.implementation,
        )
        block = self.diag_block_size
        if decode:
            initialized = kv_cache.cache_is_initialized(self)
            keys, values, mask, start = self.cache_write(k, v, Mask(causal=True))
            if initialized:
                # The cache holds every past key; the mask keeps those of the query's own block.
                mask = mask.replace(mask_fn=same_block(block))
                return F.softmax_attention(q, keys, values, mask=mask, q_offset=start, **dropout)

        batch, length, heads, dim = q.shape
        num_blocks = -(-length // block)
        pad = num_blocks * block - length

        def blocks(x: Array) -> Array:  # [B, T, h, d] -> [B * n, block, h, d], zero-padded
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x
            return x.reshape(batch * num_blocks, block, x.shape[2], x.shape[3])

        valid = jnp.full((batch,), length, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
        starts = jnp.arange(num_blocks, dtype=jnp.int32) * block
        block_lengths = jnp.clip(valid[:, None] - starts[None, :], 0, block).reshape(batch * num_blocks)
        mask = Mask(causal=causal, kv_lengths=block_lengths if (pad or kv_lengths is not None) else None)
        out = F.softmax_attention(blocks(q), blocks(k), blocks(v), mask=mask, **dropout)
        out = out.reshape(batch, num_blocks * block, heads, dim)[:, :length]
        if q_lengths is not None:
            keep = jnp.arange(length)[None, :] < jnp.asarray(q_lengths)[:, None]
            out = jnp.where(keep[:, :, None, None], out, 0.0).astype(out.dtype)
        return out
