"""Mesh construction, logical-axis rules and batch sharding on 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from train import mesh as mesh_lib


def test_minus_one_fills_remaining_devices():
    mesh = mesh_lib.make_mesh((2, -1), ("data", "tensor"))
    assert dict(mesh.shape) == {"data": 2, "tensor": 4}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert mesh.devices.size == jax.device_count() == 8


def test_bad_product_message_names_numbers():
    with pytest.raises(ValueError, match=r"shape=\(2, 2\).* 4 devices in total, but there are 8 devices"):
        mesh_lib.make_mesh((2, 2), ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"fixed axes multiply to 3, which does not divide the 8 devices"):
        mesh_lib.make_mesh((3, -1), ("data", "fsdp"))


def test_unknown_axis_message():
    with pytest.raises(ValueError, match=r"unknown axis name 'model'.*\('data', 'fsdp', 'tensor', 'context'\)"):
        mesh_lib.make_mesh((4, 2), ("data", "model"))


def test_batch_divisibility_message():
    mesh = mesh_lib.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert mesh_lib.batch_size_divisor(mesh) == 4
    mesh_lib.check_batch_size(12, mesh)  # 12 = 3 * 4: fine
    mesh8 = mesh_lib.make_mesh((4, 2), ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the mesh's batch axes data x fsdp = 8"):
        mesh_lib.check_batch_size(12, mesh8)


def test_logical_rules_normalises_config_lists():
    rules = mesh_lib.logical_rules([["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["head_dim", None]])
    assert rules == (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("head_dim", None))
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        mesh_lib.logical_rules([("mlp", "model")])


class _TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(
            8,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        )(x)
        # Unboxed bias on the second layer: must come out replicated.
        return nn.Dense(4, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")))(
            x
        )


def test_shardings_for_boxed_params():
    mesh = mesh_lib.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    abstract = jax.eval_shape(_TwoDense().init, jax.random.key(0), jnp.ones((2, 4)))
    shardings = mesh_lib.shardings_for(abstract, mesh, mesh_lib.DEFAULT_RULES)
    params = shardings["params"]
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))
    assert params["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
    assert params["Dense_0"]["bias"].spec == P("tensor")
    assert params["Dense_1"]["kernel"].spec == P("tensor", "fsdp")
    assert params["Dense_1"]["bias"].spec == P()
    # The tree matches the unboxed params, so it can be passed to jax.jit(out_shardings=...).
    assert jax.tree.structure(shardings) == jax.tree.structure(nn.meta.unbox(abstract))


def test_shardings_for_drops_missing_axes_and_non_divisible_dims():
    mesh = mesh_lib.make_mesh((8,), ("tensor",))
    abstract = {"k": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 16), jnp.float32), ("embed", "mlp"))}
    # embed -> fsdp is not in this mesh; mlp -> tensor divides 16.
    assert mesh_lib.shardings_for(abstract, mesh)["k"].spec == P(None, "tensor")
    one_head = {
        "k": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((16, 1, 4), jnp.float32), ("embed", "kv_heads", "head_dim"))
    }
    assert mesh_lib.shardings_for(one_head, mesh)["k"].spec == P(None, None, None)


def test_shard_batch_over_data_and_fsdp():
    mesh = mesh_lib.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    tokens = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    batch = mesh_lib.shard_batch({"inputs": tokens, "weights": np.ones(8, np.float32)}, mesh)
    x = batch["inputs"]
    assert x.shape == (8, 3)
    assert x.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(x), tokens)
    # 4 batch shards of 2 rows, each replicated over the 2 tensor devices.
    rows = sorted({tuple(s.index[0].indices(8)) for s in x.addressable_shards})
    assert rows == [(0, 2, 1), (2, 4, 1), (4, 6, 1), (6, 8, 1)]
    assert batch["weights"].sharding.spec == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="batch_size=6 is not divisible"):
        mesh_lib.shard_batch({"inputs": tokens[:6]}, mesh)
