"""A small residual CNN for images whose blocks carry a channel/spatial attention module chosen by registry name.

    images float [B, H, W, C_in] -> stem (Conv3x3 -> GroupNorm -> ReLU, widths[0] channels)
    -> stages s = 0 .. S-1, each `blocks_per_stage` residual blocks at widths[s] channels (the first block of
       every stage after the first halves H and W with stride 2)
    -> global average pool -> Dense -> logits float32 [B, num_classes]

    residual block:  h = GN(Conv3x3(ReLU(GN(Conv3x3_stride(x)))));  h = attention(h)
                     out = ReLU(shortcut(x) + h),   shortcut = x, or GN(Conv1x1_stride(x)) when the shape changes

The attention module sits on the residual branch before the addition, where ECA-Net and SE-Net put theirs. Any
registered mechanism with input kind "channels" (attn/channel/: eca, ela, ulsam, polarized, lka, cape,
dual_attention, class_semantic) can be used, per stage; None leaves a plain residual block. GroupNorm instead of
BatchNorm keeps the model functional (no batch statistics). Mechanisms that take a `condition` call argument
(`cape`) receive the model's `condition`; auxiliary losses (e.g. dual_attention's "reconstruction") are sown by the
modules into the "losses" collection.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.core.conv import conv, group_norm
from attn.models.encoder import classifier
from attn.models.fields import AttentionOptions, hash_fields, per_layer_options, with_layer_fields

Dtype = Any


def takes_condition(name: str) -> bool:
    """Whether mechanism `name`'s module call has a `condition` argument (parameter-conditioned attention)."""
    return "condition" in inspect.signature(attn.get(name).module.__call__).parameters


def takes_body(name: str) -> bool:
    """Whether mechanism `name` can read a body shared by the network (its call has a `body` argument and its
    module `body_options(**options)` and `shared_body(name, **options)`: MEDUSA's single body)."""
    module = attn.get(name).module
    return (
        "body" in inspect.signature(module.__call__).parameters
        and hasattr(module, "shared_body")
        and hasattr(module, "body_options")
    )


class ResidualBlock(nn.Module):
    """x [B, H, W, in_features] -> [B, H / stride, W / stride, features]; see the module docstring."""

    in_features: int
    features: int
    stride: int
    norm_groups: int
    mechanism: str | None = None
    mechanism_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __hash__(self) -> int:
        return hash_fields(self)

    def setup(self) -> None:
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.conv_1 = conv(self.features, 3, strides=self.stride, use_bias=False, name="conv_1", **args)
        self.norm_1 = group_norm(self.norm_groups, name="norm_1", **args)
        self.conv_2 = conv(self.features, 3, use_bias=False, name="conv_2", **args)
        self.norm_2 = group_norm(self.norm_groups, name="norm_2", **args)
        if self.mechanism is not None:
            spec = attn.get(self.mechanism)
            options = dict(self.mechanism_options)
            for field in ("dtype", "param_dtype"):
                if field in spec.options:
                    options.setdefault(field, getattr(self, field))
            # The attribute name is the submodule name: sown maps land under .../stage_<s>_block_<b>/attention.
            self.attention = attn.build(self.mechanism, **options)
        if self.stride != 1 or self.in_features != self.features:
            self.shortcut = conv(self.features, 1, strides=self.stride, use_bias=False, name="shortcut", **args)
            self.shortcut_norm = group_norm(self.norm_groups, name="shortcut_norm", **args)

    def __call__(self, x: jax.Array, *, condition: jax.Array | None = None, body: jax.Array | None = None) -> jax.Array:
        h = nn.relu(self.norm_1(self.conv_1(x)))
        h = self.norm_2(self.conv_2(h))
        if self.mechanism is not None:
            kwargs = {"condition": condition} if takes_condition(self.mechanism) else {}
            if body is not None:
                kwargs["body"] = body
            h = self.attention(h, **kwargs)
        shortcut = x
        if self.stride != 1 or self.in_features != self.features:
            shortcut = self.shortcut_norm(self.shortcut(x))
        return nn.relu(shortcut + h)


class CNN(nn.Module):
    """Residual image classifier: `__call__(images [B, H, W, C], *, condition=None, deterministic=True)`.

    Returns float32 logits [B, num_classes].

    Fields:
      num_classes: number of output classes.
      widths: channels of each stage (one stage per entry; every width divisible by `norm_groups`).
      blocks_per_stage: residual blocks per stage (an int, or one int per stage).
      attention: registry name of a "channels" mechanism for every block, None for none, or one entry per stage.
      attention_options: `attn.build` options, one dict for every stage or one dict per stage.
      norm_groups: GroupNorm groups.
      share_attention_body: mechanisms with a network-level body (`medusa`: "single body, multi-scale heads") get
        one body, computed once on the stem's output and read by every block (True), or one body per block (False).
      dtype, param_dtype: computation and parameter dtypes.

    `condition` [B, P] is passed to the mechanisms that take one (`cape`); it is an error to give it when none does.
    `deterministic` is accepted for the uniform model call (nothing here uses dropout).
    """

    num_classes: int
    widths: Sequence[int] = (32, 64, 128)
    blocks_per_stage: int | Sequence[int] = 1
    attention: str | None | Sequence[str | None] = "eca"
    attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    norm_groups: int = 8
    share_attention_body: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __hash__(self) -> int:
        return hash_fields(self)

    def shared_body(self, stages: list[tuple[int, int, str | None, dict[str, Any]]]) -> nn.Module | None:
        """The one body every block of a body-sharing mechanism reads (see `share_attention_body`), or None."""
        names = sorted({name for _, _, name, _ in stages if name is not None and takes_body(name)})
        if not self.share_attention_body or not names:
            return None
        if len(names) > 1:
            raise ValueError(
                f"stages use {names}, mechanisms that each want a network-level body; use one of them, or "
                "share_attention_body=False"
            )
        module = attn.get(names[0]).module
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chosen = [module.body_options(**{**args, **options}) for _, _, name, options in stages if name == names[0]]
        if any(options != chosen[0] for options in chosen[1:]):
            raise ValueError(
                f"the stages give {names[0]} different body options ({chosen}); one shared body needs the same ones, "
                "or set share_attention_body=False"
            )
        return module.shared_body(f"{names[0]}_body", **chosen[0])

    def stages(self) -> list[tuple[int, int, str | None, dict[str, Any]]]:
        """Validated (width, blocks, mechanism, options) per stage."""
        widths = tuple(self.widths)
        if not widths or any(not isinstance(w, int) or w <= 0 for w in widths):
            raise ValueError(f"widths={self.widths!r} must be a non-empty sequence of positive ints")
        if self.num_classes <= 0:
            raise ValueError(f"num_classes={self.num_classes} must be positive")
        if self.norm_groups <= 0 or any(w % self.norm_groups for w in widths):
            raise ValueError(f"norm_groups={self.norm_groups} must be positive and divide every width in {widths}")
        n = len(widths)
        blocks = (
            (self.blocks_per_stage,) * n if isinstance(self.blocks_per_stage, int) else tuple(self.blocks_per_stage)
        )
        if len(blocks) != n or any(not isinstance(b, int) or b <= 0 for b in blocks):
            raise ValueError(f"blocks_per_stage={self.blocks_per_stage!r} must be a positive int or {n} positive ints")
        if self.attention is None or isinstance(self.attention, str):
            names = (self.attention,) * n
        else:
            names = tuple(self.attention)
            if len(names) != n:
                raise ValueError(f"attention has {len(names)} entries but there are {n} stages; give one or {n}")
        for name in set(names) - {None}:
            if not isinstance(name, str):
                raise ValueError(f"attention entries must be registry names or None; got {name!r}")
            if attn.get(name).input_kind != "channels":
                raise ValueError(
                    f"attention={name!r} has input kind {attn.get(name).input_kind!r}; the CNN takes mechanisms of "
                    f"input kind 'channels' ({', '.join(attn.list_mechanisms(family='channel'))})"
                )
        options = per_layer_options(self.attention_options, n)
        return list(zip(widths, blocks, names, options, strict=True))

    @nn.compact
    def __call__(
        self, images: jax.Array, *, condition: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        del deterministic
        if images.ndim != 4:
            raise ValueError(f"images must be float [batch, height, width, channels]; got shape {images.shape}")
        stages = self.stages()
        if condition is not None and not any(name and takes_condition(name) for _, _, name, _ in stages):
            raise ValueError("condition was given but no attention mechanism of this CNN takes a condition")
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(stages[0][0], 3, use_bias=False, name="stem", **args)(images.astype(self.dtype))
        x = nn.relu(group_norm(self.norm_groups, name="stem_norm", **args)(x))
        body_module = self.shared_body(stages)
        body = None if body_module is None else body_module(x)
        # A mechanism's per-layer fields count the residual blocks of all stages (attn.models.fields).
        depth, index = sum(blocks for _, blocks, _, _ in stages), 0
        for s, (width, blocks, name, options) in enumerate(stages):
            for b in range(blocks):
                block_options = options
                if name is not None:
                    block_options = with_layer_fields(name, options, layer_index=index, num_layers=depth)
                index += 1
                x = ResidualBlock(
                    in_features=x.shape[-1],
                    features=width,
                    stride=2 if s > 0 and b == 0 else 1,
                    norm_groups=self.norm_groups,
                    mechanism=name,
                    mechanism_options=block_options,
                    name=f"stage_{s}_block_{b}",
                    **args,
                )(x, condition=condition, body=body if name is not None and takes_body(name) else None)
        pooled = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(self.dtype)
        logits = classifier(self.num_classes, name="classifier", **args)(pooled)
        return logits.astype(jnp.float32)
