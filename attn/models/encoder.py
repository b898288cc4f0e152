"""Bidirectional encoder with a classification head (masked mean pool), a masked-LM head, or no head (BERT-style
hidden states and sentence embeddings).

tokens int [B, T] (valid prefix of `lengths` per row) -> embedding (+ learned positions, + token types, + norm)
-> num_layers blocks, pre-norm with a final norm or post-norm (BERT) (padding mask)
-> "classification": pool over valid tokens (masked mean, or a registered "pooling" mechanism such as
   attentive_pooling) -> Dense -> logits float32 [B, num_classes]
-> "mlm": tied or untied vocab head -> logits float32 [B, T, vocab_size]
-> "hidden": the last hidden states [B, T, d_model] (BertModel's last_hidden_state)
-> "embedding": their masked mean float32 [B, d_model] (sentence-transformers' mean pooling)
With cls_pooler, BERT's pooler tanh(Dense(h[:, 0])) [B, d_model] is sown as intermediates/pooler_output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.core.validation import check_choice
from attn.models.fields import AttentionOptions, hash_fields
from attn.models.pooling import check_pool, pool_tokens
from attn.models.trunk import TokenTrunk, block_stack, embed_tokens, vocab_logits

Dtype = Any

HEADS = ("classification", "mlm", "hidden", "embedding")


def classifier(num_classes: int, *, dtype: Dtype, param_dtype: Dtype, name: str = "classifier") -> nn.Dense:
    """Dense classification head [..., E] -> [..., num_classes], axes ("embed", "classes")."""
    return nn.Dense(
        num_classes,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "classes")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("classes",)),
        name=name,
    )


class Encoder(TokenTrunk):
    """Bidirectional transformer encoder.

    `__call__(tokens int[B, T], *, lengths=None int[B], token_type_ids=None int[B, T], deterministic=True)` ->
    logits float32 [B, num_classes] (head="classification") or [B, T, vocab_size] (head="mlm"), hidden states
    [B, T, d_model] (head="hidden") or their mean float32 [B, d_model] (head="embedding"). Tokens at or beyond
    `lengths[b]` are padding: no valid token attends to them and they are left out of the pooled mean.

    Trunk fields as in `DecoderLM` (vocab_size, num_layers, d_model, num_heads, mlp_dim, head_dim,
    num_kv_heads, attention, attention_options, norm, mlp, tie_embeddings, position_embedding, max_len,
    dropout_rate, dtype, param_dtype); `head` and `num_classes` choose the output; `pool` ("mean" or the
    registry name of a "pooling" mechanism, with `pool_options` for `attn.build`) reduces the tokens for the
    classification head. `cls_pooler` adds BERT's pooler (module `pooler`, output sown as
    intermediates/pooler_output).
    """

    head: str = "classification"
    num_classes: int | None = None
    pool: str = "mean"
    pool_options: AttentionOptions = dataclasses.field(default_factory=dict)
    cls_pooler: bool = False

    def __hash__(self) -> int:  # each dataclass subclass needs its own (dict-valued fields)
        return hash_fields(self)

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        lengths: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        check_choice("head", self.head, HEADS)
        check_pool(self.pool, ("mean",))
        if self.head == "classification" and (self.num_classes is None or self.num_classes <= 0):
            raise ValueError(f"head='classification' needs num_classes > 0; got num_classes={self.num_classes}")
        if lengths is not None and jnp.shape(lengths) != tokens.shape[:1]:
            raise ValueError(f"lengths must be int [batch={tokens.shape[0]}]; got shape {jnp.shape(lengths)}")
        x, embedding = embed_tokens(self, tokens, None, deterministic=deterministic, token_type_ids=token_type_ids)
        mask = None if lengths is None else attn.Mask(q_lengths=lengths, kv_lengths=lengths)
        x = block_stack(self, x, mask=mask, deterministic=deterministic)
        if self.cls_pooler:
            # a Dense like the classifier head: its output axis is replicated, as "classes" is
            pooled = classifier(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype, name="pooler")(x[:, 0])
            self.sow("intermediates", "pooler_output", jnp.tanh(pooled))
        if self.head == "mlm":
            return vocab_logits(self, embedding, x)
        if self.head == "hidden":
            return x
        if self.head == "embedding":
            return pool_tokens(
                self,
                x,
                pool="mean",
                lengths=lengths,
                num_heads=self.num_heads,
                head_dim=1,
                pool_options={},
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
        pooled = pool_tokens(
            self,
            x,
            pool=self.pool,
            lengths=lengths,
            num_heads=self.num_heads,
            head_dim=self.head_dim or self.d_model // self.num_heads,
            pool_options=self.pool_options,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        logits = classifier(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)(pooled)
        return logits.astype(jnp.float32)
