"""GPT-2 (`GPT2LMHeadModel`) checkpoints as an `attn.models.DecoderLM`.

    tokens -> wte + wpe (learned positions, n_positions rows) -> n_layer blocks of
        x + c_proj(attention(ln_1(x)))  with q, k, v = split(c_attn(ln_1(x)))  (biases on all four projections)
        x + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(x))))                               (biases on both)
    -> ln_f -> logits against wte (tied)

The model: softmax attention without positional encoding in the layer (`position="none"`, `use_bias=True`),
LayerNorm with GPT-2's epsilon, the "gelu" MLP (tanh approximation = transformers' "gelu_new") with biases, learned
positions, tied embeddings. GPT-2's `Conv1D` weights are stored [in, out], as ours, so no tensor is transposed; the
fused c_attn [E, 3E] holds q, k, v side by side on its last axis, each [E, H * D] (heads outer, head_dim inner).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attn.models.decoder import DecoderLM
from attn.pretrained.architecture import Architecture, check_keys, positive_int, require
from attn.pretrained.layouts import TensorRule, norm_rules

NAME = "GPT2LMHeadModel"

_TRANSLATED = {
    "vocab_size",
    "n_positions",
    "n_ctx",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "tie_word_embeddings",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    "add_cross_attention",
    # No effect on the forward pass at inference: dropout rates, and the GPT2DoubleHeadsModel summary head.
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
}


def build_model(config: Mapping[str, Any], dtype: Any) -> DecoderLM:
    """DecoderLM with GPT-2's structure from its config.json; ValueError for a setting it cannot reproduce.

    `reorder_and_upcast_attn` only changes the precision of transformers' attention and is accepted either way.
    """
    check_keys(config, NAME, _TRANSLATED)
    require(config, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), NAME, "the MLP is tanh-approximated gelu")
    require(config, "scale_attn_by_inverse_layer_idx", (False, None), NAME, "logits are scaled by 1/sqrt(head_dim)")
    require(config, "add_cross_attention", (False, None), NAME, "a decoder-only model has no cross-attention")
    require(config, "tie_word_embeddings", (True, None), NAME, "GPT2LMHeadModel ties its output head to wte")
    positions = positive_int(config, "n_positions", NAME)
    if config.get("n_ctx") not in (None, positions):
        raise ValueError(f"config.json n_ctx={config['n_ctx']!r} of {NAME} differs from n_positions={positions}")
    d_model = positive_int(config, "n_embd", NAME)
    inner = config.get("n_inner")
    options: dict[str, Any] = {"position": "none", "use_bias": True}
    if config.get("scale_attn_weights", True) is False:
        options["scale"] = 1.0
    return DecoderLM(
        vocab_size=positive_int(config, "vocab_size", NAME),
        num_layers=positive_int(config, "n_layer", NAME),
        d_model=d_model,
        num_heads=positive_int(config, "n_head", NAME),
        mlp_dim=4 * d_model if inner is None else positive_int(config, "n_inner", NAME),
        attention="softmax",
        attention_options=options,
        norm="layernorm",
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        mlp="gelu",
        mlp_bias=True,
        tie_embeddings=True,
        position_embedding="learned",
        max_len=positions,
        dtype=dtype,
        param_dtype=dtype,
    )


def tensor_rules(model: DecoderLM, config: Mapping[str, Any]) -> list[TensorRule]:
    """Where each DecoderLM parameter sits in a GPT2LMHeadModel checkpoint (names with the "transformer." prefix)."""
    rules = [
        TensorRule("transformer.wte.weight", ("embedding", "embedding"), groups=(1, 1)),
        TensorRule("transformer.wpe.weight", ("position_embedding", "embedding"), groups=(1, 1)),
        *norm_rules("transformer.ln_f", ("final_norm",)),
    ]
    for i in range(model.num_layers):
        hf, ours = f"transformer.h.{i}", f"layers_{i}"
        attention = (ours, "attention")
        for part, projection in enumerate(("query", "key", "value")):
            kernel, bias = (*attention, projection, "kernel"), (*attention, projection, "bias")
            rules.append(TensorRule(f"{hf}.attn.c_attn.weight", kernel, groups=(1, 2), part=part, parts=3))
            rules.append(TensorRule(f"{hf}.attn.c_attn.bias", bias, groups=(2,), part=part, parts=3))
        rules += [
            TensorRule(f"{hf}.attn.c_proj.weight", (*attention, "out", "kernel"), groups=(2, 1)),
            TensorRule(f"{hf}.attn.c_proj.bias", (*attention, "out", "bias")),
            *norm_rules(f"{hf}.ln_1", (ours, "attention_norm")),
            *norm_rules(f"{hf}.ln_2", (ours, "mlp_norm")),
            TensorRule(f"{hf}.mlp.c_fc.weight", (ours, "feed_forward", "wi", "kernel"), groups=(1, 1)),
            TensorRule(f"{hf}.mlp.c_fc.bias", (ours, "feed_forward", "wi", "bias")),
            TensorRule(f"{hf}.mlp.c_proj.weight", (ours, "feed_forward", "wo", "kernel"), groups=(1, 1)),
            TensorRule(f"{hf}.mlp.c_proj.bias", (ours, "feed_forward", "wo", "bias")),
        ]
    return rules


def _no_parameter(name: str) -> bool:
    """The causal-mask buffers older GPT-2 checkpoints store (`attn.bias`, `attn.masked_bias`)."""
    return name.endswith((".attn.bias", ".attn.masked_bias"))


GPT2 = Architecture(
    name=NAME,
    model_type="gpt2",
    build_model=build_model,
    tensor_rules=tensor_rules,
    no_parameter=_no_parameter,
    optional_prefix="transformer.",
)
