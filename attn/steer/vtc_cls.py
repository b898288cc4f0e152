"""VTC-CLS [191] ("[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs", Wang et al. 2024):
visual tokens ranked by the vision encoder's class-token attention; the top ones enter the language model.

With A^l [B, H, 1 + N, 1 + N] the image encoder's attention in layer l (token 0 the class token, 1..N the patches):

    s_j = sum_{l in layers} (1/H) sum_h A^l[h, 0, 1 + j]          j = 0..N-1   (the [CLS] ensemble over layers)
    K   = top-k of s, k = max(1, ceil(ratio * N)), kept in position order
    prefix = image_tokens[K]                                       [B, k, d_model] enters the decoder

The text decoder then runs on the k kept tokens only (a prefix k/N as long). No-op: ratio = 1 (every token, in
order: bit-identical logits). Needs a VisionLanguageModel with fusion="prefix" and vision_cls_token=True, and an
image encoder whose mechanism has an attention probability matrix. Cost: one encoder pass with the weights captured;
the decoder's attention cost falls from (N + T)^2 to (k + T)^2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn.steer import visual_tokens as vt
from attn.steer.registry import register


@register(
    "vtc_cls",
    paper="[191] [CLS] Token Tells Everything Needed for Training-free Efficient MLLMs (VTC-CLS, Wang et al. 2024)",
    fidelity="official-code",
    reference=(
        "THU-MIG/VTC-CLS llava/model/multimodal_encoder/clip_encoder.py cls_token_only (head-mean attention row of "
        "the [CLS] token to the patches, summed over the encoder layers from start_layer on) and llava_arch.py "
        "encode_images (torch.topk of that score, the kept features re-sorted into position order). Differences: the "
        "ensemble defaults to every encoder layer (the official code stops before the last layer because LLaVA reads "
        "the penultimate layer's features; ours reads the last layer's), and our tiny encoder's class token is an "
        "optional field of attn.models.VisionLanguageModel (vision_cls_token) that is never fed to the decoder"
    ),
    no_op="ratio=1 (every image token enters the decoder; bit-identical logits)",
)
@dataclasses.dataclass(frozen=True)
class VtcCls:
    """ratio in (0, 1]: the share of the N image tokens kept; layers: the image-encoder layers whose [CLS]
    attention is summed (None: all)."""

    ratio: float
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        vt.check_ratio("ratio", self.ratio)

    def check(self, model: Any) -> None:
        """ValueError naming `model` for a model this system cannot reduce."""
        vt.check_prefix_vlm(model)
        vt.check_weights(model, "vtc_cls", vision=True)

    def select(self, model: Any, params: Any, images: jax.Array) -> jax.Array:
        """Kept image-token indices int32 [B, k] in position order."""
        self.check(model)
        scores = vt.cls_scores(model, params, images, self.layers)
        return vt.top_indices(scores, vt.keep_count(self.ratio, scores.shape[-1]))

    def reduce(self, model: Any, params: Any, images: jax.Array, tokens: jax.Array) -> vt.Reduction:
        """The Reduction for images [B, H, W, C] and text tokens [B, T] (the question does not change the choice)."""
        self.check(model)
        prefix = vt.image_tokens(model, params, images)
        if self.ratio == 1.0:
            return vt.unreduced(prefix, model.num_layers)
        indices = self.select(model, params, images)
        kept = jnp.full((prefix.shape[0], model.num_layers), indices.shape[1] / prefix.shape[1], jnp.float32)
        return vt.Reduction(vt.gather_tokens(prefix, indices), kept)
