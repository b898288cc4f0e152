"""`flashbias`: attention with an additive bias given as low-rank factors folded into q and k.

Paper: "FlashBias: Fast Computation of Attention with Bias" (Wu, Guo, Ma, Sun, Wang, Matusik, Long, NeurIPS
2025; code github.com/thuml/FlashBias).

If the bias is B = U W^T with U [Tq, r] and W [Tk, r], then

    scale q k^T + U W^T = [scale q, U] [k, W]^T

so a bias-free attention kernel run on q' = [scale q, U], k' = [k, W] (head dim D + r, logit scale 1) computes
biased attention; the [Tq, Tk] bias is never materialised (O(T r) memory for it instead of O(T^2)), and any
fused kernel (cuDNN, Pallas flash) can run it. Factors here are zero-padded so that D + r is a multiple of 8
(zeros change no dot product; fused GPU kernels want such head sizes).

Factors:
  * ALiBi, exact, causal: -m_h (i - j) = u_i . w_j with u_i = [m_h, -m_h i], w_j = [j, 1] (rank 2). It equals the
    dense ALiBi bias -m_h |i - j| on every visible (j <= i) pair, so the result is exactly ALiBi attention (the
    FlashBias paper's language-model case, `alibi_factors`). The bidirectional -m|i - j| is not low rank; use the
    truncated-SVD approximation there.
  * Any dense bias, top-r truncated SVD, B ~ U_r S_r V_r^T, u = U_r sqrt(S_r), w = V_r sqrt(S_r) (the paper's
    route for Swin's relative-position bias, `svd_factors`); exact at full rank, error decreasing in r.
  * Learned (factors="learned" in the layer): per-head position tables u = U_h[pos_i], w = W_h[pos_j] of rank r
    (a learned low-rank relative/absolute bias, the paper's "neural decomposition" specialised to positions).

Shapes: q [B, Tq, H, D], k/v [B, Tk, KVH, D], u [B|1, Tq, H, r], w [B|1, Tk, KVH|H, r] (w with H heads when the
bias is head-specific on both sides: k and v are then repeated over the query groups). Time O(B H Tq Tk (D + r)).

Reduction to softmax: zero factors (u = 0) give `softmax_attention` (up to the rounding of folding the scale into
q); the layer with factors="alibi" and a causal mask equals the `softmax` layer with position="alibi" and the same
parameters (to float rounding, tested at 1e-5).

In the layer the factors are the `prepare` stage's bias (`position_bias` returns them) and `attend` folds them
into q and k (`fold_factors`): a plain call runs the fused kernel on the folded q', k'; a call that needs the
pipeline's explicit stages (an intervention on the logits or weights, a capture, dropout) runs them on the same
q', k', so its `attention_logits` are the biased logits scale q k^T + u w^T, never built from a dense bias.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core import pipeline
from attn.core import positions as pos
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.validation import check_positive, check_rank, choice, positive_int
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

FACTORS = ("alibi", "learned")
POSITIONS = ("none", "rope")


# ---------------------------------------------------------------------------------------------------- factors
def alibi_factors(num_heads: int, q_positions: Array, kv_positions: Array) -> tuple[Array, Array]:
    """Exact rank-2 factors of the causal ALiBi bias: u_i . w_j = -slope_h (i - j).

    q_positions: int [Tq] or [B, Tq]; kv_positions: int [Tk] or [B, Tk].
    Returns u float32 [B|1, Tq, H, 2] and w float32 [B|1, Tk, 1, 2] (one kv head: it broadcasts over all).
    """
    qp = jnp.asarray(q_positions, jnp.float32)
    kp = jnp.asarray(kv_positions, jnp.float32)
    qp, kp = (p[None] if p.ndim == 1 else p for p in (qp, kp))
    slopes = jnp.asarray(pos.alibi_slopes(num_heads))[None, None, :]  # [1, 1, H]
    u = jnp.stack([jnp.broadcast_to(slopes, (*qp.shape, num_heads)), -slopes * qp[..., None]], axis=-1)
    w = jnp.stack([kp, jnp.ones_like(kp)], axis=-1)[:, :, None, :]
    return u, w


def svd_factors(bias: Array, rank: int) -> tuple[Array, Array]:
    """Top-`rank` factors of a dense bias [B|1, H, Tq, Tk] (or [H, Tq, Tk]) by truncated SVD.

    Returns u [B|1, Tq, H, rank] and w [B|1, Tk, H, rank] with u w^T the best rank-`rank` approximation of each
    head's bias (exact when rank >= min(Tq, Tk)).
    """
    check_rank("bias", bias, (3, 4), "[batch|1, heads, q_len, kv_len]")
    bias = jnp.asarray(bias, jnp.float32)
    bias = bias[None] if bias.ndim == 3 else bias
    check_positive("rank", rank)
    rank = min(int(rank), *bias.shape[-2:])
    left, singular, right_t = jnp.linalg.svd(bias, full_matrices=False)
    root = jnp.sqrt(singular[..., :rank])[..., None, :]  # [B, H, 1, r]
    u = left[..., :rank] * root  # [B, H, Tq, r]
    w = jnp.swapaxes(right_t[..., :rank, :], -1, -2) * root  # [B, H, Tk, r]
    return jnp.swapaxes(u, 1, 2), jnp.swapaxes(w, 1, 2)


# ---------------------------------------------------------------------------------------------------- functional
def fold_factors(
    q: Array, k: Array, v: Array, u: Array | None, w: Array | None, *, scale: float | None = None
) -> tuple[Array, Array, Array]:
    """(q', k', v) with q' k'^T = scale q k^T + u w^T: q' = [scale q, u], k' = [k, w], factors zero-padded so that
    D + r is a multiple of 8. u, w None (no bias): q' = scale q, k' = k. Attention with logit scale 1 on (q', k', v)
    is biased attention on (q, k, v).

    q [B, Tq, H, D], k [B, Tk, KVH, D], v [B, Tk, KVH, Dv]; u [B|1, Tq, H, r]; w [B|1, Tk, KVH|1|H, r] (with H heads,
    k and v are repeated over the query groups). Returns q' [B, Tq, H, D + r + pad] and k' [B, Tk, KVH|H, D + r +
    pad] in q's and k's dtypes, and v (repeated when w has H heads).
    """
    batch, q_len, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    scaled = q * jnp.asarray(scale, q.dtype)
    if u is None and w is None:
        return scaled, k, v
    if u is None or w is None:
        raise ValueError(f"u and w must be given together (or both None), got u={u!r} and w={w!r}")
    check_rank("u", u, 4, "[batch|1, q_len, heads, rank]")
    check_rank("w", w, 4, "[batch|1, kv_len, kv_heads|1|heads, rank]")
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if u.shape[1:3] != (q_len, heads) or u.shape[0] not in (1, batch):
        raise ValueError(f"u has shape {u.shape}; expected [batch|1, q_len={q_len}, heads={heads}, rank]")
    if w.shape[1] != kv_len or w.shape[2] not in (1, kv_heads, heads) or w.shape[0] not in (1, batch):
        raise ValueError(
            f"w has shape {w.shape}; expected [batch|1, kv_len={kv_len}, kv_heads={kv_heads} (or 1 or "
            f"heads={heads}), rank]"
        )
    if u.shape[-1] != w.shape[-1]:
        raise ValueError(f"u and w must have the same rank (last axis), got u {u.shape} and w {w.shape}")
    if w.shape[2] == heads and kv_heads != heads:  # head-specific key factors: give every query head its keys
        k, v = (jnp.repeat(t, heads // kv_heads, axis=2) for t in (k, v))
        kv_heads = heads
    rank = u.shape[-1]
    pad = -(dim + rank) % 8
    u = jnp.pad(u, [(0, 0)] * 3 + [(0, pad)])
    w = jnp.pad(w, [(0, 0)] * 3 + [(0, pad)])
    q_biased = jnp.concatenate(
        [scaled, jnp.broadcast_to(u, (batch, q_len, heads, rank + pad)).astype(q.dtype)],
        axis=-1,
    )
    k_biased = jnp.concatenate([k, jnp.broadcast_to(w, (batch, kv_len, kv_heads, rank + pad)).astype(k.dtype)], axis=-1)
    return q_biased, k_biased, v


def flashbias_attention(
    q: Array,
    k: Array,
    v: Array,
    u: Array,
    w: Array,
    *,
    causal: bool = False,
    mask: Mask | Array | None = None,
    window: int | tuple[int, int] | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
    scale: float | None = None,
    q_offset: Any = 0,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
    return_lse: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, dict[str, Array]]:
    """softmax(scale q k^T + u w^T + mask) v, computed as bias-free attention on [scale q, u] and [k, w].

    Args:
      q: [B, Tq, H, D]; k: [B, Tk, KVH, D]; v: [B, Tk, KVH, Dv].
      u: [B|1, Tq, H, r] query-side factors. w: [B|1, Tk, KVH, r] key-side factors, or [B|1, Tk, 1, r] (shared by
        all heads), or [B|1, Tk, H, r] (head-specific; k and v are then repeated over the query groups).
      causal, mask, window, segment_ids, q_offset, dropout_rate, dropout_rng, return_probs, return_lse,
        implementation: as in `attn.functional.softmax_attention` (no dense bias, no softcap: the factored bias
        would not commute with the cap).
      scale: logit scale of q k^T (default 1/sqrt(D)); the bias is not scaled.
    Returns:
      [B, Tq, H, Dv] in q.dtype, or (out, aux) when a return_* flag is set.
    """
    q_biased, k_biased, v = fold_factors(q, k, v, u, w, scale=scale)
    return F.softmax_attention(
        q_biased,
        k_biased,
        v,
        causal=causal,
        mask=mask,
        window=window,
        segment_ids=segment_ids,
        scale=1.0,
        q_offset=q_offset,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        return_probs=return_probs,
        return_lse=return_lse,
        implementation=implementation,
    )


# ---------------------------------------------------------------------------------------------------- layer
class FactoredBias(NamedTuple):
    """What `position_bias` hands to `attend` (as call.bias): the bias as factors u [B|1, Tq, H, r], w [B|1, Tk,
    KVH|1, r] (None, None: no bias)."""

    u: Array
    w: Array


@register(
    "flashbias",
    family="softmax",
    paper="FlashBias: Fast Computation of Attention with Bias",
    catalog=44,
    op=flashbias_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="attention bias as low-rank factors appended to q and k (exact causal ALiBi, learned, or SVD)",
    option_docs={
        "position": "'none' or 'rope' (the bias itself comes from `factors`)",
        "factors": "'alibi' (exact rank-2 causal ALiBi) or 'learned' (per-head position tables of rank `rank`)",
        "rank": "rank r of the learned factors",
        "max_len": "number of positions of the learned factor tables (positions beyond are clipped)",
        "softcap": "must be None (the factored bias sits inside the dot product, where a cap would not commute)",
    },
    fidelity="paper",
    reference="the paper's low-rank bias folded into q and k ([scale q, U] [k, W]^T), exact rank-2 causal ALiBi and "
    "SVD factors; code github.com/thuml/FlashBias",
    validators={
        "position": choice(*POSITIONS),
        "factors": choice(*FACTORS),
        "rank": positive_int,
        "max_len": positive_int,
        "softcap": choice(None),
    },
    has_attention_weights=True,
)
class FlashBiasAttention(MultiHeadAttention):
    """Softmax attention whose position bias is a low-rank factorisation folded into q and k. x [B, T, E] -> same."""

    position: str = "none"
    factors: str = "alibi"
    rank: int = 4
    max_len: int = 2048

    def position_bias(self, q: Array, q_pos: Array, kv_pos: Array, mask: Mask | None) -> FactoredBias:
        """The bias as factors (the `prepare` stage's call.bias), which `attend` folds into q and k."""
        if self.factors == "alibi":
            if mask is None or not mask.causal:
                raise ValueError(
                    "factors='alibi' is exact only under a causal mask (-m|i-j| is not low rank); pass "
                    "mask=attn.Mask(causal=True) or factor a dense bias with svd_factors"
                )
            return FactoredBias(*alibi_factors(self.num_heads, q_pos, kv_pos))
        table = lambda name, heads, axis: jnp.asarray(
            self.param(
                name,
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", axis, None)),
                (self.max_len, heads, self.rank),
                self.param_dtype,
            ),
            jnp.float32,
        )
        clip = lambda p: jnp.clip(jnp.asarray(p, jnp.int32), 0, self.max_len - 1)
        u = table("query_factors", self.num_heads, "heads")[clip(q_pos)]
        w = table("key_factors", self.kv_heads, "kv_heads")[clip(kv_pos)]
        return FactoredBias(u if u.ndim == 4 else u[None], w if w.ndim == 4 else w[None])

    @classmethod
    def overrides_stages(cls) -> bool:
        # `scores` only states that q arrives with the scale folded in (see attend): the fused path computes the
        # same logits, so plain calls keep the fused kernel
        return False

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """Folds the scale and the factors into q' = [scale q, u], k' = [k, w] (`fold_factors`; cross-attention
        has no factors: q' = scale q). A plain call runs the bias-free fused kernel on them; a call that needs the
        explicit stages (interventions on logits or weights, captures, dropout) runs the pipeline on the same q', k',
        whose logits are the biased ones (bit-identical to the fused path on XLA)."""
        factors = call.bias if isinstance(call.bias, FactoredBias) else FactoredBias(None, None)
        q, k, v = fold_factors(q, k, v, factors.u, factors.w, scale=self.scale)
        call = call.replace(bias=None)
        if self.explicit_reason(call) is None:
            return F.softmax_attention(
                q,
                k,
                v,
                mask=call.mask,
                window=self.window,
                scale=1.0,
                q_offset=call.q_offset,
                implementation=self.implementation,
            )
        return super().attend(q, k, v, call)

    def scores(self, q: Array, k: Array) -> Array:
        """Logits of the folded q' [B, Tq, H, D'] and k' [B, Tk, KVH, D'] of `attend`: q' k'^T = scale q k^T + u w^T
        (logit scale 1: the scale is inside q')."""
        return pipeline.scores(q, k, scale=1.0)
