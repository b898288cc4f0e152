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
        # The first invocation stopped at step 3, between log steps: step 3 is logged there, 4 by the second.
        assert [step for step, _ in scalars[tag]] == [2, 3, 4, 6], tag
    for tag in ("eval/loss", "eval/perplexity", "eval/accuracy"):
        assert [step for step, _ in scalars[tag]] == [3, 6], tag
    loss = dict(scalars["train/loss"])
    perplexity = dict(scalars["train/perplexity"])
    assert perplexity[6] == pytest.approx(math.exp(loss[6]), rel=1e-3)
    assert loss[6] < loss[2]  # it learns something in six steps
    assert "config" in metrics.read_text(workdir)


def probe_weights_by_hand(workdir):
    """The attention weights [B, H, T, T] of each layer of the step-6 checkpoint on the probe batch, as the model
    sows them, in float64 numpy."""
    config = lm_tiny.get_config("smoke")
    s = trainer.setup(config, workdir)
    layout = trainer.layout_state(s)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, save_every=3)
    try:
        state, _, step = trainer.restore_or_init(s, layout, checkpointer)
    finally:
        checkpointer.close()
    assert step == 6
    _, collections = s.task.apply({"params": state.params}, s.probe_batch, mutable=["intermediates"])
    flat = jax.tree_util.tree_flatten_with_path(collections["intermediates"])[0]
    weights = {}
    for path, value in flat:
        keys = [str(getattr(entry, "key", entry)) for entry in path]
        if "attention_weights" in keys:
            weights[int(keys[0].split("_")[1])] = np.asarray(value, np.float64)
    return weights


def test_attention_statistics_per_layer(smoke_run):
    """The logged step-6 statistics equal entropy and first-key mass recomputed, row by row, from the weights the
    checkpointed model gives the probe batch (mean over batch, heads and queries)."""
    workdir, _, _ = smoke_run
    scalars = metrics.read_scalars(workdir)
    weights = probe_weights_by_hand(workdir)
    assert sorted(weights) == [0, 1]
    for layer, probs in weights.items():
        batch, heads, length, _ = probs.shape
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        assert np.all(probs[..., np.triu_indices(length, 1)[0], np.triu_indices(length, 1)[1]] == 0)  # causal
        rows = [probs[b, h, i, : i + 1] for b in range(batch) for h in range(heads) for i in range(length)]
        entropy = np.mean([-sum(p * math.log(p) for p in row if p > 0) for row in rows])
        mass = np.mean([row[0] for row in rows])
        logged_entropy = dict(scalars[f"attention/entropy/layer_{layer}"])
        logged_mass = dict(scalars[f"attention/first_key_mass/layer_{layer}"])
        assert sorted(logged_entropy) == sorted(logged_mass) == [3, 6]
        assert logged_entropy[6] == pytest.approx(entropy, rel=1e-4)
        assert logged_mass[6] == pytest.approx(mass, rel=1e-4)


def test_metrics_jsonl_mirrors_the_scalars(smoke_run):
    workdir, _, _ = smoke_run
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    logged = [row["step"] for row in rows if "train/loss" in row]
    assert logged == [2, 3, 4, 6]  # the first run logged 2 and (stopping) 3, the resumed one 4 and 6; no duplicates


def test_checkpoint_of_a_different_model_is_a_clear_error(smoke_run, tmp_path):
    workdir, _, _ = smoke_run
    config = lm_tiny.get_config("smoke")
    config.model.d_model = 64
    with pytest.raises(ConfigError, match=r"written with a different config: model.d_model 32 -> 64;"):
        trainer.run(config, workdir)
    config.allow_changes = "model.d_model"  # accepted by the config check, the shapes still differ
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
