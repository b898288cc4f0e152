"""The run API: the one module of `train` that tools outside it (eval/) use. A `Run` is a training run's config,
task (model + loss), parameters and data on this machine's mesh, with its evaluation step; `load_run` restores one
from a workdir's checkpoint, `build_run` makes one from a config (no checkpoint: for timing the train step), and
`train` trains or resumes a config in a workdir.

    run = load_run("runs/lm_tiny")                 # latest checkpoint, with the config saved inside it
    source = run.data("valid", batch_size=8)       # the config's data source: any split, rows or length
    metrics = run.evaluate(source, num_batches=4)  # {"loss", "accuracy", ["perplexity"]}
    with run.tracing():                            # mesh + logical axis rules, for any traced call of run.task
        logits = run.task.apply({"params": run.params}, batch)

Config files and overrides are read as `python -m train` reads them (`load_config_file`,
`unknown_override_message`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging

from . import mesh as mesh_lib
from . import tasks, trainer
from .checkpointing import CheckpointDamaged, Checkpointer
from .config_checks import unknown_override_message
from .config_file import load_config_file
from .data import make_source, source_class
from .data.text import corpus_text  # eval's way to the corpus (eval imports only train.run)
from .metrics import METRICS_FILE  # the workdir's scalar log, read back by eval.run_metrics
from .optim import make_optimizer
from .state import TrainState
from .techniques import effective_params
from .trainer import RUN_ERRORS, TrainingDiverged  # RUN_ERRORS: the one-line errors of a run

__all__ = [
    "METRICS_FILE",
    "RUN_ERRORS",
    "CheckpointDamaged",
    "Run",
    "TrainResult",
    "TrainingDiverged",
    "build_run",
    "corpus_text",
    "load_config_file",
    "load_run",
    "make_optimizer",
    "make_source",
    "source_class",
    "train",
    "unknown_override_message",
]

TrainResult = trainer.RunResult


def train(
    config: Mapping[str, Any],
    workdir: str,
    *,
    stop_at_step: int | None = None,
    evaluators: Any = None,
    guard: Any = None,
) -> TrainResult:
    """Trains `config` in `workdir` exactly as `python -m train` does, resuming from the latest checkpoint there
    (a finished run returns at once). `stop_at_step` ends it early after that step, with a checkpoint.
    `evaluators` ({tool: callable}) run the config.evals entries at their cadence; `guard` is an entered
    train.preemption.PreemptionGuard (a SIGTERM then saves and returns; default: trainer.run installs its own)."""
    return trainer.run(config, workdir, stop_at_step=stop_at_step, guard=guard, evaluators=evaluators)


@dataclasses.dataclass
class Run:
    """A training run on this machine: its config, task, parameters and data, laid out on its mesh.

    Attributes:
      config: the run's ml_collections config (for a restored run, the one saved with the checkpoint).
      workdir: absolute path of the run directory.
      params: the model parameters (sharded on the mesh); None for a run built from a config (`build_run`). With
        training techniques they include params["techniques"] and go through `task.apply`; `model_params` is what
        `task.model` itself computes with.
      step: the checkpoint's step (0 for `build_run`).
    """

    config: ml_collections.ConfigDict
    workdir: str
    params: Any
    step: int
    _setup: trainer.Setup = dataclasses.field(repr=False)
    _layout: trainer.StateLayout = dataclasses.field(repr=False)

    @property
    def task(self) -> tasks.Task:
        """The model and its loss (`task.model`, `task.apply`, `task.kind`, `task.is_language_model`)."""
        return self._setup.task

    @property
    def model_params(self) -> Any:
        """The parameters `task.model` computes with when applied directly (decoding with a cache, swapping the
        attention): `params` after the training techniques' transforms (σReparam's γ/σ(W)·W), without their
        variables; `params` itself for a run trained without techniques."""
        return None if self.params is None else effective_params(self.task, self.params)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._setup.mesh

    @property
    def batch_divisor(self) -> int:
        """Rows of every global batch must be a multiple of this (the batch-sharded mesh axes x processes)."""
        return mesh_lib.batch_size_divisor(self.mesh) * jax.process_count()

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """The mesh and logical axis rules that tracing the model needs (wrap every jit / apply of `task`)."""
        with trainer.tracing_context(self._setup):
            yield

    def data(
        self,
        split: str = "valid",
        *,
        batch_size: int | None = None,
        seq_len: int | None = None,
        per_process: bool = True,
    ) -> Any:
        """The config's data source for `split` ("train" or "valid"), restarted at its first batch.

        batch_size: global rows per batch (default: the config's batch_size). seq_len: tokens per row (default: the
        config's seq_len). per_process: True, this process's share of every global batch (what `evaluate` takes);
        False, the whole batch as if there were one process (the same rows on every process).
        A source yields dicts of host arrays (`next_batch()`), e.g. "inputs" int32 [rows, seq_len] for text.
        """
        config = self.config
        options = {key: value for key, value in config.data.to_dict().items() if key != "name" and value is not None}
        where = dict(process_index=jax.process_index(), process_count=jax.process_count()) if per_process else {}
        return make_source(
            config.data.name,
            split=split,
            batch_size=config.batch_size if batch_size is None else batch_size,
            seq_len=config.seq_len if seq_len is None else seq_len,
            seed=config.seed,
            **where,
            **options,
        )

    @functools.cached_property
    def eval_step(self) -> Any:
        """eval_step(params, global batch) -> {"loss_sum", "correct", "weight"}: the trainer's deterministic
        evaluation step (jitted with the run's shardings; any batch shape, e.g. longer sequences)."""
        return trainer.make_eval_step(self._setup, self._layout)

    def evaluate(self, source: Any, num_batches: int, params: Any = None) -> dict[str, float]:
        """Task metrics ("loss", "accuracy", ["perplexity"]) of `params` (default: the run's) over the first
        `num_batches` batches of `source` (a `data(...)` source; reset first, so every call sees the same batches)."""
        params = self.params if params is None else params
        if params is None:
            raise ValueError("params=None: this run was built from a config and has no parameters; pass params")
        return trainer.evaluate_loss(self._setup, self.eval_step, params, source, num_batches)

    # --- the train step, for benchmarks of training throughput -------------------------------------------------

    @property
    def num_params(self) -> int:
        """Number of model parameters (scalars)."""
        return tasks.count_params(self._layout.abstract_state.params)

    @property
    def tokens_per_example(self) -> int:
        """Tokens one training example holds (sequence length, or patches for images)."""
        shapes = {key: (value.shape, value.dtype) for key, value in self._layout.batch_shapes.items()}
        return self.task.tokens_per_example(shapes)

    def train_flops_per_token(self, length: int) -> float:
        """The trainer's training FLOP estimate per token at `length` tokens per example (6 N + 12 L H Dh T)."""
        return trainer.train_flops_per_token(self.num_params, *tasks.attention_layout(self.task), length)

    def init_state(self, rng: jax.Array) -> TrainState:
        """Fresh parameters and optimizer state in their shardings (the trainer's init)."""
        return trainer.init_state(self._setup, self._layout, rng)

    def train_step(self) -> tuple[Any, float]:
        """(train_step, compile seconds): the trainer's sharded, state-donating step, compiled ahead of time.
        train_step(state, global batch, rng) -> (state, metrics)."""
        return trainer.make_train_step(self._setup, self._layout)

    def next_train_batch(self) -> dict[str, jax.Array]:
        """The next batch of the run's training stream, sharded on the mesh."""
        return mesh_lib.shard_batch(self._setup.train_source.next_batch(), self.mesh)


def build_run(config: Mapping[str, Any], workdir: str) -> Run:
    """A `Run` of `config` with no parameters (params None, step 0): its data, task, layout and steps.
    Raises ConfigError (a ValueError) for a bad config, as `python -m train` does."""
    s = trainer.setup(config, workdir)
    return Run(s.config, s.workdir, None, 0, s, trainer.layout_state(s))


def load_run(workdir: str, step: int | None = None) -> Run:
    """The run in `workdir` at checkpoint `step` (default: the latest), restored onto this machine's mesh.

    The config is the one saved with the checkpoint. Its mesh is kept when this machine has the devices for it;
    otherwise the run falls back to pure data parallelism over all devices. No distributed start-up is done.
    """
    checkpointer = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"), keep=1, save_every=1)
    try:
        candidates = [step] if step is not None else sorted(checkpointer.all_steps(), reverse=True)
        if not candidates:
            raise FileNotFoundError(f"no finished checkpoint in {checkpointer.directory}")
        damaged = []
        for candidate in candidates:
            try:
                return _restore_run(checkpointer, candidate, workdir)
            except CheckpointDamaged as error:
                if step is not None:
                    raise
                damaged.append(f"{candidate}: {error.reason or error}")
                logging.warning("checkpoint %d of %s is damaged (%s); trying an older one", candidate, workdir, error)
        raise CheckpointDamaged(f"every checkpoint in {checkpointer.directory} is damaged ({'; '.join(damaged)})")
    finally:
        checkpointer.close()


def _restore_run(checkpointer: Checkpointer, step: int, workdir: str) -> Run:
    """The run at checkpoint `step` (its saved config; the mesh falls back to data parallelism if needed)."""
    try:
        meta = checkpointer.read_meta(step)
    except (OSError, ValueError, KeyError) as error:  # an unreadable meta item is damage, as in restore
        raise CheckpointDamaged(f"checkpoint {step}: {error}", step=step, reason=str(error)) from None
    config = ml_collections.ConfigDict(meta["config"])
    try:
        mesh_lib.make_mesh(config.mesh.shape, config.mesh.axes)
    except ValueError:
        config.mesh.shape, config.mesh.axes = (-1,), ("data",)
    config.distributed.initialize = False
    s = trainer.setup(config, workdir)
    layout = trainer.layout_state(s)
    state, _, _, _ = checkpointer.restore(step, abstract_state=layout.abstract_state)
    return Run(s.config, s.workdir, state.params, int(meta["step"]), s, layout)
