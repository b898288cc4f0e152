"""ACMIL: Attention-Challenging Multiple Instance Learning (Zhang et al. 2024, "Attention-Challenging Multiple
Instance Learning for Whole Slide Image Classification", ECCV 2024, catalog [142]) — its training losses.

ACMIL has two parts. Multiple Branch Attention (MBA) gives the MIL model K attention branches, each with its own
classifier, and classifies the bag from the mean attention; Stochastic Top-K Instance Masking (STKIM) masks, while
training, a random part of each branch's top-k instances. Both are architecture: the fields `branches`,
`mask_top_k` and `mask_drop` of attn.models.mil.AttentionMIL (official ACMIL_GA: n_token = 5, n_masked_patch = 10,
mask_drop = 0.6). This technique adds the losses that make the branches learn different patterns
(official Step3_WSI_classification_ACMIL.py train_one_epoch):

    L_branch    = mean_{b,k} CE(branch_logits[b, k], y_b)                        (official loss0)
    A_k         = softmax over the instances of the branch scores (after STKIM)  [B, K, N]
    L_diversity = mean_b sum_{i<j} cos(A_i, A_j) / (K (K - 1) / 2)              (official diff_loss)
    loss        = CE(bag logits, y) + branch_weight * L_branch + diversity_weight * L_diversity

(the official total is diff_loss + loss0 + loss1: both weights 1 by default). The bag cross-entropy is the
trainer's own loss. The model must have branches >= 2 (refused before compilation otherwise).

No-op setting: branch_weight = diversity_weight = 0 (the technique is skipped; the train step is the baseline's bit
for bit — the model's branches and STKIM still train the bag classifier, as the model fields say).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attn.core import validation
from attn.models.mil import intermediate

from .base import Option, Technique, register

COSINE_EPS = 1e-8  # torch.cosine_similarity's default eps


def branch_diversity(weights: jax.Array) -> jax.Array:
    """Mean over bags of the mean pairwise cosine similarity of the K branch attentions: weights [B, K, N], K >= 2
    -> float32 scalar (1 = identical branches, 0 = disjoint)."""
    weights = weights.astype(jnp.float32)
    count = weights.shape[1]
    norms = jnp.maximum(jnp.linalg.norm(weights, axis=-1), COSINE_EPS)  # [B, K]
    unit = weights / norms[..., None]
    cosine = jnp.einsum("bin,bjn->bij", unit, unit)
    upper = jnp.triu(jnp.ones((count, count), bool), k=1)
    pairs = count * (count - 1) / 2
    return jnp.mean(jnp.sum(jnp.where(upper, cosine, 0.0), axis=(1, 2)) / pairs)


def branch_cross_entropy(branch_logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Weighted mean over bags and branches of the cross-entropy of each branch's logits [B, K, C] against the bag
    labels int [B] (weights float [B], None = 1)."""
    log_probs = jax.nn.log_softmax(branch_logits.astype(jnp.float32), axis=-1)
    targets = jnp.broadcast_to(labels[:, None, None].astype(jnp.int32), (*branch_logits.shape[:2], 1))
    nll = -jnp.take_along_axis(log_probs, targets, axis=-1)[..., 0]  # [B, K]
    weights = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    return jnp.sum(jnp.mean(nll, axis=1) * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


@register
class Acmil(Technique):
    """ACMIL's branch and diversity losses for a multi-branch attention-MIL model (see the module docstring)."""

    name = "acmil"
    fidelity = "official-code"
    reference = (
        "Zhang et al. 2024 (arXiv 2311.07125) Sec. 3.2-3.3 (MBA, STKIM); dazhangyu123/ACMIL "
        "architecture/transformer.py ACMIL_GA.forward and Step3_WSI_classification_ACMIL.py train_one_epoch"
    )
    model_kinds = ("mil",)
    options = {
        "branch_weight": Option(1.0, validation.non_negative, "weight of the per-branch cross-entropy (official 1)"),
        "diversity_weight": Option(1.0, validation.non_negative, "weight of the branch cosine similarity (official 1)"),
    }
    collections = ("intermediates",)

    @property
    def active(self) -> bool:
        return self.branch_weight > 0 or self.diversity_weight > 0

    def bind_model(self, model_config: Mapping[str, Any]) -> None:
        branches = model_config.get("branches", 1)
        if not isinstance(branches, int) or branches < 2:
            raise ValueError(
                f"technique 'acmil' needs a multi-branch attention model: model.branches={branches!r} must be >= 2 "
                "(ACMIL uses 5; set model.mask_top_k and model.mask_drop for its top-k instance masking)"
            )

    def loss(
        self,
        logits: Any,
        collections: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        variables: Mapping[str, Any],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        branch = branch_cross_entropy(intermediate(collections, "branch_logits"), batch["labels"], batch.get("weights"))
        diversity = branch_diversity(intermediate(collections, "mil_attention"))
        loss = self.branch_weight * branch + self.diversity_weight * diversity
        return loss, {"loss": loss, "branch_ce": branch, "diversity": diversity}
