"""The part every model shares: a stack of transformer blocks, the final norm, and the vocab head.

These helpers run inside a model's `nn.compact` method and read the model's trunk fields (`num_layers`,
`d_model`, `num_heads`, `head_dim`, `num_kv_heads`, `mlp_dim`, `attention`, `attention_options`, `norm`,
`mlp`, `dropout_rate`, `dtype`, `param_dtype`, and, where the model has them, `norm_eps` (default 1e-6), `mlp_bias`
(default False), `cross_attention` and `cross_attention_options`), so the submodules they create are the model's own
children: `layers_<i>`, `final_norm`, `lm_head`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.core.layer_carry import layer_carry
from attn.core.positions import LearnedPositionEmbedding
from attn.core.validation import check_choice
from attn.models.block import TransformerBlock, check_cross_mechanism, check_mechanism
from attn.models.fields import (
    AttentionOptions,
    hash_fields,
    per_layer_mechanisms,
    per_layer_options,
    with_layer_fields,
)
from attn.models.layers import (
    ACTIVATION_AXES,
    MLPS,
    NORMS,
    TokenEmbedding,
    make_norm,
)

POSITION_EMBEDDINGS = ("none", "learned")


class TokenTrunk(nn.Module):
    """The fields of a token model's trunk (embedding, blocks, final norm, vocab head), shared by `DecoderLM` and
    `Encoder`, which add their own fields and `__call__`. See `DecoderLM` for what each field means, and:

      norm_position: "pre" (norm before each sublayer, a final norm after the stack) or "post" (norm after each
        residual sum, no final norm: BERT).
      embedding_norm: a norm (`embedding_norm`) on the summed embeddings, before dropout (BERT's embeddings.LayerNorm).
      token_types: rows of a token-type (segment) embedding `token_type_embedding` added to the tokens' (BERT's 2);
        0 for none.
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    mlp_dim: int
    head_dim: int | None = None
    num_kv_heads: int | None = None
    attention: str | Sequence[str] = "softmax"
    attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    tie_embeddings: bool = True
    position_embedding: str = "none"
    max_len: int = 2048
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    norm_eps: float = 1e-6
    mlp_bias: bool = False
    norm_position: str = "pre"
    embedding_norm: bool = False
    token_types: int = 0

    def __hash__(self) -> int:  # dict-valued fields: hash a frozen copy (see fields.hash_fields)
        return hash_fields(self)


def resolve_head_dim(model: Any) -> int:
    """`model.head_dim`, or d_model // num_heads when it is None (then d_model must divide evenly)."""
    if model.head_dim is not None:
        if model.head_dim <= 0:
            raise ValueError(f"head_dim={model.head_dim} must be positive")
        return model.head_dim
    if model.num_heads <= 0 or model.d_model % model.num_heads:
        raise ValueError(
            f"d_model={model.d_model} is not divisible by num_heads={model.num_heads}; set head_dim explicitly"
        )
    return model.d_model // model.num_heads


def stack_options(names: Sequence[str], options: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, options) per layer of a stack, with each mechanism's per-layer fields (layer_index, num_layers) filled
    in where the user did not set them (see attn.models.fields.with_layer_fields)."""
    count = len(names)
    return [
        (name, with_layer_fields(name, entry, layer_index=i, num_layers=count))
        for i, (name, entry) in enumerate(zip(names, options, strict=True))
    ]


def resolve_layers(model: Any, *, grid: tuple[int, ...] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Validated (mechanism name, options) per layer, per-layer fields filled; checks norm/mlp choices and
    mechanism kinds."""
    if model.num_layers < 0:
        raise ValueError(f"num_layers={model.num_layers} must be >= 0")
    check_choice("norm", model.norm, NORMS)
    check_choice("mlp", model.mlp, MLPS)
    names = per_layer_mechanisms(model.attention, model.num_layers)
    options = per_layer_options(model.attention_options, model.num_layers)
    for name in set(names):
        check_mechanism(name, grid=grid)
    return stack_options(names, options)


def resolve_cross_layers(model: Any) -> list[tuple[str | None, dict[str, Any]]]:
    """(cross-attention mechanism name or None, options) per layer, from the model's optional `cross_attention`
    (None, one registry name, or one per layer) and `cross_attention_options` fields; per-layer fields filled."""
    cross = getattr(model, "cross_attention", None)
    if cross is None:
        return [(None, {})] * model.num_layers
    names = per_layer_mechanisms(cross, model.num_layers)
    options = per_layer_options(getattr(model, "cross_attention_options", None), model.num_layers)
    for name in set(names):
        check_cross_mechanism(name)
    return stack_options(names, options)


def block_fields(model: Any) -> dict[str, Any]:
    """The TransformerBlock fields every block of `model` shares (heads, widths, norm, MLP, dropout, dtypes); callers
    add the mechanism, its options and the name."""
    return dict(
        num_heads=model.num_heads,
        head_dim=resolve_head_dim(model),
        num_kv_heads=model.num_kv_heads,
        mlp_dim=model.mlp_dim,
        norm=model.norm,
        norm_eps=getattr(model, "norm_eps", 1e-6),
        mlp=model.mlp,
        mlp_bias=getattr(model, "mlp_bias", False),
        dropout_rate=model.dropout_rate,
        dtype=model.dtype,
        param_dtype=model.param_dtype,
    )


def block_stack(
    model: Any,
    x: jax.Array,
    *,
    mask: attn.Mask | None = None,
    positions: jax.Array | None = None,
    context: jax.Array | None = None,
    context_mask: attn.Mask | None = None,
    decode: bool = False,
    deterministic: bool = True,
    grid: tuple[int, ...] | None = None,
    block: Any = TransformerBlock,
) -> jax.Array:
    """Run the model's `num_layers` blocks and (pre-norm models) its final norm: x [B, T, d_model] -> [B, T, d_model].

    `block` builds each block from TransformerBlock's fields (a TransformerBlock subclass or a partial of one).

    context [B, Tc, E] and context_mask (an attn.Mask over (x, context) pairs) feed the cross-attention sublayers
    of a model with a `cross_attention` field; they must be None for a model without one.
    """
    fields = block_fields(model)
    norm_position = getattr(model, "norm_position", "pre")
    layers = resolve_layers(model, grid=grid)
    cross_layers = resolve_cross_layers(model)
    with layer_carry():  # values a layer leaves for the later layers of this stack (attn.core.layer_carry)
        for i, ((name, options), (cross_name, cross_options)) in enumerate(zip(layers, cross_layers, strict=True)):
            x = block(
                mechanism=name,
                attention_options=options,
                cross_attention=cross_name,
                cross_attention_options=cross_options,
                norm_position=norm_position,
                grid=grid,
                name=f"layers_{i}",
                **fields,
            )(
                x,
                mask=mask,
                positions=positions,
                context=context,
                context_mask=context_mask,
                decode=decode,
                deterministic=deterministic,
            )
    if norm_position == "post":
        return x
    final_norm = make_norm(
        model.norm, dtype=model.dtype, param_dtype=model.param_dtype, name="final_norm", epsilon=fields["norm_eps"]
    )
    return final_norm(x)


def embed_tokens(
    model: Any,
    tokens: jax.Array,
    positions: jax.Array | None,
    *,
    deterministic: bool,
    token_type_ids: jax.Array | None = None,
) -> tuple[jax.Array, TokenEmbedding]:
    """Token (+ learned position, + token type) embeddings [B, T, d_model] in `model.dtype`, and the embedding module.

    tokens int [B, T]; positions int [B, T] or None (then 0..T-1); token_type_ids int [B, T] in [0, token_types) or
    None (then 0), only for a model with `token_types` > 0. Creates `embedding`, with position_embedding="learned"
    `position_embedding` with `model.max_len` rows, with token_types `token_type_embedding`, and with
    embedding_norm the norm `embedding_norm` over the sum.
    """
    types = getattr(model, "token_types", 0)
    if token_type_ids is not None and (types <= 0 or jnp.shape(token_type_ids) != tokens.shape):
        raise ValueError(
            f"token_type_ids of shape {jnp.shape(token_type_ids)} need a model with token_types > 0 (it has "
            f"{types}) and the tokens' shape {tokens.shape}"
        )
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be int [batch, length]; got {tokens.dtype} {tokens.shape}")
    check_choice("position_embedding", model.position_embedding, POSITION_EMBEDDINGS)
    embedding = TokenEmbedding(
        model.vocab_size, model.d_model, dtype=model.dtype, param_dtype=model.param_dtype, name="embedding"
    )
    x = embedding(tokens)
    if model.position_embedding == "learned":
        batch, length = tokens.shape
        if positions is None:
            if length > model.max_len:
                raise ValueError(f"sequence length {length} exceeds max_len={model.max_len} of the learned positions")
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        table = LearnedPositionEmbedding(
            model.max_len,
            model.d_model,
            dtype=model.dtype,
            param_dtype=model.param_dtype,
            name="position_embedding",
        )
        x = x + table(positions)
    if types > 0:
        type_table = TokenEmbedding(
            types, model.d_model, dtype=model.dtype, param_dtype=model.param_dtype, name="token_type_embedding"
        )
        ids = jnp.zeros_like(tokens) if token_type_ids is None else token_type_ids
        x = x + type_table(ids)
    if getattr(model, "embedding_norm", False):
        eps = getattr(model, "norm_eps", 1e-6)
        x = make_norm(model.norm, dtype=model.dtype, param_dtype=model.param_dtype, name="embedding_norm", epsilon=eps)(
            x
        )
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    return nn.Dropout(model.dropout_rate)(x, deterministic=deterministic), embedding


def vocab_logits(model: Any, embedding: TokenEmbedding, x: jax.Array) -> jax.Array:
    """Vocabulary logits float32 [B, T, vocab_size] from x [B, T, d_model].

    Tied (`model.tie_embeddings`): x @ embedding.T. Untied: a Dense `lm_head` with axes ("embed", "vocab").
    """
    if model.tie_embeddings:
        logits = embedding.attend(x)
    else:
        kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab"))
        logits = nn.Dense(
            model.vocab_size,
            use_bias=False,
            dtype=model.dtype,
            param_dtype=model.param_dtype,
            kernel_init=kernel_init,
            name="lm_head",
        )(x)
    logits = logits.astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
