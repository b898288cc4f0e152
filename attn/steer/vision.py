"""What the vision-language steering systems (var, vhr, damro, imbalance_fix, carve) share: the prefix VLM they act
on, the image-token span of its decoder's sequence, layer lists, the hidden states entering each decoder block, and
the selection of the decoder's self-attention (with the prefix-VLM checks of `attn.steer.visual_tokens`).

The systems assume a LLaVA-style model: `attn.models.VisionLanguageModel` with fusion="prefix", whose decoder reads
the N image tokens as positions 0..N-1 of its sequence (prefix-LM mask) and the text after them. Their rules select
the decoder's self-attention only ("decoder/*/attention"), never the image encoder's blocks, which share the
`layers_<i>` names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.steer.common import model_geometry
from attn.steer.visual_tokens import DECODER_SELF_ATTENTION, check_prefix_vlm, check_span, check_weights

__all__ = [
    "DECODER_SELF_ATTENTION",
    "block_inputs",
    "check_layers",
    "check_span",
    "decoder_geometry",
    "image_key_mask",
    "num_image_tokens",
    "query_positions",
]


def decoder_geometry(model: Any, system: str, *, needs_weights: bool = True) -> tuple[int, int]:
    """(num_layers, num_heads) of the decoder of a prefix VLM. ValueError naming `model` for another model (or
    fusion), or (needs_weights) for a decoder layer without an attention probability matrix."""
    check_prefix_vlm(model)
    if needs_weights:
        check_weights(model, system, vision=False)
    return model_geometry(model)


def num_image_tokens(model: Any, images: Any) -> int:
    """N = (H / patch_size) * (W / patch_size) image tokens of images [B, H, W, C] (the decoder's prefix)."""
    shape = tuple(np.shape(images))
    if len(shape) != 4:
        raise ValueError(f"images must be float [batch, height, width, channels]; got shape {shape}")
    p = model.patch_size
    if shape[1] % p or shape[2] % p:
        raise ValueError(f"images of {shape[1]}x{shape[2]} pixels are not a multiple of patch_size={p}")
    return (shape[1] // p) * (shape[2] // p)


def check_layers(layers: Sequence[int] | None, num_layers: int, default: Sequence[int]) -> tuple[int, ...]:
    """Decoder layer indices in [0, num_layers), sorted; `default` when None. ValueError naming `layers`."""
    if layers is None:
        return tuple(default)
    values = (layers,) if isinstance(layers, (int, np.integer)) else tuple(layers)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < num_layers]
    if bad:
        raise ValueError(
            f"layers={list(values)} holds {bad}, out of range: the decoder has {num_layers} layers "
            f"(0..{num_layers - 1})"
        )
    return tuple(sorted({int(v) for v in values}))


def image_key_mask(image_span: tuple[int, int], kv_len: int) -> jax.Array:
    """bool [kv_len]: the keys that are image tokens."""
    keys = jnp.arange(kv_len)
    return (keys >= image_span[0]) & (keys < image_span[1])


def query_positions(q_len: int, kv_len: int) -> jax.Array:
    """Absolute positions int [q_len] of the queries of a [q_len, kv_len] map (the last q_len positions: prefill
    gives 0..T-1, a decode step its cache position)."""
    return kv_len - q_len + jnp.arange(q_len)


def block_inputs(model: Any, variables: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """The hidden states entering each decoder block (the residual stream): float32 [L, B, N + T, d_model] for
    images [B, H, W, C] and tokens int [B, T]. Read with a flax method interceptor on the blocks' __call__; any
    intervention active around the call applies."""
    found: dict[int, jax.Array] = {}

    def grab(next_fun, args, kwargs, context):
        path = context.module.path
        if context.method_name == "__call__" and len(path) == 2 and path[0] == "decoder":
            if path[1].startswith("layers_"):
                found[int(path[1][len("layers_") :])] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        model.apply(variables, images, tokens)
    return jnp.stack([found[i].astype(jnp.float32) for i in sorted(found)])
