"""`rala`: Rank-Augmented Linear Attention ([120] "Breaking the Low-Rank Dilemma of Linear Attention", the
token mixer of RAVLT).

Linear attention phi(Q) (phi(K)^T V) has a low-rank KV buffer and low-rank outputs. RALA raises both ranks while
staying linear in N (the official GateLinearAttentionNoSilu of qhfan/RALA, phi = elu + 1, s = 1 / sqrt(d)):

    q_i = phi(x_i W_q),  k_j = phi(x_j W_k),  v_j = x_j W_v,  g_i = x_i W_g
    alpha = softmax_j(s qbar . k_j),  qbar = mean_i q_i              context-aware weights of the KV buffer
    k~_j  = N alpha_j k_j                                           (mean weight 1)
    y_i   = [R(q_i) . (1/N) sum_j R(k~_j) v_j^T] / [q_i . (1/N) sum_j k~_j + eps]
    o_i   = (y_i + LePE(v)_i) ⊙ g_i                                 element-wise output gate (rank augmentation)

R is RoPE (the official code rotates q and k~ in the numerator only; RAVLT's RoPE is 2-D, here 1-D over the
sequence) and LePE a depthwise convolution of V over the tokens (official 5 x 5 on the grid; here 1-D, kernel
`lepe_kernel_size`). The numerator is the non-causal `attn.functional.linear_attention` core; no N x N array.

RALA is non-causal: qbar and the softmax over j see the whole sequence (it is a vision token mixer), so it has no
causal mask and no decode mode. Padding (q_lengths / kv_lengths) removes padded tokens from qbar, the softmax,
N and the sums.

Shapes: x [B, N, E] -> [B, N, E]; GQA repeats k and v to the query heads. Time O(B H N D^2), memory
O(B H N D). Reductions: kv_weighting=False, gate=False, position="none", lepe_kernel_size=0 gives exactly the
non-causal `linear` attention (elu + 1, normalised; eps multiplied by N, as in the official code). Nothing reduces
it to softmax attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core import positions as pos
from attn.core.conv import HeadwiseDepthwiseConv, kernel_size_or_off
from attn.core.feature_maps import elu_plus_one
from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.linear_scan import linear_mask_parts, repeat_kv
from attn.core.padding import length_mask
from attn.core.validation import check_positive, check_qkv, choice, optional, positive, positive_int
from attn.registry import register

Array = jax.Array

POSITIONS = ("rope", "none")


def rank_augmented_linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    kv_weighting: bool = True,
    positions: Array | None = None,
    rope_base: float = 10000.0,
    scale: float | None = None,
    eps: float = 1e-6,
    q_lengths: Array | None = None,
    kv_lengths: Array | None = None,
    chunk_size: int = 64,
    implementation: str | None = None,
) -> Array:
    """RALA's attention part y (see the module docstring; the LePE term and the gate belong to the layer).

    Args:
      q: [B, N, H, D], k: [B, M, KVH, D], v: [B, M, KVH, Dv], before the feature map phi = elu + 1.
      kv_weighting: re-weight the keys by N softmax_j(s qbar . k_j) (False: plain linear attention).
      positions: int [B, N] (self-attention, M == N) to apply RoPE in the numerator; None: no RoPE.
      rope_base: RoPE base. scale: s (default 1/sqrt(D)). eps: added to the mean-normalised denominator.
      q_lengths, kv_lengths: int [B] padding lengths. chunk_size, implementation: of the linear-attention core.
    Returns:
      y [B, N, H, Dv] in q.dtype (padded rows 0).
    """
    heads, _ = check_qkv(q, k, v)
    batch, q_len, _, dim = q.shape
    kv_len = k.shape[1]
    if positions is not None and q_len != kv_len:
        raise ValueError(f"RoPE positions need self-attention (q_len == kv_len), got {q_len} and {kv_len}")
    check_positive("eps", eps)
    scale = dim**-0.5 if scale is None else scale
    q_valid = jnp.ones((batch, q_len)) if q_lengths is None else length_mask(q_lengths, batch, q_len, "q_lengths")
    kv_valid = jnp.ones((batch, kv_len)) if kv_lengths is None else length_mask(kv_lengths, batch, kv_len, "kv_lengths")
    phi_q = elu_plus_one(q.astype(jnp.float32)) * q_valid[:, :, None, None]
    phi_k = repeat_kv(elu_plus_one(k.astype(jnp.float32)), heads) * kv_valid[:, :, None, None]
    values = repeat_kv(v.astype(jnp.float32), heads)
    num_keys = jnp.sum(kv_valid, axis=1)[:, None, None, None]  # [B, 1, 1, 1]

    if kv_weighting:
        mean_query = jnp.sum(phi_q, axis=1) / jnp.maximum(jnp.sum(q_valid, axis=1), 1.0)[:, None, None]  # [B, H, D]
        logits = jnp.einsum("bhd,bshd->bsh", scale * mean_query, phi_k)
        logits = jnp.where(kv_valid[:, :, None] > 0, logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=1)
        weights = jnp.where(kv_valid[:, :, None] > 0, weights, 0.0)  # all-padded rows: 0, not NaN
        phi_k = phi_k * (num_keys[..., 0] * weights)[..., None]

    keys = phi_k / jnp.maximum(num_keys, 1.0)  # the official 1/N (sqrt(N)^-1 on K and on V)
    denominator = jnp.einsum("bthd,bhd->bth", phi_q, jnp.sum(keys, axis=1)) + eps
    num_q, num_k = phi_q, keys
    if positions is not None:
        inv_freq, _ = pos.rope_frequencies(dim, base=rope_base)
        num_q, num_k = pos.apply_rope(phi_q, positions, inv_freq), pos.apply_rope(keys, positions, inv_freq)
    numerator = F.linear_attention(
        num_q, num_k, values, causal=False, chunk_size=chunk_size, implementation=implementation
    )
    return (numerator / denominator[..., None] * q_valid[:, :, None, None]).astype(q.dtype)


@register(
    "rala",
    family="linear",
    paper="Breaking the Low-Rank Dilemma of Linear Attention",
    catalog=120,
    op=rank_augmented_linear_attention,
    input_kind="sequence",
    supports_causal=False,
    supports_decode=False,
    summary="rank-augmented linear attention: query-aware KV-buffer weights, LePE, element-wise output gate",
    option_docs={
        "kv_weighting": "re-weight the KV buffer by N softmax_j(qbar . k_j / sqrt(d)) (KV-buffer rank augmentation)",
        "gate": "multiply the output element-wise by x W_g (output rank augmentation)",
        "position": "'rope' (RoPE on q and k in the numerator, as in RAVLT) or 'none'",
        "rope_base": "RoPE base (theta)",
        "lepe_kernel_size": "kernel of the depthwise convolution of V added before the gate (0 = off; paper: 5)",
        "scale": "scale of the KV-buffer logits (None = 1/sqrt(head_dim))",
        "eps": "added to the mean-normalised denominator",
        "chunk_size": "chunk of the linear-attention core",
    },
    fidelity="official-code",
    reference="github.com/qhfan/RALA GateLinearAttentionNoSilu (RoPE and LePE are 1-D here, 2-D there)",
    validators={
        "position": choice(*POSITIONS),
        "eps": positive,
        "lepe_kernel_size": kernel_size_or_off,
        "scale": optional(positive),
        "chunk_size": positive_int,
    },
)
class RankAugmentedLinearAttention(AttentionLayer):
    """RALA (non-causal). x [B, N, E] -> [B, N, E]."""

    kv_weighting: bool = True
    gate: bool = True
    position: str = "rope"
    rope_base: float = 10000.0
    lepe_kernel_size: int = 5
    scale: float | None = None
    eps: float = 1e-6
    chunk_size: int = 64

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.cross:
            raise ValueError(
                f"rala is self-attention (its gate and LePE act per token); got a context {call.context.shape}"
            )
        if call.decode:
            raise ValueError("decode=True is not supported by rala: it is not causal (qbar averages every query)")
        if self.mask_parts(call)[0]:
            raise ValueError("rala is not causal: the KV-buffer weights use the mean of all queries; got a causal mask")

    def mask_parts(self, call: AttentionCall) -> tuple[bool, Array | None, Array | None]:
        """(causal, q_lengths, kv_lengths) of the call's mask; other mask parts raise."""
        return linear_mask_parts(call.mask, "rala")

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """q_positions int [B, N] for RoPE (applied inside the op, to the numerator only); no cache."""
        positions = self.query_positions(call.positions, q.shape[0], q.shape[1], 0) if self.position == "rope" else None
        return q, k, v, call.replace(q_positions=positions)

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, N, H, D], k/v [B, N, KVH, D] -> [B, N, H, Dv]: RALA plus LePE(V), padded rows 0 (the output gate
        follows in the template)."""
        _, q_lengths, kv_lengths = self.mask_parts(call)
        length = q.shape[1]
        y = rank_augmented_linear_attention(
            q,
            k,
            v,
            kv_weighting=self.kv_weighting,
            positions=call.q_positions,
            rope_base=self.rope_base,
            scale=self.scale,
            eps=self.eps,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            chunk_size=self.chunk_size,
            implementation=self.implementation,
        )
        if self.lepe_kernel_size:
            values = repeat_kv(v, self.num_heads)
            if kv_lengths is not None:
                values = values * (jnp.arange(length) < jnp.asarray(kv_lengths)[:, None])[:, :, None, None]
            lepe = HeadwiseDepthwiseConv(
                self.lepe_kernel_size, dtype=self.dtype, param_dtype=self.param_dtype, name="lepe"
            )
            y = y + lepe(values).astype(y.dtype)
        if q_lengths is not None:
            y = y * (jnp.arange(length) < jnp.asarray(q_lengths)[:, None])[:, :, None, None].astype(y.dtype)
        return y

    def output_gate(self, x: Array) -> Array | None:
        """The output rank augmentation: an element-wise gate x W_g [B, N, H, Dv] (no activation)."""
        return self.dense_heads(x, self.num_heads, "heads", "gate") if self.gate else None
