"""DAMRO [95] ("DAMRO: Dive into the Attention Mechanism of LVLM to Reduce Object Hallucination", Gong et al.,
EMNLP 2024): outlier image tokens found from the vision encoder's attention, their influence removed at decoding.

The decoder's attention over the image follows the vision encoder's, and both concentrate on a few background
"outlier" tokens. DAMRO ranks the N image tokens by the vision encoder's attention and keeps the top k as outliers
O, then decodes contrastively against a second pass that sees only the outliers:

    score_j  = mean over heads of A^{enc, last}_{CLS, j}        (the class token's attention, last encoder layer)
    O        = top-k_j score_j
    l        = logits(image, text),   l_O = logits(image tokens in O only, text)
    l'_v     = (1 + alpha) l_v - alpha l_{O,v}     where l_v >= log(beta) + max_u l_u, else -inf

(the adaptive plausibility cut of contrastive decoding: only tokens within a factor beta of the best keep a score).

Adaptation: the image encoder here has no class token unless the model sets vision_cls_token=True. With one, the
class token's row is used as in the paper; without, score_j is the attention token j receives in the last encoder
layer, averaged over heads and queries (the column mean of the map, which a class token's row approximates in a ViT
whose tokens share the sink). "Only the outliers" is done by masking the other image keys out of every decoder
layer (logit -inf for every query): exactly the decoder run on the outlier tokens alone with every token at its
original position (for a decoder without positions, the same as deleting the other image tokens; with RoPE the kept
tokens stay where they were in the image rather than moving up).

No-op: alpha = 0 with beta = 0 (bit-identical logits); alpha = 0 alone keeps the greedy choice (the cut only removes
tokens below the best). Shapes: scores float32 [B, N], outliers bool [B, N], logits [..., V].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn import interventions as iv
from attn.steer.registry import register
from attn.steer.vision import check_span, decoder_geometry
from attn.steer.visual_tokens import check_weights, index_mask, key_mask_rule, top_indices, vision_attention


def outlier_scores(model: Any, params: Any, images: jax.Array) -> jax.Array:
    """score_j of the module docstring: float32 [B, N] from the last image-encoder layer (the class token's row
    with vision_cls_token, else the mean attention each image token receives)."""
    decoder_geometry(model, "damro", needs_weights=False)
    check_weights(model, "damro", vision=True)
    weights = vision_attention(model, params, images)[-1]  # [B, H, S, S]
    if getattr(model, "vision_cls_token", False):
        return jnp.mean(weights[:, :, 0, 1:], axis=1)
    return jnp.mean(weights, axis=(1, 2))


def contrastive_logits(logits: jax.Array, outlier_logits: jax.Array, alpha: float, beta: float) -> jax.Array:
    """(1 + alpha) logits - alpha outlier_logits where logits >= log(beta) + max logits, else -inf: [..., V]."""
    cutoff = (math.log(beta) if beta > 0 else -math.inf) + jnp.max(logits, axis=-1, keepdims=True)
    diffs = (1.0 + alpha) * logits - alpha * outlier_logits
    return jnp.where(logits < cutoff, -jnp.inf, diffs)


@register(
    "damro",
    paper="[95] DAMRO: Dive into the Attention Mechanism of LVLM to Reduce Object Hallucination (Gong et al., 2024)",
    fidelity="official-code",
    reference=(
        "arXiv 2410.04514 section 3 and coder-gx/DAMRO sample_method/sample.py (cutoff log(beta) + max logit, "
        "(1 + alpha) l - alpha l_cd masked below the cutoff; l_cd from a second pass whose image input is the top-k "
        "outlier tokens by the ViT's CLS attention). Differences: without a class token the outliers are ranked by "
        "the mean attention received in the last encoder layer; the outlier-only pass masks the other image keys "
        "(positions kept)"
    ),
    no_op="alpha=0 with beta=0 (bit-identical logits); alpha=0 keeps the greedy choice",
)
@dataclasses.dataclass(frozen=True)
class Damro:
    """alpha >= 0: the contrast strength; beta in [0, 1]: the plausibility cut (0: none); k >= 1: outlier tokens."""

    alpha: float = 0.5
    beta: float = 0.1
    k: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
            raise ValueError(f"alpha={self.alpha!r} must be a number >= 0 (0: no contrast)")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta={self.beta!r} must be a number in [0, 1] (0: no plausibility cut)")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k={self.k!r} must be an int >= 1 (outlier image tokens)")

    def outliers(self, scores: jax.Array) -> jax.Array:
        """bool [B, N]: the k highest-scoring image tokens of scores [B, N]. ValueError when k > N."""
        if self.k > scores.shape[-1]:
            raise ValueError(f"k={self.k} exceeds the {scores.shape[-1]} image tokens")
        return index_mask(top_indices(scores, self.k), scores.shape[-1])

    def rules(self, model: Any, outliers: jax.Array, image_span: Sequence[int]) -> tuple[iv.Rule, ...]:
        """Rules for the outlier-only pass: every decoder layer's self-attention sees, of the image keys in
        image_span, only the outliers (bool [B, N], N = the span's length). ValueError for a span of another
        length, or a decoder layer without attention weights."""
        num_layers, _ = decoder_geometry(model, "damro")
        start, stop = check_span(image_span, 1 << 30, "image_span")
        if getattr(outliers, "ndim", None) != 2 or outliers.shape[-1] != stop - start:
            raise ValueError(
                f"outliers must be bool [batch, {stop - start}] (the image_span's tokens); got shape "
                f"{getattr(outliers, 'shape', None)}"
            )
        return tuple(key_mask_rule(layer, outliers, start) for layer in range(num_layers))

    def combine(self, logits: jax.Array, outlier_logits: jax.Array) -> jax.Array:
        """The contrastive logits [..., V] of the full pass's and the outlier-only pass's logits."""
        if logits.shape != outlier_logits.shape:
            raise ValueError(f"outlier_logits has shape {outlier_logits.shape}; logits has {logits.shape}")
        return contrastive_logits(logits, outlier_logits, float(self.alpha), float(self.beta))
