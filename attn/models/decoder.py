"""Decoder-only language model whose attention is any causal registered mechanism, per layer if wanted.

    tokens int [B, T] -> embedding (+ learned positions) -> num_layers pre-norm blocks (causal mask,
    segment ids for packed sequences) -> final norm -> tied or untied vocab head -> logits float32 [B, T, V]

Parameters: `embedding`, optional `position_embedding`, `layers_<i>/{attention, attention_norm, mlp_norm,
feed_forward}`, `final_norm`, and `lm_head` when untied. Decoding state lives in the "cache" collection: each
layer's KV cache under `layers_<i>/attention`, and, with learned positions, `position_index` at the top.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.models.fields import hash_fields, per_layer_mechanisms
from attn.models.trunk import TokenTrunk, block_stack, embed_tokens, vocab_logits

Dtype = Any


class DecoderLM(TokenTrunk):
    """Causal language model: `__call__(tokens int[B, T]) -> logits float32 [B, T, vocab_size]`.

    Attributes:
      vocab_size, num_layers, d_model, num_heads, mlp_dim: sizes.
      head_dim: per-head size; None means d_model // num_heads.
      num_kv_heads: key/value heads (GQA/MQA); None means num_heads.
      attention: registry name, or one name per layer. Each must be a "sequence" mechanism that
        supports causal masking (and decoding, to use decode=True).
      attention_options: extra `attn.build` options, one dict for all layers or one per layer. The per-layer fields
        a mechanism declares (its spec's `layer_fields`: `layer_index`, the block's 0-based index in this stack
        whatever the other blocks' mechanisms, and `num_layers`) are filled for each layer unless set here.
      norm: "rmsnorm" or "layernorm"; norm_eps: its epsilon. mlp: "swiglu" or "gelu"; mlp_bias: biases in the MLP.
      tie_embeddings: output head is the transposed token embedding.
      position_embedding: "none" (the mechanism handles positions, e.g. RoPE) or "learned" (max_len rows).
      dropout_rate: on embeddings and after each sublayer; also passed to the attention layers.
      dtype / param_dtype: compute / parameter dtypes (logits are always float32).
    """

    def __hash__(self) -> int:  # each dataclass subclass needs its own (dict-valued fields)
        return hash_fields(self)

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> jax.Array:
        """tokens int [B, T]; positions int [B, T] or None; segment_ids int [B, T] or None (packing).

        decode=True (apply with mutable=["cache"]): the first call creates a zero cache of length T (see
        `init_cache`); later calls take the next chunk of tokens and return its logits.
        Returns logits float32 [B, T, vocab_size].
        """
        self._check_mechanisms(decode)
        if decode and segment_ids is not None:
            raise ValueError("segment_ids are not supported with decode=True; decode one sequence per row")
        embed_positions = positions
        if positions is None and decode and self.position_embedding == "learned":
            embed_positions = self._decode_positions(tokens.shape)
        x, embedding = embed_tokens(self, tokens, embed_positions, deterministic=deterministic)
        mask = attn.Mask(causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        # Positions only reach the attention layers when the caller chose them: otherwise each layer
        # counts from its own cache index, which is the same count kept here for learned positions.
        x = block_stack(
            self,
            x,
            mask=mask,
            positions=positions,
            decode=decode,
            deterministic=deterministic,
        )
        return vocab_logits(self, embedding, x)

    def _check_mechanisms(self, decode: bool) -> None:
        for name in set(per_layer_mechanisms(self.attention, self.num_layers)):
            spec = attn.get(name)
            if not spec.supports_causal:
                raise ValueError(f"attention={name!r} does not support causal masking; DecoderLM needs it")
            if decode and not spec.supports_decode:
                raise ValueError(f"attention={name!r} does not support decode=True (no KV cache)")

    def _decode_positions(self, shape: tuple[int, int]) -> jax.Array:
        """Positions of a decode chunk: index + 0..T-1, advancing the model-level counter in "cache"."""
        batch, length = shape
        created = not self.has_variable("cache", "position_index")
        index = self.variable("cache", "position_index", lambda: jnp.zeros((), jnp.int32))
        offsets = jnp.arange(length, dtype=jnp.int32)
        if created:
            # The cache-creating call is a plain forward (flax convention) and leaves the index at 0.
            return jnp.broadcast_to(offsets, (batch, length))
        start = index.value
        index.value = start + length
        return jnp.broadcast_to(start + offsets, (batch, length))
