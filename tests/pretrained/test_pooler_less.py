"""A ViTModel / BertModel checkpoint saved without its pooler (transformers' `add_pooling_layer=False`: config.json
unchanged, no pooler.dense.* tensors) loads as the model with cls_pooler=False, computes the committed fixture's
last_hidden_state within 1e-4, and saves back bit-equal without inventing a pooler. Half a pooler is named.

The pooler-less checkpoints are derived here from the committed `vit` and `bert` fixtures by dropping the two pooler
tensors with the safetensors package (tests/fixtures/hf/make_fixtures.py `vit_no_pooler bert_no_pooler` shows how
transformers makes the same files)."""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from attn import pretrained
from tests.pretrained.fixtures import fixture_dir, loaded, reference, tensor_bytes

POOLER = ("pooler.dense.weight", "pooler.dense.bias")


def _derive(tmp_path, name, drop=POOLER):
    """A copy of fixture `name` whose model.safetensors lacks the tensors `drop` (metadata kept)."""
    directory = tmp_path / f"{name}_derived"
    shutil.copytree(fixture_dir(name), directory)
    file = directory / "model.safetensors"
    with safe_open(str(file), framework="numpy") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if key not in drop}
    assert all(key in tensor_bytes(fixture_dir(name)) for key in drop)  # the fixture had them
    save_file(tensors, str(file), metadata=metadata)
    return directory


def _hidden(name, model, params):
    """last_hidden_state of the fixture's reference input, and the intermediates (pooler_output when sown)."""
    ref = reference(name)
    if name == "vit":
        apply = jax.jit(lambda params, images: model.apply({"params": params}, images, mutable=["intermediates"]))
        return apply(params, jnp.asarray(ref["pixel_values"]))
    apply = jax.jit(
        lambda params, tokens, lengths, types: model.apply(
            {"params": params}, tokens, lengths=lengths, token_type_ids=types, mutable=["intermediates"]
        )
    )
    return apply(params, *(jnp.asarray(ref[key], jnp.int32) for key in ("input_ids", "lengths", "token_type_ids")))


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_pooler_less_checkpoint_loads_and_matches_the_last_hidden_state(tmp_path, name):
    model, params, _, _ = pretrained.load(_derive(tmp_path, name))
    assert not model.cls_pooler and "pooler" not in params
    hidden, state = _hidden(name, model, params)
    assert "pooler_output" not in state.get("intermediates", {})
    ref = reference(name)
    lengths = ref["lengths"] if name == "bert" else [hidden.shape[1]] * hidden.shape[0]
    for row, length in enumerate(lengths):  # bert: padded positions are outputs of neither model
        np.testing.assert_allclose(np.asarray(hidden[row, :length]), ref["hidden"][row, :length], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_pooler_less_round_trip_is_bit_equal_without_inventing_a_pooler(tmp_path, name):
    source = _derive(tmp_path, name)
    model, params, tokenizer, hf_config = pretrained.load(source)
    out = tmp_path / "saved"
    pretrained.save(out, model, params, hf_config, tokenizer=tokenizer)
    original, copy = tensor_bytes(source), tensor_bytes(out)
    assert not set(POOLER) & set(copy)
    assert copy == original
    assert json.loads((out / "config.json").read_text()) == json.loads((source / "config.json").read_text())


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_save_refuses_pooler_and_params_that_disagree(tmp_path, name):
    """A model with its pooler but params without it (and the reverse) is an error, not a half-written pooler."""
    model, params, _, hf_config = loaded(name)
    trimmed = {key: value for key, value in params.items() if key != "pooler"}
    with pytest.raises(ValueError, match=r"params do not match the model: missing \['pooler/bias', 'pooler/kernel'\]"):
        pretrained.save(tmp_path / "a", model, trimmed, hf_config)
    with pytest.raises(ValueError, match=r"unexpected \['pooler/bias', 'pooler/kernel'\]"):
        pretrained.save(tmp_path / "b", model.clone(cls_pooler=False), params, hf_config)


@pytest.mark.parametrize("name", ["vit", "bert"])
@pytest.mark.parametrize("kept", POOLER)
def test_half_a_pooler_names_the_file_and_the_tensor(tmp_path, name, kept):
    directory = _derive(tmp_path, name, drop=tuple(set(POOLER) - {kept}))
    (missing,) = set(POOLER) - {kept}
    message = (
        f"checkpoint tensor '{kept}' in {directory / 'model.safetensors'} is half a pooler: '{missing}' is missing"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        pretrained.load(directory)
