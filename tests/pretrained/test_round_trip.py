"""save(load(dir)) reproduces the checkpoint: every tensor byte for byte (names, dtypes, shapes and data bytes),
config.json and the tokenizer; sharded saving and other dtypes load back."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from attn import pretrained
from tests.pretrained.fixtures import fixture_dir, loaded, reference, tensor_bytes


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama_llama3", "mistral", "qwen2", "bert", "vit", "vit_classifier"])
def test_round_trip_is_bit_equal(tmp_path, name):
    model, params, tokenizer, hf_config = loaded(name)
    pretrained.save(tmp_path, model, params, hf_config, tokenizer=tokenizer)
    original, copy = tensor_bytes(fixture_dir(name)), tensor_bytes(tmp_path)
    assert sorted(copy) == sorted(original)
    for tensor, (dtype, shape, data) in original.items():
        assert copy[tensor][:2] == (dtype, shape), tensor
        assert copy[tensor][2] == data, tensor
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config == json.loads((fixture_dir(name) / "config.json").read_text())
    if tokenizer is None:  # vit: an image model has no tokenizer.json
        return
    prompt = "def fibonacci(n):\n    return"
    assert pretrained.load_tokenizer(tmp_path).encode(prompt).ids == reference(name)["input_ids"][0].tolist()


def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    model, params, _, hf_config = loaded("gpt2")
    pretrained.save(tmp_path, model, params, hf_config, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / shard).is_file() for shard in shards)
    assert not (tmp_path / "model.safetensors").exists()
    assert tensor_bytes(tmp_path) == tensor_bytes(fixture_dir("gpt2"))
    _, again, tokenizer, _ = pretrained.load(tmp_path)
    assert tokenizer is None  # saved without one
    np.testing.assert_array_equal(
        np.asarray(again["layers_1"]["attention"]["key"]["kernel"]),
        np.asarray(params["layers_1"]["attention"]["key"]["kernel"]),
    )


def test_bfloat16_load_save_load(tmp_path):
    """dtype=bfloat16 casts on load; the saved file holds BF16 tensors (read back through the memory-map path),
    each the bfloat16 rounding of the float32 original."""
    model, params, _, hf_config = pretrained.load(fixture_dir("llama"), dtype=jnp.bfloat16)
    assert model.param_dtype == jnp.bfloat16 and model.dtype == jnp.bfloat16
    pretrained.save(tmp_path, model, params, hf_config)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    original = {}
    for file in sorted(fixture_dir("llama").glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as handle:
            original.update({name: handle.get_tensor(name) for name in handle.keys()})
    saved = tensor_bytes(tmp_path)
    for tensor, value in original.items():
        dtype, shape, data = saved[tensor]
        assert (dtype, shape) == ("BF16", list(value.shape))
        np.testing.assert_array_equal(
            np.frombuffer(data, ml_dtypes.bfloat16).reshape(shape), value.astype(ml_dtypes.bfloat16)
        )
    again, params_again, _, _ = pretrained.load(tmp_path)
    assert again.param_dtype == jnp.bfloat16
    kernel = params_again["layers_0"]["feed_forward"]["wi_gate"]["kernel"]
    expected = original["model.layers.0.mlp.gate_proj.weight"].T.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(kernel), expected)


def test_save_refuses_a_model_the_config_does_not_describe(tmp_path):
    model, params, _, hf_config = loaded("llama")
    swapped = model.clone(attention="gated")
    with pytest.raises(ValueError, match=r"attention='gated' \(config.json gives 'softmax'\)"):
        pretrained.save(tmp_path, swapped, params, hf_config)
