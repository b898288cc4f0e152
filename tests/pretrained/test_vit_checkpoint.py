"""A ViTModel checkpoint loads as an `attn.models.ViT` (head="hidden", cls_pooler) that computes what transformers
computed for two fixed images: last hidden states and the pooler output within 1e-4 (float32, eager attention; NCHW
pixels on their side, NHWC on ours); a ViTForImageClassification checkpoint gives its logits. The Conv2d weight maps through a TensorRule `permute` and the position table
[1, N + 1, E] through a size-1 view axis (group 0), checked against explicit loops, block by block and back; sharded
loading equals unsharded; settings it cannot honour are named."""

from __future__ import annotations

import itertools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from attn import pretrained
from attn.models.vit import ViT
from attn.pretrained.layouts import TensorRule, join_parameters, read_block, tensor_shape
from attn.pretrained.safetensors_files import SafetensorsFiles
from tests.pretrained.fixtures import fixture_dir, loaded, reference

OUT, CHANNELS, KH, KW = 5, 3, 2, 4  # a non-square kernel: a swap of kh and kw cannot pass
ROWS, WIDTH = 7, 6


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "conv": rng.standard_normal((OUT, CHANNELS, KH, KW)).astype(np.float32),  # torch Conv2d [out, in, kh, kw]
        "table": rng.standard_normal((1, ROWS, WIDTH)).astype(np.float32),  # ViT position_embeddings [1, N, E]
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with SafetensorsFiles(tmp_path) as handle:
        yield handle, tensors


def _flax_kernel(weight):
    """[KH, KW, CHANNELS, OUT] with kernel[i, j, c, o] = weight[o, c, i, j]."""
    out = np.zeros((KH, KW, CHANNELS, OUT), weight.dtype)
    for i, j, c, o in itertools.product(range(KH), range(KW), range(CHANNELS), range(OUT)):
        out[i, j, c, o] = weight[o, c, i, j]
    return out


def _table(tensor):
    """[ROWS, WIDTH] with table[n, e] = tensor[0, n, e]."""
    out = np.zeros((ROWS, WIDTH), tensor.dtype)
    for n, e in itertools.product(range(ROWS), range(WIDTH)):
        out[n, e] = tensor[0, n, e]
    return out


CONV = TensorRule("conv", ("kernel",), groups=(1, 1, 1, 1), permute=(2, 3, 1, 0))
TABLE = TensorRule("table", ("table",), groups=(0, 1, 1))


@pytest.mark.parametrize(
    "conv_block, table_block",
    [
        (None, None),
        ((slice(0, 1), slice(1, 3), slice(None), slice(2, 5)), (slice(2, 6), slice(0, 3))),
        ((slice(1, 2), slice(0, 4), slice(1, 3), slice(0, 1)), (slice(0, 1), slice(3, 6))),
    ],
)
def test_permuted_and_size_one_axes_read_block_by_block(files, conv_block, table_block):
    handle, tensors = files
    for rule, whole, block in (
        (CONV, _flax_kernel(tensors["conv"]), conv_block),
        (TABLE, _table(tensors["table"]), table_block),
    ):
        got = read_block(handle, rule, whole.shape, block)
        np.testing.assert_array_equal(got, whole if block is None else whole[block])


def test_permuted_and_size_one_axes_join_back_and_imply_the_tensor_shapes(files):
    _, tensors = files
    np.testing.assert_array_equal(join_parameters([CONV], [_flax_kernel(tensors["conv"])]), tensors["conv"])
    np.testing.assert_array_equal(join_parameters([TABLE], [_table(tensors["table"])]), tensors["table"])
    assert tensor_shape(CONV, (KH, KW, CHANNELS, OUT)) == (OUT, CHANNELS, KH, KW)
    assert tensor_shape(TABLE, (ROWS, WIDTH)) == (1, ROWS, WIDTH)


def test_bad_permutations_are_named():
    with pytest.raises(ValueError, match=r"conv: permute=\(2, 3, 1, 1\) is not a permutation of the 4 view axes"):
        TensorRule("conv", ("kernel",), groups=(1, 1, 1, 1), permute=(2, 3, 1, 1))
    with pytest.raises(ValueError, match=r"w: set transpose=True or permute=\(1, 0\), not both"):
        TensorRule("w", ("kernel",), groups=(1, 1), transpose=True, permute=(1, 0))
    with pytest.raises(ValueError, match=r"w: transpose=True needs a 2-D view; groups \(1, 1, 1\)"):
        TensorRule("w", ("kernel",), groups=(1, 1, 1), transpose=True)


def _images():
    return jnp.asarray(reference("vit")["pixel_values"])


def test_hidden_states_and_pooler_match_transformers():
    model, params, tokenizer, _ = loaded("vit")
    assert isinstance(model, ViT) and model.head == "hidden" and tokenizer is None
    ref = reference("vit")
    apply = jax.jit(lambda params, images: model.apply({"params": params}, images, mutable=["intermediates"]))
    hidden, state = apply(params, _images())
    assert hidden.shape == ref["hidden"].shape == (2, 17, 32)
    np.testing.assert_allclose(np.asarray(hidden), ref["hidden"], atol=1e-4, rtol=0)
    (pooler,) = state["intermediates"]["pooler_output"]
    np.testing.assert_allclose(np.asarray(pooler), ref["pooler"], atol=1e-4, rtol=0)


def test_image_classifier_logits_match_transformers():
    model, params, _, _ = loaded("vit_classifier")
    assert model.head == "classification" and model.num_classes == 5 and not model.cls_pooler
    ref = reference("vit_classifier")
    logits = jax.jit(lambda params, images: model.apply({"params": params}, images))(
        params, jnp.asarray(ref["pixel_values"])
    )
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)


def test_sharded_load_equals_unsharded():
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto, AxisType.Auto))
    _, params, _, _ = loaded("vit")
    _, sharded, _, _ = pretrained.load(fixture_dir("vit"), mesh=mesh)
    flat_sharded = dict(jax.tree_util.tree_leaves_with_path(sharded))
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        placed = flat_sharded[path]
        assert isinstance(placed.sharding, NamedSharding), jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(placed), np.asarray(value), err_msg=jax.tree_util.keystr(path))


def _copy(tmp_path, name="vit", **changes):
    directory = tmp_path / name
    shutil.copytree(fixture_dir(name), directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_mask_token": True}, r"config.json key 'use_mask_token' \(= True\) of ViTModel is not supported"),
        (
            {"hidden_act": "gelu_new"},
            r"hidden_act='gelu_new' of ViTModel cannot be honoured: expected one of \['gelu'\]",
        ),
        ({"qkv_bias": False}, r"qkv_bias=False of ViTModel cannot be honoured"),
        ({"pooler_output_size": 16}, r"pooler_output_size=16 of ViTModel cannot be honoured: expected hidden_size=32"),
        ({"pooler_act": "relu"}, r"pooler_act='relu' of ViTModel cannot be honoured"),
        ({"image_size": 18}, r"image_size=18 of ViTModel is not a multiple of patch_size=4"),
        ({"image_size": [16, 16]}, r"image_size=\[16, 16\] of ViTModel: expected a positive integer"),
    ],
)
def test_settings_that_cannot_be_honoured_are_named(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        pretrained.load(_copy(tmp_path, **changes))


def test_classifier_without_labels_is_named(tmp_path):
    directory = _copy(tmp_path, name="vit_classifier", id2label={})
    with pytest.raises(ValueError, match=r"id2label=\{\} of ViTForImageClassification: expected a non-empty mapping"):
        pretrained.load(directory)


def test_mask_token_tensor_is_refused(tmp_path):
    """A checkpoint saved with use_mask_token=True holds embeddings.mask_token, which this model has no place for."""
    directory = _copy(tmp_path)
    file = directory / "model.safetensors"
    with safe_open(str(file), framework="numpy") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["embeddings.mask_token"] = np.zeros((1, 1, 32), np.float32)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"'embeddings.mask_token' \(1, 1, 32\) has no parameter in the ViTModel.*use_mask_token=True"
    ):
        pretrained.load(directory)


def test_other_image_sizes_are_refused_not_interpolated():
    model, params, _, _ = loaded("vit")
    with pytest.raises(ValueError, match=r"images of size 20x20 differ from image_size=16.*not supported"):
        model.apply({"params": params}, jnp.zeros((1, 20, 20, 3)))


def test_head_and_pooler_fields_are_checked():
    model, params, _, _ = loaded("vit")
    with pytest.raises(ValueError, match=r"head='classification' needs num_classes > 0; got num_classes=0"):
        model.clone(head="classification").apply({"params": params}, _images())
    with pytest.raises(
        ValueError, match=r"cls_pooler=True pools the class token and needs pool='cls'; got pool='mean'"
    ):
        model.clone(pool="mean").apply({"params": params}, _images())
    with pytest.raises(ValueError, match=r"head='logits'"):
        model.clone(head="logits").apply({"params": params}, _images())
