"""VMTC + CMAI [87] ("Enhancing Instruction-Following Capability of Visual-Language Models by Reducing Image
Redundancy", Yang et al. 2024): visual-modality token compression (keep the primary image tokens, merge the redundant
ones by clustering) and cross-modality attention inhibition (text-image pairs with a low focus score get no
attention).

VMTC, with s [B, N] the image encoder's [CLS] attention score of each image token (`visual_tokens.cls_scores`), x_j
the image tokens [B, N, d_model], k = max(1, ceil(ratio * N)) tokens entering the decoder:

    k_p = min(k, max(1, round(primary_share * k))),  k_m = k - k_p
    P   = the k_p tokens with the largest s (position order)                          primary tokens, kept as they are
    R   = the other N - k_p tokens (position order)                                   redundant tokens
    c_m = x_{R[floor(m |R| / k_m)]}, m = 0..k_m-1                                     evenly spaced initial centres
    repeat `iterations` times:  a_r = argmin_m |x_r - c_m|^2  (ties: lower m);  c_m = mean{x_r : a_r = m} (kept if
                                empty)                                                 k-means on the redundant tokens
    prefix = [x_P ; c_0 .. c_{k_m-1}]                                                 [B, k, d_model]

CMAI, in each decoder layer's self-attention with P the layer's attention [B, H, S, S] and the image tokens at
positions [start, stop), text after them:

    F_ij = sum_{t >= stop} P_it P_tj                       focus of query i on image key j, through the text tokens
    for each text query i >= stop: the m = min(floor(inhibit * n), n - 1) image keys with the lowest F_ij (ties:
    lower position) get logit -inf, so the softmax renormalises the query's attention over the rest

No-op: ratio = 1 and inhibit = 0 (every token unmerged, no rules; bit-identical logits). The paper does not give the
clustering's settings, the score that picks the primary tokens, or the inhibited share; see the registry record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn import interventions as iv
from attn.steer import visual_tokens as vt
from attn.steer.registry import register


def merge_tokens(tokens: jax.Array, scores: jax.Array, k: int, primary_share: float, iterations: int) -> jax.Array:
    """VMTC: tokens [B, N, D], scores [B, N] -> [B, k, D] (k_p primary tokens, then k_m cluster means)."""
    n = tokens.shape[1]
    primary_count = min(k, max(1, int(primary_share * k + 0.5)))
    merged_count = k - primary_count
    primary = vt.top_indices(scores, primary_count)
    kept = vt.gather_tokens(tokens, primary)
    if merged_count == 0:
        return kept
    rest = jnp.argsort(vt.index_mask(primary, n), axis=-1, stable=True)[:, : n - primary_count]
    x = vt.gather_tokens(tokens, rest).astype(jnp.float32)  # [B, R, D]
    starts = jnp.asarray([m * (n - primary_count) // merged_count for m in range(merged_count)])
    centres = x[:, starts]
    for _ in range(iterations):
        distance = jnp.sum((x[:, :, None] - centres[:, None]) ** 2, axis=-1)  # [B, R, k_m]
        onehot = jax.nn.one_hot(jnp.argmin(distance, axis=-1), merged_count, dtype=x.dtype)
        counts = jnp.sum(onehot, axis=1)[..., None]  # [B, k_m, 1]
        sums = jnp.einsum("brm,brd->bmd", onehot, x)
        centres = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centres)
    return jnp.concatenate([kept, centres.astype(tokens.dtype)], axis=1)


def inhibition_mask(weights: jax.Array, span: tuple[int, int], inhibit: float) -> jax.Array:
    """CMAI's inhibited (query, image key) pairs: weights [B, H, S, S] -> bool [B, H, S, n] (text queries only)."""
    start, stop = span
    n = stop - start
    count = min(int(inhibit * n), n - 1)
    focus = jnp.einsum("bhit,bhtj->bhij", weights[..., stop:], weights[:, :, stop:, start:stop])
    rank = jnp.argsort(jnp.argsort(focus, axis=-1, stable=True), axis=-1)  # 0 = the lowest focus
    return (rank < count) & (jnp.arange(weights.shape[2]) >= stop)[:, None]


@dataclasses.dataclass(frozen=True)
class Inhibition:
    """CMAI as a rule maker for `visual_tokens.Reduction.edit` (hashable): inhibit in (0, 1), the image span, the
    decoder layers."""

    inhibit: float
    span: tuple[int, int]
    layers: tuple[int, ...]

    def rules(self, model: Any) -> tuple[iv.Rule, ...]:
        start, stop = self.span

        def fn(logits: jax.Array, path: str) -> jax.Array:
            inhibited = inhibition_mask(jax.nn.softmax(logits, axis=-1), self.span, self.inhibit)
            image = logits[..., start:stop]
            return logits.at[..., start:stop].set(jnp.where(inhibited, -jnp.inf, image))

        return tuple(
            iv.hook("attention_logits", fn, layers=[f"decoder/layers_{layer}"], module=vt.DECODER_SELF_ATTENTION)
            for layer in self.layers
        )


@register(
    "vmtc_cmai",
    paper="[87] Enhancing Instruction-Following Capability of Visual-Language Models by Reducing Image Redundancy "
    "(VMTC + CMAI, Yang et al. 2024)",
    fidelity="reconstructed",
    reference=(
        "arXiv 2411.15453 (abstract: primary tokens kept, redundant tokens clustered and merged; a text-to-image "
        "focus score aggregating text-to-image attention by text-to-text attention, attention inhibited on low-score "
        "pairs; secondary summaries name k-means and a modified causal mask); no official code was found. "
        "Reconstructed: primary tokens by the encoder's [CLS] attention, k-means with evenly spaced initial centres "
        "and a fixed number of iterations, F = A_text,text A_text,image per head, the lowest share of each text "
        "query's image keys masked"
    ),
    no_op="ratio=1 and inhibit=0 (bit-identical logits)",
)
@dataclasses.dataclass(frozen=True)
class VmtcCmai:
    """ratio in (0, 1]: the share of image tokens entering the decoder (primary + merged); primary_share in (0, 1]:
    the share of those that are primary tokens; iterations: k-means steps; inhibit in [0, 1): the share of each text
    query's image keys CMAI masks; layers: decoder layers with CMAI (None: all); cls_layers: encoder layers of the
    [CLS] score (None: all)."""

    ratio: float
    inhibit: float = 0.0
    primary_share: float = 0.5
    iterations: int = 3
    layers: Sequence[int] | None = None
    cls_layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        vt.check_ratio("ratio", self.ratio)
        vt.check_ratio("primary_share", self.primary_share)
        if isinstance(self.inhibit, bool) or not isinstance(self.inhibit, (int, float)) or not 0 <= self.inhibit < 1:
            raise ValueError(f"inhibit={self.inhibit!r} must be a number in [0, 1) (0: no inhibition)")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations={self.iterations!r} must be a non-negative int")

    def check(self, model: Any) -> None:
        """ValueError naming `model` for a model this system cannot reduce, or `layers` for a layer it lacks."""
        vt.check_prefix_vlm(model)
        vt.check_weights(model, "vmtc_cmai", vision=True)
        if self.inhibit > 0:
            vt.check_weights(model, "vmtc_cmai", vision=False)
        for layer in self.layers or ():
            if not 0 <= layer < model.num_layers:
                raise ValueError(f"layers has {layer}, out of range: the decoder has {model.num_layers} layers")

    def reduce(self, model: Any, params: Any, images: jax.Array, tokens: jax.Array) -> vt.Reduction:
        """The Reduction for images [B, H, W, C] and text tokens [B, T]: the merged prefix [B, k, d_model] and, with
        inhibit > 0, CMAI on the decoder."""
        self.check(model)
        prefix = vt.image_tokens(model, params, images)
        n = prefix.shape[1]
        k = vt.keep_count(self.ratio, n)
        if k < n:
            scores = vt.cls_scores(model, params, images, self.cls_layers)
            prefix = merge_tokens(prefix, scores, k, self.primary_share, self.iterations)
        kept = jnp.full((prefix.shape[0], model.num_layers), k / n, jnp.float32)
        if self.inhibit == 0:
            return vt.Reduction(prefix, kept)
        layers = tuple(range(model.num_layers)) if self.layers is None else tuple(sorted(set(self.layers)))
        return vt.Reduction(prefix, kept, edit=Inhibition(float(self.inhibit), (0, k), layers))
