"""Imbalanced-attention fix [38] ("Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large
Vision-Language Model", Arif et al., 2025): rebalance the decoder's attention between image and text tokens.

The paper's analysis: hallucination follows a progressive loss of visual grounding in deeper layers, where the text
queries' attention drifts from the image to the text. The training-free fix has two parts, rebuilt here as:

  dual-stream token selection, per decoder layer l and row (I the image tokens):
      local    L_l = top-k_local_j   mean_{h, text queries i} A^l_{h,ij}      (what the text reads in this layer)
      spatial  G   = top-k_spatial_j saliency_j                               (the image encoder's attention
                                                                              received, last encoder layer)
      selected S_l = L_l united with G

  head-specific modulation, by each head's visual sensitivity on the unsteered input:
      v_{l,h}  = mean_{text queries i} sum_{j in I} A^l_{h,ij}                (the head's image share)
      logits'_{h,ij} = logits_{h,ij} + gamma (l + 1) / L  v_{l,h} / max_h' v_{l,h'}    i text, j in S_l

so heads that already read the image are amplified most, and deeper layers (which lose grounding) more. With
softmax, the selected image tokens' weights grow by the factor e^delta relative to the rest of the row.

Reconstructed: the paper gives neither the selection criteria nor the amplification formula in a form readable here
(the catalog's stand-in: a per-head additive logit boost on selected visual tokens proportional to the head's
visual sensitivity); the streams, the depth factor and the normalisation are this implementation's choices.

No-op: gamma = 0 (bit-identical), or layers=() (no rules). Shapes: decoder weights [L] x [B, H, S, S], saliency
float [B, N], sensitivity float32 [L, B, H], selected bool [L, B, N]; the rule acts on attention_logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn import interventions as iv
from attn.steer.damro import outlier_scores
from attn.steer.registry import register
from attn.steer.vision import DECODER_SELF_ATTENTION, check_layers, check_span, decoder_geometry, num_image_tokens
from attn.steer.visual_tokens import index_mask, text_to_image, top_indices


def decoder_weights(model: Any, variables: Any, images: jax.Array, tokens: jax.Array) -> list[jax.Array]:
    """The attention weights [B, H, S, S] of every decoder layer on the unsteered pass: [L] list."""
    _, cache = iv.run_with_cache(
        model, variables, images, tokens, names=("attention_weights",), layers=[DECODER_SELF_ATTENTION]
    )
    return [cache[f"decoder/layers_{layer}/attention"]["attention_weights"] for layer in range(model.num_layers)]


def visual_sensitivity(weights: Sequence[jax.Array], image_span: tuple[int, int]) -> jax.Array:
    """v_{l,h} per row: each head's attention on the image, mean over the text queries: float32 [L, B, H]."""
    start, stop = image_span
    return jnp.stack([jnp.mean(jnp.sum(w[:, :, stop:, start:stop], axis=-1), axis=-1) for w in weights])


def dual_stream_selection(
    weights: Sequence[jax.Array], saliency: jax.Array, image_span: tuple[int, int], k_local: int, k_spatial: int
) -> jax.Array:
    """S_l per row: bool [L, B, N], the k_local image tokens the layer's text reads most united with the
    k_spatial most salient ones (saliency float [B, N])."""
    n = image_span[1] - image_span[0]
    spatial = index_mask(top_indices(saliency, k_spatial), n) if k_spatial else jnp.zeros(saliency.shape, bool)
    out = []
    for w in weights:
        local = text_to_image(w, image_span)
        out.append(spatial | (index_mask(top_indices(local, k_local), n) if k_local else False))
    return jnp.stack(out)


@register(
    "imbalance_fix",
    paper="[38] Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language Model",
    fidelity="reconstructed",
    reference=(
        "arXiv 2501.12206 abstract (dual-stream token selection of locally informative and spatially significant "
        "visual tokens; head-specific modulation by measured visual sensitivity; visual grounding lost in deeper "
        "layers) and the catalog's stand-in (additive logit boost on selected visual tokens, per head, proportional "
        "to visual sensitivity); no official code found; the formulas are this implementation's"
    ),
    no_op="gamma=0 (bit-identical), or layers=() (no rules)",
)
@dataclasses.dataclass(frozen=True)
class ImbalanceFix:
    """gamma >= 0: the largest logit boost (deepest layer, most visual head); k_local, k_spatial >= 0: tokens per
    selection stream; layers: decoder layers to steer (None: all)."""

    gamma: float = 1.0
    k_local: int = 2
    k_spatial: int = 2
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not self.gamma >= 0:
            raise ValueError(f"gamma={self.gamma!r} must be a number >= 0 (0: no modulation)")
        for name in ("k_local", "k_spatial"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")

    def analyse(self, model: Any, variables: Any, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(sensitivity float32 [L, B, H], selected bool [L, B, N]) from one unsteered pass and the image encoder's
        attention. ValueError when a stream asks for more tokens than the image has."""
        decoder_geometry(model, "imbalance_fix")
        n = num_image_tokens(model, images)
        if max(self.k_local, self.k_spatial) > n:
            raise ValueError(f"k_local={self.k_local}, k_spatial={self.k_spatial}: the image has {n} tokens")
        weights = decoder_weights(model, variables, images, tokens)
        saliency = outlier_scores(model, variables["params"], images)
        span = (0, n)
        return visual_sensitivity(weights, span), dual_stream_selection(
            weights, saliency, span, self.k_local, self.k_spatial
        )

    def rules(
        self, model: Any, sensitivity: jax.Array, selected: jax.Array, image_span: Sequence[int]
    ) -> tuple[iv.Rule, ...]:
        """Rules for `attn.intervene` boosting the selected image keys for the text queries in the chosen layers.
        ValueError for a layer outside the decoder, inputs of the wrong shape, or a bad image_span."""
        num_layers, num_heads = decoder_geometry(model, "imbalance_fix")
        layers = check_layers(self.layers, num_layers, range(num_layers))
        start, stop = check_span(image_span, 1 << 30, "image_span")
        if getattr(sensitivity, "ndim", None) != 3 or tuple(sensitivity.shape[::2]) != (num_layers, num_heads):
            raise ValueError(
                f"sensitivity must be float [num_layers={num_layers}, batch, num_heads={num_heads}]; got shape "
                f"{getattr(sensitivity, 'shape', None)}"
            )
        if getattr(selected, "ndim", None) != 3 or tuple(selected.shape[::2]) != (num_layers, stop - start):
            raise ValueError(
                f"selected must be bool [num_layers={num_layers}, batch, {stop - start}] (the image_span's tokens); "
                f"got shape {getattr(selected, 'shape', None)}"
            )
        top = jnp.max(sensitivity, axis=-1, keepdims=True)
        boost = jnp.where(top > 0, sensitivity / jnp.where(top > 0, top, 1.0), 0.0)  # [L, B, H] in [0, 1]
        gamma = float(self.gamma)

        def rule(layer: int) -> iv.Rule:
            delta = gamma * (layer + 1) / num_layers * boost[layer]  # [B, H]

            def fn(logits: jax.Array, path: str) -> jax.Array:
                keys = jnp.zeros((logits.shape[0], logits.shape[-1]), bool).at[:, start:stop].set(selected[layer])
                add = jnp.where(keys[:, None, None, :], delta[:, :, None, None], 0.0).astype(logits.dtype)
                return logits + add

            return iv.hook(
                "attention_logits", fn, layers=[layer], queries=(stop, 1 << 30), module=DECODER_SELF_ATTENTION
            )

        return tuple(rule(layer) for layer in layers)
