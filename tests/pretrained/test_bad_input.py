"""Bad checkpoints fail with messages that say what is wrong: the supported architectures, the config key that
cannot be honoured, the missing or mis-shaped tensor with both shapes, the missing file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from attn import pretrained
from tests.pretrained.fixtures import fixture_dir


def _copy(tmp_path, name="gpt2"):
    directory = tmp_path / name
    shutil.copytree(fixture_dir(name), directory)
    return directory


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def _edit_tensors(directory, change):
    file = directory / "model.safetensors"
    with safe_open(str(file), framework="numpy") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    directory = _copy(tmp_path)
    _edit_config(directory, architectures=["MambaForCausalLM"])
    with pytest.raises(ValueError, match=r"architectures=\['MambaForCausalLM'\] is not supported.*GPT2LMHeadModel"):
        pretrained.load(directory)
    _edit_config(directory, architectures=None, model_type="mamba")
    with pytest.raises(
        ValueError, match=r"model_type='mamba'.*supported: \['BertModel', 'GPT2LMHeadModel', 'LlamaForCausalLM'"
    ):
        pretrained.load(directory)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"some_future_flag": True},
            r"config.json key 'some_future_flag' \(= True\) of GPT2LMHeadModel is not supported",
        ),
        ({"activation_function": "relu"}, r"activation_function='relu' of GPT2LMHeadModel cannot be honoured"),
        ({"scale_attn_by_inverse_layer_idx": True}, r"scale_attn_by_inverse_layer_idx=True .* cannot be honoured"),
        ({"n_ctx": 32}, r"n_ctx=32 of GPT2LMHeadModel differs from n_positions=64"),
    ],
)
def test_gpt2_settings_that_cannot_be_honoured_are_named(tmp_path, changes, message):
    directory = _copy(tmp_path)
    _edit_config(directory, **changes)
    with pytest.raises(ValueError, match=message):
        pretrained.load(directory)


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "longrope", "rope_theta": 1e4}, r"rope type 'longrope' .* expected one of \('default'"),
        ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "mscale": 0.7}, r"mscale=0.7 .* cannot be honoured"),
        (
            {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": 16},
            r"beta_fast=16 .* uses beta_fast=32",
        ),
        ({"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5}, r"\['partial_rotary"),
    ],
)
def test_llama_rope_settings_that_cannot_be_honoured_are_named(tmp_path, rope, message):
    directory = _copy(tmp_path, "llama_yarn")
    _edit_config(directory, rope_parameters=rope)
    with pytest.raises(ValueError, match=message):
        pretrained.load(directory)


@pytest.mark.parametrize(
    "name, changes, message",
    [
        ("mistral", {"sliding_window": 0}, r"sliding_window=0 of MistralForCausalLM: expected a positive integer"),
        ("mistral", {"attention_bias": True}, r"key 'attention_bias' \(= True\) of MistralForCausalLM"),
        ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]}, r"layer_types=\['full_attention', 'chunk"),
        ("qwen2", {"layer_types": ["full_attention"]}, r"expected a list of num_hidden_layers=2 entries"),
        ("qwen2", {"use_sliding_window": "yes"}, r"use_sliding_window='yes' of Qwen2ForCausalLM: expected true"),
    ],
)
def test_sliding_window_settings_that_cannot_be_honoured_are_named(tmp_path, name, changes, message):
    directory = _copy(tmp_path, name)
    _edit_config(directory, **changes)
    with pytest.raises(ValueError, match=message):
        pretrained.load(directory)


def test_missing_tensor_is_named_with_its_shape(tmp_path):
    directory = _copy(tmp_path)
    _edit_tensors(directory, lambda tensors: tensors.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"'transformer.h.1.mlp.c_fc.bias' with shape \(128,\) .* is missing"):
        pretrained.load(directory)


def test_mismatched_tensor_is_named_with_both_shapes(tmp_path):
    directory = _copy(tmp_path)

    def shrink(tensors):
        tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"][:, :90]

    _edit_tensors(directory, shrink)
    with pytest.raises(
        ValueError,
        match=r"'transformer.h.0.attn.c_attn.weight' has shape \(32, 90\) but config.json implies \(32, 96\)",
    ):
        pretrained.load(directory)


def test_superfluous_tensor_is_named(tmp_path):
    directory = _copy(tmp_path)
    _edit_tensors(directory, lambda tensors: tensors.update({"transformer.h.0.adapter.weight": np.zeros((2, 2))}))
    with pytest.raises(ValueError, match=r"'transformer.h.0.adapter.weight' \(2, 2\) has no parameter"):
        pretrained.load(directory)


def test_tied_head_that_differs_from_the_embedding_is_refused(tmp_path):
    directory = _copy(tmp_path)

    def add_head(tensors):
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0

    _edit_tensors(directory, add_head)
    with pytest.raises(ValueError, match=r"lm_head.weight differs"):
        pretrained.load(directory)


def test_checkpoint_without_prefix_loads(tmp_path):
    """Older GPT-2 checkpoints name tensors without "transformer." and store causal-mask buffers."""
    directory = _copy(tmp_path)

    def legacy(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))

    _edit_tensors(directory, legacy)
    _, params, _, _ = pretrained.load(directory)
    _, expected, _, _ = pretrained.load(fixture_dir("gpt2"))
    np.testing.assert_array_equal(np.asarray(params["embedding"]["embedding"]), expected["embedding"]["embedding"])


def test_missing_files_are_named(tmp_path):
    directory = _copy(tmp_path)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json is missing"):
        pretrained.load_tokenizer(directory)
    assert pretrained.load(directory)[2] is None
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors and no model.safetensors.index.json"):
        pretrained.load(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        pretrained.load(directory)
    sharded = _copy(tmp_path, "llama")
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"names the shard model-00002-of-00003.safetensors, which is missing"):
        pretrained.load(sharded)
