"""Loading onto a mesh of the 8 fake CPU devices gives the same parameters and logits as loading unsharded, with
every parameter a NamedSharding array laid out by its logical axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from safetensors import safe_open

from attn import pretrained
from tests.pretrained.fixtures import fixture_dir, loaded, reference


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_sharded_load_equals_unsharded(name):
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto, AxisType.Auto))
    _, params, _, _ = loaded(name)
    model, sharded, _, _ = pretrained.load(fixture_dir(name), mesh=mesh)
    flat = jax.tree_util.tree_leaves_with_path(params)
    flat_sharded = dict(jax.tree_util.tree_leaves_with_path(sharded))
    assert len(flat) == len(flat_sharded)
    split = 0
    for path, value in flat:
        placed = flat_sharded[path]
        assert isinstance(placed.sharding, NamedSharding) and placed.sharding.mesh == mesh
        np.testing.assert_array_equal(np.asarray(placed), np.asarray(value), err_msg=jax.tree_util.keystr(path))
        split += placed.sharding.spec != PartitionSpec()
    assert split > len(flat) // 2  # most parameters are split across devices, not replicated
    ref = reference(name)
    logits = jax.jit(model.apply)({"params": sharded}, jnp.asarray(ref["input_ids"], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)


def test_query_kernel_shards_hold_their_heads():
    """Each device's block of a [E, H, D] query kernel is the block of the transposed q_proj weight it names."""
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto, AxisType.Auto))
    _, sharded, _, config = pretrained.load(fixture_dir("llama_yarn"), mesh=mesh)
    kernel = sharded["layers_1"]["attention"]["query"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    with safe_open(str(fixture_dir("llama_yarn") / "model.safetensors"), framework="numpy") as handle:
        weight = handle.get_tensor("model.layers.1.self_attn.q_proj.weight")  # [H * D, E]
    heads, head_dim = config["num_attention_heads"], config["head_dim"]
    for shard in kernel.addressable_shards:
        rows, cols, _ = shard.index
        expected = np.stack([weight[h * head_dim : (h + 1) * head_dim, rows].T for h in range(heads)[cols]], axis=1)
        np.testing.assert_array_equal(np.asarray(shard.data), expected)
