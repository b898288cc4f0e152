"""Encoder-decoder transformer: a bidirectional encoder over source tokens and a causal decoder that cross-attends
to its output; every attention (encoder self, decoder self, decoder cross) is a registered mechanism chosen by name.

    src int [B, Ts] (valid prefix of `src_lengths` per row) -> encoder: embedding -> encoder_layers blocks (padding
      mask) -> final norm -> encoded [B, Ts, d_model]
    tgt int [B, Tt] -> decoder: embedding -> num_layers blocks, each  causal self-attention -> cross-attention to
      `encoded` (padded source keys masked) -> MLP  -> final norm -> vocab head -> logits float32 [B, Tt, vocab_size]

Parameters: `encoder/{embedding, layers_<i>/attention, ..., final_norm}` and `decoder/{embedding,
layers_<i>/{attention, cross_attention, ...}, final_norm[, lm_head]}`. Decoding state ("cache") lives under
`decoder/layers_<i>/attention` (self-attention KV cache) and `decoder/layers_<i>/cross_attention` (whatever the
cross-attention mechanism keeps while decoding). `attn.models.generate_encoder_decoder` decodes greedily or by
sampling with that cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.models.decoder import DecoderLM
from attn.models.fields import AttentionOptions, hash_fields
from attn.models.trunk import TokenTrunk, block_stack, embed_tokens, vocab_logits

Dtype = Any


def lengths_mask(lengths: jax.Array | None, batch: int) -> attn.Mask | None:
    """attn.Mask(kv_lengths=lengths) for attending to a padded context; None when every key is valid."""
    if lengths is None:
        return None
    if jnp.shape(lengths) != (batch,):
        raise ValueError(f"context lengths must be int [batch={batch}]; got shape {jnp.shape(lengths)}")
    return attn.Mask(kv_lengths=lengths)


class SourceEncoder(TokenTrunk):
    """Bidirectional token encoder: tokens int [B, T] (+ lengths int [B]) -> features [B, T, d_model] (final-normed).

    Trunk fields as in `DecoderLM`; `tie_embeddings` is unused (there is no vocab head). Tokens at or beyond
    `lengths[b]` are padding: no valid token attends to them.
    """

    def __hash__(self) -> int:  # each dataclass subclass needs its own (dict-valued fields)
        return hash_fields(self)

    @nn.compact
    def __call__(self, tokens: jax.Array, *, lengths: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        if lengths is not None and jnp.shape(lengths) != tokens.shape[:1]:
            raise ValueError(f"lengths must be int [batch={tokens.shape[0]}]; got shape {jnp.shape(lengths)}")
        x, _ = embed_tokens(self, tokens, None, deterministic=deterministic)
        mask = None if lengths is None else attn.Mask(q_lengths=lengths, kv_lengths=lengths)
        return block_stack(self, x, mask=mask, deterministic=deterministic)


class ConditionedDecoder(DecoderLM):
    """Causal decoder conditioned on a context [B, Tc, d_model], either through cross-attention (`cross_attention`
    set: every layer attends to the context after its self-attention) or as a prefix (`__call__(..., prefix=...)`:
    the context tokens come first and are attended bidirectionally, a prefix-LM).

    `__call__(tokens int[B, T], *, context=None, context_lengths=None, prefix=None, ...)` -> logits float32
    [B, T, vocab_size] for the token positions. Fields as in `DecoderLM`, plus `cross_attention` (None, a registry
    name, or one per layer) and `cross_attention_options` (one dict, or one per layer).
    """

    cross_attention: str | Sequence[str] | None = None
    cross_attention_options: AttentionOptions = dataclasses.field(default_factory=dict)

    def __hash__(self) -> int:
        return hash_fields(self)

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        context: jax.Array | None = None,
        context_lengths: jax.Array | None = None,
        prefix: jax.Array | None = None,
        positions: jax.Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> jax.Array:
        """tokens int [B, T]; context float [B, Tc, d_model] (with cross_attention) and its valid lengths int [B];
        prefix float [B, P, d_model] (prefix-LM: prepended to the token embeddings; with decode=True, give it on
        the call that starts the sequence). Returns logits float32 [B, T, vocab_size]."""
        self._check_mechanisms(decode)
        if (self.cross_attention is None) != (context is None):
            raise ValueError(
                f"cross_attention={self.cross_attention!r} and context "
                f"{'None' if context is None else context.shape} must be given together"
            )
        if context is None and context_lengths is not None:
            raise ValueError("context_lengths was given without a context")
        embed_positions = positions
        if positions is None and decode and self.position_embedding == "learned":
            embed_positions = self._decode_positions(tokens.shape)
        x, embedding = embed_tokens(self, tokens, embed_positions, deterministic=deterministic)
        mask = attn.Mask(causal=True)
        num_prefix = 0
        if prefix is not None:
            if prefix.ndim != 3 or prefix.shape[0] != x.shape[0] or prefix.shape[2] != self.d_model:
                raise ValueError(
                    f"prefix must be float [batch={x.shape[0]}, prefix_length, d_model={self.d_model}]; "
                    f"got shape {prefix.shape}"
                )
            num_prefix = prefix.shape[1]
            x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
            mask = attn.Mask(causal=True, prefix_lengths=num_prefix)
        x = block_stack(
            self,
            x,
            mask=mask,
            positions=positions,
            context=context,
            context_mask=None if context is None else lengths_mask(context_lengths, x.shape[0]),
            decode=decode,
            deterministic=deterministic,
        )
        return vocab_logits(self, embedding, x[:, num_prefix:])


class EncoderDecoder(nn.Module):
    """Sequence-to-sequence transformer (see the module docstring).

    Attributes:
      vocab_size: target vocabulary (decoder input and output). source_vocab_size: source vocabulary (None: the same).
      num_layers: decoder blocks. encoder_layers: encoder blocks (None: num_layers).
      d_model, num_heads, mlp_dim, head_dim, num_kv_heads: sizes, shared by encoder and decoder.
      attention / attention_options: the decoder's self-attention (causal; per layer allowed).
      encoder_attention / encoder_attention_options: the encoder's self-attention (per layer allowed).
      cross_attention / cross_attention_options: the decoder's cross-attention to the encoder output (a "cross"
        mechanism, or a "sequence" one that projects keys/values from a context; per layer allowed).
      norm, mlp, tie_embeddings (decoder head), position_embedding, max_len, dropout_rate, dtype, param_dtype: as in
        `DecoderLM`.
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    mlp_dim: int
    source_vocab_size: int | None = None
    encoder_layers: int | None = None
    head_dim: int | None = None
    num_kv_heads: int | None = None
    attention: str | Sequence[str] = "softmax"
    attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    encoder_attention: str | Sequence[str] = "softmax"
    encoder_attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    cross_attention: str | Sequence[str] = "softmax"
    cross_attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    tie_embeddings: bool = True
    position_embedding: str = "none"
    max_len: int = 2048
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __hash__(self) -> int:
        return hash_fields(self)

    def setup(self) -> None:
        if self.cross_attention is None:
            raise ValueError("cross_attention=None: an encoder-decoder needs a cross-attention mechanism name")
        shared = dict(
            d_model=self.d_model,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            norm=self.norm,
            mlp=self.mlp,
            position_embedding=self.position_embedding,
            max_len=self.max_len,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder = SourceEncoder(
            vocab_size=self.source_vocab_size or self.vocab_size,
            num_layers=self.num_layers if self.encoder_layers is None else self.encoder_layers,
            attention=self.encoder_attention,
            attention_options=self.encoder_attention_options,
            **shared,
        )
        self.decoder = ConditionedDecoder(
            vocab_size=self.vocab_size,
            num_layers=self.num_layers,
            attention=self.attention,
            attention_options=self.attention_options,
            cross_attention=self.cross_attention,
            cross_attention_options=self.cross_attention_options,
            tie_embeddings=self.tie_embeddings,
            **shared,
        )

    def encode(self, src: jax.Array, src_lengths: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
        """Encoder output float [B, Ts, d_model] of src int [B, Ts] with valid lengths int [B] (None: all valid)."""
        return self.encoder(src, lengths=src_lengths, deterministic=deterministic)

    def decode(
        self,
        tgt: jax.Array,
        encoded: jax.Array,
        src_lengths: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> jax.Array:
        """Logits float32 [B, Tt, vocab_size] of the decoder input tgt int [B, Tt] (teacher forcing: the target
        shifted right), attending to encoded [B, Ts, d_model] of which the first src_lengths[b] are valid.

        decode=True (apply with mutable=["cache"]): the first call creates the cache (its length is tgt's); later
        calls take the next target tokens, as `DecoderLM` does.
        """
        return self.decoder(
            tgt,
            context=encoded,
            context_lengths=src_lengths,
            positions=positions,
            decode=decode,
            deterministic=deterministic,
        )

    def __call__(
        self,
        src: jax.Array,
        tgt: jax.Array,
        *,
        src_lengths: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher-forced logits float32 [B, Tt, vocab_size] for src int [B, Ts] (+ src_lengths int [B]) and the
        decoder input tgt int [B, Tt]."""
        encoded = self.encode(src, src_lengths, deterministic=deterministic)
        return self.decode(tgt, encoded, src_lengths, deterministic=deterministic)
