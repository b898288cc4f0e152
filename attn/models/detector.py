"""Dense object-centre detector: a ViT encoder whose every patch token predicts "is an object centre here, of which
class, and where inside the patch".

    images float [B, H, W, C] -> patch tokens [B, N, d_model] (+ learned positions) -> num_layers blocks -> final norm
    -> Dense -> float32 [B, N, 1 + num_classes + 2]:
       [..., 0]                  background logit
       [..., 1 : 1 + C]          class logits (the object whose centre lies in this patch)
       [..., 1 + C :]            centre offset (row, column) from the patch centre, in patch units

A per-token objectness + offset head (CenterNet / FCOS style) rather than a DETR set predictor: one dense prediction
per token needs no Hungarian matching, so it trains in minutes on a CPU, and every encoder token's output is judged,
which is what a token-selecting encoder (e.g. `focus_detr`) has to preserve. `decode_detections` turns the output
into centres and classes; `train.tasks` holds the loss and the hit-rate metric.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.models.encoder import classifier
from attn.models.fields import AttentionOptions, hash_fields
from attn.models.trunk import block_stack
from attn.models.vit import embed_patches, patch_grid

Dtype = Any


def patch_centres(grid: tuple[int, int], patch_size: int) -> jax.Array:
    """(row, column) pixel centres float32 [h * w, 2] of the patches of a grid (h, w), row-major."""
    rows, cols = jnp.meshgrid(jnp.arange(grid[0]), jnp.arange(grid[1]), indexing="ij")
    return (jnp.stack([rows.ravel(), cols.ravel()], -1).astype(jnp.float32) + 0.5) * patch_size


def decode_detections(outputs: jax.Array, grid: tuple[int, int], patch_size: int) -> tuple[jax.Array, jax.Array]:
    """outputs float [B, N, 1 + C + 2] -> (label int32 [B, N]: 0 background, c + 1 class c; centre float32 [B, N, 2]:
    the patch centre plus the predicted offset times patch_size, in pixels)."""
    classes = outputs.shape[-1] - 3
    label = jnp.argmax(outputs[..., : 1 + classes], axis=-1).astype(jnp.int32)
    centre = patch_centres(grid, patch_size)[None] + outputs[..., 1 + classes :].astype(jnp.float32) * patch_size
    return label, centre


class Detector(nn.Module):
    """`__call__(images float[B, H, W, C], *, deterministic=True)` -> float32 [B, N, 1 + num_classes + 2].

    N = (H / patch_size) * (W / patch_size). Trunk fields as in `ViT` (no class token: every token is a patch).
    `hit_radius` is the distance in pixels within which a predicted centre hits an object, read by the task's metric
    (it has no effect on the forward). Parameters: `patch_embedding`, `position_embedding`, `layers_<i>`,
    `final_norm`, `classifier` (kernel [d_model, 1 + num_classes + 2]).
    """

    num_classes: int
    patch_size: int
    num_layers: int
    d_model: int
    num_heads: int
    mlp_dim: int
    head_dim: int | None = None
    num_kv_heads: int | None = None
    attention: str | Sequence[str] = "softmax"
    attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    norm: str = "layernorm"
    mlp: str = "gelu"
    dropout_rate: float = 0.0
    hit_radius: float = 2.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __hash__(self) -> int:
        return hash_fields(self)

    def grid(self, images: jax.Array) -> tuple[int, int]:
        """The patch grid (H // patch_size, W // patch_size); ValueError for bad fields or image shapes."""
        if self.patch_size <= 0:
            raise ValueError(f"patch_size={self.patch_size} must be positive")
        if self.num_classes <= 0:
            raise ValueError(f"num_classes={self.num_classes} must be positive (object classes)")
        if not self.hit_radius > 0:
            raise ValueError(f"hit_radius={self.hit_radius} must be a positive distance in pixels")
        return patch_grid(images, self.patch_size)

    @nn.compact
    def __call__(self, images: jax.Array, *, deterministic: bool = True) -> jax.Array:
        grid = self.grid(images)
        x = embed_patches(self, images, grid, cls_token=False, deterministic=deterministic)
        x = block_stack(self, x, deterministic=deterministic, grid=grid)
        head = classifier(1 + self.num_classes + 2, dtype=self.dtype, param_dtype=self.param_dtype)
        return head(x).astype(jnp.float32)


def token_targets(
    centres: jax.Array, classes: jax.Array, valid: jax.Array, grid: tuple[int, int], patch_size: int
) -> tuple[jax.Array, jax.Array]:
    """Per-token targets of objects centres float [B, M, 2] (pixels), classes int [B, M], valid [B, M] (1 = an object):
    (label int32 [B, N]: class + 1 at the patch holding an object's centre, else 0; offset float32 [B, N, 2]: that
    centre minus the patch centre, in patch units, 0 elsewhere). Two centres in one patch: the later slot wins."""
    height, width = grid
    cell = jnp.floor(centres.astype(jnp.float32) / patch_size).astype(jnp.int32)
    index = jnp.clip(cell[..., 0], 0, height - 1) * width + jnp.clip(cell[..., 1], 0, width - 1)  # [B, M]
    present = valid > 0
    rows = jnp.arange(centres.shape[0])[:, None]
    # Invalid slots write to a dummy token N (dropped), so they never overwrite an object.
    target = jnp.where(present, index, height * width)
    label = jnp.zeros((centres.shape[0], height * width + 1), jnp.int32).at[rows, target].set(classes + 1)
    offset_rows = (centres - patch_centres(grid, patch_size)[index]) / patch_size
    offset = jnp.zeros((centres.shape[0], height * width + 1, 2), jnp.float32).at[rows, target].set(offset_rows)
    return label[:, :-1], offset[:, :-1]


def detection_loss_sums(
    outputs: jax.Array, batch: dict[str, jax.Array], patch_size: int, hit_radius: float
) -> dict[str, jax.Array]:
    """Sums over the batch of a dense detection loss and its hit counts. outputs float [B, N, 1 + C + 2] (`Detector`);
    batch {"images" [B, H, W, C], "centres" [B, M, 2], "classes" [B, M], "valid" [B, M] [, "weights" [B]]}.

    Loss per image: the mean cross-entropy over its background tokens plus that over its object tokens (balanced: a
    scene is mostly background) plus the mean L1 offset error (patch units) over its object tokens. An object is hit
    when a token predicting its class has a decoded centre within hit_radius pixels of it; a detection (a token whose
    argmax is not background) is true when it lies that close to an object of its class.

    Returns float32 scalars: loss_sum, correct (sum of per-image hit rates; 1 for an image without objects), weight
    (images), hits, objects, detections, true_detections.
    """
    grid = (batch["images"].shape[1] // patch_size, batch["images"].shape[2] // patch_size)
    classes = outputs.shape[-1] - 3
    label, offset = token_targets(batch["centres"], batch["classes"], batch["valid"], grid, patch_size)
    weights = batch.get("weights", jnp.ones(outputs.shape[:1], jnp.float32)).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(outputs[..., : 1 + classes].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, label[..., None], axis=-1)[..., 0]  # [B, N]
    is_object = (label > 0).astype(jnp.float32)
    mean_over = lambda values, where: jnp.sum(values * where, -1) / jnp.maximum(jnp.sum(where, -1), 1.0)  # noqa: E731
    l1 = jnp.sum(jnp.abs(outputs[..., 1 + classes :].astype(jnp.float32) - offset), -1)
    loss = mean_over(nll, 1.0 - is_object) + mean_over(nll, is_object) + mean_over(l1, is_object)

    predicted, centre = decode_detections(outputs, grid, patch_size)
    near = jnp.linalg.norm(centre[:, None] - batch["centres"][:, :, None].astype(jnp.float32), axis=-1) <= hit_radius
    same = predicted[:, None, :] == (batch["classes"][:, :, None] + 1)  # [B, M, N]
    valid = batch["valid"] > 0
    match = near & same & valid[:, :, None]
    hits = jnp.sum(jnp.any(match, axis=2) & valid, -1).astype(jnp.float32)  # [B]
    objects = jnp.sum(valid, -1).astype(jnp.float32)
    detections = jnp.sum(predicted > 0, -1).astype(jnp.float32)
    true_detections = jnp.sum(jnp.any(match, axis=1) & (predicted > 0), -1).astype(jnp.float32)
    rate = jnp.where(objects > 0, hits / jnp.maximum(objects, 1.0), 1.0)
    total = lambda values: jnp.sum(values * weights)  # noqa: E731
    return {
        "loss_sum": total(loss),
        "correct": total(rate),
        "weight": jnp.sum(weights),
        "hits": total(hits),
        "objects": total(objects),
        "detections": total(detections),
        "true_detections": total(true_detections),
    }


def detection_metrics(sums: dict[str, Any]) -> dict[str, Any]:
    """hit_rate = hits / objects (recall at hit_radius), precision = true detections / detections, their F1."""
    recall = sums["hits"] / jnp.maximum(sums["objects"], 1.0)
    precision = sums["true_detections"] / jnp.maximum(sums["detections"], 1.0)
    f1 = 2 * recall * precision / jnp.maximum(recall + precision, 1e-9)
    return {"hit_rate": recall, "precision": precision, "f1": f1}
