"""Attention diversification loss for ViTs (Guo, Stutz & Schiele 2023, "Robustifying Token Attention for Vision
Transformers", ICCV, catalog [148]): the ADL half of TAP + ADL.

ViTs "overfocus": most query tokens put their attention on the same few input tokens, and those tokens are not
robust to corruptions. ADL penalises the cosine similarity between each token's attention vector and the batch
element's mean attention vector, after zeroing the small entries, so tokens aggregate from diverse inputs. Per
layer l, with the attention weights A^l [B, H, N, N] of the train forward:

    M[b, i, :]   = (1 / H) sum_h A^l[b, h, i, :]              head-averaged attention row of query i   [B, N, N]
    S[b, :]      = (1 / N) sum_i M[b, i, :]                    the mean attention vector                 [B, N]
    tau          = threshold / N                               keep entries above `threshold` x uniform
    M~ = M * 1[M > tau],   S~ = S * 1[S > tau]
    cos[b, i]    = <M~[b, i], S~[b]> / (max(||M~[b, i]||, 1e-8) * max(||S~[b]||, 1e-8))
    L_ADL        = (1 / (L + 1e-6)) sum_l mean_{b, i} cos[b, i]
    loss         = L_task + weight * L_ADL

This is the official `AttentionDiversificationLoss` (TAPADL_RVT/engine.py and TAPADL_FAN/main.py): the head mean,
the `th / n_tokens` threshold (default th = 2), torch's cosine_similarity with eps 1e-8, the mean over batch and
queries, and the division by (number of layers + 1e-6). Official weight (`--adloss`) 1. Every query token takes
part (the official RVT/FAN models have no class token; with pool="cls" the class token's row is included too).

TAP (token-aware average pooling: before each block's attention, a per-token softmax mixture of 3x3 average pools
at dilations 0..K-1, predicted by conv3x3 -> norm -> conv3x3, TAPADL_RVT/tap_robust_models.py Block) changes the ViT
block itself, which a training technique cannot do: it is the ViT field `token_pooling="tap"`
(attn.models.token_pooling); configs/vit_tiny.py:tap_adl trains TAP with this loss, as the paper does.

The weights come from the `attention_weights` captures of the train forward ("intermediates" made mutable), so the
mechanism must compute a probability matrix (a config naming one that does not is refused before compilation).

No-op setting: weight = 0 (the technique is skipped; the train step is the baseline's bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn.core import validation

from .base import Option, Technique, register

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's eps
LAYER_EPS = 1e-6  # the official loss starts its layer counter at 1e-6


def layer_similarity(weights: jax.Array, threshold: float) -> jax.Array:
    """Mean over batch and queries of cos(M~[b, i], S~[b]) for one layer's weights [B, H, N, N] -> float32 scalar
    (see the module docstring)."""
    rows = jnp.mean(weights.astype(jnp.float32), axis=1)  # [B, N, N]
    cut = threshold / rows.shape[-1]
    mean_row = jnp.mean(rows, axis=1, keepdims=True)  # [B, 1, N]
    rows = jnp.where(rows > cut, rows, 0.0)
    mean_row = jnp.where(mean_row > cut, mean_row, 0.0)
    dot = jnp.sum(rows * mean_row, axis=-1)
    norms = jnp.maximum(jnp.linalg.norm(rows, axis=-1), COSINE_EPS) * jnp.maximum(
        jnp.linalg.norm(mean_row, axis=-1), COSINE_EPS
    )
    return jnp.mean(dot / norms)


def diversification_loss(layers: Sequence[jax.Array], threshold: float) -> jax.Array:
    """L_ADL of the attention weights of every layer (each [B, H, N, N]) -> float32 scalar."""
    return sum(layer_similarity(w, threshold) for w in layers) / (len(layers) + LAYER_EPS)


@register
class AttentionDiversification(Technique):
    """The attention diversification loss on a ViT's attention weights (see the module docstring)."""

    name = "adl_tap"
    fidelity = "official-code"
    reference = (
        "Guo, Stutz & Schiele 2023 (arXiv 2303.11126; the abstract only, the full text was not available); "
        "guoyongcs/TAPADL "
        "TAPADL_RVT/engine.py and TAPADL_FAN/main.py AttentionDiversificationLoss, main.py --adloss/--threshold"
    )
    model_kinds = ("vit",)
    options = {
        "weight": Option(1.0, validation.non_negative, "weight of L_ADL (official --adloss 1); 0 = off"),
        "threshold": Option(2.0, validation.non_negative, "keep attention above threshold / N (official 2)"),
    }
    collections = ("intermediates",)
    needs_attention_weights = True

    @property
    def active(self) -> bool:
        return self.weight > 0

    def bind_model(self, model_config: Mapping[str, Any]) -> None:
        self.num_layers = int(model_config["num_layers"])

    def loss(
        self,
        logits: jax.Array,
        collections: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        variables: Mapping[str, Any],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        by_layer = self.layer_weights(collections)
        layers = [by_layer[i] for i in range(self.num_layers)]
        similarity = diversification_loss(layers, self.threshold)
        loss = self.weight * similarity
        metrics = {"loss": loss, "similarity": similarity}
        for i, w in enumerate(layers):
            metrics[f"similarity/layer_{i}"] = layer_similarity(w, self.threshold)
        return loss, metrics
