"""`sea`: Sparse linear attention with an Estimated Attention mask ([183] "SEA: Sparse Linear Attention with
Estimated Attention Mask").

SEA estimates a compressed attention matrix at linear cost with a kernel (Performer) attention whose output a
learned decoder turns into M scores per query, selects the top columns of that estimate, decompresses the selection
to key indices and computes exact softmax attention on the selected keys only, blended with an average context.
Per layer (shapes per head; D = head_dim, Dv = value dim):

  1. Performer estimate. phi = Performer random features of q and k (FAVOR+ softmax kernel "favor", or the ReLU
     kernel "favor_relu" = relu(x' w) + 1e-3 that the official code uses when causal; x' = x D^(-1/4), F = D ln D
     fixed orthogonal features), values u_j = [p_j ⊕ v_j] with a position code p_j [D] (causal: a learned table
     p_j = P[j]; non-causal: the identity matrix resampled to the sequence, p_j[c] = max(0, 1 - |j (D-1)/(L-1) - c|)):
         C_i = sum_{j visible} phi(q_i) . phi(k_j) u_j / sum_{j visible} phi(q_i) . phi(k_j)        [D + Dv]
  2. Encoder and decoder. t_i = GELU(LayerNorm(W_e [C_i ⊕ v_i]))  [2D] (v_i the query token's own value);
     rows r_i = W_r t_i reshaped to [2 channels per head, ceil(M/4)]; the heads' rows form an image over (query i,
     column) that a CNN decodes: LayerNorm over the columns -> conv 3x3 (dilation 2) -> ReLU -> conv 3x3
     (dilation 2) -> ReLU -> nearest upsample x4 along the columns -> conv 1x1 to one channel per head ->
     LayerNorm over the M columns, giving scores s_i [M] and the estimate Ahat_i = softmax(s_i). Causal: the
     convolutions see only rows i, i-2, .. i-8 (zero rows before position 0), so decoding keeps the last 8 rows
     in "cache"/"decoder_rows".
  3. Compressed top-k. Row i's M columns span its L_i visible keys (L_i = i + 1 causal, the sequence length
     otherwise): column c holds keys [round(c L_i / M), round((c+1) L_i / M)) (round half up). The row keeps the
     b_i = clip(round(k M / L_i), 1, M) columns of largest Ahat_i, about k keys.
  4. Sparse attention, row scale and average context. With the selected visible keys S_i, P_ij = softmax_{j in
     S_i}(s q_i . k_j) (s = 1/sqrt(D)); (g, h) = sigmoid(W_g t_i) and
         o_i = h (g sum_{j in S_i} P_ij v_j) + (1 - h) avg_i,
     avg_i = the mean of v_j over the visible keys (causal), or sum_j w_j v_j with w_j the estimate's column mass
     averaged over the query rows and spread evenly over the column's keys (non-causal).

Training (distill=True): the layer's own exact softmax attention of its frozen q, k is the teacher (the official
code's self-teacher setting), and "losses"/"sea_distillation" gets, as in the official code,
    0.1 KL(teacher || Ahat resized to keys) + MSE(Ahat resized to keys, teacher) + MSE(o, teacher output),
where "resized to keys" is the row-wise softmax over visible keys of s_i[column of key j]. All three are computed
from stop-gradient q, k, v, so only the estimator (encoder, decoder, scales, position table) learns from them; the
top-k selection passes no gradient, and the task loss reaches the estimator through g, h and avg.

Checked against the paper (arXiv 2310.01777: Performer + decoder estimate of the compressed attention, top-k,
sparse attention, distillation of the attention matrix) and the official code (gmlwns2000/sea-attention,
src/models/perlin_attention/attention.py and modules.py). Differences: one decoder architecture for both
masks (the official non-causal decoder uses a strided CNN without the LayerNorms); the top-k is per head, not
grouped across heads; no FlatCSR kernels (the XLA path gathers the selected keys); the Performer projection is
fixed (the official one is redrawn every 1000 steps); the non-causal average context is normalised (the official
weights sum to about S/M); the official 1x1 convolution's padding quirk is left out.

Causal: every stage reads only rows and keys at or before the query, so SEA is causal; decoding keeps the usual
KV cache plus the decoder's last 8 rows. Shapes: x [B, T, E] -> [B, T, E]. Time O(T (F (D + Dv) + M D + K D))
with K ~ top_k keys per row (about 2 top_k at most), memory O(T (M + K D)): linear in T for fixed top_k and M.
Nothing reduces it exactly to softmax attention (the scales and the average context stay).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.core import kv_cache
from attn.core import positions as pos
from attn.core.conv import conv, layer_norm
from attn.core.distillation import attention_distillation_loss
from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.linear_scan import linear_mask_parts, repeat_kv
from attn.core.masks import Mask
from attn.core.padding import masked_softmax
from attn.core.pipeline import accumulation_dtype
from attn.core.validation import check_qkv, choice, int_at_least, optional, positive, positive_int
from attn.registry import register

Array = jax.Array

ESTIMATOR_MAPS = ("auto", "favor", "favor_relu")
POSITIONS = ("rope", "none")
DECODER_HISTORY = 8  # rows the causal decoder sees before a query: 2 convolutions x (3 - 1) x dilation 2
UPSAMPLE = 4  # the decoder works on ceil(M / 4) columns and upsamples them to M
CHANNELS_PER_HEAD = 2


# ------------------------------------------------------------------------------------------- Performer estimate
def orthogonal_features(num_features: int, dim: int, seed: int) -> np.ndarray:
    """Performer's orthogonal random features [F, D]: blocks of orthonormal rows, each scaled to the norm of a
    Gaussian vector (so the rows are marginally N(0, I))."""
    rng = np.random.default_rng(seed)
    blocks = [np.linalg.qr(rng.standard_normal((dim, dim)))[0].T for _ in range(-(-num_features // dim))]
    rows = np.concatenate(blocks, axis=0)[:num_features]
    return (rows * np.linalg.norm(rng.standard_normal((num_features, dim)), axis=1)[:, None]).astype(np.float32)


def favor_features(x: Array, projection: Array, *, is_query: bool) -> Array:
    """Positive random features of x [B, T, H, D] -> float32 [B, T, H, F] (softmax kernel exp(q . k / sqrt(D))).

    The exponent is shifted by a stop-gradient maximum: per row for queries, per (batch, head) over all tokens for
    keys. Both shifts are positive factors that cancel in the normalised estimate.
    """
    x = x.astype(accumulation_dtype(x)) * x.shape[-1] ** -0.25
    exponent = jnp.einsum("bthd,fd->bthf", x, projection) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    axes = (-1,) if is_query else (1, 3)
    exponent = exponent - jax.lax.stop_gradient(jnp.max(exponent, axis=axes, keepdims=True))
    return jnp.exp(exponent) * projection.shape[0] ** -0.5


def favor_relu_features(x: Array, projection: Array) -> Array:
    """Performer's generalized (ReLU) random features relu(x D^(-1/4) w) + 1e-3: [B, T, H, D] -> float32 [.., F]."""
    x = x.astype(accumulation_dtype(x)) * x.shape[-1] ** -0.25
    return jax.nn.relu(jnp.einsum("bthd,fd->bthf", x, projection)) + 1e-3


def estimator_features(
    q: Array, k: Array, *, feature_map: str, causal: bool, num_features: int | None, seed: int
) -> tuple[Array, Array]:
    """phi(q) [B, Tq, H, F], phi(k) [B, S, KVH, F] of the Performer estimator ("auto": favor_relu when causal)."""
    dim = q.shape[-1]
    count = num_features or max(dim, int(dim * math.log(dim)))
    projection = jnp.asarray(orthogonal_features(count, dim, seed))
    if feature_map == "auto":
        feature_map = "favor_relu" if causal else "favor"
    if feature_map == "favor_relu":
        return favor_relu_features(q, projection), favor_relu_features(k, projection)
    return favor_features(q, projection, is_query=True), favor_features(k, projection, is_query=False)


def kernel_context(
    q_features: Array,
    k_features: Array,
    values: Array,
    *,
    causal: bool,
    q_offset: Any = 0,
    kv_lengths: Array | None = None,
    chunk_size: int = 64,
) -> Array:
    """Normalised kernel attention sum_j w_ij u_j / sum_j w_ij, w_ij = phi_i . phi_j over the visible keys.

    q_features [B, Tq, H, F], k_features [B, S, KVH, F], values [B, S, KVH, E] -> float32 [B, Tq, H, E]; rows without
    visible keys are 0. Self-attention from position 0 (and non-causal calls) run on the chunked linear-attention
    core; queries at an offset (decoding) score the S keys directly (O(Tq S F)). The normaliser is divided here, with
    no epsilon, so the features' shifts cancel exactly.
    """
    q_len, heads, kv_len = q_features.shape[1], q_features.shape[2], k_features.shape[1]
    dtype = accumulation_dtype(q_features, values)
    values = jnp.concatenate([values.astype(dtype), jnp.ones(values.shape[:-1] + (1,), dtype)], -1)
    full = q_len == kv_len and isinstance(q_offset, (int, np.integer)) and q_offset == 0
    if full or not causal:
        sums = F.linear_attention(
            q_features, k_features, values, causal=causal, kv_lengths=kv_lengths, chunk_size=chunk_size
        ).astype(dtype)
    else:
        scores = jnp.einsum("bthf,bshf->bths", q_features, repeat_kv(k_features, heads))
        visible = jnp.arange(kv_len)[None, :] <= (q_offset + jnp.arange(q_len))[:, None]  # [Tq, S]
        visible = visible[None, :, None, :]
        if kv_lengths is not None:
            visible = visible & (jnp.arange(kv_len) < jnp.asarray(kv_lengths)[:, None])[:, None, None, :]
        sums = jnp.einsum("bths,bshe->bthe", jnp.where(visible, scores, 0.0), repeat_kv(values, heads))
    total = sums[..., -1:]
    return sums[..., :-1] / jnp.where(total > 0, total, 1.0)


def resampled_identity(lengths: Array, kv_len: int, dim: int) -> Array:
    """The non-causal position code: I_D resampled (bilinear, corners aligned) to each sequence's length.

    lengths int [B] -> float32 [B, S, 1, D], row j = max(0, 1 - |j (D - 1) / (L - 1) - c|) over channels c.
    """
    span = jnp.maximum(jnp.asarray(lengths, jnp.float32) - 1.0, 1.0)[:, None]
    where = jnp.arange(kv_len, dtype=jnp.float32)[None, :] * (dim - 1) / span  # [B, S]
    code = jax.nn.relu(1.0 - jnp.abs(where[..., None] - jnp.arange(dim, dtype=jnp.float32)))
    return code[:, :, None, :]


# ------------------------------------------------------------------------------------ compressed top-k selection
def visible_lengths(batch: int, q_len: int, kv_len: int, *, causal: bool, q_offset: Any, kv_lengths: Any) -> Array:
    """L_i, the number of keys row i sees (a prefix of the keys): int32 [B, Tq]."""
    total = jnp.full((batch,), kv_len, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    lengths = jnp.broadcast_to(total[:, None], (batch, q_len))
    if causal:
        lengths = jnp.minimum(lengths, q_offset + jnp.arange(q_len, dtype=jnp.int32)[None, :] + 1)
    return lengths


def column_starts(lengths: Array, num_columns: int) -> Array:
    """First key of each compressed column, round(c L / M) (half up), for c = 0 .. M: int32 [..., M + 1]."""
    c = jnp.arange(num_columns + 1, dtype=jnp.int32)
    return (2 * c * lengths[..., None] + num_columns) // (2 * num_columns)


def key_columns(lengths: Array, kv_len: int, num_columns: int) -> Array:
    """The column holding key j in a row of L visible keys, ceil((2j + 1) M / 2L) - 1: int32 [..., S] (for j < L)."""
    j = jnp.arange(kv_len, dtype=jnp.int32)
    span = 2 * jnp.maximum(lengths[..., None], 1)
    return jnp.clip(((2 * j + 1) * num_columns + span - 1) // span - 1, 0, num_columns - 1)


def columns_kept(lengths: Any, num_columns: int, top_k: int) -> Any:
    """b = clip(round(k M / L), 1, M) columns kept in a row of L visible keys (0 when L = 0); jnp or numpy."""
    xp = jnp if isinstance(lengths, jax.Array) else np
    safe = xp.maximum(lengths, 1)
    kept = xp.clip((2 * top_k * num_columns + safe) // (2 * safe), 1, num_columns)
    return xp.where(lengths > 0, kept, 0)


@functools.lru_cache(maxsize=64)
def max_selected_keys(kv_len: int, num_columns: int, top_k: int) -> int:
    """The most keys any row can select (static): over L = 1 .. S, the b(L) widest columns, at most L."""
    lengths = np.arange(1, kv_len + 1)
    c = np.arange(num_columns + 1)
    starts = (2 * c[None, :] * lengths[:, None] + num_columns) // (2 * num_columns)
    widths = -np.sort(-np.diff(starts, axis=1), axis=1)  # each row's widths, widest first
    kept = columns_kept(lengths, num_columns, top_k)
    taken = np.take_along_axis(np.cumsum(widths, axis=1), (kept - 1)[:, None], axis=1)[:, 0]
    return int(max(1, np.max(np.minimum(taken, lengths))))


def select_keys(estimate: Array, lengths: Array, *, top_k: int, kv_len: int) -> tuple[Array, Array]:
    """Top columns of the estimate, decompressed to key indices.

    estimate [B, Tq, H, M], lengths int [B, Tq] (L_i) -> (keys int32 [B, H, Tq, K], valid bool [B, H, Tq, K]) with
    K = max_selected_keys(S, M, top_k): row i keeps the b_i columns of largest estimate and lists their keys.
    """
    num_columns = estimate.shape[-1]
    size = max_selected_keys(kv_len, num_columns, top_k)
    order = jnp.argsort(-jax.lax.stop_gradient(estimate), axis=-1)  # [B, Tq, H, M], largest first
    starts = column_starts(lengths, num_columns)[:, :, None, :]  # [B, Tq, 1, M + 1]
    widths = jnp.diff(starts, axis=-1)
    kept = columns_kept(lengths, num_columns, top_k)[:, :, None, None]
    ranked_widths = jnp.where(
        jnp.arange(num_columns) < kept, jnp.take_along_axis(jnp.broadcast_to(widths, order.shape), order, -1), 0
    )
    ranked_starts = jnp.take_along_axis(jnp.broadcast_to(starts[..., :-1], order.shape), order, -1)
    ends = jnp.cumsum(ranked_widths, axis=-1)  # slot where each ranked column's keys end
    slots = jnp.arange(size, dtype=jnp.int32)
    rank = jnp.vectorize(lambda e: jnp.searchsorted(e, slots, side="right"), signature="(m)->(k)")(ends)
    rank = jnp.minimum(rank, num_columns - 1)
    first_slot = jnp.take_along_axis(ends - ranked_widths, rank, -1)
    keys = jnp.take_along_axis(ranked_starts, rank, -1) + slots - first_slot
    valid = slots < ends[..., -1:]
    keys = jnp.where(valid, keys, 0)
    return jnp.moveaxis(keys, 2, 1), jnp.moveaxis(valid, 2, 1)


def sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    keys: Array,
    valid: Array,
    *,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> tuple[Array, Array]:
    """Exact softmax attention over listed keys: q [B, Tq, H, D], k/v [B, S, KVH, D], keys int [B, H, Tq, K] with
    valid bool [B, H, Tq, K] -> (out float32 [B, Tq, H, Dv], probs float32 [B, H, Tq, K]); memory O(Tq K D)."""
    batch, q_len, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    index = keys.reshape(batch, heads, -1, 1)
    dtype = accumulation_dtype(q, k, v)

    def gather(x: Array) -> Array:  # [B, S, KVH, D] -> [B, H, Tq, K, D]
        x = jnp.swapaxes(repeat_kv(x, heads), 1, 2).astype(dtype)
        return jnp.take_along_axis(x, index, axis=2).reshape(keys.shape + (x.shape[-1],))

    logits = scale * jnp.einsum("bthd,bhtkd->bhtk", q.astype(dtype), gather(k))
    probs = masked_softmax(logits, valid)
    attended = probs
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        attended = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhtk,bhtkd->bthd", attended.astype(dtype), gather(v)), probs


def sea_sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    estimate: Array,
    *,
    top_k: int,
    causal: bool = False,
    scale: float | None = None,
    q_offset: Any = 0,
    kv_lengths: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """SEA's stages 3-4 without the scales: top-k of a compressed estimate, then exact sparse softmax.

    Args:
      q: [B, Tq, H, D]. k: [B, S, KVH, D]. v: [B, S, KVH, Dv].
      estimate: [B, Tq, H, M], row i's M columns spanning its visible keys (see the module docstring).
      top_k: about k keys per row. causal: queries at q_offset + i see keys j <= q_offset + i.
      scale: softmax scale (default 1/sqrt(D)). kv_lengths: int [B] padding lengths.
      dropout_rate, dropout_rng: dropout on the sparse probabilities.
    Returns:
      (out float32 [B, Tq, H, Dv], {"probs": [B, H, Tq, K], "keys": [B, H, Tq, K], "valid": [B, H, Tq, K],
      "lengths": int [B, Tq] (L_i)}).
    """
    check_qkv(q, k, v)
    if not (isinstance(top_k, (int, np.integer)) and top_k > 0):
        raise ValueError(f"top_k={top_k!r} must be a positive int")
    if estimate.shape[:3] != q.shape[:3]:
        raise ValueError(f"estimate has shape {estimate.shape}; expected [{', '.join(map(str, q.shape[:3]))}, M]")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r} must be in [0, 1)")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
    batch, q_len = q.shape[:2]
    lengths = visible_lengths(batch, q_len, k.shape[1], causal=causal, q_offset=q_offset, kv_lengths=kv_lengths)
    keys, valid = select_keys(estimate, lengths, top_k=int(top_k), kv_len=k.shape[1])
    out, probs = sparse_attention(q, k, v, keys, valid, scale=scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return out, {"probs": probs, "keys": keys, "valid": valid, "lengths": lengths}


def average_context(v: Array, estimate: Array, lengths: Array, *, causal: bool, q_valid: Array | None = None) -> Array:
    """The context blended with the sparse output: float32 [B, Tq, H, Dv].

    Causal: the mean of v_j over row i's L_i visible keys. Non-causal: sum_j w_j v_j with w_j the estimate [B, Tq,
    H, M] averaged over the (valid, q_valid bool [B, Tq]) rows, each column's mass spread over its keys.
    """
    batch, kv_len, _, _ = v.shape
    heads = estimate.shape[2]
    v = v.astype(accumulation_dtype(v, estimate))
    if causal:
        sums = jnp.cumsum(v, axis=1)  # keys past kv_lengths are never inside a visible prefix
        index = jnp.clip(lengths - 1, 0, kv_len - 1)[:, :, None, None]
        prefix = jnp.take_along_axis(sums, index, axis=1)  # [B, Tq, KVH, Dv]
        return repeat_kv(prefix, heads) / jnp.maximum(lengths, 1)[:, :, None, None].astype(v.dtype)
    rows = jnp.ones(estimate.shape[:2], bool) if q_valid is None else q_valid
    mass = (
        jnp.sum(jnp.where(rows[:, :, None, None], estimate, 0.0), 1) / jnp.maximum(jnp.sum(rows, 1), 1)[:, None, None]
    )
    total = lengths[:, 0]  # non-causal rows all see the same keys
    columns = key_columns(total, kv_len, estimate.shape[-1])  # [B, S]
    widths = jnp.diff(column_starts(total, estimate.shape[-1]), axis=-1)  # [B, M]
    per_key = jnp.take_along_axis(mass / jnp.maximum(widths, 1)[:, None, :], columns[:, None, :], -1)  # [B, H, S]
    per_key = jnp.where(jnp.arange(kv_len) < total[:, None, None], per_key, 0.0)
    per_key = per_key / jnp.maximum(jnp.sum(per_key, -1, keepdims=True), 1e-30)
    return jnp.einsum("bhs,bshd->bhd", per_key, repeat_kv(v, heads))[:, None].repeat(estimate.shape[1], axis=1)


def dense_probs(probs: Array, keys: Array, kv_len: int) -> Array:
    """Scatters sparse probabilities [B, H, Tq, K] at key indices [B, H, Tq, K] into [B, H, Tq, kv_len]."""
    one_hot = jax.nn.one_hot(keys, kv_len, dtype=probs.dtype)
    return jnp.einsum("bhtk,bhtks->bhts", probs, one_hot)


def keys_distribution(scores: Array, lengths: Array, kv_len: int) -> Array:
    """The compressed scores resized to keys: row-wise softmax over the L_i visible keys of s_i[column of key j].

    scores [B, Tq, H, M], lengths int [B, Tq] -> float32 [B, H, Tq, S] (O(T S): for the distillation loss)."""
    columns = key_columns(lengths, kv_len, scores.shape[-1])  # [B, Tq, S]
    resized = jnp.take_along_axis(scores.astype(jnp.float32), columns[:, :, None, :], -1)  # [B, Tq, H, S]
    visible = (jnp.arange(kv_len) < lengths[..., None])[:, :, None, :]
    return jnp.moveaxis(masked_softmax(resized, visible), 2, 1)


def sea_distillation_loss(
    scores: Array, lengths: Array, teacher_probs: Array, output: Array, teacher_output: Array
) -> Array:
    """The official training loss: 0.1 KL(teacher || resized estimate) + MSE(resized estimate, teacher) + MSE(output,
    teacher output). scores [B, Tq, H, M], lengths [B, Tq], teacher_probs [B, H, Tq, S], outputs [B, Tq, H, Dv].
    A float32 scalar."""
    student = keys_distribution(scores, lengths, teacher_probs.shape[-1])
    teacher = teacher_probs.astype(jnp.float32)
    return (
        0.1 * attention_distillation_loss(student, teacher)
        + jnp.mean(jnp.square(student - teacher))
        + jnp.mean(jnp.square(output.astype(jnp.float32) - teacher_output.astype(jnp.float32)))
    )


# --------------------------------------------------------------------------------------------------------- layer
@register(
    "sea",
    family="linear",
    paper="SEA: Sparse Linear Attention with Estimated Attention Mask",
    catalog=183,
    op=sea_sparse_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="Performer estimate + learned CNN decoder of the compressed attention, top-k, exact sparse softmax "
    "blended with an average context",
    option_docs={
        "top_k": "about k keys attended per query (k M / L compressed columns); the distillation teaches the estimate",
        "compressed_length": "columns M of the compressed attention estimate (each row's visible keys in M groups); "
        "at least 8, so that the decoder's LayerNorm over its ceil(M/4) columns sees two",
        "feature_map": "Performer kernel: 'auto' (ReLU features when causal, softmax FAVOR+ otherwise, as the "
        "official code), 'favor' or 'favor_relu'",
        "num_features": "random features F of the Performer (None = D ln D)",
        "feature_seed": "seed of the fixed random features",
        "max_positions": "rows of the learned position table of the causal estimator's values",
        "distill": "sow the official training loss against the layer's own softmax attention under 'losses' (O(T^2))",
        "position": "'rope' (rotary q and k) or 'none'",
        "rope_base": "RoPE base (theta) when position='rope'",
        "scale": "softmax scale (None = 1/sqrt(head_dim))",
        "chunk_size": "chunk of the Performer's linear-attention core",
    },
    fidelity="official-code",
    reference="arXiv 2310.01777 (Sec. 3); gmlwns2000/sea-attention src/models/perlin_attention/attention.py, "
    "modules.py, ops/kernels/causal_resize_m_to_t.py (Performer + encoder/CNN decoder, per-row compressed top-k, "
    "row scaler and average-context mix, 0.1 KL + MSE + context MSE); one decoder for both masks, per-head top-k, "
    "no FlatCSR kernels",
    validators={
        "top_k": positive_int,
        "compressed_length": int_at_least(2 * UPSAMPLE),
        "chunk_size": positive_int,
        "max_positions": positive_int,
        "num_features": optional(positive_int),
        "feature_map": choice(*ESTIMATOR_MAPS),
        "position": choice(*POSITIONS),
        "scale": optional(positive),
    },
)
class SparseEstimatedAttention(AttentionLayer):
    """SEA: Performer + decoder estimate, compressed top-k, exact sparse softmax, average-context mix.
    x [B, T, E] -> [B, T, E]."""

    top_k: int = 64
    compressed_length: int = 128
    feature_map: str = "auto"
    num_features: int | None = None
    feature_seed: int = 0
    max_positions: int = 2048
    distill: bool = False
    position: str = "rope"
    rope_base: float = 10000.0
    scale: float | None = None
    chunk_size: int = 64

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        causal, q_lengths, kv_lengths = self.mask_parts(call)
        if call.cross:
            raise ValueError(
                "sea is self-attention: its estimator reads each query token's own value (context=None expected)"
            )
        if call.decode and (not causal or q_lengths is not None or kv_lengths is not None):
            raise ValueError(
                f"decode=True needs a causal mask without lengths (attn.Mask(causal=True)); got {call.mask!r}"
            )

    def mask_parts(self, call: AttentionCall) -> tuple[bool, Array | None, Array | None]:
        """(causal, q_lengths, kv_lengths) of the call's mask; other mask parts raise."""
        return linear_mask_parts(call.mask, "sea")

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """RoPE on q and k (position='rope'); decoding appends k, v to the KV cache and returns the whole cache,
        with q_offset = the cache index and the mask's kv_lengths = the filled length."""
        batch, length = q.shape[:2]
        offset = kv_cache.current_index(self) if call.decode else 0
        if self.position == "rope":
            q_pos = self.query_positions(call.positions, batch, length, offset)
            inv_freq, _ = pos.rope_frequencies(self.head_dim, base=self.rope_base)
            q, k = pos.apply_rope(q, q_pos, inv_freq), pos.apply_rope(k, q_pos, inv_freq)
        if call.decode:
            keys, values, start = kv_cache.write(self, k, v)
            if start is not None:
                filled = jnp.full((batch,), start + length, jnp.int32)
                return q, keys, values, call.replace(mask=call.mask.replace(kv_lengths=filled), q_offset=start)
        return q, k, v, call

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, T, H, D], k/v [B, S, KVH, D] -> [B, T, H, Dv] (the sparse probabilities sown as attention weights
        on request; with distill, the training loss under "losses")."""
        causal, q_lengths, kv_lengths = self.mask_parts(call)
        parts = self.estimator_parts(causal, k.shape[1])
        y, aux = self.sea_heads(
            q,
            k,
            v,
            parts,
            causal=causal,
            q_offset=call.q_offset,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            decode=call.decode,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
        )
        if self.wants_weights():
            self.sow("intermediates", "attention_weights", dense_probs(aux["probs"], aux["keys"], k.shape[1]))
        if self.distill and not call.decode:
            self.sow_distillation_loss(q, k, v, parts, causal=causal, q_lengths=q_lengths, kv_lengths=kv_lengths)
        return y.astype(q.dtype)

    def sea_heads(
        self,
        q: Array,
        k: Array,
        v: Array,
        parts: dict[str, Any],
        *,
        causal: bool,
        q_offset: Any,
        q_lengths: Array | None,
        kv_lengths: Array | None,
        decode: bool,
        dropout_rate: float = 0.0,
        dropout_rng: Array | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """The four stages on per-head q, k, v with the estimator `parts`: (out float32 [B, Tq, H, Dv], aux of
        `sea_sparse_attention` plus "scores" [B, Tq, H, M] and "estimate" [B, Tq, H, M])."""
        batch, q_len = q.shape[:2]
        kv_len = k.shape[1]
        q_features, k_features = estimator_features(
            q,
            k,
            feature_map=self.feature_map,
            causal=causal,
            num_features=self.num_features,
            seed=self.feature_seed,
        )
        if causal:
            code = parts["value_positions"][None, :kv_len, None, :]
        else:
            lengths = jnp.full((batch,), kv_len, jnp.int32) if kv_lengths is None else kv_lengths
            code = resampled_identity(lengths, kv_len, self.head_dim)
        dtype = accumulation_dtype(q, v)
        code = code.astype(dtype)
        values = jnp.concatenate([jnp.broadcast_to(code, v.shape[:3] + (code.shape[-1],)), v.astype(dtype)], -1)
        context = kernel_context(
            q_features,
            k_features,
            values,
            causal=causal,
            q_offset=q_offset,
            kv_lengths=kv_lengths,
            chunk_size=self.chunk_size,
        )
        own_values = repeat_kv(jax.lax.dynamic_slice_in_dim(v, q_offset, q_len, axis=1), q.shape[2])
        encoded = parts["encoder"](jnp.concatenate([context, own_values.astype(dtype)], -1))
        hidden = jax.nn.gelu(parts["encoder_norm"](encoded), approximate=False)
        scores = self.decoder(hidden, parts, causal=causal, q_offset=q_offset, decode=decode)
        estimate = jax.nn.softmax(scores, axis=-1)
        sparse, aux = sea_sparse_attention(
            q,
            k,
            v,
            estimate,
            top_k=self.top_k,
            causal=causal,
            scale=self.scale,
            q_offset=q_offset,
            kv_lengths=kv_lengths,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
        )
        q_valid = None if q_lengths is None else jnp.arange(q_len) < jnp.asarray(q_lengths)[:, None]
        average = average_context(v, estimate, aux["lengths"], causal=causal, q_valid=q_valid)
        gates = jax.nn.sigmoid(parts["scales"](hidden))  # [B, Tq, H, 2]
        row_scale, mix = gates[..., :1], gates[..., 1:]
        out = mix * row_scale * sparse + (1.0 - mix) * average
        if q_valid is not None:
            out = out * q_valid[:, :, None, None]
            aux["probs"] = aux["probs"] * jnp.swapaxes(q_valid[:, :, None, None], 1, 2)
        return out, {**aux, "scores": scores, "estimate": estimate}

    # ------------------------------------------------------------------ estimator pieces
    def dense(self, features: int, axes: tuple[str | None, str | None], name: str) -> nn.Dense:
        return nn.Dense(
            features,
            dtype=self.estimator_dtype(),
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
            name=name,
        )

    def estimator_dtype(self) -> Any:
        """The estimator computes in float32 (float64 when the layer's dtype is float64)."""
        return jnp.promote_types(self.dtype, jnp.float32)

    def estimator_parts(self, causal: bool, kv_len: int) -> dict[str, Any]:
        """The estimator's parameters, made once per call: the encoder (W_e, LayerNorm; shared by the heads), the
        decoder's row projection, CNN and norms, the scales W_g, and (causal) the value position table [S, D]."""
        common = dict(dtype=self.estimator_dtype(), param_dtype=self.param_dtype)
        channels = self.num_heads * CHANNELS_PER_HEAD
        width = -(-self.compressed_length // UPSAMPLE)
        pad = ((2 * 2, 0) if causal else (2, 2), (2, 2))
        parts = {
            "encoder": self.dense(2 * self.head_dim, ("hidden", "mlp"), "encoder"),
            "encoder_norm": layer_norm(name="encoder_norm", **common),
            "decoder_rows": self.dense(CHANNELS_PER_HEAD * width, ("mlp", None), "decoder_rows"),
            "norm_in": layer_norm(name="decoder_norm_in", **common),
            "conv1": conv(channels, 3, dilation=2, padding=pad, name="decoder_conv1", **common),
            "conv2": conv(channels, 3, dilation=2, padding=pad, name="decoder_conv2", **common),
            "conv_out": conv(self.num_heads, 1, name="decoder_conv_out", **common),
            "norm_out": layer_norm(name="decoder_norm_out", **common),
            "scales": self.dense(2, ("mlp", None), "scales"),
        }
        if causal:
            if kv_len > self.max_positions:
                raise ValueError(
                    f"sea's causal estimator has a position table of max_positions={self.max_positions} rows; got "
                    f"{kv_len} keys (raise max_positions)"
                )
            table = self.param(
                "value_positions",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), ("length", "head_dim")),
                (self.max_positions, self.head_dim),
                self.param_dtype,
            )
            parts["value_positions"] = jnp.asarray(table, self.estimator_dtype())
        return parts

    def decoder(self, hidden: Array, parts: dict[str, Any], *, causal: bool, q_offset: Any, decode: bool) -> Array:
        """t [B, Tq, H, 2D] -> scores [B, Tq, H, M]: row projection, then a CNN over (query, column) with the heads'
        channels; causal convolutions see rows i, i-2, .., i-8 (decoding keeps the last 8 input rows in "cache")."""
        batch, q_len, heads, _ = hidden.shape
        rows = parts["decoder_rows"](hidden)
        image = jnp.moveaxis(rows.reshape(batch, q_len, heads * CHANNELS_PER_HEAD, -1), 2, 3)  # [B, Tq, W, C]
        positions = q_offset + jnp.arange(q_len)
        if causal:
            history = jnp.zeros((batch, DECODER_HISTORY) + image.shape[2:], image.dtype)
            if decode:
                if self.has_variable("cache", "decoder_rows"):
                    history = self.get_variable("cache", "decoder_rows")
                    image = jnp.concatenate([history, image], axis=1)
                    self.put_variable("cache", "decoder_rows", image[:, -DECODER_HISTORY:])
                else:  # the cache-creating call: a zero history, like the zero KV cache
                    self.put_variable("cache", "decoder_rows", history)
                    image = jnp.concatenate([history, image], axis=1)
            else:
                image = jnp.concatenate([history, image], axis=1)
            positions = q_offset - DECODER_HISTORY + jnp.arange(DECODER_HISTORY + q_len)
        live = (positions >= 0)[None, :, None, None]  # rows before position 0 are the convolutions' zero padding
        y = jnp.where(live, jnp.swapaxes(parts["norm_in"](jnp.swapaxes(image, 2, 3)), 2, 3), 0.0)  # over columns
        y = jnp.where(live, jax.nn.relu(parts["conv1"](y)), 0.0)
        y = jnp.where(live, jax.nn.relu(parts["conv2"](y)), 0.0)
        y = jnp.repeat(y, UPSAMPLE, axis=2)[:, :, : self.compressed_length]
        y = parts["conv_out"](y)  # [B, rows, M, H]
        return parts["norm_out"](jnp.moveaxis(y, 3, 2))[:, -q_len:]  # [B, Tq, H, M]

    def sow_distillation_loss(
        self,
        q: Array,
        k: Array,
        v: Array,
        parts: dict[str, Any],
        *,
        causal: bool,
        q_lengths: Array | None,
        kv_lengths: Array | None,
    ) -> None:
        """Teacher: the exact softmax attention of the frozen q, k, v; student: SEA's estimate and output from the
        same frozen inputs (only the estimator's parameters receive the gradient)."""
        q, k, v = (jax.lax.stop_gradient(x) for x in (q, k, v))
        mask = Mask(causal=causal, q_lengths=q_lengths, kv_lengths=kv_lengths)
        teacher_out, teacher = F.softmax_attention(q, k, v, mask=mask, scale=self.scale, return_probs=True)
        out, aux = self.sea_heads(
            q, k, v, parts, causal=causal, q_offset=0, q_lengths=q_lengths, kv_lengths=kv_lengths, decode=False
        )
        loss = sea_distillation_loss(aux["scores"], aux["lengths"], teacher["probs"], out, teacher_out)
        self.sow("losses", "sea_distillation", loss)
