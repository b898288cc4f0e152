"""Vision Transformer: patchify, positions (learned or 2-D sin-cos), pre-norm blocks of any mechanism, a classifier.

    images float [B, H, W, C] -> Conv(kernel = stride = patch_size) -> [B, h*w, d_model] (+ class token)
    -> + position embedding (learned table, or fixed 2-D sin-cos) -> num_layers blocks -> final norm
    -> pool ("cls": the class token; "mean": mean over patches; or a registered "pooling" mechanism such as
       attentive_pooling over the patches) -> Dense -> logits float32 [B, num_classes]
       (head="hidden": the final-normed tokens [B, (1 +) h*w, d_model] instead, Hugging Face's last_hidden_state)

"sequence" mechanisms see the patches as a sequence [B, N, E]; "spatial" mechanisms (e.g. neighborhood
attention) see the patch grid [B, h, w, E] and therefore need a pool other than "cls" (a class token has no
grid place).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.core.validation import check_choice
from attn.models.block import TransformerBlock
from attn.models.encoder import classifier
from attn.models.fields import AttentionOptions, hash_fields, per_layer_mechanisms
from attn.models.layers import ACTIVATION_AXES
from attn.models.pooling import check_pool, pool_tokens
from attn.models.token_pooling import TokenPoolingBlock
from attn.models.trunk import block_stack

Dtype = Any

POOLS = ("cls", "mean")
HEADS = ("classification", "hidden")
TOKEN_POOLINGS = (None, "tap")


def patch_grid(images: jax.Array, patch_size: int) -> tuple[int, int]:
    """(H // patch_size, W // patch_size) of images [B, H, W, C]; ValueError for another rank or a remainder."""
    if images.ndim != 4:
        raise ValueError(f"images must be float [batch, height, width, channels]; got shape {images.shape}")
    height, width = images.shape[1:3]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch_size={patch_size}")
    return height // patch_size, width // patch_size


PATCH_POSITIONS = ("learned", "sincos2d")


def sincos_2d_positions(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> jax.Array:
    """Fixed 2-D sine-cosine position embeddings float32 [h*w, width] of an h x w patch grid (row-major).

    As big_vision's `posemb_sincos_2d` (the MoCo v3 form): with q = width // 4 frequencies
    omega_i = temperature ** (-i / (q - 1)), i = 0..q-1, the patch at row y, column x gets
    [sin(x omega), cos(x omega), sin(y omega), cos(y omega)] (each a block of q channels).
    ValueError unless width is a multiple of 4 and at least 8 (q >= 2).
    """
    if width % 4 or width < 8:
        raise ValueError(f"position_embedding='sincos2d' needs a width that is a multiple of 4 and >= 8; got {width}")
    quarter = width // 4
    omega = 1.0 / temperature ** (jnp.arange(quarter, dtype=jnp.float32) / (quarter - 1))
    y, x = jnp.meshgrid(jnp.arange(grid[0], dtype=jnp.float32), jnp.arange(grid[1], dtype=jnp.float32), indexing="ij")
    x = x.reshape(-1, 1) * omega[None]
    y = y.reshape(-1, 1) * omega[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


def embed_patches(
    model: nn.Module,
    images: jax.Array,
    grid: tuple[int, int],
    *,
    cls_token: bool,
    deterministic: bool,
    position_embedding: str = "learned",
) -> jax.Array:
    """Patch tokens [B, (1 +) h*w, d_model] of images float [B, H, W, C], with positions and dropout.

    Runs inside `model`'s compact method and reads its `patch_size`, `d_model`, `dropout_rate`, `dtype` and
    `param_dtype`: the parameters are the model's own `patch_embedding`, with position_embedding="learned" (the
    default) `position_embedding` (a [(1 +) h*w, d_model] table, init normal(0.02), one row per token including the
    class token) and, with `cls_token`, `cls_token` (prepended as token 0). position_embedding="sincos2d" adds the
    fixed `sincos_2d_positions` to the patch tokens instead (no parameter; the class token gets none, as in
    big_vision). `grid` is (h, w) = (H, W) // patch_size.
    """
    check_choice("position_embedding", position_embedding, PATCH_POSITIONS)
    x = nn.Conv(
        model.d_model,
        kernel_size=(model.patch_size, model.patch_size),
        strides=(model.patch_size, model.patch_size),
        padding="VALID",
        dtype=model.dtype,
        param_dtype=model.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("patch_height", "patch_width", "channels", "embed")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name="patch_embedding",
    )(images)
    batch = x.shape[0]
    x = x.reshape(batch, grid[0] * grid[1], model.d_model)
    if position_embedding == "sincos2d":
        x = x + sincos_2d_positions(grid, model.d_model).astype(model.dtype)[None]
    if cls_token:
        cls = model.param(
            "cls_token",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None, "embed")),
            (1, 1, model.d_model),
            model.param_dtype,
        )
        x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, model.dtype), (batch, 1, model.d_model)), x], 1)
    if position_embedding == "learned":
        table = model.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("length", "embed")),
            (x.shape[1], model.d_model),
            model.param_dtype,
        )
        x = x + jnp.asarray(table, model.dtype)[None]
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    return nn.Dropout(model.dropout_rate)(x, deterministic=deterministic)


class ViT(nn.Module):
    """Image classifier: `__call__(images float[B, H, W, C], *, deterministic=True)` -> [B, num_classes].

    Logits are float32.

    H and W must be multiples of `patch_size`. Trunk fields as in `DecoderLM` (num_layers, d_model,
    num_heads, mlp_dim, head_dim, num_kv_heads, attention, attention_options, norm, mlp, dropout_rate,
    dtype, param_dtype); ViT defaults to layernorm + gelu. Parameters: `patch_embedding` (kernel axes
    ("patch_height", "patch_width", "channels", "embed")), `position_embedding` ("length", "embed"),
    `cls_token` with pool="cls", `pool` with a pooling mechanism (options `pool_options`), `layers_<i>`,
    `final_norm`, `classifier`.

    Fields for imported checkpoints (attn.pretrained.vit), whose defaults leave the model as above:
      norm_eps: epsilon of every norm (Hugging Face ViT: 1e-12); mlp_bias: biases on the MLP's dense layers.
      head: "classification" (logits) or "hidden" (the final-normed tokens [B, (1 +) h*w, d_model], no classifier;
        num_classes is then unused).
      cls_pooler: with pool="cls", the pooler tanh(Dense(x[:, 0])) [B, d_model] (module `pooler`) sown as
        intermediates/pooler_output (Hugging Face ViTModel's pooler_output).
      image_size: when set, images must be image_size x image_size (the position table has one row per patch of
        that size, plus the class token; positions are not interpolated for other sizes).

    position_embedding: "learned" (default: the `position_embedding` table) or "sincos2d" (fixed 2-D sine-cosine
      positions of the patch grid as big_vision's ViT, no parameter; d_model a multiple of 4; any image size).

    token_pooling: None (default) or "tap": token-aware average pooling before every block's attention
      (attn.models.token_pooling, Guo et al. 2023 [148]; a `token_pooling` submodule in each `layers_<i>`), with
      `token_pooling_scales` dilations (official 4); needs pool != "cls" (TAP pools over the patch grid).

    attention="dcal" (Zhu et al. 2022 [46]) runs attn.cross.dcal.classify instead of the plain stack: SA, a GLCA
      block and (training only) the PWCA pass, with extra parameters `glca`, `glca_norm`, `glca_classifier` and
      `dcal_loss_weights`; needs pool="cls".
    """

    num_classes: int
    patch_size: int
    num_layers: int
    d_model: int
    num_heads: int
    mlp_dim: int
    pool: str = "cls"
    pool_options: AttentionOptions = dataclasses.field(default_factory=dict)
    head_dim: int | None = None
    num_kv_heads: int | None = None
    attention: str | Sequence[str] = "softmax"
    attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    norm: str = "layernorm"
    mlp: str = "gelu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm_eps: float = 1e-6
    mlp_bias: bool = False
    head: str = "classification"
    cls_pooler: bool = False
    image_size: int | None = None
    token_pooling: str | None = None
    token_pooling_scales: int = 4
    position_embedding: str = "learned"

    def __hash__(self) -> int:
        return hash_fields(self)

    @nn.compact
    def __call__(self, images: jax.Array, *, deterministic: bool = True) -> jax.Array:
        grid = self._grid(images)
        if "dcal" in per_layer_mechanisms(self.attention, self.num_layers):  # DCAL's branches (attn.cross.dcal)
            from attn.cross import dcal

            return dcal.classify(self, images, grid, deterministic=deterministic)
        x = embed_patches(
            self,
            images,
            grid,
            cls_token=self.pool == "cls",
            deterministic=deterministic,
            position_embedding=self.position_embedding,
        )
        # Only a class-token-free sequence maps onto the patch grid that spatial mechanisms need.
        block = TransformerBlock
        if self.token_pooling == "tap":
            block = functools.partial(TokenPoolingBlock, num_scales=self.token_pooling_scales)
        x = block_stack(self, x, deterministic=deterministic, grid=None if self.pool == "cls" else grid, block=block)
        if self.cls_pooler:
            pooled = classifier(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype, name="pooler")(x[:, 0])
            self.sow("intermediates", "pooler_output", jnp.tanh(pooled))
        if self.head == "hidden":
            return x
        if self.pool == "cls":
            pooled = x[:, 0]
        else:
            pooled = pool_tokens(
                self,
                x,
                pool=self.pool,
                lengths=None,
                num_heads=self.num_heads,
                head_dim=self.head_dim or self.d_model // self.num_heads,
                pool_options=self.pool_options,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
        logits = classifier(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)(pooled)
        return logits.astype(jnp.float32)

    def _grid(self, images: jax.Array) -> tuple[int, int]:
        """Validate fields and image shape; return the patch grid (H // patch_size, W // patch_size)."""
        check_pool(self.pool, POOLS)
        check_choice("head", self.head, HEADS)
        check_choice("token_pooling", self.token_pooling, TOKEN_POOLINGS)
        if self.token_pooling is not None and self.pool == "cls":
            raise ValueError(
                f"token_pooling={self.token_pooling!r} pools over the patch grid and needs pool='mean' (or a pooling "
                "mechanism); pool='cls' adds a class token that has no place on the grid"
            )
        if self.patch_size <= 0:
            raise ValueError(f"patch_size={self.patch_size} must be positive")
        if self.head == "classification" and self.num_classes <= 0:
            raise ValueError(f"head='classification' needs num_classes > 0; got num_classes={self.num_classes}")
        if self.cls_pooler and self.pool != "cls":
            raise ValueError(f"cls_pooler=True pools the class token and needs pool='cls'; got pool={self.pool!r}")
        grid = patch_grid(images, self.patch_size)
        check_choice("position_embedding", self.position_embedding, PATCH_POSITIONS)
        if self.position_embedding != "learned" and "dcal" in per_layer_mechanisms(self.attention, self.num_layers):
            raise ValueError(
                f"position_embedding={self.position_embedding!r} is not supported with attention='dcal' (its "
                "classify embeds the patches with the learned table); use position_embedding='learned'"
            )
        if self.image_size is not None and images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"images of size {images.shape[1]}x{images.shape[2]} differ from image_size={self.image_size}: the "
                "learned positions cover that size only (interpolating them to other sizes is not supported)"
            )
        if self.pool == "cls":
            for name in set(per_layer_mechanisms(self.attention, self.num_layers)):
                if attn.get(name).input_kind == "spatial":
                    raise ValueError(
                        f"attention={name!r} is a spatial mechanism (it attends over the patch grid) and "
                        "needs pool='mean' (or a pooling mechanism); pool='cls' adds a class token that has no place "
                        "on the grid"
                    )
        return grid
