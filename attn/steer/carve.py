"""CARVE, contrastive attention refinement for visual enhancement [43] ("Focusing by Contrastive Attention:
Enhancing VLMs' Visual Reasoning", Ge et al., 2025).

A text query's attention over the image mixes a task signal with question-independent visual noise (texture,
clutter); a general query ("describe the image") sees almost only the noise. Contrasting the two separates them, and
masking the image where the contrast is low removes the distracting regions before the model answers.

For a pass with query tokens q, the image attention of the answering position i (the last) over the deep layers:

    a_j(q)  = mean_{l in layers, h} A^l_{h,ij} / sum_{j' in I} mean_{l, h} A^l_{h,ij'}      j in I (the image tokens)
    c_j     = a_j(task) / (a_j(general) + lam)                                              the contrast map
    keep    = the ceil(keep_ratio N) image tokens of largest c_j
    image'  = the image with every patch outside `keep` set to 0 (pixel-level mask); the model then answers on
              image' (or, with `rules`, its decoder attends over the kept image tokens only)

Reconstructed: from the paper's abstract (contrast of general and task-specific attention maps, pixel-level
masking, attention converging in deeper layers) and a secondary summary of its decomposition (task attention as
semantic signal times question-independent noise, isolated by dividing by the general query's map with a small
regulariser); the layer choice, the keep rule and the zero fill are this implementation's.

No-op: keep_ratio = 1 (images bit-identical, no rules). Shapes: contrast float32 [B, N], keep bool [B, N], images
[B, H, W, C].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn import interventions as iv
from attn.steer.registry import register
from attn.steer.vision import DECODER_SELF_ATTENTION, check_layers, check_span, decoder_geometry, num_image_tokens
from attn.steer.visual_tokens import check_ratio, index_mask, keep_count, key_mask_rule, top_indices


def image_attention(
    model: Any, variables: Any, images: jax.Array, tokens: jax.Array, layers: Sequence[int], query: int = -1
) -> jax.Array:
    """a_j(q) of the module docstring: the answering position's attention over the image tokens, mean over `layers`
    and heads, renormalised over the image: float32 [B, N]."""
    n = num_image_tokens(model, images)
    _, cache = iv.run_with_cache(
        model, variables, images, tokens, names=("attention_weights",), layers=[DECODER_SELF_ATTENTION]
    )
    maps = [cache[f"decoder/layers_{layer}/attention"]["attention_weights"][:, :, query, :n] for layer in layers]
    mean = jnp.mean(jnp.stack(maps), axis=(0, 2))  # [B, N]
    total = jnp.sum(mean, axis=-1, keepdims=True)
    return mean / jnp.where(total > 0, total, 1.0)


def patch_mask(keep: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
    """Pixels of the kept patches: keep bool [B, h*w] (row-major patch order) -> bool [B, h*p, w*p, 1]."""
    tiles = keep.reshape(keep.shape[0], grid[0], grid[1])
    return jnp.repeat(jnp.repeat(tiles, patch_size, axis=1), patch_size, axis=2)[..., None]


@register(
    "carve",
    paper="[43] Focusing by Contrastive Attention: Enhancing VLMs' Visual Reasoning (CARVE, Ge et al., 2025)",
    fidelity="reconstructed",
    reference=(
        "arXiv 2509.06461 abstract (contrast of attention maps of a general and a task-specific query separates "
        "semantic signal from visual noise; pixel-level masking; attention converges in deep layers) and the "
        "emergentmind summary of its decomposition (task map divided by the general map plus a small constant); no "
        "official code found; layer choice, keep rule and zero fill are this implementation's"
    ),
    no_op="keep_ratio=1 (images bit-identical, no rules)",
)
@dataclasses.dataclass(frozen=True)
class Carve:
    """keep_ratio in (0, 1]: the share of image tokens kept; lam > 0: the contrast's regulariser; layers: the decoder
    layers whose attention is contrasted (None: the deeper half)."""

    keep_ratio: float = 0.5
    lam: float = 1e-3
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        check_ratio("keep_ratio", self.keep_ratio)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not self.lam > 0:
            raise ValueError(f"lam={self.lam!r} must be a number > 0")

    def contrast(
        self, model: Any, variables: Any, images: jax.Array, task_tokens: jax.Array, general_tokens: jax.Array
    ) -> jax.Array:
        """c_j: float32 [B, N] from two unsteered passes (task_tokens and general_tokens int [B, T], the same
        images). ValueError for a layer outside the decoder or token batches of different shapes."""
        num_layers, _ = decoder_geometry(model, "carve")
        layers = check_layers(self.layers, num_layers, range(num_layers // 2, num_layers))
        if task_tokens.shape != general_tokens.shape:
            raise ValueError(
                f"general_tokens has shape {general_tokens.shape}; task_tokens has {task_tokens.shape} (the same "
                "images, one query each)"
            )
        task = image_attention(model, variables, images, task_tokens, layers)
        general = image_attention(model, variables, images, general_tokens, layers)
        return task / (general + float(self.lam))

    def keep(self, contrast: jax.Array) -> jax.Array:
        """bool [B, N]: the ceil(keep_ratio N) image tokens of largest contrast [B, N]."""
        n = contrast.shape[-1]
        return index_mask(top_indices(contrast, keep_count(float(self.keep_ratio), n)), n)

    def mask_images(self, model: Any, images: jax.Array, keep: jax.Array) -> jax.Array:
        """images [B, H, W, C] with every patch outside keep (bool [B, N]) set to 0. ValueError for a keep mask of
        another size than the image's patch count."""
        n = num_image_tokens(model, images)
        if getattr(keep, "shape", None) != (images.shape[0], n):
            raise ValueError(f"keep must be bool [batch, {n}] (one flag per patch); got {getattr(keep, 'shape', None)}")
        p = model.patch_size
        pixels = patch_mask(keep, (images.shape[1] // p, images.shape[2] // p), p)
        return jnp.where(pixels, images, jnp.zeros((), images.dtype))

    def rules(self, model: Any, keep: jax.Array, image_span: Sequence[int]) -> tuple[iv.Rule, ...]:
        """Rules for `attn.intervene` making every decoder layer attend over the kept image tokens only (the
        attention-level alternative to `mask_images`); () when keep_ratio = 1."""
        num_layers, _ = decoder_geometry(model, "carve")
        start, stop = check_span(image_span, 1 << 30, "image_span")
        if getattr(keep, "ndim", None) != 2 or keep.shape[-1] != stop - start:
            raise ValueError(f"keep must be bool [batch, {stop - start}]; got shape {getattr(keep, 'shape', None)}")
        if float(self.keep_ratio) == 1.0:
            return ()
        return tuple(key_mask_rule(layer, keep, start) for layer in range(num_layers))
