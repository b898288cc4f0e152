"""Vision Transformer checkpoints as an `attn.models.ViT`: `ViTModel` (e.g. google/vit-base-patch16-224-in21k) and
`ViTForImageClassification` (e.g. google/vit-base-patch16-224).

    images [B, H, W, C] (NHWC; transformers takes pixel_values NCHW) -> patch_embeddings.projection, a Conv2d with
    kernel = stride = patch_size -> [B, N, E], class token prepended -> + position_embeddings [N + 1, E]
    -> num_hidden_layers pre-norm blocks:
         x = x + attention.output.dense(attention(query(ln_before(x)), key(.), value(.)))   biases everywhere
         x = x + output.dense(gelu(intermediate.dense(layernorm_after(x))))                  erf gelu
    -> layernorm -> last_hidden_state [B, N + 1, E] (head="hidden")
    pooler tanh(pooler.dense(h[:, 0])) sown as intermediates/pooler_output [B, E]

ViTForImageClassification holds the same encoder under "vit." without the pooler, and its logits float32
[B, num_labels] are classifier(h[:, 0]) (our head="classification", pool="cls"; num_labels = len(id2label)).

Layouts: the Conv2d weight [E, C, p, p] is the flax Conv kernel [p, p, C, E] with its axes permuted (TensorRule
`permute=(2, 3, 1, 0)`; both are cross-correlations, so no flip); position_embeddings [1, N + 1, E] and
cls_token [1, 1, E] map by reshape. The model is fixed to `image_size` (positions are not interpolated, as
transformers' `interpolate_pos_encoding=True` would). Not supported: checkpoints saved with `use_mask_token=True`
(their `embeddings.mask_token` has no parameter here) and ViTForMaskedImageModeling. A ViTModel saved without its
pooler (`add_pooling_layer=False`, which config.json does not record) is recognised by its tensors (no pooler.dense.*)
and loads as a ViT with cls_pooler=False; saving it writes no pooler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from attn.models.vit import ViT
from attn.pretrained.architecture import Architecture, check_keys, fit_pooler, positive_int, require
from attn.pretrained.layouts import TensorRule, linear_rules, norm_rules

NAME = "ViTModel"
CLASSIFIER_NAME = "ViTForImageClassification"

# torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out].
CONV_TO_FLAX = (2, 3, 1, 0)

_TRANSLATED = {
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "pooler_output_size",
    "pooler_act",
    "is_encoder_decoder",
    # No effect on ViTModel's forward pass at inference: dropout rates, the masked-image-modelling decoder's stride.
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "encoder_stride",
}


def build_model(config: Mapping[str, Any], dtype: Any) -> ViT:
    """ViT (head="hidden", cls_pooler) with ViTModel's structure from its config.json; ValueError for a setting it
    cannot reproduce."""
    return _build(config, dtype, NAME)


def build_classifier(config: Mapping[str, Any], dtype: Any) -> ViT:
    """ViT (head="classification", num_classes = len(id2label)) with ViTForImageClassification's structure."""
    labels = config.get("id2label")
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(
            f"config.json id2label={labels!r} of {CLASSIFIER_NAME}: expected a non-empty mapping (one entry per class)"
        )
    return _build(config, dtype, CLASSIFIER_NAME).clone(
        num_classes=len(labels), head="classification", cls_pooler=False
    )


def _build(config: Mapping[str, Any], dtype: Any, architecture: str) -> ViT:
    """The ViTModel encoder (head="hidden", cls_pooler) that config.json describes; `architecture` names the class in
    error messages."""
    check_keys(config, architecture, _TRANSLATED)
    require(config, "hidden_act", ("gelu",), architecture, "the MLP uses the erf gelu")
    require(config, "qkv_bias", (True, None), architecture, "the attention projections have biases")
    require(config, "is_encoder_decoder", (False, None), architecture, "ViT is an encoder")
    d_model = positive_int(config, "hidden_size", architecture)
    pooler = architecture == NAME  # the classifier has no pooler, so its pooler settings have no effect
    if pooler:
        require(config, "pooler_act", ("tanh", None), architecture, "the pooler is tanh(dense(class token))")
    if pooler and config.get("pooler_output_size") not in (None, d_model):
        raise ValueError(
            f"config.json pooler_output_size={config['pooler_output_size']!r} of {architecture} cannot be honoured: "
            f"expected hidden_size={d_model} (the pooler maps [E] -> [E])"
        )
    heads = positive_int(config, "num_attention_heads", architecture)
    if d_model % heads:
        raise ValueError(
            f"config.json hidden_size={d_model} of {architecture} is not a multiple of num_attention_heads={heads}"
        )
    image_size = positive_int(config, "image_size", architecture)
    patch_size = positive_int(config, "patch_size", architecture)
    if image_size % patch_size:
        raise ValueError(
            f"config.json image_size={image_size} of {architecture} is not a multiple of patch_size={patch_size}"
        )
    positive_int(config, "num_channels", architecture)
    return ViT(
        num_classes=0,
        patch_size=patch_size,
        num_layers=positive_int(config, "num_hidden_layers", architecture),
        d_model=d_model,
        num_heads=heads,
        mlp_dim=positive_int(config, "intermediate_size", architecture),
        pool="cls",
        attention="softmax",
        attention_options={"position": "none", "use_bias": True},
        norm="layernorm",
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        mlp="gelu_exact",
        mlp_bias=True,
        head="hidden",
        cls_pooler=True,
        image_size=image_size,
        dtype=dtype,
        param_dtype=dtype,
    )


def example_input(config: Mapping[str, Any]) -> np.ndarray:
    """Images float32 [1, image_size, image_size, num_channels] (what fixes the parameter shapes)."""
    size = positive_int(config, "image_size", NAME)
    return np.zeros((1, size, size, positive_int(config, "num_channels", NAME)), np.float32)


def tensor_rules(model: ViT, config: Mapping[str, Any]) -> list[TensorRule]:
    """Where each ViT parameter sits in a ViTModel checkpoint (pooler.dense only with `cls_pooler`)."""
    pooler = linear_rules("pooler.dense", ("pooler",), (1, 1), bias=True) if model.cls_pooler else []
    return [*_encoder_rules(model, ""), *pooler]


def classifier_rules(model: ViT, config: Mapping[str, Any]) -> list[TensorRule]:
    """Where each ViT parameter sits in a ViTForImageClassification checkpoint."""
    return [*_encoder_rules(model, "vit."), *linear_rules("classifier", ("classifier",), (1, 1), bias=True)]


def _encoder_rules(model: ViT, prefix: str) -> list[TensorRule]:
    """Embeddings, blocks and final norm of a ViTModel whose tensor names start with `prefix`."""
    rules = [
        TensorRule("embeddings.cls_token", ("cls_token",), groups=(1, 1, 1)),
        TensorRule("embeddings.position_embeddings", ("position_embedding",), groups=(0, 1, 1)),
        TensorRule(
            "embeddings.patch_embeddings.projection.weight",
            ("patch_embedding", "kernel"),
            groups=(1, 1, 1, 1),
            permute=CONV_TO_FLAX,
        ),
        TensorRule("embeddings.patch_embeddings.projection.bias", ("patch_embedding", "bias")),
        *norm_rules("layernorm", ("final_norm",)),
    ]
    for i in range(model.num_layers):
        hf, ours = f"encoder.layer.{i}", f"layers_{i}"
        attention = (ours, "attention")
        rules += norm_rules(f"{hf}.layernorm_before", (ours, "attention_norm"))
        for projection in ("query", "key", "value"):
            rules += linear_rules(f"{hf}.attention.attention.{projection}", (*attention, projection), (1, 2), bias=True)
        rules += linear_rules(f"{hf}.attention.output.dense", (*attention, "out"), (2, 1), bias=True)
        rules += norm_rules(f"{hf}.layernorm_after", (ours, "mlp_norm"))
        rules += linear_rules(f"{hf}.intermediate.dense", (ours, "feed_forward", "wi"), (1, 1), bias=True)
        rules += linear_rules(f"{hf}.output.dense", (ours, "feed_forward", "wo"), (1, 1), bias=True)
    return [dataclasses.replace(rule, name=prefix + rule.name) for rule in rules]


_MASK_TOKEN = "a checkpoint saved with use_mask_token=True (masked image modelling) is not supported"

VIT = Architecture(
    name=NAME,
    model_type="vit",
    build_model=build_model,
    tensor_rules=tensor_rules,
    example_input=example_input,
    unsupported_tensors={"embeddings.mask_token": _MASK_TOKEN},
    fit_to_tensors=fit_pooler,
)
VIT_CLASSIFIER = Architecture(
    name=CLASSIFIER_NAME,
    model_type="vit",
    build_model=build_classifier,
    tensor_rules=classifier_rules,
    example_input=example_input,
    unsupported_tensors={"vit.embeddings.mask_token": _MASK_TOKEN},
)
