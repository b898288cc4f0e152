"""Checkpoint integrity: checksums recorded at save and verified at restore; damaged checkpoints (bytes
overwritten, a file truncated or deleted, a garbled JSON item) are named and the newest one that verifies is
restored instead; "last good" skips checkpoints whose state held nan/inf."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.train.damage import array_data_files, overwrite_throughout
from tests.train.tiny_run import tiny_config
from train import trainer
from train.checkpointing import CheckpointDamaged, Checkpointer, state_checksums
from train.mesh import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --- the checksum, against a numpy reference written from its definition ------------------------------------

_M = 0xFFFFFFFF


def _fmix32_reference(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M
    return h ^ (h >> 16)


def _checksum_reference(x: np.ndarray) -> str:
    """sum_i fmix32(word_i ^ fmix32(i + seed)) mod 2**32 for the two seeds, over the row-major words of x."""
    if x.dtype.itemsize == 4:
        words = x.view(np.uint32).ravel()
    elif x.dtype.itemsize == 2:
        words = x.view(np.uint16).ravel().astype(np.uint32)
    else:
        words = x.astype(np.uint8).ravel().astype(np.uint32)
    out = ""
    for seed in (0x243F6A88, 0x85A308D3):
        total = 0
        for i, word in enumerate(words.tolist()):
            total = (total + _fmix32_reference(word ^ _fmix32_reference((i + seed) & _M))) & _M
        out += f"{total:08x}"
    return out


def test_checksums_match_the_reference_for_each_dtype():
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "bf16": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
        "i32": rng.integers(-9, 9, size=(2, 2, 3)).astype(np.int32),
        "flag": np.array([True, False, True]),
        "scalar": np.float32(2.5),
    }
    checksums, nonfinite = state_checksums({k: jnp.asarray(v) for k, v in arrays.items()})
    assert nonfinite == []
    for name, value in arrays.items():
        assert checksums[name] == _checksum_reference(np.asarray(value)), name


def test_checksum_does_not_depend_on_the_sharding_but_on_every_bit():
    mesh = make_mesh((4, 2), ("data", "tensor"))
    x = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
    sharded = jax.device_put(x, NamedSharding(mesh, P("data", "tensor")))
    one_device = jax.device_put(x, jax.devices()[0])
    assert state_checksums({"x": sharded})[0] == state_checksums({"x": one_device})[0]
    flipped = x.copy()
    flipped.view(np.uint32)[5, 3] ^= 1  # one bit of one element
    assert state_checksums({"x": jnp.asarray(flipped)})[0] != state_checksums({"x": one_device})[0]
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
    assert state_checksums({"x": jnp.asarray(swapped)})[0] != state_checksums({"x": one_device})[0]


def test_nonfinite_leaves_are_listed():
    _, nonfinite = state_checksums({"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.inf])}, "n": jnp.int32(3)})
    assert nonfinite == ["b/c"]


# --- damaged checkpoints on disk -------------------------------------------------------------------------------


def _state(seed):
    # Random values: zstd cannot compress them, so overwritten bytes reach the values instead of the codec.
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": rng.normal(size=(32,)).astype(np.float32)}
    opt = {"mu": {k: v * 0.1 for k, v in params.items()}, "count": np.int32(seed)}
    return jax.tree.map(jnp.asarray, {"params": params, "opt_state": opt, "step": np.int32(seed)})


_WRITE_TWO = """
import sys
import jax
from tests.train.test_integrity import _state
from train.checkpointing import Checkpointer
with Checkpointer(sys.argv[1], keep=3, save_every=1, async_save=False) as ckpt:
    for step in (1, 2):
        ckpt.save(step, state=_state(step), data_state={"step": step}, rng=jax.random.key(step), config={"s": 1})
"""


@pytest.fixture(scope="module")
def written_once(tmp_path_factory):
    """Checkpoints 1 and 2, written by another process: orbax keeps what it wrote in an in-process cache that
    restores would read instead of the damaged files."""
    directory = str(tmp_path_factory.mktemp("written") / "ckpt")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _WRITE_TWO, directory], cwd=REPO, env=env, check=True, timeout=300)
    return directory


@pytest.fixture
def two_checkpoints(written_once, tmp_path):
    """A fresh copy of checkpoints 1 and 2 in tmp_path/ckpt."""
    directory = str(tmp_path / "ckpt")
    shutil.copytree(written_once, directory)
    return directory


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _assert_equal_trees(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _other_steps_arrays(step_dir):
    """Replaces the state item of ``step_dir`` by checkpoint 1's: every file is intact and orbax reads step 1's
    values without complaint; only the checksums recorded for step 2 can tell."""
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(os.path.join(os.path.dirname(step_dir), "1", "state"), os.path.join(step_dir, "state"))


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "delete", "other_steps_arrays"])
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(two_checkpoints, damage):
    step_dir = os.path.join(two_checkpoints, "2")
    if damage == "other_steps_arrays":
        _other_steps_arrays(step_dir)
    else:  # bytes overwritten throughout the zstd stream: garbage values or a decoding error, damage either way
        path = array_data_files(step_dir)[0]
        {"overwrite": overwrite_throughout, "truncate": _truncate, "delete": os.remove}[damage](path)
    with Checkpointer(two_checkpoints, keep=3, save_every=1) as ckpt:
        state, data, _, meta = ckpt.restore(abstract_state=_state(0))
        assert meta["step"] == 1 and data == {"step": 1}
        _assert_equal_trees(state, _state(1))
        assert [step for step, _ in ckpt.skipped] == [2]
        if damage == "other_steps_arrays":
            assert "arrays do not match the checksum recorded when it was saved" in ckpt.skipped[0][1]
        with pytest.raises(CheckpointDamaged, match=f"checkpoint {os.path.join(two_checkpoints, '2')} is damaged"):
            ckpt.restore(2, abstract_state=_state(0))


def test_garbled_json_items_are_damage(two_checkpoints):
    data_item = os.path.join(two_checkpoints, "2", "data", "metadata")
    text = open(data_item).read()
    assert '"step": 2' in text or '"step":2' in text
    open(data_item, "w").write(text.replace("2", "3"))  # still valid JSON, different content
    meta_item = os.path.join(two_checkpoints, "1", "meta", "metadata")
    open(meta_item, "w").write(open(meta_item).read()[:-10])  # truncated JSON
    with Checkpointer(two_checkpoints, keep=3, save_every=1) as ckpt:
        with pytest.raises(CheckpointDamaged) as info:
            ckpt.restore(abstract_state=_state(0))
    message = str(info.value)
    assert message.startswith(f"every checkpoint in {two_checkpoints} is damaged")
    assert "2: its data-iterator state does not match the SHA-256" in message
    assert "1: its meta item cannot be read" in message
    assert "\n" not in message


def test_set_aside_moves_the_damaged_step_and_it_can_be_saved_again(two_checkpoints):
    _other_steps_arrays(os.path.join(two_checkpoints, "2"))
    with Checkpointer(two_checkpoints, keep=3, save_every=1, async_save=False) as ckpt:
        ckpt.restore(abstract_state=_state(0))
        moved = ckpt.set_aside(2)
        assert moved == two_checkpoints + "-damaged" + os.sep + "2" and os.path.isdir(moved)
        assert ckpt.all_steps() == [1]
        assert ckpt.save(2, state=_state(2), data_state={"step": 2}, rng=None, config={})
        state, _, _, _ = ckpt.restore(abstract_state=_state(0))
    _assert_equal_trees(state, _state(2))


def test_last_good_step_needs_a_finite_state(tmp_path):
    with Checkpointer(tmp_path, keep=3, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state=_state(1), data_state={}, rng=None, config={})
        bad = _state(2)
        bad["opt_state"]["mu"]["b"] = bad["opt_state"]["mu"]["b"].at[3].set(jnp.nan)
        ckpt.save(2, state=bad, data_state={}, rng=None, config={})
        assert ckpt.read_meta(2)["nonfinite"] == ["opt_state/mu/b"]
        assert ckpt.last_good_step() == 1
        assert ckpt.last_good_step(before=1) is None


# --- the trainer ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_resumes_from_the_newest_checkpoint_that_verifies(tmp_path):
    workdir = str(tmp_path)
    assert trainer.run(tiny_config(), workdir).step == 2
    checkpoints = os.path.join(workdir, "checkpoints")
    for path in array_data_files(os.path.join(checkpoints, "2")):
        overwrite_throughout(path)
    # The resumed run is another process, as after a real restart (orbax caches what this process wrote).
    args = ["--config", "configs/lm_tiny.py:smoke", "--workdir", workdir, "--config.model.num_layers=1"]
    args += ["--config.checkpoint_every=1", "--config.log_every=1", "--config.eval_every=0"]
    args += ["--config.eval.stats_batch_size=0", "--config.eval.num_batches=1"]
    args += ["--config.total_steps=3", "--config.allow_changes=total_steps"]
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {os.path.join(checkpoints, '2')} is damaged" in proc.stdout
    assert f"resuming from {os.path.join(checkpoints, '1')}, the newest checkpoint that verifies" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == f"done: step 3; checkpoint {os.path.join(checkpoints, '3')}"
    assert os.path.isdir(os.path.join(workdir, "checkpoints-damaged", "2"))
    with Checkpointer(checkpoints, keep=2, save_every=1) as ckpt:
        assert ckpt.all_steps() == [2, 3]  # step 2 written again by the resumed run
