"""Llama-family (`LlamaForCausalLM`) checkpoints as an `attn.models.DecoderLM`.

    tokens -> embed_tokens -> num_hidden_layers blocks of
        x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))   n = input_layernorm(x), GQA
        x + down_proj(silu(gate_proj(n)) * up_proj(n))                     n = post_attention_layernorm(x)
    -> norm -> lm_head (or embed_tokens when tied)

The model: softmax attention with RoPE (half-split pairs (i, i + d/2), transformers' rotate_half), RMSNorm with the
config's epsilon, the SwiGLU MLP, no learned positions. Every `torch.nn.Linear` weight is stored [out, in] and
transposed. RoPE scaling (`rope_parameters` of transformers >= 5, or `rope_theta` + `rope_scaling` before):
  default   plain RoPE with base rope_theta.
  linear    position interpolation, `rope_scaling="linear"`.
  yarn      YaRN with transformers' ramp and attention factor 0.1 ln(factor) + 1 (`rope_scaling="yarn"`); a custom
            attention_factor, mscale, mscale_all_dim, beta_fast != 32, beta_slow != 1 or truncate=False is refused.
  llama3    Llama 3.1's frequency-band interpolation (`rope_scaling="llama3"`).
  dynamic   dynamic NTK: transformers rescales the base only once a sequence exceeds max_position_embeddings, so
            within max_position_embeddings (the model's `max_len`, which eval.generate enforces) it is plain RoPE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attn.models.decoder import DecoderLM
from attn.pretrained.architecture import Architecture, check_keys, positive_int, require
from attn.pretrained.layouts import TensorRule, linear_rules

NAME = "LlamaForCausalLM"

_TRANSLATED = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    # Sliced matmuls in older transformers: the same function for any value.
    "pretraining_tp",
    # No effect on the forward pass at inference.
    "attention_dropout",
}

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
    "dynamic": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings"},
    "yarn": {
        "rope_type",
        "type",
        "rope_theta",
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "llama3": {
        "rope_type",
        "type",
        "rope_theta",
        "factor",
        "original_max_position_embeddings",
        "low_freq_factor",
        "high_freq_factor",
    },
}


def rope_parameters(config: Mapping[str, Any], architecture: str = NAME) -> dict[str, Any]:
    """The RoPE settings of a config.json in transformers >= 5's form (`rope_parameters` with `rope_type` and
    `rope_theta`), also from the older `rope_theta` + `rope_scaling` keys."""
    if config.get("rope_parameters") is not None:
        if config.get("rope_scaling") is not None:
            raise ValueError(f"config.json of {architecture} sets both rope_parameters and rope_scaling; expected one")
        params = dict(config["rope_parameters"])
    else:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"config.json rope type {kind!r} of {architecture} is not supported; expected one of {ROPE_TYPES}"
        )
    unknown = sorted(set(params) - _ROPE_KEYS[kind])
    if unknown:
        raise ValueError(
            f"config.json RoPE settings {unknown} of {architecture} (rope type {kind!r}) are not supported; "
            f"expected only {sorted(_ROPE_KEYS[kind])}"
        )
    params["rope_type"] = kind
    return params


def _factor(params: Mapping[str, Any], architecture: str) -> float:
    factor = params.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(
            f"config.json RoPE factor={factor!r} of {architecture} (type {params['rope_type']!r}): expected > 0"
        )
    return float(factor)


def rope_options(config: Mapping[str, Any], architecture: str = NAME) -> dict[str, Any]:
    """The softmax layer's RoPE options (`rope_base`, `rope_scaling`, ...) for a Llama-family config.json."""
    params = rope_parameters(config, architecture)
    kind = params["rope_type"]
    options: dict[str, Any] = {"position": "rope", "rope_base": float(params["rope_theta"])}
    max_positions = config.get("max_position_embeddings")
    original = params.get("original_max_position_embeddings", max_positions)
    if kind == "linear":
        options.update(rope_scaling="linear", rope_scaling_factor=_factor(params, architecture))
    elif kind == "dynamic":
        _factor(params, architecture)  # validated; no effect within max_position_embeddings (the module docstring)
    elif kind == "yarn":
        for key, default in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True)):
            if params.get(key) not in (None, default):
                raise ValueError(
                    f"config.json RoPE {key}={params[key]!r} of {architecture} (yarn) cannot be honoured: the yarn "
                    f"ramp uses {key}={default}"
                )
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if params.get(key) is not None:
                raise ValueError(
                    f"config.json RoPE {key}={params[key]!r} of {architecture} (yarn) cannot be honoured: the "
                    "attention factor is 0.1 ln(factor) + 1"
                )
        factor = params.get("factor")
        factor = max_positions / original if factor is None else _factor(params, architecture)
        options.update(rope_scaling="yarn", rope_scaling_factor=float(factor), rope_original_max_len=int(original))
    elif kind == "llama3":
        options.update(
            rope_scaling="llama3",
            rope_scaling_factor=_factor(params, architecture),
            rope_original_max_len=int(original),
            rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        )
    return options


def build_decoder(
    config: Mapping[str, Any],
    dtype: Any,
    *,
    architecture: str,
    translated: set[str],
    qkv_bias: bool,
    out_bias: bool,
    windows: list[int | None] | None = None,
) -> DecoderLM:
    """DecoderLM with the Llama family's structure from a config.json; ValueError for a setting it cannot reproduce.

    qkv_bias / out_bias: biases on the q/k/v and on the output projections. windows: per layer, the sliding window
    of transformers' `sliding_window` (query i sees keys j with i - window < j <= i, so the layer's window is
    (window - 1, 0)) or None for full causal attention; None for every layer full.
    """
    check_keys(config, architecture, translated)
    require(config, "hidden_act", ("silu",), architecture, "the MLP is SwiGLU")
    d_model = positive_int(config, "hidden_size", architecture)
    heads = positive_int(config, "num_attention_heads", architecture)
    head_dim = (
        positive_int(config, "head_dim", architecture) if config.get("head_dim") is not None else d_model // heads
    )
    kv_heads = config.get("num_key_value_heads")
    num_layers = positive_int(config, "num_hidden_layers", architecture)
    options = rope_options(config, architecture)
    if qkv_bias:
        options["use_bias"] = True
    if out_bias != qkv_bias:
        options["out_bias"] = out_bias
    attention_options: dict[str, Any] | list[dict[str, Any]] = options
    if windows is not None:
        attention_options = [options if w is None else {**options, "window": (w - 1, 0)} for w in windows]
    return DecoderLM(
        vocab_size=positive_int(config, "vocab_size", architecture),
        num_layers=num_layers,
        d_model=d_model,
        num_heads=heads,
        head_dim=head_dim,
        num_kv_heads=None if kv_heads is None else positive_int(config, "num_key_value_heads", architecture),
        mlp_dim=positive_int(config, "intermediate_size", architecture),
        attention="softmax",
        attention_options=attention_options,
        norm="rmsnorm",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        mlp_bias=bool(config.get("mlp_bias", False)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        position_embedding="none",
        max_len=positive_int(config, "max_position_embeddings", architecture),
        dtype=dtype,
        param_dtype=dtype,
    )


def build_model(config: Mapping[str, Any], dtype: Any) -> DecoderLM:
    """DecoderLM with Llama's structure from its config.json; ValueError for a setting it cannot reproduce."""
    bias = bool(config.get("attention_bias"))
    return build_decoder(config, dtype, architecture=NAME, translated=_TRANSLATED, qkv_bias=bias, out_bias=bias)


def decoder_rules(model: DecoderLM, *, qkv_bias: bool, out_bias: bool, mlp_bias: bool) -> list[TensorRule]:
    """Where each DecoderLM parameter sits in a Llama-family (`model.layers.<i>.self_attn...`) checkpoint."""
    rules = [
        TensorRule("model.embed_tokens.weight", ("embedding", "embedding"), groups=(1, 1)),
        TensorRule("model.norm.weight", ("final_norm", "scale")),
    ]
    if not model.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head", "kernel"), groups=(1, 1), transpose=True))
    for i in range(model.num_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        attention = (ours, "attention")
        for projection, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            rules += linear_rules(f"{hf}.self_attn.{name}", (*attention, projection), (1, 2), qkv_bias)
        rules += linear_rules(f"{hf}.self_attn.o_proj", (*attention, "out"), (2, 1), out_bias)
        rules += [
            TensorRule(f"{hf}.input_layernorm.weight", (ours, "attention_norm", "scale")),
            TensorRule(f"{hf}.post_attention_layernorm.weight", (ours, "mlp_norm", "scale")),
        ]
        for projection, name in (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj")):
            rules += linear_rules(f"{hf}.mlp.{name}", (ours, "feed_forward", projection), (1, 1), mlp_bias)
    return rules


def tensor_rules(model: DecoderLM, config: Mapping[str, Any]) -> list[TensorRule]:
    """Where each DecoderLM parameter sits in a LlamaForCausalLM checkpoint."""
    bias = bool(config.get("attention_bias"))
    return decoder_rules(model, qkv_bias=bias, out_bias=bias, mlp_bias=bool(config.get("mlp_bias")))


LLAMA = Architecture(name=NAME, model_type="llama", build_model=build_model, tensor_rules=tensor_rules)
