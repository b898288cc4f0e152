"""Checkpointer: round trip, retention, async saves, restore onto another mesh, errors, crash safety."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train.checkpointing import Checkpointer
from train.mesh import make_mesh


def _state(mesh, *, heads=4, spec=P("data")):
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, spec if x.ndim == 2 else P()))
    params = {
        "layers_0": {
            "kernel": jnp.arange(16 * heads, dtype=jnp.float32).reshape(16, heads) / 7.0,
            "bias": jnp.linspace(-1.0, 1.0, heads),
        }
    }
    opt_state = {"mu": jax.tree.map(lambda p: p * 0.5, params), "nu": jax.tree.map(jnp.square, params)}
    state = {"params": params, "opt_state": (opt_state, {"count": jnp.int32(7)}), "step": jnp.int32(12)}
    return jax.tree.map(shard, state)


def _abstract(state, mesh, spec):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec if x.ndim == 2 else P())),
        state,
    )


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.dtype == y.dtype


@pytest.fixture
def mesh8():
    return make_mesh((8,), ("data",))


def test_round_trip(tmp_path, mesh8):
    state = _state(mesh8)
    rng = jax.random.key(42)
    data_state = {"epoch": 2, "position": [3, 1, 4], "seed": 0}
    config = {"model": {"d_model": 16}, "optim": {"learning_rate": 3e-4}}
    with Checkpointer(tmp_path, keep=3, save_every=4) as ckpt:
        assert ckpt.save(12, state=state, data_state=data_state, rng=rng, config=config)
        ckpt.wait()
        restored, data, rng2, meta = ckpt.restore(abstract_state=_abstract(state, mesh8, P("data")))
    _assert_trees_equal(restored, state)
    assert data == data_state
    assert jnp.issubdtype(rng2.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(rng2), jax.random.key_data(rng))
    assert meta["step"] == 12 and meta["config"] == config
    # Raw uint32 keys come back raw.
    with Checkpointer(tmp_path / "raw", keep=1, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state=state, data_state={}, rng=jax.random.PRNGKey(5), config={})
        _, _, raw, _ = ckpt.restore(1, abstract_state=state)
    assert raw.dtype == jnp.uint32
    np.testing.assert_array_equal(raw, jax.random.PRNGKey(5))


def test_save_every_and_force(tmp_path, mesh8):
    state = _state(mesh8)
    with Checkpointer(tmp_path, keep=5, save_every=10) as ckpt:
        assert not ckpt.save(5, state=state, data_state={}, rng=None, config={})
        assert ckpt.save(7, state=state, data_state={}, rng=None, config={}, force=True)
        ckpt.wait()
        # The same step twice is a no-op, not an orbax error.
        assert not ckpt.save(7, state=state, data_state={}, rng=None, config={}, force=True)
        assert ckpt.all_steps() == [7]


def test_keep_n_newest(tmp_path, mesh8):
    state = _state(mesh8)
    with Checkpointer(tmp_path, keep=2, save_every=1) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, state=state, data_state={"i": step}, rng=None, config={})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["3", "4"]


def test_keep_every(tmp_path, mesh8):
    state = _state(mesh8)
    with Checkpointer(tmp_path, keep=1, save_every=1, keep_every=2, async_save=False) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, state=state, data_state={}, rng=None, config={})
        assert ckpt.all_steps() == [2, 4, 5]


def test_async_save_then_wait(tmp_path, mesh8):
    state = _state(mesh8)
    ckpt = Checkpointer(tmp_path, keep=2, save_every=1, async_save=True)
    assert ckpt.save(3, state=state, data_state={"k": 1}, rng=None, config={})
    ckpt.wait()
    assert ckpt.latest_step() == 3
    # Another process (here: a fresh Checkpointer) sees the finished step.
    other = Checkpointer(tmp_path, keep=2, save_every=1)
    assert other.latest_step() == 3
    restored, data, rng, _ = other.restore(abstract_state=_abstract(state, mesh8, P("data")))
    _assert_trees_equal(restored, state)
    assert data == {"k": 1} and rng is None
    ckpt.close()
    other.close()


def test_restore_onto_different_mesh(tmp_path, mesh8):
    state = _state(mesh8, spec=P("data"))
    assert state["params"]["layers_0"]["kernel"].sharding.spec == P("data")
    with Checkpointer(tmp_path, keep=1, save_every=1) as ckpt:
        ckpt.save(1, state=state, data_state={}, rng=jax.random.key(0), config={})
    mesh42 = make_mesh((4, 2), ("data", "tensor"))
    abstract = _abstract(state, mesh42, P("data", "tensor"))
    with Checkpointer(tmp_path, keep=1, save_every=1) as ckpt:
        restored, _, rng, _ = ckpt.restore(abstract_state=abstract)
    _assert_trees_equal(restored, state)
    kernel = restored["params"]["layers_0"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh42, P("data", "tensor"))
    assert {tuple(s.data.shape) for s in kernel.addressable_shards} == {(4, 2)}
    assert rng.sharding == NamedSharding(mesh42, P())


def test_different_model_error(tmp_path, mesh8):
    with Checkpointer(tmp_path, keep=1, save_every=1) as ckpt:
        ckpt.save(1, state=_state(mesh8, heads=4), data_state={}, rng=None, config={})
        bigger = _abstract(_state(mesh8, heads=8), mesh8, P("data"))
        with pytest.raises(
            ValueError,
            match=r"written for a different model config: opt_state/0/mu/layers_0/bias has shape \(4,\) "
            r"in the checkpoint but \(8,\) in this model",
        ):
            ckpt.restore(abstract_state=bigger)
        extra = _abstract(_state(mesh8), mesh8, P("data"))
        extra["params"]["new_layer"] = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=NamedSharding(mesh8, P()))
        with pytest.raises(ValueError, match=r"params/new_layer with shape \(2,\) is in this model but not in the"):
            ckpt.restore(abstract_state=extra)


def test_abstract_state_needs_shardings(tmp_path, mesh8):
    state = _state(mesh8)
    with Checkpointer(tmp_path, keep=1, save_every=1) as ckpt:
        ckpt.save(1, state=state, data_state={}, rng=None, config={})
        no_sharding = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        with pytest.raises(ValueError, match=r"abstract_state leaf 'opt_state/0/mu/layers_0/bias'.*\.sharding set"):
            ckpt.restore(abstract_state=no_sharding)


def test_empty_directory(tmp_path, mesh8):
    with Checkpointer(tmp_path / "none", keep=1, save_every=1) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
            ckpt.restore(abstract_state=_state(mesh8))


def test_crash_mid_save_is_surfaced_and_never_latest(tmp_path, mesh8, monkeypatch):
    state = _state(mesh8)
    ckpt = Checkpointer(tmp_path, keep=3, save_every=1, async_save=True)
    ckpt.save(1, state=state, data_state={"at": 1}, rng=None, config={})
    ckpt.wait()

    # The background write dies before the atomic rename of "2.orbax-checkpoint-tmp" to "2".
    from orbax.checkpoint._src.path import atomicity

    async def crash(self, *args, **kwargs):
        raise OSError("simulated crash while finalizing")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    ckpt.save(2, state=jax.tree.map(lambda x: x + 1, state), data_state={"at": 2}, rng=None, config={})
    with pytest.raises(Exception, match="simulated crash"):
        ckpt.wait()
    monkeypatch.undo()
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith("2.")]
    assert leftovers and all(".orbax-checkpoint-tmp" in p for p in leftovers)
    assert not (tmp_path / "2").exists()

    # A restarted run resumes from step 1 and does not trip over the leftover.
    restarted = Checkpointer(tmp_path, keep=3, save_every=1)
    assert restarted.latest_step() == 1
    restored, data, _, _ = restarted.restore(abstract_state=_abstract(state, mesh8, P("data")))
    _assert_trees_equal(restored, state)
    assert data == {"at": 1}
    # Saving step 2 again works and leaves only the finished directory.
    assert restarted.save(2, state=state, data_state={"at": 2}, rng=None, config={})
    restarted.wait()
    assert restarted.all_steps() == [1, 2]
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("2")) == ["2"]
    restarted.close()


_TWO_PROCESS_SCRIPT = r"""
import os, sys
process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
import numpy as np, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from train.checkpointing import Checkpointer
from train.mesh import make_mesh, shard_batch
from train.preemption import PreemptionGuard

mesh = make_mesh((-1, 2), ("data", "tensor"))
batch = shard_batch({"x": np.full((4, 3), process_id, np.int32)}, mesh)
assert batch["x"].shape == (8, 3), batch["x"].shape
with PreemptionGuard() as guard:
    assert not guard.should_stop
    if process_id == 1:  # Only one process gets the signal ...
        guard.request_stop("SIGTERM")
    assert guard.should_stop  # ... both stop.
values = np.arange(32.0).reshape(8, 4)
w = jax.make_array_from_callback((8, 4), NamedSharding(mesh, P("data", "tensor")), lambda i: values[i])
ckpt = Checkpointer(workdir, keep=1, save_every=1)
ckpt.save(1, state={"w": w}, data_state={"position": 10 + process_id}, rng=jax.random.key(3), config={})
ckpt.wait()
other = make_mesh((2, -1), ("data", "tensor"))
sharding = NamedSharding(other, P("tensor", "data"))
abstract = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding)}
state, data, rng, _ = ckpt.restore(abstract_state=abstract)
assert data == {"position": 10 + process_id}, data
for shard in state["w"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), values[shard.index])
ckpt.close()
print("ok", process_id)
"""


def test_two_processes(tmp_path):
    """Two CPU processes: per-process data states, agreement on stopping, restore onto another mesh."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(tmp_path / "ckpt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0 and f"ok {i}" in out, out[-3000:]
