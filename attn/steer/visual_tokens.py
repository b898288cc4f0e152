"""What the visual token-reduction systems (vtc_cls, zipvl, g_search, vmtc_cmai) share: the prefix VLM they act on,
keep ratios and counts, ranking and gathering image tokens, the attention they read, and masking image keys in the
decoder.

The model is `attn.models.VisionLanguageModel` with fusion="prefix" (LLaVA-style): its N image tokens
[B, N, d_model] are the decoder's prefix, then the text. A system either changes which image tokens enter the
decoder (a shorter or merged prefix [B, K, d_model], K <= N) or, per decoder layer, which image keys the layer's
self-attention sees (rules for `attn.intervene` that set the logits of dropped image keys to -inf for every query:
exactly the attention over the kept keys only, and the keys a compressed KV cache would keep). The result is a
`Reduction`; `reduced_logits` runs the decoder on it (jitted, the model static: models hash by their fields).

Keep counts: k = max(1, ceil(ratio * N)) for a ratio in (0, 1]; ratio 1 keeps every token, and every system then
returns the unreduced prefix and no rules (bit-identical logits).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn import interventions as iv
from attn.models.fields import per_layer_mechanisms
from attn.models.vlm import VisionLanguageModel

IMAGE_ENCODER = "image_encoder/*"
DECODER_SELF_ATTENTION = "decoder/*/attention"


@dataclasses.dataclass(frozen=True)
class Reduction:
    """A token-reduction step's output for one batch.

    prefix: float [B, K, d_model], the image tokens that enter the decoder (K <= N).
    kept: float [B, num_layers], per row and decoder layer, the share of the N image tokens whose information the
      layer's attention can read (K / N for a shorter prefix; the kept share of the prefix for per-layer masks).
    masks: None, or bool [num_layers, B, n]: per decoder layer, the image keys (positions span_start + j) its
      self-attention sees (the others get logit -inf for every query).
    span_start: where the masked image tokens start in the decoder's sequence.
    edit: None, or a hashable rule maker (`edit.rules(model)` -> rules for `attn.intervene`, e.g. attention
      inhibition) applied with the masks.
    """

    prefix: jax.Array
    kept: jax.Array
    masks: jax.Array | None = None
    span_start: int = 0
    edit: Any = None

    def rules(self, model: Any, masks: jax.Array | None = None) -> tuple[iv.Rule, ...]:
        """The rules this reduction runs the decoder under (`masks` replaces self.masks, e.g. traced)."""
        masks = self.masks if masks is None else masks
        out = () if masks is None else tuple(key_mask_rule(i, masks[i], self.span_start) for i in range(len(masks)))
        return out + (() if self.edit is None else tuple(self.edit.rules(model)))


# ---------------------------------------------------------------------------------------------------- checks
def check_prefix_vlm(model: Any) -> None:
    """ValueError naming `model` unless it is a VisionLanguageModel with fusion="prefix"."""
    if not isinstance(model, VisionLanguageModel) or model.fusion != "prefix":
        fusion = getattr(model, "fusion", None)
        raise ValueError(
            f"model={type(model).__name__} (fusion={fusion!r}) must be attn.models.VisionLanguageModel with "
            "fusion='prefix': token reduction chooses the image tokens of the decoder's prefix"
        )


def check_weights(model: Any, system: str, *, vision: bool) -> None:
    """ValueError naming `model` when a layer the system reads (the image encoder's with `vision`, else the
    decoder's self-attention) has no attention probability matrix."""
    attention, layers, part = (
        (model.vision_attention, model.vision_layers, "vision_attention")
        if vision
        else (model.attention, model.num_layers, "attention")
    )
    for layer, name in enumerate(per_layer_mechanisms(attention, layers)):
        if not attn.get(name).has_attention_weights:
            raise ValueError(
                f"model: {system} reads attention weights, but {part} layer {layer} uses mechanism {name!r}, which "
                "has no attention probability matrix (spec has_attention_weights=False); use a softmax-family "
                "mechanism there"
            )


def check_ratio(name: str, value: Any) -> float:
    """`value` as a float in (0, 1]; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r} must be a number in (0, 1] (1 keeps every image token)")
    return float(value)


def check_span(span: Any, seq_len: int, name: str = "span") -> tuple[int, int]:
    """(start, stop) with 0 <= start < stop <= seq_len; ValueError naming `name` otherwise."""
    try:
        start, stop = (int(v) for v in span)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={span!r} must be a (start, stop) pair of ints") from None
    if not 0 <= start < stop <= seq_len:
        raise ValueError(f"{name}=({start}, {stop}) lies outside the sequence: need 0 <= start < stop <= {seq_len}")
    return start, stop


def keep_count(ratio: float, n: int) -> int:
    """k = max(1, ceil(ratio * n)) (ratio * n rounded to 9 decimals first, so 0.3 * 10 keeps 3)."""
    return max(1, math.ceil(round(ratio * n, 9)))


# ---------------------------------------------------------------------------------------------------- tokens
def top_indices(scores: jax.Array, k: int) -> jax.Array:
    """The k highest-scoring tokens of scores [B, N] (ties to the lower index), in position order: int32 [B, k]."""
    order = jnp.argsort(-scores, axis=-1, stable=True)[:, :k]
    return jnp.sort(order, axis=-1).astype(jnp.int32)


def gather_tokens(tokens: jax.Array, indices: jax.Array) -> jax.Array:
    """tokens [B, N, D] at indices int [B, K] -> [B, K, D]."""
    return jnp.take_along_axis(tokens, indices[..., None], axis=1)


def index_mask(indices: jax.Array, n: int) -> jax.Array:
    """bool [B, n], True at indices int [B, K]."""
    return jnp.any(indices[..., None] == jnp.arange(n), axis=-2)


# ---------------------------------------------------------------------------------------------------- running
@functools.partial(jax.jit, static_argnums=0)
def image_tokens(model: Any, params: Any, images: jax.Array) -> jax.Array:
    """The decoder-ready image tokens [B, N, d_model] of images float [B, H, W, C] (jitted; model static)."""
    return model.apply({"params": params}, images, method="encode")


@functools.partial(jax.jit, static_argnums=0)
def vision_attention(model: Any, params: Any, images: jax.Array) -> list[jax.Array]:
    """Per image-encoder layer, the attention weights [B, H, S, S] (S = N, or 1 + N with the class token first)."""
    _, cache = iv.run_with_cache(
        model, {"params": params}, images, names=("attention_weights",), layers=[IMAGE_ENCODER], method="encode"
    )
    paths = sorted((p for p in cache if p.startswith("image_encoder/")), key=_layer_index)
    return [cache[p]["attention_weights"] for p in paths]


def cls_scores(model: Any, params: Any, images: jax.Array, layers: Sequence[int] | None = None) -> jax.Array:
    """s_j = sum over `layers` (default all) of the head-mean attention the class token pays to image token j:
    float [B, N]. ValueError naming `model` when its image encoder has no class token."""
    if not getattr(model, "vision_cls_token", False):
        raise ValueError(
            f"model={type(model).__name__} has no class token in its image encoder (vision_cls_token=False); the "
            "[CLS] ranking needs one"
        )
    maps = vision_attention(model, params, images)
    chosen = range(len(maps)) if layers is None else layers
    for layer in chosen:
        if not 0 <= layer < len(maps):
            raise ValueError(f"layers has {layer}, out of range: the image encoder has {len(maps)} layers")
    return sum(jnp.mean(maps[layer][:, :, 0, 1:], axis=1) for layer in chosen)


def reduced_logits(model: Any, params: Any, reduction: Reduction, tokens: jax.Array) -> jax.Array:
    """The decoder's logits float32 [B, T, V] for text tokens int [B, T] on a Reduction (one jitted call; the rules
    are entered inside the trace)."""
    return _decode(model, params, reduction.prefix, tokens, reduction.masks, reduction.span_start, reduction.edit)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _decode(model: Any, params: Any, prefix: Any, tokens: Any, masks: Any, start: int, edit: Any) -> jax.Array:
    rules = Reduction(prefix, jnp.zeros(()), masks, start, edit).rules(model)
    with attn.intervene(*rules):
        return model.apply({"params": params}, tokens, prefix, method="decode")


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def decoder_weights(
    model: Any, layer: int, params: Any, prefix: jax.Array, tokens: jax.Array, masks: Any, start: int
) -> jax.Array:
    """The attention weights [B, H, K + T, K + T] decoder layer `layer` used, with the key masks bool [l, B, n] of
    the first l layers active (masks None: none)."""
    rules = Reduction(prefix, jnp.zeros(()), masks, start).rules(model)
    path = f"decoder/layers_{layer}/attention"
    with attn.intervene(*rules):
        _, cache = iv.run_with_cache(
            model, {"params": params}, tokens, prefix, names=("attention_weights",), layers=[path], method="decode"
        )
    return cache[path]["attention_weights"]


def _layer_index(path: str) -> int:
    return next(int(part[len("layers_") :]) for part in path.split("/") if part.startswith("layers_"))


# ---------------------------------------------------------------------------------------------------- key masks
def key_mask_rule(layer: int, keep: jax.Array, start: int) -> iv.Rule:
    """A rule for decoder layer `layer`: image keys start + j with keep[b, j] False (keep bool [B, n]) get logit
    -inf for every query, so the layer attends over the kept image tokens only."""

    def fn(logits: jax.Array, path: str) -> jax.Array:
        n = keep.shape[-1]
        dropped = jnp.zeros((logits.shape[0], logits.shape[-1]), bool).at[:, start : start + n].set(~keep)  # [B, Tk]
        return jnp.where(dropped[:, None, None, :], -jnp.inf, logits)

    return iv.hook("attention_logits", fn, layers=[f"decoder/layers_{layer}"], module=DECODER_SELF_ATTENTION)


def layerwise_masks(
    model: Any,
    params: Any,
    prefix: jax.Array,
    tokens: jax.Array,
    span: tuple[int, int],
    select: Callable[[int, jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """Per decoder layer l (shallow to deep), keep_l = select(l, weights_l, keep_{l-1}) with weights_l [B, H, S, S]
    the layer's attention given the masks of the layers before it (keep_{-1}: all True). One forward pass per layer:
    the masks are exactly those a single pass computing each layer's selection from its own attention would use.
    Returns bool [num_layers, B, stop - start]."""
    start, stop = span
    keep = jnp.ones((prefix.shape[0], stop - start), bool)
    masks: list[jax.Array] = []
    for layer in range(model.num_layers):
        so_far = jnp.stack(masks) if masks else None
        weights = decoder_weights(model, layer, params, prefix, tokens, so_far, start)
        keep = select(layer, weights, keep)
        masks.append(keep)
    return jnp.stack(masks)


def text_to_image(weights: jax.Array, span: tuple[int, int]) -> jax.Array:
    """Attention the text queries (after the image span) pay to each image token, mean over heads and those queries:
    weights [B, H, S, S] -> float [B, stop - start]."""
    start, stop = span
    return jnp.mean(weights[:, :, stop:, start:stop], axis=(1, 2))


def unreduced(prefix: jax.Array, num_layers: int) -> Reduction:
    """The no-op Reduction: every image token, no rules."""
    return Reduction(prefix, jnp.ones((prefix.shape[0], num_layers), jnp.float32))
