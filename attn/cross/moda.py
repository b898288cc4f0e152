"""`moda`: MOdular Duplex Attention, visual keys aligned onto the text modality's basis, plus a modality-pair mask.

Paper: "MODA: MOdular Duplex Attention for Multimodal Perception, Cognition, and Emotion Understanding" (Zhang et
al., ICML 2025; arXiv 2507.04635; code github.com/KwaiVGI/MODA, `LlamaAttention.forward` in
moda/model/language_model/modeling_llama_local_moda.py).

Self-attention over a mixed sequence x [B, T, E] whose tokens [s, s + N) are visual (s = image_start, N =
image_tokens) and the rest text. MODA's "correct-after-align": before the softmax, each head maps the visual keys
into the text modality's space, spanned by the text keys and values (the Gram matrix is the basis), then the
attention scores pass a mask chosen per modality pair. Per (kv) head, after RoPE:

    k^ = (k + 1e-6) / ||k + 1e-6||                       row-normalised keys                   [T, D]
    G  = sum_{t in text} k^_t^T v_t ;  G_i <- G_i / ||G_i||   the text basis, rows normalised      [D, D]
    k_t <- (k_t + r * (k^_t G)) W_f          for visual t (r [D] zero-initialised, W_f [D, D]; shared by heads)
    o_i = softmax_j(q_i k_j^T / sqrt(D) + (0 if allowed(i, j) else -inf)) v_j

allowed(i, j) = the caller's mask (causal, padding) AND modality_mask[m(i), m(j)], the four entries of
modality_mask = (text->text, text->visual, visual->text, visual->visual), m(t) = visual iff s <= t < s + N. The text
set of the Gram is every non-visual token (prompt_tokens=None, the official training forward), or the text before
the image plus the prompt_tokens P right after it (so answer tokens never reach the visual keys: with causal
attention the layer is then causal from s + N + P on).

Shapes: x [B, T, E] -> [B, T, E]; parameters of the `softmax` layer plus modality_ratio [D] and
modality_fuser [D, D]. Cost: that of causal softmax attention plus O(B KVH T D^2) for the alignment.

Exact reductions: image_tokens=0, or modality_ratio = 0 with modality_fuser = I (their initial values) and the
default modality_mask, is the `softmax` layer with the same parameters (the official code initialises W_f like
every linear layer, N(0, 0.02); identity here so a model starts as its softmax baseline). Decoding: the KV cache's
steps equal the full forward when the first (prefill) call holds the image and the Gram's text, as in the official
code (it aligns only where the keys cover the whole sequence).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import OptionValidator, non_negative_int, optional
from attn.registry import register

Array = jax.Array

MODALITY_PAIRS = ("text->text", "text->visual", "visual->text", "visual->visual")
modality_mask_validator = OptionValidator(
    lambda v: isinstance(v, tuple) and len(v) == 4 and all(isinstance(b, bool) for b in v),
    f"a tuple of 4 bools {MODALITY_PAIRS}",
    "4 bools",
)


@dataclasses.dataclass(frozen=True)
class ModalityPairPattern:
    """`Mask.mask_fn` (absolute positions): query i may see key j iff allowed[2 m(i) + m(j)], m(t) = 1 for visual
    tokens [image_start, image_end), else 0."""

    image_start: int
    image_end: int
    allowed: tuple[bool, bool, bool, bool]

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        q_visual = (q_idx >= self.image_start) & (q_idx < self.image_end)
        kv_visual = (kv_idx >= self.image_start) & (kv_idx < self.image_end)
        table = jnp.asarray(self.allowed)
        return table[2 * q_visual.astype(jnp.int32) + kv_visual.astype(jnp.int32)]


def modality_pair_mask(
    image_start: int, image_tokens: int, modality_mask: tuple[bool, ...], base: Mask | None = None
) -> Mask | None:
    """`base` ANDed with the modality-pair pattern (see the module docstring); `base` itself when every pair is
    allowed or there is no image. ValueError for a `base` that already has a mask_fn."""
    non_negative_int("image_start", image_start)
    non_negative_int("image_tokens", image_tokens)
    modality_mask_validator("modality_mask", modality_mask)
    if image_tokens == 0 or all(modality_mask):
        return base
    if base is not None and base.mask_fn is not None:
        raise ValueError(
            f"moda adds its modality-pair mask as a mask_fn; the given mask already has mask_fn={base.mask_fn!r}; "
            "expected a mask without mask_fn (causal, padding, segments)"
        )
    pattern = ModalityPairPattern(image_start, image_start + image_tokens, tuple(modality_mask))
    return Mask(mask_fn=pattern) if base is None else base.replace(mask_fn=pattern)


def text_basis(k: Array, v: Array, text: Array) -> tuple[Array, Array]:
    """(k^, G): k [B, T, KVH, D], v [B, T, KVH, Dv], text bool [B, T] -> row-normalised keys k^ [B, T, KVH, D] and
    the row-normalised text Gram G [B, KVH, D, Dv] = rownorm(sum_{t text} k^_t^T v_t) (a zero row stays zero)."""
    k = k.astype(jnp.float32) + 1e-6
    unit = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    gram = jnp.einsum("bthd,bthe,bt->bhde", unit, v.astype(jnp.float32), text.astype(jnp.float32))
    norm = jnp.linalg.norm(gram, axis=-1, keepdims=True)
    return unit, gram / jnp.where(norm > 0, norm, 1.0)


@register(
    "moda",
    family="cross",
    paper="MODA: MOdular Duplex Attention for Multimodal Perception, Cognition, and Emotion Understanding",
    catalog=1,
    op=text_basis,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="visual keys aligned onto the text keys' Gram basis (r-gated, fused), then a modality-pair mask",
    fidelity="official-code",
    reference="github.com/KwaiVGI/MODA moda/model/language_model/modeling_llama_local_moda.py (LlamaAttention: "
    "key_v/||key_v||, gram_t = key_t^T value_t row-normalised, fused_v = pfuser_v(key_v + ratio_v * key_v gram_t)); "
    "modality-pair mask from arXiv 2507.04635 (adaptive masked attention; the code's default is the causal mask)",
    has_attention_weights=True,
    validators={
        **SOFTMAX_VALIDATORS,
        "image_start": non_negative_int,
        "image_tokens": non_negative_int,
        "prompt_tokens": optional(non_negative_int),
        "modality_mask": modality_mask_validator,
    },
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "image_start": "position s of the first visual token",
        "image_tokens": "number N of visual tokens at [s, s + N) (0 = the softmax layer)",
        "prompt_tokens": "text tokens after the image that enter the Gram (None = all text tokens, the official code)",
        "modality_mask": f"allowed modality pairs {MODALITY_PAIRS} (query->key), ANDed with the call's mask",
    },
)
class ModularDuplexAttention(SoftmaxAttentionLayer):
    """Softmax self-attention over a [text | visual | text] sequence with MODA's aligned visual keys and modality-pair
    mask. x [B, T, E] -> [B, T, E]."""

    image_start: int = 0
    image_tokens: int = 0
    prompt_tokens: int | None = None
    modality_mask: tuple[bool, bool, bool, bool] = (True, True, True, True)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        modality_mask_validator("modality_mask", self.modality_mask)
        if call.context is not None:
            raise ValueError(
                f"moda is self-attention over the mixed sequence; got a context of shape {tuple(call.context.shape)} "
                "(put the visual tokens into x at image_start)"
            )
        end = self.image_start + self.image_tokens
        if not call.decode and self.image_tokens and end > call.x.shape[1]:
            raise ValueError(
                f"image_start={self.image_start} + image_tokens={self.image_tokens} = {end} exceeds the length "
                f"{call.x.shape[1]} of x (shape {tuple(call.x.shape)}); expected the visual tokens inside x"
            )

    def align(self, k: Array, v: Array, positions: Array) -> Array:
        """k [B, T, KVH, D] with the visual keys replaced by (k + r * k^ G) W_f; positions int [B, T] absolute."""
        ratio = self.param(
            "modality_ratio", nn.with_logical_partitioning(nn.initializers.zeros, ("head_dim",)), (self.head_dim,)
        )
        fuser = self.param(
            "modality_fuser",
            nn.with_logical_partitioning(lambda _, shape, dtype: jnp.eye(*shape, dtype=dtype), ("head_dim", None)),
            (self.head_dim, self.head_dim),
            self.param_dtype,
        )
        end = self.image_start + self.image_tokens
        visual = (positions >= self.image_start) & (positions < end)
        text = ~visual
        if self.prompt_tokens is not None:
            text &= positions < end + self.prompt_tokens
        unit, gram = text_basis(k, v, text)
        aligned = jnp.einsum("bthd,bhde->bthe", unit, gram)
        fused = jnp.einsum("bthd,de->bthe", k.astype(jnp.float32) + jnp.asarray(ratio) * aligned, jnp.asarray(fuser))
        return jnp.where(visual[:, :, None, None], fused.astype(k.dtype), k)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, Any]:
        if not self.image_tokens:
            return super().prepare(q, k, v, call)

        def rotate_and_align(q: Array, k: Array, q_pos: Array) -> tuple[Array, Array]:
            if self.position == "rope":
                q, k = self.rotate(q, k, q_pos)
            return q, self.align(k, v, q_pos)

        q, k, v, call = self.locate(q, k, v, call, rotate=rotate_and_align)
        bias = self.position_bias(q, call.q_positions, call.kv_positions, call.mask)
        mask = modality_pair_mask(self.image_start, self.image_tokens, self.modality_mask, call.mask)
        return q, k, v, call.replace(bias=bias, mask=mask)
