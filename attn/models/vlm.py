"""Small vision-language model: a ViT encoder over image patches, a projection, and a causal text decoder that
either cross-attends to the image tokens or reads them as a prefix. Every attention is a registered mechanism.

    images float [B, H, W, C] -> image_encoder: patchify (patch_size) + positions (vision_position_embedding)
      -> vision_layers blocks
      -> final norm -> [B, N, vision_d_model]  (N = H*W / patch_size^2; with vision_cls_token a class token
      joins the encoder as token 0 and is dropped here)
    -> projection (Dense) -> image tokens [B, N, d_model]
    tokens int [B, T] -> text decoder (num_layers blocks):
      fusion="cross"  (default) causal self-attention, then cross-attention to the image tokens, in every block
      fusion="cross" with visual_prefix_pool=p > 0: also the image tokens average-pooled in groups of p
                      consecutive tokens (N / p pooled tokens) prepended to the text as a prefix-LM prefix; the
                      cross-attention then updates x = [pooled | text] (CrossLMM's pooled visual tokens, `crosslmm`
                      with visual_tokens = N / p)
      fusion="prefix" the image tokens are prepended and attended bidirectionally (prefix-LM mask), the text
                      causally
    -> final norm -> vocab head -> logits float32 [B, T, vocab_size] (text positions only)

Parameters: `image_encoder/{patch_embedding, position_embedding, layers_<i>, final_norm}`, `projection`,
`decoder/{embedding, layers_<i>/{attention[, cross_attention], ...}, final_norm[, lm_head]}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.core.validation import check_choice
from attn.cross.crosslmm import pool_frames
from attn.models.encoder_decoder import ConditionedDecoder
from attn.models.fields import AttentionOptions, hash_fields, per_layer_mechanisms
from attn.models.trunk import block_stack
from attn.models.vit import embed_patches, patch_grid

Dtype = Any

FUSIONS = ("cross", "prefix")


class ImageEncoder(nn.Module):
    """The ViT trunk without a head: images float [B, H, W, C] -> patch features [B, h*w, d_model] (final-normed),
    or [B, 1 + h*w, d_model] with the class token first when `cls_token`.

    Fields as in `ViT` (position_embedding: "learned" table or fixed "sincos2d"). Without a class token (the
    default) "spatial" mechanisms see the h x w patch grid; with one (a learned `cls_token` parameter prepended as
    token 0, as `ViT` with pool="cls") the encoder needs "sequence" mechanisms.
    """

    patch_size: int
    num_layers: int
    d_model: int
    num_heads: int
    mlp_dim: int
    head_dim: int | None = None
    num_kv_heads: int | None = None
    attention: str | Sequence[str] = "softmax"
    attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    norm: str = "layernorm"
    mlp: str = "gelu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cls_token: bool = False
    position_embedding: str = "learned"

    def __hash__(self) -> int:
        return hash_fields(self)

    @nn.compact
    def __call__(self, images: jax.Array, *, deterministic: bool = True) -> jax.Array:
        if self.patch_size <= 0:
            raise ValueError(f"patch_size={self.patch_size} must be positive")
        grid = patch_grid(images, self.patch_size)
        if self.cls_token:
            for name in set(per_layer_mechanisms(self.attention, self.num_layers)):
                if attn.get(name).input_kind == "spatial":
                    raise ValueError(
                        f"vision_attention={name!r} is a spatial mechanism and needs vision_cls_token=False (a class "
                        "token has no place on the patch grid)"
                    )
        x = embed_patches(
            self,
            images,
            grid,
            cls_token=self.cls_token,
            deterministic=deterministic,
            position_embedding=self.position_embedding,
        )
        return block_stack(self, x, deterministic=deterministic, grid=None if self.cls_token else grid)


class VisionLanguageModel(nn.Module):
    """Image-conditioned text decoder (see the module docstring).

    `__call__(images float[B, H, W, C], tokens int[B, T], *, deterministic=True)` -> logits float32 [B, T, V].

    Attributes:
      vocab_size, num_layers, d_model, num_heads, mlp_dim, head_dim, num_kv_heads: the text decoder's sizes.
      attention / attention_options: the decoder's causal self-attention (per layer allowed).
      fusion: "cross" (cross-attention to the image tokens) or "prefix" (image tokens as a prefix-LM prefix).
      visual_prefix_pool: fusion="cross" only: > 0 prepends the image tokens average-pooled in groups of this many
        consecutive tokens (frame-major video tokens: a divisor of the tokens per frame keeps groups inside a frame)
        as a prefix; 0 (default): the decoder's sequence is the text alone. No KV-cache decoding with it.
      cross_attention / cross_attention_options: the decoder's cross-attention mechanism (fusion="cross" only).
      patch_size: square patch side; H and W must be multiples.
      vision_layers: image encoder blocks. vision_d_model / vision_num_heads / vision_mlp_dim: its sizes (None: the
        decoder's). vision_attention / vision_attention_options: its mechanism ("sequence" or "spatial").
      vision_position_embedding: the image encoder's patch positions, "learned" (default; the table
        `image_encoder/position_embedding`) or "sincos2d" (fixed 2-D sine-cosine as big_vision's ViT, no parameter).
      norm, mlp, tie_embeddings, position_embedding, max_len, dropout_rate, dtype, param_dtype: as in `DecoderLM`
        (norm and mlp also for the image encoder).
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    vision_layers: int = 2
    vision_d_model: int | None = None
    vision_num_heads: int | None = None
    vision_mlp_dim: int | None = None
    vision_attention: str | Sequence[str] = "softmax"
    vision_attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    vision_cls_token: bool = False
    vision_position_embedding: str = "learned"
    fusion: str = "cross"
    visual_prefix_pool: int = 0
    head_dim: int | None = None
    num_kv_heads: int | None = None
    attention: str | Sequence[str] = "softmax"
    attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
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
        check_choice("fusion", self.fusion, FUSIONS)
        if self.visual_prefix_pool < 0 or (self.visual_prefix_pool and self.fusion != "cross"):
            raise ValueError(
                f"visual_prefix_pool={self.visual_prefix_pool} with fusion={self.fusion!r}: expected 0, or a positive "
                "pool size with fusion='cross'"
            )
        if self.fusion == "cross" and self.cross_attention is None:
            raise ValueError("fusion='cross' needs cross_attention (a mechanism name); got None")
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype, dropout_rate=self.dropout_rate)
        vision_width = self.vision_d_model or self.d_model
        self.image_encoder = ImageEncoder(
            patch_size=self.patch_size,
            num_layers=self.vision_layers,
            d_model=vision_width,
            num_heads=self.vision_num_heads or self.num_heads,
            mlp_dim=self.vision_mlp_dim or self.mlp_dim,
            attention=self.vision_attention,
            attention_options=self.vision_attention_options,
            norm=self.norm,
            mlp=self.mlp,
            cls_token=self.vision_cls_token,
            position_embedding=self.vision_position_embedding,
            **args,
        )
        self.projection = nn.Dense(
            self.d_model,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("vision_embed", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        )
        self.decoder = ConditionedDecoder(
            vocab_size=self.vocab_size,
            num_layers=self.num_layers,
            d_model=self.d_model,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            attention=self.attention,
            attention_options=self.attention_options,
            cross_attention=self.cross_attention if self.fusion == "cross" else None,
            cross_attention_options=self.cross_attention_options,
            norm=self.norm,
            mlp=self.mlp,
            tie_embeddings=self.tie_embeddings,
            position_embedding=self.position_embedding,
            max_len=self.max_len,
            **args,
        )

    def encode(self, images: jax.Array, lengths: None = None, *, deterministic: bool = True) -> jax.Array:
        """Image tokens float [B, N, d_model] of images float [B, H, W, C]. `lengths` must be None (every patch is
        valid); it is accepted so that `generate_encoder_decoder` drives this model like an `EncoderDecoder`."""
        if lengths is not None:
            raise ValueError("images have no padding: lengths must be None")
        features = self.image_encoder(images, deterministic=deterministic)
        if self.vision_cls_token:
            features = features[:, 1:]  # the class token stays in the encoder
        tokens = self.projection(features)
        return nn.with_logical_constraint(tokens, ("batch", "length", "embed"))

    def decode(
        self,
        tokens: jax.Array,
        encoded: jax.Array,
        lengths: None = None,
        *,
        decode: bool = False,
        deterministic: bool = True,
    ) -> jax.Array:
        """Logits float32 [B, T, vocab_size] of text tokens int [B, T] given image tokens encoded [B, N, d_model].

        decode=True (apply with mutable=["cache"]) decodes with the KV cache. With fusion="prefix" the image tokens
        are written into the cache by the calls that start the sequence (the cache-creating call and the first
        decode call give `encoded`); later calls continue with encoded=None (their keys see the cached image).
        """
        if lengths is not None:
            raise ValueError("images have no padding: lengths must be None")
        if self.fusion == "cross":
            if encoded is None:
                raise ValueError("fusion='cross' needs the image tokens `encoded` on every call")
            if not self.visual_prefix_pool:
                return self.decoder(tokens, context=encoded, decode=decode, deterministic=deterministic)
            if decode:
                raise ValueError(f"visual_prefix_pool={self.visual_prefix_pool} does not decode with a KV cache")
            pooled = pool_frames(encoded, 1, self.visual_prefix_pool)  # [B, N / pool, d_model]
            return self.decoder(tokens, context=encoded, prefix=pooled, deterministic=deterministic)
        if encoded is None and not decode:
            raise ValueError("encoded=None continues a cached sequence: it needs decode=True")
        return self.decoder(tokens, prefix=encoded, decode=decode, deterministic=deterministic)

    def __call__(self, images: jax.Array, tokens: jax.Array, *, deterministic: bool = True) -> jax.Array:
        return self.decode(tokens, self.encode(images, deterministic=deterministic), deterministic=deterministic)
