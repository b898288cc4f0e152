"""`tcpa`: token-coordinated prompt attention; CLS and image tokens attend disjoint prompt pools, each token only
the prompts its matching selects.

Paper: "Token Coordinated Prompt Attention is Needed for Visual Prompting" (Liu et al., ICML 2025; code
github.com/zhoujiahuan1991/ICML2025-TCPA, models/TCPA.py `get_mask_TDVP` and `Pool`).

Visual prompting adds learned prompt tokens as extra keys and values of a frozen ViT's attention (VPT-deep). TCPA
splits them into a CLS pool (Pc prompts) and an image pool (Pi prompts), each prompt with a matching key; a token
sees the prompts of its own pool only, and only the top-k whose keys are most cosine-similar to it:

    keys / values: [P_cls | P_img | x] projected by the layer's key/value projections     [B, Pc + Pi + T, ...]
    sel_t   = top-k_j cos(x_t, K_j) over the pool of token t (CLS pool for t < num_cls_tokens, else image pool)
    allowed(t, s) = s is a token of x, or s is a prompt of t's pool in sel_t
    o_t = softmax_s(q_t k_s^T / sqrt(d) + (0 if allowed(t, s) else -inf)) v_s

Prompts are keys and values only (their own outputs are not computed). The matching is a hard top-k; the keys K
learn from the auxiliary loss mean(1 - cos(x_t, K_j)) over the selected pairs, sown into "losses" as
`prompt_matching` (the official code's `dist`). Matching uses the layer input x (the block's normed hidden state).

Shapes: x [B, T, E] (the first num_cls_tokens are CLS tokens) -> [B, T, E]; the mask is a dense boolean
[B, 1, T, Pc + Pi + T] (data-dependent: built from the matching). Cost: the `softmax` layer's over T + Pc + Pi keys
plus O(B T (Pc + Pi) E) for the matching.

Exact reduction: cls_prompts = image_prompts = 0 is the frozen ViT's softmax self-attention (`softmax` with the same
query/key/value/out parameters, position="none").
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import choice, non_negative_int, positive_int
from attn.registry import register

Array = jax.Array


def match_prompts(tokens: Array, keys: Array, top_k: int) -> tuple[Array, Array]:
    """Top-k cosine matching: tokens [B, T, E], keys [P, E] -> (selected bool [B, T, P] with top_k True per token,
    matching loss: the mean of 1 - cos over the selected pairs, a float32 scalar)."""
    positive_int("top_k", top_k)
    if top_k > keys.shape[0]:
        raise ValueError(f"top_k={top_k} exceeds the {keys.shape[0]} prompts of the pool; expected top_k <= pool size")
    # a / max(|a|, 1e-12), with a finite gradient at a = 0 (a zero-initialised class token after a LayerNorm)
    unit = lambda a: a * jax.lax.rsqrt(jnp.maximum(jnp.sum(a * a, axis=-1, keepdims=True), 1e-24))  # noqa: E731
    cosine = jnp.einsum("bte,pe->btp", unit(tokens.astype(jnp.float32)), unit(keys.astype(jnp.float32)))
    _, index = jax.lax.top_k(jax.lax.stop_gradient(cosine), top_k)
    selected = jnp.any(jax.nn.one_hot(index, keys.shape[0], dtype=jnp.bool_), axis=-2)
    loss = jnp.sum(jnp.where(selected, 1.0 - cosine, 0.0)) / (selected.shape[0] * selected.shape[1] * top_k)
    return selected, loss


@register(
    "tcpa",
    family="cross",
    paper="Token Coordinated Prompt Attention is Needed for Visual Prompting",
    catalog=42,
    op=match_prompts,
    input_kind="sequence",
    supports_causal=False,
    supports_decode=False,
    summary="ViT attention with CLS and image prompt pools as extra keys; each token sees its top-k matched prompts",
    fidelity="official-code",
    reference="github.com/zhoujiahuan1991/ICML2025-TCPA models/TCPA.py (get_mask_TDVP: CLS row sees only CLS "
    "prompts, image rows only image prompts, each its top-k by Pool's cosine matching; dist = mean(1 - sim))",
    validators={
        **SOFTMAX_VALIDATORS,
        "position": choice("none"),
        "num_cls_tokens": non_negative_int,
        "cls_prompts": non_negative_int,
        "image_prompts": non_negative_int,
        "cls_top_k": positive_int,
        "image_top_k": positive_int,
    },
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "position": "'none' only (prompts have no position; ViTs add learned positions to the tokens)",
        "num_cls_tokens": "number of CLS tokens at the start of x (they match the CLS pool)",
        "cls_prompts": "Pc: prompts in the CLS pool (0 with image_prompts=0: plain softmax attention)",
        "image_prompts": "Pi: prompts in the image-token pool",
        "cls_top_k": "prompts each CLS token sees (top-k of the CLS pool by cosine matching)",
        "image_top_k": "prompts each image token sees (top-k of the image pool)",
    },
)
class TokenCoordinatedPromptAttention(SoftmaxAttentionLayer):
    """Softmax self-attention over x [B, T, E] plus matched prompt keys/values. -> [B, T, E]."""

    position: str = "none"
    num_cls_tokens: int = 1
    cls_prompts: int = 4
    image_prompts: int = 4
    cls_top_k: int = 2
    image_top_k: int = 2

    # The weights span prompts and tokens ([B, H, T, P + T]): interventions select heads, not key positions.
    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.context is not None:
            raise ValueError(f"tcpa is self-attention over the ViT tokens; got a context of shape {call.context.shape}")
        if call.decode:
            raise ValueError("tcpa does not decode (decode=True): it is an encoder layer")
        if call.mask is not None:
            raise ValueError(f"tcpa takes no mask (got {call.mask!r}): its mask comes from the prompt matching")
        if self.num_cls_tokens > call.x.shape[1]:
            raise ValueError(f"num_cls_tokens={self.num_cls_tokens} exceeds the length {call.x.shape[1]} of x")
        for pool, top_k, name in (
            (self.cls_prompts, self.cls_top_k, "cls"),
            (self.image_prompts, self.image_top_k, "image"),
        ):
            if pool and top_k > pool:
                raise ValueError(f"{name}_top_k={top_k} exceeds {name}_prompts={pool}; expected at most the pool size")

    def pool_param(self, name: str, size: int, width: int) -> Array:
        """A pool's prompts or matching keys [size, E], uniform in [-1, 1] as in the official code."""
        init = nn.with_logical_partitioning(nn.initializers.uniform(scale=2.0), ("length", "embed"))
        return jnp.asarray(self.param(name, init, (size, width), self.param_dtype)) - 1.0

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        """q from x [B, T, H, D]; k, v from [cls prompts | image prompts | x] [B, Pc + Pi + T, KVH, D]."""
        prompts = []
        for name, size in (("cls", self.cls_prompts), ("image", self.image_prompts)):
            if size:
                prompts.append(self.pool_param(f"{name}_prompts", size, x.shape[-1]))
        if not prompts:
            return super().project_qkv(x, None)
        table = jnp.concatenate(prompts)
        extra = jnp.broadcast_to(table[None], (x.shape[0], *table.shape)).astype(x.dtype)
        q = self.dense_heads(x, self.num_heads, "heads", "query")
        source = jnp.concatenate([extra, x], axis=1)
        k = self.dense_heads(source, self.kv_heads, "kv_heads", "key")
        v = self.dense_heads(source, self.kv_heads, "kv_heads", "value")
        return q, k, v

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, Any]:
        if not (self.cls_prompts or self.image_prompts):
            return super().prepare(q, k, v, call)
        x, cls, length = call.x, self.num_cls_tokens, call.x.shape[1]
        blocks, losses = [], []
        for name, size, top_k, rows in (
            ("cls", self.cls_prompts, self.cls_top_k, jnp.arange(length) < cls),
            ("image", self.image_prompts, self.image_top_k, jnp.arange(length) >= cls),
        ):
            if not size:
                continue
            selected, loss = match_prompts(x, self.pool_param(f"{name}_keys", size, x.shape[-1]), top_k)
            blocks.append(selected & rows[None, :, None])
            losses.append(loss)
        self.sow("losses", "prompt_matching", sum(losses))
        visible = jnp.concatenate([*blocks, jnp.ones((x.shape[0], length, length), jnp.bool_)], axis=-1)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (x.shape[0], length))
        kv_positions = jnp.arange(k.shape[1], dtype=jnp.int32)
        call = call.replace(mask=Mask(dense=visible[:, None]), q_positions=positions, kv_positions=kv_positions)
        return q, k, v, call
