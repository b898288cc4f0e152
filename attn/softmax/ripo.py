"""`ripo`: RIPO attention — relative index, pitch and onset terms for symbolic music.

Paper: "A Domain-Knowledge-Inspired Music Embedding Space and a Novel Attention Mechanism for Symbolic Music
Modeling" (Guo, Kang, Herremans, AAAI 2023; code github.com/guozixunnicolas/FundamentalMusicEmbedding, whose
`RelativeGlobalAttention_relative_index_pitch_onset` and configs fixed the details below).

Every token t carries an index n_t, a pitch p_t and an onset o_t (cumulative duration). The logits add three
relative terms to the content term:

    S_idx[i, j]   = q_i . E_r[n_j - n_i]                      Music-Transformer relative index (distances -(M-1)..0,
                                                              one E_r [M, D] shared by the heads, as the official code)
    S_pitch[i, j] = q_i,h . (A_p FMS_p(p_i - p_j) + c_p)_h    relative pitch (interval)
    S_onset[i, j] = q_i,h . (A_o FMS_o(o_i - o_j) + c_o)_h    relative onset
    o = softmax((Q K^T + S_idx + S_pitch + S_onset) / sqrt(D) + mask) V

FMS is the Fundamental Music Embedding of a relative attribute (the bias-free sinusoid of FME):

    FMS(d)[k] = sin(w_k d) for even k, cos(w_k d) for odd k,   w_k = base^(-2 floor(k/2) / F)   (k < F = fme_dim)

with trainable w_k (the paper's trainable FME; bases 9919 for pitch and 7920 for onset as in its configs).
A (F -> H x D) and c are the composition of the official code's two linear maps (the embedding's `senn` and the
attention's `relnn`). Pairs involving a token without a pitch (rest / pad; here pitch < 0) use a learned vector
s_p in place of FMS_p, as the official "relative pitch supplement" embedding.

Computation: the relative pitch/onset embeddings are never built as the paper's [B, T, T, E] tensor. Because
sin(w(a_i - a_j)) and cos(w(a_i - a_j)) split into products of functions of a_i and of a_j, each term is one
matmul of rank 2F:

    u_i = A^T q_i  [H, F];   S[i, j] = sum_k u_ik (alpha_k(a_i) cos(w_k a_j) + beta_k(a_i) sin(w_k a_j)) + q_i . c
    (alpha, beta) = (sin, -cos) of w_k a_i for even k, (cos, sin) for odd k

which is exact (attributes are shifted by the first key's value first, to keep the angles small in float32).

Inputs: `positions` float or int [B, T, 3] = (index, pitch, onset) (pitch < 0 marks a token without a pitch;
onsets in any consistent unit, e.g. beats). positions [B, T] or None give only the index (then arange, offset
by the cache index when decoding) with pitch = onset = 0: the pitch and onset terms are then constant along each
row and cancel in the softmax, so the layer is index-relative attention (it trains in the text LM configs).
Decoding caches the keys' attributes next to the KV cache ("cached_attributes").

Shapes: x [B, T, E] -> [B, T, E]; A [F, H, D]; w [F]; E_r [1|H, M, D]. Time O(B H T^2 (D + F)), memory
O(B H T (T + M + F)).

Reduction to softmax: relative_terms=() is exactly the `softmax` layer with position="none" and the same
q/k/v/o parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall
from attn.core.validation import optional, positive, positive_int, subset
from attn.registry import get, register
from attn.softmax.relative_music import (
    MusicRelativeAttention,
    music_relative_logits,
    relative_logits_gathered,
    relative_table,
)

Array = jax.Array

TERMS = ("index", "pitch", "onset")


def fme_frequencies(features: int, base: float) -> Array:
    """w_k = base^(-2 floor(k/2) / F), k < F: float32 [F] (sin and cos features of a pair share the initial w)."""
    k = jnp.arange(features)
    return jnp.asarray(base, jnp.float32) ** (-2.0 * (k // 2) / features)


def fms(delta: Array, frequencies: Array) -> Array:
    """FMS(d)[k] = sin(w_k d) (even k), cos(w_k d) (odd k): [...] -> float32 [..., F]."""
    angles = jnp.asarray(delta, jnp.float32)[..., None] * jnp.asarray(frequencies, jnp.float32)
    even = (jnp.arange(angles.shape[-1]) % 2) == 0
    return jnp.where(even, jnp.sin(angles), jnp.cos(angles))


def relative_attribute_logits(
    q: Array,
    q_values: Array,
    kv_values: Array,
    frequencies: Array,
    kernel: Array,
    bias: Array,
    unknown: Array | None = None,
) -> Array:
    """S[b, h, i, j] = q[b, i, h] . (A^T FMS(a_i - a_j) + c)[h], computed with rank-2F factors. float32 [B, H, Tq, Tk].

    q [B, Tq, H, D]; q_values [B|1, Tq], kv_values [B|1, Tk] (attribute values a); frequencies w [F]; kernel A
    [F, H, D]; bias c [H, D]; unknown s [F] or None: pairs where either value is negative use s instead of FMS.
    """
    q32 = q.astype(jnp.float32)
    qa = jnp.asarray(q_values, jnp.float32)
    ka = jnp.asarray(kv_values, jnp.float32)
    reference = ka[:, :1]  # only differences matter: shift to keep w * a small
    w = jnp.asarray(frequencies, jnp.float32)
    theta_q = (qa - reference)[..., None] * w  # [B, Tq, F]
    theta_k = (ka - reference)[..., None] * w  # [B, Tk, F]
    even = (jnp.arange(w.shape[0]) % 2) == 0
    alpha = jnp.where(even, jnp.sin(theta_q), jnp.cos(theta_q))
    beta = jnp.where(even, -jnp.cos(theta_q), jnp.sin(theta_q))
    u = jnp.einsum("bihd,fhd->bhif", q32, jnp.asarray(kernel, jnp.float32))  # [B, H, Tq, F]
    scores = jnp.einsum(
        "bhif,bjf->bhij", u * alpha[:, None], jnp.broadcast_to(jnp.cos(theta_k), (q.shape[0], *theta_k.shape[1:]))
    )
    scores = scores + jnp.einsum(
        "bhif,bjf->bhij", u * beta[:, None], jnp.broadcast_to(jnp.sin(theta_k), (q.shape[0], *theta_k.shape[1:]))
    )
    constant = jnp.einsum("bihd,hd->bhi", q32, jnp.asarray(bias, jnp.float32))[..., None]
    scores = scores + constant
    if unknown is not None:
        special = jnp.einsum("bhif,f->bhi", u, jnp.asarray(unknown, jnp.float32))[..., None] + constant
        pair = (qa[:, :, None] < 0) | (ka[:, None, :] < 0)  # [B|1, Tq, Tk]
        scores = jnp.where(pair[:, None], special, scores)
    return scores


@register(
    "ripo",
    family="softmax",
    paper="A Domain-Knowledge-Inspired Music Embedding Space and a Novel Attention Mechanism for Symbolic Music "
    "Modeling",
    catalog=102,
    op=relative_attribute_logits,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="relative index + pitch-interval + onset-interval logits (FME sinusoids); positions [B, T, 3]",
    option_docs={
        **{n: o.doc for n, o in get("relative_music").options.items()},
        "share_heads": "one relative index table E_r for all heads (the official code) instead of one per head",
        "relative_terms": "subset of ('index', 'pitch', 'onset') added to the logits; () = softmax",
        "fme_dim": "features F of the relative pitch/onset sinusoids (even; None = num_heads * head_dim)",
        "pitch_base": "FME base of the pitch frequencies (paper config: 9919)",
        "onset_base": "FME base of the onset frequencies (paper config: 7920)",
    },
    fidelity="official-code",
    reference="github.com/guozixunnicolas/FundamentalMusicEmbedding "
    "RelativeGlobalAttention_relative_index_pitch_onset and its configs (FME bases 9919 / 7920)",
    validators={
        "relative_terms": subset(*TERMS),
        "fme_dim": optional(positive_int),
        "pitch_base": positive,
        "onset_base": positive,
    },
    has_attention_weights=True,
)
class RIPOAttention(MusicRelativeAttention):
    """Relative index / pitch / onset attention. x [B, T, E], positions [B, T, 3] (index, pitch, onset) -> [B, T, E]."""

    share_heads: bool = True
    relative_terms: tuple[str, ...] = TERMS
    fme_dim: int | None = None
    pitch_base: float = 9919.0
    onset_base: float = 7920.0

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if self.fme_dim is not None and self.fme_dim % 2:
            raise ValueError(f"fme_dim={self.fme_dim!r} must be a positive even int (or None)")

    def query_positions(self, positions: Array | None, batch: int, length: int, offset: Any) -> Array:
        """int32 [B, T]: the index channel of positions [B, T, 3] (rounded), else the `softmax` layer's positions
        (RoPE, with position="rope", rotates by them)."""
        if positions is not None and jnp.ndim(positions) == 3:
            return jnp.round(self._attributes(positions, batch, length, offset)[..., 0]).astype(jnp.int32)
        return super().query_positions(positions, batch, length, offset)

    def _attributes(self, positions: Array | None, batch: int, length: int, q_offset) -> Array:
        """float32 [B, T, 3] (index, pitch, onset) from positions [B, T, 3], [B, T] / [T] (index only) or None."""
        if positions is not None and jnp.ndim(positions) == 3:
            positions = jnp.asarray(positions)
            if positions.shape[-1] != 3 or positions.shape[1] != length:
                raise ValueError(
                    f"positions has shape {positions.shape}; expected [batch, {length}, 3] (index, pitch, onset)"
                )
            return jnp.broadcast_to(positions.astype(jnp.float32), (batch, length, 3))
        index = self.query_positions(positions, batch, length, q_offset).astype(jnp.float32)
        return jnp.stack([index, jnp.zeros_like(index), jnp.zeros_like(index)], axis=-1)

    def relative_logits(self, q: Array, kv_len: int, positions: Array | None, q_offset, decode: bool) -> Array | None:
        terms = tuple(self.relative_terms)
        features = self.num_heads * self.head_dim if self.fme_dim is None else self.fme_dim
        if not terms:
            return None
        batch, length = q.shape[0], q.shape[1]
        q_attr = self._attributes(positions, batch, length, q_offset)
        kv_attr = q_attr
        if decode:
            # cache_write already ran: this chunk's keys went to q_offset (0 on the creating call, where the cache
            # is exactly this chunk); keep their attributes at the same slots.
            # Side state of the KV cache on the cache protocol (a RecurrentState sharing the cache's index).
            cached = cache_lib.load_state(self, ("cached_attributes",), shared_index=True)
            stored = jnp.zeros((batch, kv_len, 3), jnp.float32) if cached is None else cached.state["cached_attributes"]
            kv_attr = jax.lax.dynamic_update_slice_in_dim(stored, q_attr, q_offset, axis=1)
            axes = (("cached_attributes", ("batch", "cache_length", None)),)
            cache_lib.store_state(self, cache_lib.RecurrentState({"cached_attributes": kv_attr}, None, axes))
        scores = jnp.zeros((batch, self.num_heads, length, kv_len), jnp.float32)
        if "index" in terms:
            heads = 1 if self.share_heads else self.num_heads
            table = relative_table(
                self, "relative_embeddings", heads, self.max_distance, self.head_dim, self.param_dtype
            )
            if positions is None:
                scores = scores + music_relative_logits(self, table, q, kv_len, None, q_offset)
            else:
                index = lambda a: jnp.round(a[..., 0]).astype(jnp.int32)
                scores = scores + relative_logits_gathered(q, table, index(q_attr), index(kv_attr))
        for channel, name, base in ((1, "pitch", self.pitch_base), (2, "onset", self.onset_base)):
            if name in terms:
                scores = scores + self._attribute_term(
                    q, q_attr[..., channel], kv_attr[..., channel], name, base, features
                )
        return scores

    def _attribute_term(self, q: Array, q_values: Array, kv_values: Array, name: str, base: float, features: int):
        param = lambda suffix, init, shape, axes: self.param(
            f"{name}_{suffix}", nn.with_logical_partitioning(init, axes), shape, self.param_dtype
        )
        frequencies = param(
            "frequencies",
            lambda key, shape, dtype: fme_frequencies(shape[0], base).astype(dtype),
            (features,),
            ("relative_features",),
        )
        kernel = param(
            "projection",
            nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
            (features, self.num_heads, self.head_dim),
            ("relative_features", "heads", "head_dim"),
        )
        bias = param("projection_bias", nn.initializers.zeros, (self.num_heads, self.head_dim), ("heads", "head_dim"))
        unknown = None
        if name == "pitch":
            uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -0.1, 0.1)
            unknown = param("unknown", uniform, (features,), ("relative_features",))
        return relative_attribute_logits(q, q_values, kv_values, frequencies, kernel, bias, unknown)
