"""config.init_from with a Hugging Face checkpoint loads each parameter straight into the train state's sharding.

On the 8 fake CPU devices, under an fsdp x tensor mesh, `trainer.start_from_checkpoint` gives bit for bit the
parameters of an unsharded `pretrained.load`, each carrying the train state's sharding, and reads the checkpoint
block by block: every read of the tensor-sharded query kernel is one device's block of heads, never the whole
tensor. The fast test builds the trainer's Setup around a small real data source (no train step is compiled); the
slow one goes through `trainer.setup` and `restore_or_init`."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn import pretrained
from attn.pretrained import checkpoint
from tests.train.test_finetune import LLAMA, _config
from train import mesh as mesh_lib
from train import tasks, trainer
from train.checkpointing import Checkpointer
from train.data import make_source

QUERY = "model.layers.0.self_attn.q_proj.weight"  # [H * D, E]; our kernel [E, H, D] splits H over "tensor"


@pytest.fixture
def reads(monkeypatch):
    """(tensor name, parameter shape, block index) of every read_block call of pretrained.load."""
    calls = []
    read_block = checkpoint.read_block

    def recording(files, rule, shape, index=None):
        calls.append((rule.name, tuple(shape), index))
        return read_block(files, rule, shape, index)

    monkeypatch.setattr(checkpoint, "read_block", recording)
    return calls


def _sharded_config():
    config = _config("")
    config.mesh.shape, config.mesh.axes = (2, 4), ("fsdp", "tensor")
    return config


def _check(params, shardings, reads):
    """params equal an unsharded load's bit for bit and carry `shardings`; the query kernel was read by blocks."""
    query = [(shape, index) for name, shape, index in reads if name == QUERY]
    _, unsharded, _, _ = pretrained.load(LLAMA)
    placed = dict(jax.tree_util.tree_leaves_with_path(params))
    wanted = dict(jax.tree_util.tree_leaves_with_path(shardings))
    leaves = jax.tree_util.tree_leaves_with_path(unsharded)
    assert sorted(placed, key=str) == sorted((path for path, _ in leaves), key=str)
    split = 0
    for path, value in leaves:
        where = jax.tree_util.keystr(path)
        assert placed[path].sharding == wanted[path], where
        split += not placed[path].sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(placed[path]), np.asarray(value), err_msg=where)
    assert split >= len(leaves) // 2  # most parameters are really split over the 8 devices
    assert len(query) >= 4 and all(index is not None for _, index in query)
    for shape, index in query:
        start, stop, _ = index[1].indices(shape[1])
        assert stop - start < shape[1], index  # a block of heads, not the whole tensor


def test_sharded_init_from_equals_unsharded_load_and_reads_blocks(tmp_path, reads):
    assert jax.device_count() == 8
    config = _sharded_config()
    mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.axes)
    source = make_source("tokenized_text", split="valid", batch_size=8, seq_len=16, tokenizer=LLAMA, max_bytes=4096)
    s = trainer.Setup(
        config=config,
        workdir=str(tmp_path),
        mesh=mesh,
        rules=mesh_lib.rules_for_mesh(mesh_lib.logical_rules(config.mesh.rules), mesh),
        task=tasks.build_task(config.model),
        train_source=source,
        valid_source=None,
        probe_batch=None,
        tx=optax.adam(1e-3),
        schedule=None,
    )
    layout = trainer.layout_state(s)
    fresh = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype, device=leaf.sharding), layout.abstract_state)
    state = trainer.start_from_checkpoint(s, layout, fresh)
    _check(state.params, layout.state_shardings.params, reads)
    moments = jax.tree.leaves(state.opt_state[0].mu)
    assert all(not np.any(np.asarray(leaf)) for leaf in moments)  # a fresh optimizer state


@pytest.mark.slow
def test_sharded_init_from_through_the_trainer(tmp_path, reads):
    s = trainer.setup(_sharded_config(), str(tmp_path))
    layout = trainer.layout_state(s)
    with Checkpointer(os.path.join(s.workdir, "checkpoints"), keep=1, save_every=1) as checkpointer:
        state, _, _ = trainer.restore_or_init(s, layout, checkpointer)
    _check(state.params, layout.state_shardings.params, reads)
