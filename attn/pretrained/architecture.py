"""What `attn.pretrained` knows about one Hugging Face architecture, and the explicit reading of its config.json.

An `Architecture` turns a config.json (a dict) into an `attn.models` model and lists the `TensorRule`s that place
each of the model's parameters in the checkpoint. Config translation is explicit: every key of config.json is either
honoured (it sets a model field), checked (it must have a value the model reproduces), or known to have no effect
on the forward pass (dropout rates, initialisation, generation defaults, metadata); any other key is an error that
names it, so no setting is silently dropped.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from attn.pretrained.layouts import TensorRule

# Keys any transformers config.json may hold that do not change the forward pass of a causal LM: metadata, token
# ids, generation and training settings.
COMMON_NO_EFFECT = frozenset(
    {
        "_name_or_path",
        "architectures",
        "model_type",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "use_cache",
        "initializer_range",
        "id2label",
        "label2id",
        "task_specific_params",
        "tokenizer_class",
        "gradient_checkpointing",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "problem_type",
        "chunk_size_feed_forward",
        "prefix",
        "finetuning_task",
    }
)

# What the model's `dtype`/`param_dtype` are set from when the caller gives no dtype: the checkpoint's tensors.
DTYPE_KEYS = ("dtype", "torch_dtype")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One supported checkpoint class.

    name: the `architectures` entry of config.json (e.g. "LlamaForCausalLM"); model_type: its `model_type`.
    build_model(config, dtype) -> model: the config translation (raises ValueError naming a key it cannot honour).
    tensor_rules(model, config) -> rules: one TensorRule per parameter of the model's "params" tree.
    no_parameter(name) -> bool: checkpoint tensors that hold no parameter (e.g. GPT-2's causal-mask buffers).
    optional_prefix: a prefix of the tensor names that older checkpoints omit ("transformer." for GPT-2).
    example_input(config) -> array: an input the model is initialised with to find its parameter shapes (default
      tokens int32 [1, 1]; images for a vision model).
    unsupported_tensors: checkpoint tensors of a variant the model cannot express -> why (added to the error).
    fit_to_tensors(model, file_of) -> model: the variant of the config's model that the checkpoint's tensors
      describe where config.json does not say (e.g. a BertModel / ViTModel saved without its pooler); `file_of` maps
      every tensor name of the checkpoint to its safetensors file. Default: the model unchanged.
    """

    name: str
    model_type: str
    build_model: Callable[[Mapping[str, Any], Any], nn.Module]
    tensor_rules: Callable[[nn.Module, Mapping[str, Any]], list[TensorRule]]
    no_parameter: Callable[[str], bool] = lambda name: False
    optional_prefix: str = ""
    example_input: Callable[[Mapping[str, Any]], Any] = lambda config: np.zeros((1, 1), np.int32)
    unsupported_tensors: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    fit_to_tensors: Callable[[nn.Module, Mapping[str, pathlib.Path]], nn.Module] = lambda model, file_of: model


def fit_pooler(model: nn.Module, file_of: Mapping[str, pathlib.Path], prefix: str = "pooler.dense.") -> nn.Module:
    """`model` (with `cls_pooler`) without its pooler when the checkpoint holds neither `{prefix}weight` nor
    `{prefix}bias` (transformers' `add_pooling_layer=False`, which config.json does not record); unchanged when it
    holds both. ValueError naming the file and the tensor when it holds only one of them."""
    names = (f"{prefix}weight", f"{prefix}bias")
    present = [name for name in names if name in file_of]
    if len(present) == 2:
        return model
    if not present:
        return model.clone(cls_pooler=False)
    (found,) = present
    (absent,) = set(names) - {found}
    raise ValueError(
        f"checkpoint tensor {found!r} in {file_of[found]} is half a pooler: {absent!r} is missing (a pooler needs "
        "both its weight and its bias; a checkpoint saved with add_pooling_layer=False has neither)"
    )


def check_keys(config: Mapping[str, Any], architecture: str, known: Collection[str]) -> None:
    """ValueError naming the first config.json key that is neither in `known` nor in COMMON_NO_EFFECT."""
    for key in sorted(config):
        if key not in known and key not in COMMON_NO_EFFECT:
            raise ValueError(
                f"config.json key {key!r} (= {config[key]!r}) of {architecture} is not supported by attn.pretrained; "
                f"the keys it translates are {sorted(known)}"
            )


def require(config: Mapping[str, Any], key: str, allowed: Collection[Any], architecture: str, why: str) -> Any:
    """config[key] (None when absent) if it is one of `allowed`, else ValueError naming the key and the value."""
    value = config.get(key)
    if value not in allowed:
        raise ValueError(
            f"config.json {key}={value!r} of {architecture} cannot be honoured: expected one of {list(allowed)} ({why})"
        )
    return value


def positive_int(config: Mapping[str, Any], key: str, architecture: str) -> int:
    """config[key] as a positive int, else ValueError naming the key."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json {key}={value!r} of {architecture}: expected a positive integer")
    return value
