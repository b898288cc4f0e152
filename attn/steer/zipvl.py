"""ZipVL [166] ("ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification", He et al. 2024):
a dynamic, per-layer share of important tokens read off the attention distribution; attention over those only, and
the rest dropped from the KV cache.

In decoder layer l, with A [B, H, S, S] the layer's attention (S = K + T: the image prefix, then the text; in the
prefix-LM every query sees every image key, so ZipVL's normalisation by the number of queries that see a key is the
mean over the S queries):

    a_j = (1 / (H S)) sum_h sum_i A[h, i, start + j]                   j = 0..n-1, n = stop - start (image span)
    a_(1) >= a_(2) >= ... >= a_(n)                                       sorted (ties: lower position first)
    p   = min{ p : sum_{r <= p} a_(r) >= tau * sum_j a_j }              the dynamic count of important tokens
    I_l = the p tokens a_(1..p)
    layer l attends over the text and I_l only: logit(i, start + j) = -inf for j not in I_l, every query i

so an easy input (attention concentrated on few image tokens) keeps few, a hard one many; p differs per row and
layer. The dropped tokens' keys and values are exactly what ZipVL's decoding cache discards for that layer. No-op:
tau = 1 (no rules; bit-identical logits). Each layer's selection reads its own attention given the masks of the
layers before it (`visual_tokens.layerwise_masks`).

This is the paper's v2 (arXiv 2410.08584v2: the less important tokens are discarded). Its v1 keeps them in a
mixed-precision KV cache instead (important tokens at 4 bits, the rest at 2): that cache is the `zipvl_cache`
mechanism (attn.kv.zipvl_cache, the same count p through `important_count`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn.kv.zipvl_cache import important_count
from attn.steer import visual_tokens as vt
from attn.steer.registry import register


def important_tokens(weights: jax.Array, span: tuple[int, int], tau: float) -> jax.Array:
    """ZipVL's important image tokens of one layer: weights [B, H, S, S] -> keep bool [B, n] (the equations of the
    module docstring)."""
    start, stop = span
    scores = jnp.mean(weights[:, :, :, start:stop], axis=(1, 2))  # [B, n]
    order = jnp.argsort(-scores, axis=-1, stable=True)
    count = jnp.minimum(important_count(scores, tau), scores.shape[-1])  # p per row, [B, 1]
    keep_ranked = jnp.arange(scores.shape[-1]) < count
    rows = jnp.arange(scores.shape[0])[:, None]
    return jnp.zeros(scores.shape, bool).at[rows, order].set(keep_ranked)


@register(
    "zipvl",
    paper="[166] ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification (He et al. 2024)",
    fidelity="reconstructed",
    reference=(
        "arXiv 2410.08584 (abstract and the layer-wise adaptive ratio p = min{p : sum of the p largest normalized "
        "attention scores >= tau * total}); no official code was found. Differences: the scores use every query of "
        "the layer (the paper approximates them with probe queries to stay on FlashAttention), the selection acts on "
        "the image tokens only (text tokens are always kept), and the KV-cache side is the same per-layer key mask "
        "(v2's discarding; v1's mixed-precision storage is the zipvl_cache mechanism, attn.kv.zipvl_cache)"
    ),
    no_op="tau=1 (every image token in every layer; bit-identical logits)",
)
@dataclasses.dataclass(frozen=True)
class ZipVL:
    """tau in (0, 1]: the share of the image tokens' attention mass the kept tokens must cover; layers: the decoder
    layers sparsified (None: all); span: (start, stop) of the image tokens in the decoder's sequence (None: the
    prefix)."""

    tau: float
    layers: Sequence[int] | None = None
    span: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        vt.check_ratio("tau", self.tau)

    def check(self, model: Any) -> None:
        """ValueError naming `model` for a model this system cannot reduce, or `layers` for a layer it lacks."""
        vt.check_prefix_vlm(model)
        vt.check_weights(model, "zipvl", vision=False)
        for layer in self.layers or ():
            if not 0 <= layer < model.num_layers:
                raise ValueError(f"layers has {layer}, out of range: the decoder has {model.num_layers} layers")

    def reduce(self, model: Any, params: Any, images: jax.Array, tokens: jax.Array) -> vt.Reduction:
        """The Reduction for images [B, H, W, C] and text tokens [B, T]: the prefix unchanged, per-layer key masks
        [L, B, n]; `kept` the share of the image span each layer keeps."""
        self.check(model)
        prefix = vt.image_tokens(model, params, images)
        span = vt.check_span(
            (0, prefix.shape[1]) if self.span is None else self.span, prefix.shape[1] + tokens.shape[1]
        )
        if self.tau == 1.0:
            return vt.unreduced(prefix, model.num_layers)
        chosen = range(model.num_layers) if self.layers is None else set(self.layers)

        def select(layer: int, weights: jax.Array, previous: jax.Array) -> jax.Array:
            if layer not in chosen:
                return jnp.ones_like(previous)
            return important_tokens(weights, span, self.tau)

        masks = vt.layerwise_masks(model, params, prefix, tokens, span, select)
        return vt.Reduction(prefix, jnp.mean(masks, axis=-1).T.astype(jnp.float32), masks, span[0])
