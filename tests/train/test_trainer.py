"""End to end in-process: the smoke config trains, logs, evaluates, checkpoints and resumes; divergence
stops with the last good checkpoint; shardings match the checked-in expectation."""

import json
import math
import os

import jax
import numpy as np
import pytest

from configs import lm_tiny
from train import metrics, trainer
from train.checkpointing import Checkpointer
from train.config_checks import ConfigError

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "shardings_2x2x2.json")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """lm_tiny:smoke (6 steps) run as two invocations: stopped after step 3, then resumed to the end."""
    workdir = str(tmp_path_factory.mktemp("smoke"))
    config = lm_tiny.get_config("smoke")
    first = trainer.run(config, workdir, stop_at_step=3)
    second = trainer.run(config, workdir)
    return workdir, first, second


def test_second_invocation_resumes_from_the_saved_step(smoke_run):
    _, first, second = smoke_run
    assert (first.start_step, first.step, first.preempted) == (0, 3, False)
    assert (second.start_step, second.step) == (3, 6)
    assert second.checkpoint.endswith(os.path.join("checkpoints", "6"))


def test_checkpoints_are_kept_as_configured(smoke_run):
    workdir, _, _ = smoke_run
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, save_every=3)
    try:
        assert checkpointer.all_steps() == [3, 6]  # keep_checkpoints=2, checkpoint_every=3
        meta = checkpointer.read_meta()
        assert meta["config"]["model"]["d_model"] == 32  # the config travels with the checkpoint
    finally:
        checkpointer.close()


def test_tensorboard_scalars_have_the_expected_tags_and_steps(smoke_run):
    workdir, _, _ = smoke_run
    scalars = metrics.read_scalars(workdir)
    for tag in (
        "train/loss",
        "train/perplexity",
        "train/accuracy",
        "train/learning_rate",
        "train/grad_norm",
        "train/param_norm",
        "perf/step_time_s",
        "perf/tokens_per_s",
        "perf/mfu",
    ):
        assert [step for step, _ in scalars[tag]] == [2, 4, 6], tag
    for tag in ("eval/loss", "eval/perplexity", "eval/accuracy"):
        assert [step for step, _ in scalars[tag]] == [3, 6], tag
    loss = dict(scalars["train/loss"])
    perplexity = dict(scalars["train/perplexity"])
    assert perplexity[6] == pytest.approx(math.exp(loss[6]), rel=1e-3)
    assert loss[6] < loss[2]  # it learns something in six steps
    assert "config" in metrics.read_text(workdir)


def test_attention_statistics_per_layer(smoke_run):
    workdir, _, _ = smoke_run
    scalars = metrics.read_scalars(workdir)
    seq_len = lm_tiny.get_config("smoke").seq_len
    for layer in (0, 1):
        entropy = [v for _, v in scalars[f"attention/entropy/layer_{layer}"]]
        mass = [v for _, v in scalars[f"attention/first_key_mass/layer_{layer}"]]
        assert len(entropy) == len(mass) == 2
        # Causal rows: query i spreads over i + 1 keys, so entropy <= mean log(i + 1) < log(T).
        assert all(0 < e < math.log(seq_len) for e in entropy)
        # Query 0 puts all its mass on key 0, so the mean mass is at least 1 / T.
        assert all(1 / seq_len <= m <= 1 for m in mass)


def test_metrics_jsonl_mirrors_the_scalars(smoke_run):
    workdir, _, _ = smoke_run
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    logged = [row["step"] for row in rows if "train/loss" in row]
    assert logged == [2, 4, 6]  # the resumed run logged 4 and 6; nothing duplicated


def test_checkpoint_of_a_different_model_is_a_clear_error(smoke_run, tmp_path):
    workdir, _, _ = smoke_run
    config = lm_tiny.get_config("smoke")
    config.model.d_model = 64
    with pytest.raises(ConfigError, match="different model config") as info:
        trainer.run(config, workdir)
    assert "params/" in str(info.value) and "\n" not in str(info.value)


def test_divergence_names_the_step_and_the_last_good_checkpoint(tmp_path):
    config = lm_tiny.get_config("smoke")
    # Step 1 runs at learning rate 0 (warmup starts at 0) and is checkpointed; step 2's rate blows the
    # parameters up to inf.
    config.optimizer.learning_rate = 1e30
    config.optimizer.warmup_steps = 4
    config.checkpoint_every = 1
    config.log_every = 1
    config.eval_every = 0
    with pytest.raises(trainer.TrainingDiverged) as info:
        trainer.run(config, str(tmp_path))
    message = str(info.value)
    assert "at step 2" in message
    assert os.path.join(str(tmp_path), "checkpoints", "1") in message
    checkpointer = Checkpointer(os.path.join(str(tmp_path), "checkpoints"), keep=2, save_every=1)
    try:
        assert checkpointer.all_steps() == [1]  # the diverged state was not saved
    finally:
        checkpointer.close()


# --- shardings ---------------------------------------------------------------------------------------


def _sharding_table() -> dict:
    """PartitionSpecs (as strings) of the params and batch of lm_tiny:smoke on a 2x2x2 mesh."""
    config = lm_tiny.get_config("smoke")
    config.mesh.shape = (2, 2, 2)
    config.mesh.axes = ("data", "fsdp", "tensor")
    s = trainer.setup(config, "/nonexistent-unused")
    layout = trainer.layout_state(s)
    flat = jax.tree_util.tree_flatten_with_path(layout.state_shardings.params)[0]
    params = {"/".join(str(getattr(k, "key", k)) for k in path): str(sh.spec) for path, sh in flat}
    batch = {key: str(value.sharding.spec) for key, value in layout.batch_shapes.items()}
    return {"mesh": {"shape": [2, 2, 2], "axes": ["data", "fsdp", "tensor"]}, "params": params, "batch": batch}


def test_shardings_match_the_golden_file():
    table = _sharding_table()
    if os.environ.get("ATTN_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2, sort_keys=True)
            f.write("\n")
    with open(GOLDEN, encoding="utf-8") as f:
        assert table == json.load(f)


def test_optimizer_moments_are_sharded_like_their_parameters():
    config = lm_tiny.get_config("smoke")
    config.mesh.shape = (2, 2, 2)
    config.mesh.axes = ("data", "fsdp", "tensor")
    s = trainer.setup(config, "/nonexistent-unused")
    layout = trainer.layout_state(s)
    params = jax.tree_util.tree_flatten_with_path(layout.state_shardings.params)[0]
    opt = jax.tree_util.tree_flatten_with_path(layout.state_shardings.opt_state)[0]
    for path, sharding in params:
        mirrors = [sh for p, sh in opt if tuple(p[-len(path) :]) == tuple(path)]
        assert len(mirrors) == 2, path  # Adam's mu and nu
        assert all(m.spec == sharding.spec for m in mirrors), path
    assert any(sh.spec != jax.sharding.PartitionSpec() for _, sh in params)
    counters = [sh for p, sh in opt if "count" in jax.tree_util.keystr(p)]
    assert counters and all(sh.spec == jax.sharding.PartitionSpec() for sh in counters)
    assert np.prod(list(s.mesh.shape.values())) == 8


def test_sown_auxiliary_losses_join_the_objective(tmp_path):
    """hedgehog with distill=True sows its distillation loss into "losses"; the trainer adds and logs it."""
    config = lm_tiny.get_config("smoke")
    config.total_steps = 2
    config.model.attention = "hedgehog"
    config.model.attention_options = {"distill": True}
    trainer.run(config, str(tmp_path))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "train/aux_loss" in line]
    assert rows and all(row["train/aux_loss"] > 0.0 for row in rows)
    config.model.attention_options = {"distill": False}
    trainer.run(config, str(tmp_path / "plain"))
    with open(os.path.join(tmp_path, "plain", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "train/aux_loss" in line]
    assert rows and all(row["train/aux_loss"] == 0.0 for row in rows)
