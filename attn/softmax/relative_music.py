"""`relative_music`: Music Transformer relative self-attention with the memory-efficient skewing.

Paper: "Music Transformer" (Huang, Vaswani, Uszkoreit, Shazeer, Simon, Hawthorne, Dai, Hoffman, Dinculescu, Eck,
ICLR 2019; reference code tensor2tensor `dot_product_self_attention_relative_v2`).

Shaw et al. add q_i . a_(j-i) to the logits, which materialises a [L, L, D] tensor of relative embeddings. The
Music Transformer keeps one learned embedding per relative distance and head, E_r [H, L, D] for distances
-(L-1) .. 0 (row r is distance r - (L - 1)), and gets every q_i . e_(j-i) from the single product Q E_r^T:

    QE     = Q E_r^T                                      [B, H, L, L]  (column r: distance r - (L - 1))
    S_rel  = Skew(QE): pad one zero column on the left -> [L, L + 1], reshape -> [L + 1, L], drop the first row
             S_rel[i, j] = q_i . e_(j - i)   for j <= i   (entries j > i are zeroed: the relative term covers keys at
                                                           or before the query, as in the paper's decoder)
    o      = softmax((Q K^T + S_rel) / sqrt(D) + mask) V    (causal mask in the paper)

`max_distance` = M is the number of rows of E_r. For L <= M the last L rows are used; for L > M, distances
beyond M - 1 get a zero relative term (tensor2tensor pads E_r with zeros the same way). Embeddings start at
N(0, D^-1/2) as in tensor2tensor; `share_heads` uses one table for all heads (its heads_share option).

The skew runs for the full forward (no `positions`, no cache offset). With `positions`, or while decoding with
the KV cache (queries at offset t), the same S_rel[i, j] = q_i . e_(kv_pos_j - q_pos_i) is gathered from
Q E_r^T [B, H, Tq, M] instead. Either way the relative term needs O(B H L M) intermediate memory — never the
[L, L, D] tensor of Shaw et al.

position="rope" (not in the paper; default "none") also rotates q and k by RoPE before the scores, so that
configs that set RoPE for every layer (configs/lm_tiny.py) run unchanged; S_rel then uses the rotated queries.

Shapes: x [B, T, E] -> [B, T, E]; E_r [H|1, M, D]. Time O(B H T (T + M) D), memory O(B H T (T + M)).
Positions apply to self-attention only (a context gets plain attention).

Reduction to softmax: with E_r = 0 the relative term vanishes and the layer is exactly the `softmax` layer with
position="none" and the same q/k/v/o parameters.

`RelativeAttentionBase` is the layer shared by the relative mechanisms of this package (`rcmha`, `ripo`): the
`softmax` layer's stages, with an unscaled relative logits term (hook `relative_logits`), scaled by the softmax
scale, as the `prepare` stage's logits bias.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.validation import check_positive, check_rank, choice, positive_int
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array


# ---------------------------------------------------------------------------------------------------- functional
def fit_relative_table(table: Array, length: int) -> Array:
    """Rows of E_r [H|1, M, D] for distances -(length-1) .. 0: the last `length` rows, or zero rows in front."""
    rows = table.shape[1]
    if rows >= length:
        return table[:, rows - length :]
    return jnp.pad(table, ((0, 0), (length - rows, 0), (0, 0)))


def skew(relative: Array) -> Array:
    """Music Transformer skewing: [..., L, L] indexed (i, r = distance + L - 1) -> [..., L, L] indexed (i, j).

    Pad one zero column in front, reshape [L, L + 1] -> [L + 1, L], drop the first row. Entry (i, j) then holds
    relative[i, L - 1 + j - i] for j <= i; entries j > i hold unrelated values (the caller masks them).
    """
    *lead, length, width = relative.shape
    if width != length:
        raise ValueError(f"skew needs a square [..., L, L] input, got shape {relative.shape}")
    padded = jnp.pad(relative, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])
    return padded.reshape(*lead, length + 1, length)[..., 1:, :]


def relative_logits_skewed(q: Array, table: Array) -> Array:
    """S_rel[b, h, i, j] = q[b, i, h] . E_r[h, M - 1 + j - i] for j <= i, else 0, by skewing. float32 [B, H, L, L].

    q: [B, L, H, D]; table E_r: [H|1, M, D], row r is relative distance r - (M - 1).
    """
    length = q.shape[1]
    rows = fit_relative_table(jnp.asarray(table, jnp.float32), length)
    qe = jnp.einsum("bihd,hrd->bhir", q.astype(jnp.float32), jnp.broadcast_to(rows, (q.shape[2], *rows.shape[1:])))
    visible = jnp.tril(jnp.ones((length, length), jnp.bool_))
    return jnp.where(visible, skew(qe), 0.0)


def relative_logits_gathered(q: Array, table: Array, q_positions: Array, kv_positions: Array) -> Array:
    """S_rel[b, h, i, j] = q[b, i, h] . E_r[h, M - 1 + d] with d = kv_pos_j - q_pos_i when -(M-1) <= d <= 0, else 0.

    q: [B, Tq, H, D]; table [H|1, M, D]; positions int [B|1, Tq] and [B|1, Tk] (or 1-D). float32 [B, H, Tq, Tk].
    """
    rows = table.shape[1]
    qe = jnp.einsum("bihd,hrd->bhir", q.astype(jnp.float32), jnp.asarray(table, jnp.float32))
    qp, kp = jnp.asarray(q_positions, jnp.int32), jnp.asarray(kv_positions, jnp.int32)
    qp, kp = (qp[None] if qp.ndim == 1 else qp), (kp[None] if kp.ndim == 1 else kp)
    distance = kp[:, None, :] - qp[:, :, None]  # [B|1, Tq, Tk]
    valid = (distance <= 0) & (distance > -rows)
    index = jnp.clip(distance + rows - 1, 0, rows - 1)
    shape = (q.shape[0], q.shape[2], q.shape[1], kp.shape[-1])
    gathered = jnp.take_along_axis(qe, jnp.broadcast_to(index[:, None], shape), axis=-1)
    return jnp.where(valid[:, None], gathered, 0.0)


# ---------------------------------------------------------------------------------------------------- layers
class RelativeAttentionBase(MultiHeadAttention):
    """Self-attention with an additive relative logits term: softmax(scale (q k^T + S) + mask) v.

    Subclasses implement `relative_logits` (S unscaled, float32 [B, H, Tq, Tk], or None); the `prepare` stage
    turns it into the call's logits bias (the default `score_mod` adds it; the fused path takes it as its bias).
    """

    position: str = "none"

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.decode and call.cross:
            raise ValueError("decode=True is for self-attention; got a context (cross-attention has no KV cache)")

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The `softmax` layer's RoPE and KV cache, then bias = scale * relative_logits(q) (self-attention only)."""
        q, k, v, call = super().prepare(q, k, v, call)
        if call.cross:
            return q, k, v, call
        relative = self.relative_logits(q, k.shape[1], call.positions, call.q_offset, call.decode)
        if relative is not None:
            scale = self.head_dim**-0.5 if self.scale is None else self.scale
            call = call.replace(bias=scale * relative)
        return q, k, v, call

    def relative_logits(self, q: Array, kv_len: int, positions: Array | None, q_offset, decode: bool) -> Array | None:
        """S unscaled, float32 [B, H, Tq, Tk], for queries q [B, Tq, H, D] (rotated, when position="rope") against
        kv_len keys (the cache when decoding, where q_offset is the queries' first slot); None: no relative term."""
        raise NotImplementedError

    def key_positions(self, q_pos: Array, kv_len: int) -> Array:
        """Positions of the keys: the query positions for a plain forward, the cache slots when decoding."""
        return q_pos if kv_len == q_pos.shape[-1] else jnp.arange(kv_len, dtype=jnp.int32)[None]


def relative_table(module: nn.Module, name: str, heads: int, rows: int, head_dim: int, param_dtype) -> Array:
    """Learned E_r [heads, rows, head_dim] ~ N(0, head_dim^-1/2) (tensor2tensor's init)."""
    check_positive("max_distance", rows)
    table = module.param(
        name,
        # A shared table has a heads axis of 1, which must not be sharded over the heads' mesh axis.
        nn.with_logical_partitioning(
            nn.initializers.normal(head_dim**-0.5), ("heads" if heads > 1 else None, "relative_distance", "head_dim")
        ),
        (heads, rows, head_dim),
        param_dtype,
    )
    return jnp.asarray(table, jnp.float32)


def music_relative_logits(
    module: RelativeAttentionBase, table: Array, q: Array, kv_len: int, positions: Array | None, q_offset
) -> Array:
    """S_rel by the skew for a plain forward (no positions, no cache offset), else by the positional gather."""
    if positions is None and isinstance(q_offset, int) and q_offset == 0 and kv_len == q.shape[1]:
        return relative_logits_skewed(q, table)
    q_pos = module.query_positions(positions, q.shape[0], q.shape[1], q_offset)
    return relative_logits_gathered(q, table, q_pos, module.key_positions(q_pos, kv_len))


@register(
    "relative_music",
    family="softmax",
    paper="Music Transformer",
    catalog=224,
    op=relative_logits_skewed,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="learned per-head relative embeddings for distances -(L-1)..0, S_rel by the memory-efficient skew",
    option_docs={
        "position": "'none' (the paper: positions enter only through the relative term) or 'rope' (RoPE on q and k "
        "as well; not in the paper, accepted so that configs that set RoPE for every layer run)",
        "max_distance": "rows M of E_r: relative distances -(M-1)..0 (farther keys get no relative term)",
        "share_heads": "one E_r for all heads instead of one per head",
    },
    fidelity="official-code",
    reference="tensor2tensor dot_product_self_attention_relative_v2 (memory-efficient skew, zero-padded E_r, N(0, "
    "D^-1/2) init)",
    validators={"position": choice("none", "rope"), "max_distance": positive_int},
    has_attention_weights=True,
)
class MusicRelativeAttention(RelativeAttentionBase):
    """Music Transformer relative self-attention. x [B, T, E] -> [B, T, E]."""

    max_distance: int = 2048
    share_heads: bool = False

    def relative_logits(self, q: Array, kv_len: int, positions: Array | None, q_offset, decode: bool) -> Array:
        heads = 1 if self.share_heads else self.num_heads
        table = relative_table(self, "relative_embeddings", heads, self.max_distance, self.head_dim, self.param_dtype)
        if positions is not None:
            check_rank("positions", positions, (1, 2), "[batch, length] or [length]")
        return music_relative_logits(self, table, q, kv_len, positions, q_offset)
