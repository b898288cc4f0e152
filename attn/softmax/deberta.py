"""`deberta`: DeBERTa's disentangled attention — content-to-content, content-to-position and position-to-content.

Paper: "DeBERTa: Decoding-enhanced BERT with Disentangled Attention" (He, Liu, Gao, Chen, ICLR 2021; code
github.com/microsoft/DeBERTa, whose DeBERTa-v2/v3 attention fixed the details below).

Each token has a content vector (the layer input) and shares a table P [2k, E] of relative-position embeddings.
With relative distance r(i, j) = i - j (query minus key position):

    Q^c = x W_q,   K^c = x W_k,   V = x W_v                               (content projections)
    Q^r = P W_q,   K^r = P W_k      share_att_key=True  (DeBERTa-v2/v3: the layer's own projections, with bias)
    Q^r = P W_qr + b_qr,  K^r = P W_kr   share_att_key=False (DeBERTa-v1: separate `pos_q_proj`, `pos_proj`)
    delta(i, j) = clip(bucket(i - j) + k, 0, 2k - 1)
    A_ij = Q^c_i . K^c_j  +  Q^c_i . K^r_delta(i,j)  +  K^c_j . Q^r_delta'(i,j)        (c2c + c2p + p2c)
    o_i  = softmax_j(A_ij / sqrt(d (1 + n_terms)) + mask) V                    (1/sqrt(3d) with both terms)

bucket: `position_buckets` = b > 0 selects DeBERTa-v2's log buckets (`log_bucket_position`): distances with
|r| <= b/2 keep their value, longer ones map logarithmically onto (b/2, b) up to `max_relative_positions`, where
they saturate; then k = b. With b <= 0, bucket(r) = r and k = `max_relative_positions` (v1: clipping only).
Past `max_relative_positions` the released codes differ: microsoft/DeBERTa's 2023 code clips r to
+-(max_relative_positions - 1) before bucketing (`log_bucket_clamp=True`), its 2021 code and `transformers` do not
(`log_bucket_clamp=False`, default: how released checkpoints are run). Unclamped buckets exceed +-(b - 1), and the
final clip of delta then maps a distance r <= -max_relative_positions to row 0 instead of row 1; nothing else
differs (for r >= max_relative_positions both give row 2k - 1).

Which DeBERTa each setting reproduces (attention layer; other options at their defaults):
  v1 (deberta-base/-large, 2020): position_buckets=0, max_relative_positions=512, share_att_key=False, use_bias=True
      (position_key without bias, position_query with one, as v1's `pos_proj` / `pos_q_proj`; v1's content key has
      no bias, so a converted v1 checkpoint sets this layer's key bias to zero).
  v2 (deberta-v2-xlarge/-xxlarge) and v3 (deberta-v3-*, the same attention): position_buckets=256,
      max_relative_positions=512, share_att_key=True, use_bias=True; log_bucket_clamp=False as `transformers`
      (models/deberta_v2) and microsoft/DeBERTa 2021, True as microsoft/DeBERTa's 2023 code.

p2c index: the paper writes delta(j, i) (key minus query). Both released implementations (microsoft/DeBERTa and
HuggingFace, which pretrained checkpoints were trained with) index p2c with the same delta(i, j) as c2p;
`p2c_index="released"` (default) follows the code, `"paper"` uses delta'(i, j) = clip(bucket(j - i) + k, 0, 2k - 1).

position="rope" (not in the paper; default "none") also rotates Q^c and K^c by RoPE, so that configs that set
RoPE for every layer (configs/lm_tiny.py) run unchanged.

Not here: the position-embedding dropout and LayerNorm of the encoder-level table (this layer owns its table;
a model that shares one table across layers would pass it in), and the enhanced mask decoder (a model head).

Shapes: x [B, T, E] -> [B, T, E]; P [2k, E]; the c2p / p2c scores are computed as Q^c K^r^T [B, H, Tq, 2k] and
Q^r K^c^T [B, H, 2k, Tk] and then gathered to [B, H, Tq, Tk] — never a [Tq, Tk, D] tensor. Time
O(B H T (T + k) D), memory O(B H T (T + k)). Positions (`positions` or the cache index) give i and j, so
causal masks and the KV cache work (p2c reads the cached keys).

Reduction to softmax: attention_terms=() leaves A_ij = Q^c_i . K^c_j with scale 1/sqrt(d): exactly the `softmax`
layer with position="none" and the same q/k/v/o parameters (the table is then unused).

In the layer (the attention pipeline, attn/core/softmax_layer.py): `scores` is the content term with DeBERTa's
scale, and `prepare` turns c2p + p2c into the call's logits bias (after the KV cache, since p2c reads the keys),
which `score_mod` adds; captures and interventions on the logits and weights see the whole A.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import pipeline
from attn.core.layer import AttentionCall, HeadProjection
from attn.core.masks import Mask
from attn.core.validation import choice, int_at_least, subset
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

TERMS = ("c2p", "p2c")
P2C_INDICES = ("released", "paper")


def log_bucket_position(relative: Array, bucket_size: int, max_position: int, *, clamp: bool = False) -> Array:
    """DeBERTa-v2's log buckets of relative distances (int [...] -> int32 [...], sign kept).

    |r| <= bucket_size // 2 is kept exactly; larger |r| maps to
    sign(r) * (mid + ceil(log(|r| / mid) / log((max_position - 1) / mid) * (mid - 1))), mid = bucket_size // 2,
    so |r| = max_position - 1 lands on bucket_size - 1. clamp=False (transformers `make_log_bucket_position`,
    microsoft/DeBERTa 2021): the formula goes on past it, |r| >= max_position giving buckets >= bucket_size.
    clamp=True (microsoft/DeBERTa 2023): r is first clipped to [-(max_position - 1), max_position - 1], so the
    buckets stay within +-(bucket_size - 1).
    """
    relative = jnp.asarray(relative, jnp.int32)
    if clamp:
        relative = jnp.clip(relative, -max_position + 1, max_position - 1)
    mid = bucket_size // 2
    sign = jnp.sign(relative)
    # Distances inside (-mid, mid) are replaced by mid - 1 before the log only to keep it finite; they are kept
    # exactly by the final where.
    abs_pos = jnp.where(jnp.abs(relative) < mid, mid - 1, jnp.abs(relative)).astype(jnp.float32)
    log_pos = jnp.ceil(jnp.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return jnp.where(abs_pos <= mid, relative, log_pos.astype(jnp.int32) * sign).astype(jnp.int32)


def relative_index(
    q_positions: Array,
    kv_positions: Array,
    *,
    position_buckets: int,
    max_relative_positions: int,
    log_bucket_clamp: bool = False,
) -> tuple[Array, int]:
    """delta(i, j) = clip(bucket(i - j) + k, 0, 2k - 1): int32 [B|1, Tq, Tk], and the span k.

    q_positions int [B|1, Tq] or [Tq], kv_positions int [B|1, Tk] or [Tk]. The two log-bucket variants differ only
    where i - j <= -max_relative_positions: row 0 without the clamp, row 1 with it."""
    q = jnp.asarray(q_positions, jnp.int32)
    kv = jnp.asarray(kv_positions, jnp.int32)
    q, kv = (q[None] if q.ndim == 1 else q), (kv[None] if kv.ndim == 1 else kv)
    relative = q[:, :, None] - kv[:, None, :]
    if position_buckets > 0:
        relative = log_bucket_position(relative, position_buckets, max_relative_positions, clamp=log_bucket_clamp)
        span = position_buckets
    else:
        span = max_relative_positions
    return jnp.clip(relative + span, 0, 2 * span - 1), span


def disentangled_scores(
    q: Array,
    k: Array,
    position_query: Array | None,
    position_key: Array | None,
    c2p_index: Array,
    p2c_index: Array,
) -> Array:
    """Unscaled c2p + p2c scores, float32 [B, H, Tq, Tk].

    q [B, Tq, H, D], k [B, Tk, KVH, D]; position_key K^r [2k, KVH, D] (None: no c2p term), position_query Q^r
    [2k, H, D] (None: no p2c term); indices int [B|1, Tq, Tk] into the 2k rows:
      c2p[b, h, i, j] = q[b, i, h] . K^r[c2p_index[i, j], g(h)]
      p2c[b, h, i, j] = k[b, j, g(h)] . Q^r[p2c_index[i, j], h]          (g(h) = h // (H / KVH))
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    shape = (batch, heads, q_len, kv_len)
    scores = jnp.zeros(shape, jnp.float32)
    qg = q.astype(jnp.float32).reshape(batch, q_len, kv_heads, groups, head_dim)
    if position_key is not None:
        per_row = jnp.einsum("bqkgd,rkd->bkgqr", qg, jnp.asarray(position_key, jnp.float32))
        per_row = per_row.reshape(batch, heads, q_len, -1)
        index = jnp.broadcast_to(c2p_index[:, None], shape)
        scores = scores + jnp.take_along_axis(per_row, index, axis=-1)
    if position_query is not None:
        pq = jnp.asarray(position_query, jnp.float32).reshape(-1, kv_heads, groups, head_dim)
        per_row = jnp.einsum("rkgd,bskd->bkgrs", pq, k.astype(jnp.float32)).reshape(batch, heads, -1, kv_len)
        index = jnp.broadcast_to(p2c_index[:, None], shape)
        scores = scores + jnp.take_along_axis(per_row, index, axis=-2)
    return scores


class DisentangledTerms(NamedTuple):
    """What `position_bias` hands to `prepare`: projected position tables and the two index matrices."""

    position_query: Array | None
    position_key: Array | None
    c2p_index: Array
    p2c_index: Array


@register(
    "deberta",
    family="softmax",
    paper="DeBERTa: Decoding-enhanced BERT with Disentangled Attention",
    catalog=134,
    op=disentangled_scores,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="disentangled attention: content-content + content-position + position-content, log relative buckets",
    option_docs={
        "position": "'none' (the paper: positions enter only through c2p / p2c) or 'rope' (RoPE on q and k as well; "
        "not in the paper, accepted so that configs that set RoPE for every layer run)",
        "scale": "logit scale (None = 1/sqrt(head_dim * (1 + number of attention_terms)), 1/sqrt(3d) with both)",
        "attention_terms": "relative terms added to content-to-content: a subset of ('c2p', 'p2c'); () = softmax",
        "position_buckets": "b > 0: DeBERTa-v2 log buckets, table of 2b rows; <= 0: plain clipping (DeBERTa-v1)",
        "max_relative_positions": "distance where the log buckets saturate (or the clip distance when b <= 0)",
        "share_att_key": "project the position table with the layer's W_q / W_k (v2/v3) instead of separate ones "
        "(v1: position_key without bias, position_query with one)",
        "log_bucket_clamp": "clip i - j to +-(max_relative_positions - 1) before log-bucketing (microsoft/DeBERTa 2023 "
        "code) instead of not (False: transformers and microsoft/DeBERTa 2021, which released checkpoints run with)",
        "p2c_index": "'released' (p2c indexed by delta(i, j), as in the official code) or 'paper' (delta(j, i))",
    },
    fidelity="official-code",
    reference="github.com/microsoft/DeBERTa disentangled_attention.py (v1 2020: pos_proj / pos_q_proj biases; v2/v3: "
    "share_att_key, p2c indexed as released) and da_utils.py (log buckets, 2021 unclamped and 2023 clamped); "
    "transformers models/deberta_v2 make_log_bucket_position / build_relative_position (unclamped, the default); "
    "p2c_index='paper' is the paper's delta(j, i)",
    validators={
        "position": choice("none", "rope"),
        "attention_terms": subset(*TERMS),
        "p2c_index": choice(*P2C_INDICES),
        "max_relative_positions": int_at_least(2),
        "log_bucket_clamp": choice(True, False),
    },
    has_attention_weights=True,
)
class DisentangledAttention(MultiHeadAttention):
    """DeBERTa disentangled self-attention with relative-position buckets. x [B, T, E] -> [B, T, E]."""

    position: str = "none"
    attention_terms: tuple[str, ...] = TERMS
    position_buckets: int = 256
    max_relative_positions: int = 512
    share_att_key: bool = True
    p2c_index: str = "released"
    log_bucket_clamp: bool = False

    def _logit_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        return 1.0 / math.sqrt(self.head_dim * (1 + len(self.attention_terms)))

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if 0 < self.position_buckets < 2:
            raise ValueError(
                f"position_buckets={self.position_buckets} must be <= 0 (no buckets) or >= 2 (log buckets)"
            )
        if self.position_buckets > self.max_relative_positions:
            raise ValueError(
                f"position_buckets={self.position_buckets} must be <= max_relative_positions="
                f"{self.max_relative_positions}"
            )

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The `softmax` layer's positions and cache, then the c2p + p2c terms as a dense logits bias (scaled like
        the content term), which the default `score_mod` adds. p2c reads the keys, cached ones included."""
        q, k, v, call = super().prepare(q, k, v, call)
        terms = call.bias
        if isinstance(terms, DisentangledTerms):
            scores = disentangled_scores(
                q, k, terms.position_query, terms.position_key, terms.c2p_index, terms.p2c_index
            )
            call = call.replace(bias=self._logit_scale() * scores)
        return q, k, v, call

    def position_bias(self, q: Array, q_pos: Array, kv_pos: Array, mask: Mask | None) -> DisentangledTerms | None:
        terms = tuple(self.attention_terms)
        if not terms:
            return None
        options = dict(
            position_buckets=self.position_buckets,
            max_relative_positions=self.max_relative_positions,
            log_bucket_clamp=self.log_bucket_clamp,
        )
        c2p_index, span = relative_index(q_pos, kv_pos, **options)
        if self.p2c_index == "paper":
            p2c_index = relative_index(kv_pos, q_pos, **options)[0].swapaxes(-1, -2)
        else:
            p2c_index = c2p_index
        table = self.param(
            "relative_embeddings",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("relative_distance", "embed")),
            (2 * span, self.query_kernel_features()),
            self.param_dtype,
        )
        project = self._shared_projection if self.share_att_key else self._position_projection
        position_key = project(table, "key", self.kv_heads, "kv_heads") if "c2p" in terms else None
        position_query = project(table, "query", self.num_heads, "heads") if "p2c" in terms else None
        return DisentangledTerms(position_query, position_key, c2p_index, p2c_index)

    def query_kernel_features(self) -> int:
        """E, the input feature size (read from the query kernel, which exists once project_qkv has run)."""
        return nn.unbox(self.variables["params"]["query"]["kernel"]).shape[0]

    def _shared_projection(self, table: Array, name: str, heads: int, heads_axis: str) -> Array:
        """P W (+ b) with the layer's own "query" / "key" parameters: [2k, E] -> [2k, heads, D]."""
        params = self.variables["params"][name]
        out = jnp.einsum("re,ehd->rhd", jnp.asarray(table, jnp.float32), jnp.asarray(nn.unbox(params["kernel"])))
        if "bias" in params:
            out = out + jnp.asarray(nn.unbox(params["bias"]))
        return out

    def _position_projection(self, table: Array, name: str, heads: int, heads_axis: str) -> Array:
        """P W_r (+ b) with separate "position_query" / "position_key" projections, biased as DeBERTa-v1's
        `pos_q_proj` (bias) and `pos_proj` (no bias), whatever `use_bias` says."""
        return HeadProjection(
            heads=heads,
            head_dim=self.head_dim,
            heads_axis=heads_axis,
            use_bias=name == "query",
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            name=f"position_{name}",
        )(jnp.asarray(table, jnp.float32))

    def scores(self, q: Array, k: Array) -> Array:
        """The content term with DeBERTa's scale 1/sqrt(d (1 + number of relative terms)). The bias is a dense
        [B, H, Tq, Tk] array anyway, so the explicit stages cost the same order of memory as the fused path would."""
        return pipeline.scores(q, k, scale=self._logit_scale(), softcap=self.softcap)
