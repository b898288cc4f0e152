"""`sea`: Sparse linear attention with an Estimated Attention mask ([183] "SEA: Sparse Linear Attention with
Estimated Attention Mask").

SEA estimates the attention matrix at linear cost with kernelised linear attention, in a compressed form (M
columns instead of S), takes a per-row top-k of the estimate, decompresses the selection to key indices and
computes exact softmax attention on the selected keys only:

  1. compressed estimate: keys are grouped into M = ceil(S / w) bins of w = ceil(S / compressed_length)
     consecutive keys; with phi a positive feature map of the estimator's q~, k~,
         Ahat[i, m] = sum_{j in bin m, j visible} phi(q~_i) . phi(k~_j) / sum_{j visible} phi(q~_i) . phi(k~_j)
     = normalised linear attention with the one-hot bin matrix [S, M] as values (the chunked core: O(S F M)).
  2. per-row top-k in the compressed space: the b = min(ceil(top_k / w), M) bins of largest Ahat[i, .]
     (the paper's k_compressed = k M / S).
  3. decompression: each selected bin expands to its w keys (nearest-neighbour resize of the mask from M to S
     columns), about top_k keys per row.
  4. sparse attention: o_i = sum_{j selected, visible} softmax_j(s q_i . k_j) v_j (exact, s = 1/sqrt(d)).

The estimator: phi = "favor" (Performer's positive orthogonal random features, phi(x) = exp(w x' - |x'|^2 / 2) /
sqrt(F), x' = x d^(-1/4), an unbiased estimate of the softmax kernel exp(q . k / sqrt(d)); SEA uses Performer),
"elu_plus_one" or "relu"; q~ = q W_q~, k~ = k W_k~ are per-head learnable maps (identity-initialised,
`estimator_maps`). The top-k blocks the gradient, so the estimator learns by attention distillation
(distill=True sows "losses"/"sea_distillation" = KL(teacher bins || Ahat), the teacher being the layer's own
exact softmax attention of the frozen q, k summed into the same bins; O(T^2), a training recipe like the paper's).

What is left out of the paper: its learned decoder (an MLP + CNN that turns the Performer output into the
compressed scores), FlatCSR kernels, the grouped top-k across heads, and the learned output scalers / average-
context mixing of the official code. Here the compressed estimate is the normalised linear attention itself, and
the interpretable attention matrix is the sparse probabilities (sown as attention weights on request).

Causal: the estimator is causal linear attention (row i sees bins only through keys j <= i) and the sparse
softmax is masked with j <= i, so SEA is causal. Decoding keeps the usual KV cache; each decoded query estimates
over the cache (O(S) per token, like `softmax`), the bins being defined on the cache length.

Shapes: x [B, T, E] -> [B, T, E]. Time O(T (C F + F M) + T k D), memory O(T (M + k D)) for fixed top_k and
compressed_length: linear in T. top_k >= T selects every key: SEA is then exactly softmax attention
(position="rope" or "none" like the `softmax` layer).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.core import kv_cache
from attn.core import positions as pos
from attn.core.distillation import attention_distillation_loss
from attn.core.feature_maps import FEATURE_MAPS
from attn.core.headwise_linear import HeadwiseLinear
from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.linear_scan import linear_mask_parts, repeat_kv
from attn.core.masks import Mask
from attn.core.padding import masked_softmax
from attn.core.validation import check_choice, check_qkv, choice, optional, positive, positive_int
from attn.registry import register

Array = jax.Array

ESTIMATOR_MAPS = ("favor", "elu_plus_one", "relu")
POSITIONS = ("rope", "none")


def compression(kv_len: int, compressed_length: int, top_k: int) -> tuple[int, int, int]:
    """(bin width w, number of bins M, bins selected per row b) for `kv_len` keys."""
    width = -(-kv_len // min(compressed_length, kv_len))
    num_bins = -(-kv_len // width)
    return width, num_bins, min(-(-top_k // width), num_bins)


def orthogonal_features(num_features: int, dim: int, seed: int) -> np.ndarray:
    """Performer's orthogonal random features [F, D]: blocks of orthonormal rows, each scaled to the norm of a
    Gaussian vector (so the rows are marginally N(0, I))."""
    rng = np.random.default_rng(seed)
    blocks = [np.linalg.qr(rng.standard_normal((dim, dim)))[0].T for _ in range(-(-num_features // dim))]
    rows = np.concatenate(blocks, axis=0)[:num_features]
    return (rows * np.linalg.norm(rng.standard_normal((num_features, dim)), axis=1)[:, None]).astype(np.float32)


def favor_features(x: Array, projection: Array, *, is_query: bool) -> Array:
    """Positive random features of x [B, T, H, D] -> [B, T, H, F] (softmax kernel exp(q . k / sqrt(D))).

    The exponent is shifted by a stop-gradient maximum: per row for queries, per (batch, head) over all tokens for
    keys. Both shifts are positive factors that cancel in the normalised estimate (and never change a row's top-k).
    """
    x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
    exponent = jnp.einsum("bthd,fd->bthf", x, projection) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    axes = (-1,) if is_query else (1, 3)
    exponent = exponent - jax.lax.stop_gradient(jnp.max(exponent, axis=axes, keepdims=True))
    return jnp.exp(exponent) * projection.shape[0] ** -0.5


def estimate_attention(
    q_features: Array,
    k_features: Array,
    *,
    bin_width: int,
    num_bins: int,
    causal: bool,
    q_offset: Any = 0,
    kv_lengths: Array | None = None,
    chunk_size: int = 64,
) -> Array:
    """The compressed estimate Ahat, float32 [B, Tq, H, M] (rows sum to 1 over the visible bins).

    q_features [B, Tq, H, F], k_features [B, S, KVH, F], positive. Self-attention from position 0 runs on the
    linear-attention core; queries at an offset (decoding) score the S cached keys directly (O(Tq S F)).
    """
    batch, q_len, heads, _ = q_features.shape
    kv_len = k_features.shape[1]
    bins = jax.nn.one_hot(jnp.arange(kv_len) // bin_width, num_bins, dtype=jnp.float32)  # [S, M]
    full = q_len == kv_len and isinstance(q_offset, (int, np.integer)) and q_offset == 0
    if full or not causal:
        values = jnp.broadcast_to(bins[None, :, None, :], (batch, kv_len, k_features.shape[2], num_bins))
        estimate = F.linear_attention(
            q_features, k_features, values, causal=causal, kv_lengths=kv_lengths, chunk_size=chunk_size
        ).astype(jnp.float32)
        # Normalised here rather than by the core's q . z + eps: the features can be small, and the rows are used
        # as distributions (distillation).
        total = jnp.sum(estimate, axis=-1, keepdims=True)
        return estimate / jnp.where(total > 0, total, 1.0)
    scores = jnp.einsum("bthf,bshf->bths", q_features, repeat_kv(k_features, heads))
    visible = jnp.arange(kv_len)[None, :] <= (q_offset + jnp.arange(q_len))[:, None]  # [Tq, S]
    visible = visible[None, :, None, :]
    if kv_lengths is not None:
        visible = visible & (jnp.arange(kv_len) < jnp.asarray(kv_lengths)[:, None])[:, None, None, :]
    scores = jnp.where(visible, scores, 0.0)
    total = jnp.sum(scores, axis=-1, keepdims=True)
    return jnp.einsum("bths,sm->bthm", scores, bins) / jnp.where(total > 0, total, 1.0)


def sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    selected_bins: Array,
    *,
    bin_width: int,
    causal: bool,
    scale: float | None = None,
    q_offset: Any = 0,
    kv_lengths: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Exact softmax attention over the keys of the selected bins.

    q [B, Tq, H, D], k/v [B, S, KVH, D], selected_bins int [B, Tq, H, b]. Returns (out [B, Tq, H, Dv] in q.dtype,
    probs float32 [B, H, Tq, b w], key indices int [B, H, Tq, b w]); memory O(Tq b w D).
    """
    batch, q_len, heads, dim = q.shape
    kv_len = k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    keys = selected_bins[..., None] * bin_width + jnp.arange(bin_width)  # [B, Tq, H, b, w]
    keys = jnp.moveaxis(keys.reshape(batch, q_len, heads, -1), 2, 1)  # [B, H, Tq, K]
    allowed = keys < kv_len
    if causal:
        allowed = allowed & (keys <= (q_offset + jnp.arange(q_len))[None, None, :, None])
    if kv_lengths is not None:
        allowed = allowed & (keys < jnp.asarray(kv_lengths)[:, None, None, None])
    index = jnp.minimum(keys, kv_len - 1).reshape(batch, heads, -1, 1)

    def gather(x: Array) -> Array:  # [B, S, KVH, D] -> [B, H, Tq, K, D]
        x = jnp.swapaxes(repeat_kv(x, heads), 1, 2).astype(jnp.float32)
        return jnp.take_along_axis(x, index, axis=2).reshape(keys.shape + (x.shape[-1],))

    logits = scale * jnp.einsum("bthd,bhtkd->bhtk", q.astype(jnp.float32), gather(k))
    probs = masked_softmax(logits, allowed)
    attended = probs
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        attended = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bhtk,bhtkd->bthd", attended, gather(v))
    return out.astype(q.dtype), probs, keys


def sea_estimate(
    estimator_q: Array,
    estimator_k: Array,
    *,
    top_k: int,
    compressed_length: int,
    causal: bool,
    feature_map: str = "favor",
    num_features: int | None = None,
    feature_seed: int = 0,
    q_offset: Any = 0,
    kv_lengths: Array | None = None,
    chunk_size: int = 64,
) -> tuple[Array, tuple[int, int, int]]:
    """Feature map + compressed estimate: (Ahat float32 [B, Tq, H, M], (bin width, M, bins per row))."""
    dim, kv_len = estimator_q.shape[-1], estimator_k.shape[1]
    if feature_map == "favor":
        count = num_features or max(dim, round(dim * math.log(dim)))
        projection = jnp.asarray(orthogonal_features(count, dim, feature_seed))
        q_features = favor_features(estimator_q, projection, is_query=True)
        k_features = favor_features(estimator_k, projection, is_query=False)
    else:
        phi = FEATURE_MAPS[feature_map]
        q_features, k_features = phi(estimator_q.astype(jnp.float32)), phi(estimator_k.astype(jnp.float32))
    width, num_bins, chosen = compression(kv_len, compressed_length, top_k)
    estimate = estimate_attention(
        q_features,
        k_features,
        bin_width=width,
        num_bins=num_bins,
        causal=causal,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        chunk_size=chunk_size,
    )
    return estimate, (width, num_bins, chosen)


def sea_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    top_k: int,
    compressed_length: int = 128,
    causal: bool = False,
    estimator_q: Array | None = None,
    estimator_k: Array | None = None,
    feature_map: str = "favor",
    num_features: int | None = None,
    feature_seed: int = 0,
    scale: float | None = None,
    q_offset: Any = 0,
    q_lengths: Array | None = None,
    kv_lengths: Array | None = None,
    chunk_size: int = 64,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_aux: bool = False,
) -> Array | tuple[Array, dict[str, Array]]:
    """SEA: estimate (compressed, linear), per-row top-k, sparse exact softmax (see the module docstring).

    Args:
      q: [B, Tq, H, D]. k: [B, S, KVH, D]. v: [B, S, KVH, Dv].
      top_k: keys per row (rounded up to whole bins). compressed_length: M, columns of the compressed estimate.
      causal: causal estimator and sparse mask (queries at positions q_offset + i, keys at 0 .. S-1).
      estimator_q, estimator_k: the estimator's inputs (default q and k), shaped like q and k.
      feature_map: "favor", "elu_plus_one" or "relu". num_features: F of "favor" (default max(D, D ln D)).
      feature_seed: seed of the fixed random features. scale: softmax scale (default 1/sqrt(D)).
      q_lengths, kv_lengths: int [B] padding lengths. chunk_size: of the estimator's linear-attention core.
      dropout_rate, dropout_rng: dropout on the sparse probabilities.
      return_aux: also return {"estimate": [B, Tq, H, M], "probs": [B, H, Tq, K], "keys": [B, H, Tq, K],
        "bins": [S] bin of each key}.
    Returns:
      out [B, Tq, H, Dv] in q.dtype, or (out, aux).
    """
    check_qkv(q, k, v)
    for name, value in (("top_k", top_k), ("compressed_length", compressed_length), ("chunk_size", chunk_size)):
        if not (isinstance(value, (int, np.integer)) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive int")
    check_choice("feature_map", feature_map, ESTIMATOR_MAPS)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r} must be in [0, 1)")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
    estimator_q = q if estimator_q is None else estimator_q
    estimator_k = k if estimator_k is None else estimator_k
    if estimator_q.shape != q.shape or estimator_k.shape != k.shape:
        raise ValueError(
            f"estimator_q {estimator_q.shape} / estimator_k {estimator_k.shape} must be shaped like q {q.shape} "
            f"and k {k.shape}"
        )
    estimate, (width, _, chosen) = sea_estimate(
        estimator_q,
        estimator_k,
        top_k=int(top_k),
        compressed_length=int(compressed_length),
        causal=causal,
        feature_map=feature_map,
        num_features=num_features,
        feature_seed=feature_seed,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        chunk_size=int(chunk_size),
    )
    _, selected = jax.lax.top_k(jax.lax.stop_gradient(estimate), chosen)
    out, probs, keys = sparse_attention(
        q,
        k,
        v,
        selected,
        bin_width=width,
        causal=causal,
        scale=scale,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    if q_lengths is not None:
        rows = (jnp.arange(q.shape[1]) < jnp.asarray(q_lengths)[:, None])[:, :, None, None]
        out, probs = out * rows.astype(out.dtype), probs * jnp.swapaxes(rows, 1, 2)
    if not return_aux:
        return out
    return out, {"estimate": estimate, "probs": probs, "keys": keys, "bins": jnp.arange(k.shape[1]) // width}


def dense_probs(probs: Array, keys: Array, kv_len: int) -> Array:
    """Scatters the sparse probabilities [B, H, Tq, K] at key indices [B, H, Tq, K] into [B, H, Tq, kv_len]."""
    one_hot = jax.nn.one_hot(keys, kv_len, dtype=probs.dtype)  # out-of-range indices give zero rows
    return jnp.einsum("bhtk,bhtks->bhts", probs, one_hot)


def sea_distillation_loss(estimate: Array, teacher_probs: Array, bins: Array, num_bins: int) -> Array:
    """KL(teacher || estimate) over the compressed rows: estimate [B, Tq, H, M], teacher [B, H, Tq, S] summed
    into the M bins of `bins` [S]. A float32 scalar, 0 when the estimate equals the binned teacher."""
    teacher = jnp.einsum("bhts,sm->bhtm", teacher_probs.astype(jnp.float32), jax.nn.one_hot(bins, num_bins))
    return attention_distillation_loss(jnp.moveaxis(estimate, 2, 1), teacher)


@register(
    "sea",
    family="linear",
    paper="SEA: Sparse Linear Attention with Estimated Attention Mask",
    catalog=183,
    op=sea_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="linear-attention estimate of the attention (compressed), per-row top-k, exact sparse softmax",
    option_docs={
        "top_k": "keys attended per query (rounded up to whole bins); >= length gives exact softmax attention",
        "compressed_length": "columns M of the compressed attention estimate (keys are binned into M groups)",
        "feature_map": "estimator kernel: 'favor' (Performer random features), 'elu_plus_one' or 'relu'",
        "num_features": "random features F of 'favor' (None = max(D, D ln D))",
        "feature_seed": "seed of the fixed random features",
        "estimator_maps": "learn per-head linear maps of q and k for the estimator (identity-initialised)",
        "distill": "sow the distillation loss KL(binned softmax teacher || estimate) under 'losses' (O(T^2))",
        "position": "'rope' (rotary q and k) or 'none'",
        "rope_base": "RoPE base (theta) when position='rope'",
        "scale": "softmax scale (None = 1/sqrt(head_dim))",
        "chunk_size": "chunk of the estimator's linear-attention core",
    },
    fidelity="paper",
    reference="the paper's pipeline (compressed estimate, per-row top-k, decompression, exact sparse softmax); its "
    "learned decoder, FlatCSR kernels and grouped top-k are not reproduced (the estimate is the normalised linear "
    "attention)",
    validators={
        "top_k": positive_int,
        "compressed_length": positive_int,
        "chunk_size": positive_int,
        "num_features": optional(positive_int),
        "feature_map": choice(*ESTIMATOR_MAPS),
        "position": choice(*POSITIONS),
        "scale": optional(positive),
    },
)
class SparseEstimatedAttention(AttentionLayer):
    """SEA: linear-attention estimate, top-k selection, exact sparse softmax. x [B, T, E] -> [B, T, E]."""

    top_k: int = 64
    compressed_length: int = 128
    feature_map: str = "favor"
    num_features: int | None = None
    feature_seed: int = 0
    estimator_maps: bool = True
    distill: bool = False
    position: str = "rope"
    rope_base: float = 10000.0
    scale: float | None = None
    chunk_size: int = 64

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        causal, q_lengths, kv_lengths = self.mask_parts(call)
        if call.cross and (causal or call.decode):
            raise ValueError(
                f"sea with a context is non-causal cross-attention; got causal={causal}, decode={call.decode}"
            )
        if call.decode and (not causal or q_lengths is not None or kv_lengths is not None):
            raise ValueError(
                f"decode=True needs a causal mask without lengths (attn.Mask(causal=True)); got {call.mask!r}"
            )

    def mask_parts(self, call: AttentionCall) -> tuple[bool, Array | None, Array | None]:
        """(causal, q_lengths, kv_lengths) of the call's mask; other mask parts raise."""
        return linear_mask_parts(call.mask, "sea")

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """RoPE on self-attention q and k (position='rope'); decoding appends k, v to the KV cache and returns the
        whole cache, with q_offset = the cache index and the mask's kv_lengths = the filled length."""
        batch, length = q.shape[:2]
        offset = kv_cache.current_index(self) if call.decode else 0
        if self.position == "rope" and not call.cross:
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
        """q [B, T, H, D], k/v [B, S, KVH, D] -> [B, T, H, Dv]: estimate, top-k, exact sparse softmax (the sparse
        probabilities sown as attention weights on request; with distill, the estimator's loss under "losses")."""
        causal, q_lengths, kv_lengths = self.mask_parts(call)
        maps = self.estimator_maps_modules()
        estimator_q, estimator_k = (q, k) if maps is None else (maps[0](q), maps[1](k))
        options = dict(
            top_k=self.top_k,
            compressed_length=self.compressed_length,
            causal=causal,
            feature_map=self.feature_map,
            num_features=self.num_features,
            feature_seed=self.feature_seed,
            scale=self.scale,
            q_offset=call.q_offset,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            chunk_size=self.chunk_size,
        )
        y, aux = sea_attention(
            q,
            k,
            v,
            estimator_q=estimator_q,
            estimator_k=estimator_k,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
            return_aux=True,
            **options,
        )
        if self.wants_weights():
            self.sow("intermediates", "attention_weights", dense_probs(aux["probs"], aux["keys"], k.shape[1]))
        if self.distill and not call.decode:
            self.sow_distillation_loss(q, k, v, maps, mask=Mask(causal=causal, kv_lengths=kv_lengths), options=options)
        return y

    def estimator_maps_modules(self) -> tuple[HeadwiseLinear, HeadwiseLinear] | None:
        """The estimator's per-head learnable maps of q (one per query head) and k (one per kv head), or None."""
        if not self.estimator_maps:
            return None
        common = dict(features=self.head_dim, dtype=jnp.float32, param_dtype=self.param_dtype)
        return (
            HeadwiseLinear(groups=self.num_heads, heads_axis="heads", name="query_estimator", **common),
            HeadwiseLinear(groups=self.kv_heads, heads_axis="kv_heads", name="key_estimator", **common),
        )

    def sow_distillation_loss(self, q: Array, k: Array, v: Array, maps, *, mask: Mask, options: dict) -> None:
        """Teacher: exact softmax weights of the frozen q, k; student: the estimate from the same frozen q, k (only
        the estimator maps receive the gradient)."""
        q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
        _, teacher = F.softmax_attention(q, k, v, mask=mask, scale=self.scale, return_probs=True)
        estimator_q, estimator_k = (q, k) if maps is None else (maps[0](q), maps[1](k))
        keep = ("top_k", "compressed_length", "causal", "feature_map", "num_features", "feature_seed", "q_offset")
        estimate, (width, num_bins, _) = sea_estimate(
            estimator_q,
            estimator_k,
            kv_lengths=options["kv_lengths"],
            chunk_size=options["chunk_size"],
            **{name: options[name] for name in keep},
        )
        bins = jnp.arange(k.shape[1]) // width
        self.sow("losses", "sea_distillation", sea_distillation_loss(estimate, teacher["probs"], bins, num_bins))
