"""`modality_mutual`: modality-mutual attention (AKI), the causal mask relaxed so image tokens see the prompt.

Paper: "Seeing is Understanding: Unlocking Causal Attention into Modality-Mutual Attention for Multimodal LLMs"
(Sony, 2025; code github.com/sony/aki, `VLMWithLanguageStream._make_modality_mutual_mask` in
codes/open_flamingo/src/vlm.py).

In a decoder-only multimodal LM the image tokens come before the text, so causal attention never lets them read
the question. AKI's mask keeps the causal mask and lifts it for one rectangle: the rows of the image tokens
[s, s + N) may also attend the text tokens that follow the image up to the end of the prompt (the question),
[s + N, s + N + P); the answer tokens stay invisible, so generation is still autoregressive:

    allowed(i, j) = j <= i  or  (s <= i < s + N  and  s + N <= j < s + N + P)
    o_i = softmax_j(q_i k_j^T / sqrt(d) + (0 if allowed(i, j) else -inf)) v_j

(s = image_start, N = image_tokens, P = prompt_tokens; the official code takes them per sample from the positions
of the <image> and <|assistant|> tokens.) No parameters and no cost beyond causal attention: the mask is a function
of (i, j) (`Mask.mask_fn`). The relaxation applies where the caller asks for causal attention; without a causal
mask every pair is visible already. Padding masks are ANDed. Over a prefix-LM mask (`Mask(causal=True,
prefix_lengths=L)`, L an int: a prefix VLM whose image tokens are the prefix) the prefix stays visible to every row:
allowed(i, j) = j <= i or j < L or the rectangle above.

Shapes: x [B, T, E] -> [B, T, E]; the layout needs s + N + P <= T on a full forward. Cost: that of the `softmax`
layer, O(B H T^2 D).

Exact reductions: image_tokens=0 (or prompt_tokens=0) is causal self-attention (`softmax` with the same
parameters); in a single layer the text rows equal causal attention for any layout (their keys and values are the
same projections). Decoding: the KV cache's causal steps equal the full forward when the first (prefill) call holds
the image and the prompt, as in the paper (the prompt's keys are computed with the mutual mask at prefill).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import non_negative_int
from attn.registry import register

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModalityMutualPattern:
    """AKI's mask as a hashable `Mask.mask_fn` (absolute positions): causal, plus image rows
    [image_start, image_end) over the prompt columns [image_end, prompt_end)."""

    image_start: int
    image_end: int
    prompt_end: int
    prefix_end: int = 0  # keys [0, prefix_end) are visible to every row (the prefix of a prefix-LM base mask)

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        image_row = (q_idx >= self.image_start) & (q_idx < self.image_end)
        prompt_column = (kv_idx >= self.image_end) & (kv_idx < self.prompt_end)
        return (kv_idx <= q_idx) | (kv_idx < self.prefix_end) | (image_row & prompt_column)


def modality_mutual_mask(image_start: int, image_tokens: int, prompt_tokens: int, base: Mask | None = None) -> Mask:
    """`base` with its causal mask relaxed to the modality-mutual mask (see the module docstring); a `base` without
    causal is returned unchanged (nothing to relax). A prefix-LM `base` (prefix_lengths a Python int L, as a
    prefix VLM passes) keeps its prefix visible: allowed(i, j) = j <= i or j < L or the mutual rectangle. ValueError
    for a `base` with per-row (array) prefix_lengths or a mask_fn."""
    for name, value in (("image_start", image_start), ("image_tokens", image_tokens), ("prompt_tokens", prompt_tokens)):
        non_negative_int(name, value)
    if base is None or not base.causal:
        return base
    prefix = base.prefix_lengths
    per_row_prefix = prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int))
    if per_row_prefix or base.mask_fn is not None:
        raise ValueError(
            "modality_mutual relaxes the causal mask with its own mask_fn; the given mask has "
            f"{'per-row prefix_lengths' if per_row_prefix else 'a mask_fn'}; expected Mask(causal=True) with padding "
            "and at most one int prefix length (the image/prompt layout comes from image_start, image_tokens and "
            "prompt_tokens)"
        )
    image_end = image_start + image_tokens
    pattern = ModalityMutualPattern(image_start, image_end, image_end + prompt_tokens, prefix or 0)
    return base.replace(causal=False, prefix_lengths=None, mask_fn=pattern)


@register(
    "modality_mutual",
    family="cross",
    paper="Seeing is Understanding: Unlocking Causal Attention into Modality-Mutual Attention for Multimodal LLMs",
    catalog=70,
    op=modality_mutual_mask,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="causal attention whose image-token rows also see the prompt text after the image (AKI)",
    fidelity="official-code",
    reference="github.com/sony/aki codes/open_flamingo/src/vlm.py (_make_modality_mutual_mask: causal plus "
    "mask[image_start:text_start, text_start:text_end] = 1, text_end = end of the question)",
    has_attention_weights=True,
    validators={
        **SOFTMAX_VALIDATORS,
        "image_start": non_negative_int,
        "image_tokens": non_negative_int,
        "prompt_tokens": non_negative_int,
    },
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "image_start": "position s of the first image token",
        "image_tokens": "number N of image tokens at [s, s + N) (0 = causal self-attention)",
        "prompt_tokens": "number P of prompt (question) tokens right after the image that image tokens may see",
    },
)
class ModalityMutualAttention(SoftmaxAttentionLayer):
    """Softmax self-attention over a [text | image | prompt | answer] sequence with the modality-mutual mask.
    x [B, T, E] -> [B, T, E]."""

    image_start: int = 0
    image_tokens: int = 0
    prompt_tokens: int = 0

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.context is not None:
            raise ValueError(
                f"modality_mutual is self-attention over the mixed sequence; got a context of shape "
                f"{tuple(call.context.shape)} (put the image tokens into x at image_start)"
            )
        end = self.image_start + self.image_tokens + self.prompt_tokens
        if not call.decode and self.image_tokens and end > call.x.shape[1]:
            raise ValueError(
                f"image_start={self.image_start} + image_tokens={self.image_tokens} + prompt_tokens="
                f"{self.prompt_tokens} = {end} exceeds the length {call.x.shape[1]} of x (shape "
                f"{tuple(call.x.shape)}); expected the image and the prompt inside x"
            )

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, Any]:
        if self.image_tokens and self.prompt_tokens:
            mask = modality_mutual_mask(self.image_start, self.image_tokens, self.prompt_tokens, call.mask)
            call = call.replace(mask=mask)
        return super().prepare(q, k, v, call)
