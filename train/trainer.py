"""The training loop: `run(config, workdir)` trains, evaluates, checkpoints and resumes.

Sections, in the order a run goes through them:

  1. setup        config checks, distributed start-up, mesh, task (model + loss), data, optimizer —
                  everything a user can get wrong fails here, before any compilation
  2. state        abstract train state -> shardings from the logical axis names -> init or restore
  3. steps        train_step / eval_step / stats_step, jitted with explicit in/out shardings
  4. evaluation   validation metrics and per-layer attention statistics
  5. throughput   FLOP estimate and MFU
  6. loop         steps, logging, NaN guard, evaluation, checkpoints, preemption

Everything traced runs under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`: linen's logical
sharding constraints look the rules up from that context while tracing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from attn import attention_stats, pretrained
from attn.models.fields import freeze, per_layer_mechanisms, per_layer_options

from . import config_checks, distributed, optim, tasks, techniques
from . import mesh as mesh_lib
from .checkpointing import CheckpointDamaged, Checkpointer, CheckpointSaveError, jsonable
from .config_checks import ConfigError
from .data import make_source
from .metrics import MetricWriter, ProgressReporter
from .preemption import PreemptionGuard
from .state import TrainState, graft_params
from .workdir_lock import WorkdirLocked, lock_workdir


class TrainingDiverged(RuntimeError):
    """The loss became nan or inf; the message names the step and the last good checkpoint."""


# What `run` raises for a problem the user fixes outside the code; each message is one line.
RUN_ERRORS = (ConfigError, TrainingDiverged, CheckpointSaveError, CheckpointDamaged, WorkdirLocked)


@dataclasses.dataclass
class RunResult:
    """What `run` returns.

    Attributes:
      step: the train state's step when the run ended.
      start_step: the step it started from (0, or the restored checkpoint's step).
      preempted: True when SIGTERM stopped the run (after saving).
      checkpoint: path of the newest checkpoint written (None if none).
      train_metrics: the last logged train scalars.
      eval_metrics: the last evaluation's scalars ({} if none ran).
    """

    step: int
    start_step: int
    preempted: bool
    checkpoint: str | None
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]

    @property
    def stopped_before_first_step(self) -> bool:
        """SIGTERM arrived during setup or compilation: no step ran and nothing was saved."""
        return self.preempted and self.step == self.start_step


# ======================================================================================================
# 1. Setup
# ======================================================================================================


@dataclasses.dataclass
class Setup:
    """Everything built from the config before compilation."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    rules: tuple
    task: tasks.Task
    train_source: Any
    valid_source: Any
    probe_batch: dict[str, np.ndarray] | None
    tx: optax.GradientTransformation
    schedule: Any
    plan: techniques.TechniquePlan | None = None  # the active config.techniques; None = the baseline train step

    @property
    def is_primary(self) -> bool:
        return jax.process_index() == 0


def setup(config: Mapping[str, Any], workdir: str) -> Setup:
    """Checks the config and builds mesh, task, data sources and optimizer. Raises ConfigError."""
    config = _as_config_dict(config)
    config_checks.check_config(config)
    distributed.initialize(config.distributed)
    try:
        mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.axes)
        # Rules naming mesh axes this mesh lacks are reduced to the axes it has (one rule set, any mesh).
        rules = mesh_lib.rules_for_mesh(mesh_lib.logical_rules(config.mesh.rules), mesh)
    except ValueError as error:
        raise ConfigError(f"mesh: {error}") from None
    config_checks.check_batch_against_mesh(config.batch_size, mesh)
    try:
        task = tasks.build_task(config.model, config.precision.compute_dtype)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model: {error}") from None
    plan = techniques.make_plan(config.get("techniques"), config.model)  # checked by check_config
    task = techniques.with_techniques(task, plan)
    train_source, valid_source, probe_batch = _make_data(config)
    _check_data_matches_model(config, task, train_source)
    config_checks.check_model_builds(config, task, train_source.element_spec)
    try:
        tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
    except ValueError as error:
        raise ConfigError(f"optimizer: {error}") from None
    tx = _restrict_to_trainable(config, task, train_source.element_spec, tx)
    return Setup(
        config=config,
        workdir=os.path.abspath(workdir),
        mesh=mesh,
        rules=rules,
        task=task,
        train_source=train_source,
        valid_source=valid_source,
        probe_batch=probe_batch,
        tx=tx,
        schedule=schedule,
        plan=plan,
    )


def _restrict_to_trainable(
    config: ml_collections.ConfigDict, task: tasks.Task, element_spec: Mapping[str, Any], tx: Any
) -> optax.GradientTransformation:
    """`tx` limited to the parameters config.trainable / config.frozen leave trainable (optim.freeze_parameters);
    ConfigError for a pattern that matches no parameter path; logs the frozen count once."""
    trainable, frozen = tuple(config.get("trainable") or ()), tuple(config.get("frozen") or ())
    if not trainable and not frozen:
        return tx
    batch = {key: jax.ShapeDtypeStruct((1, *shape[1:]), dtype) for key, (shape, dtype) in element_spec.items()}
    params = jax.eval_shape(lambda rng: task.init(rng, batch), jax.random.key(0))["params"]
    try:
        arrays, scalars = optim.check_freeze_patterns(params, trainable, frozen)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    total = tasks.count_params(params)
    _printer(jax.process_index() == 0)(
        f"frozen: {arrays} parameter arrays, {scalars} of {total} parameters get no update "
        f"(trainable={list(trainable)}, frozen={list(frozen)})"
    )
    return optim.freeze_parameters(tx, trainable, frozen)


def _as_config_dict(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    if isinstance(config, ml_collections.ConfigDict):
        return ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
    return ml_collections.ConfigDict(dict(config))


def _make_data(config: ml_collections.ConfigDict) -> tuple[Any, Any, dict[str, np.ndarray] | None]:
    """Train and valid sources for this process, and the probe batch for attention statistics.

    The probe batch is the same on every process (it is built as if there were one process) because it
    is fed replicated.
    """
    options = {key: value for key, value in config.data.to_dict().items() if key != "name"}
    options = {key: value for key, value in options.items() if value is not None}
    common = dict(seq_len=config.seq_len, seed=config.seed, **options)
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    try:
        train = make_source(  # grain builds the next 2 batches in a background thread while a step runs
            config.data.name, split="train", batch_size=config.batch_size, prefetch=2, **common, **where
        )
        valid = make_source(config.data.name, split="valid", batch_size=config.batch_size, **common, **where)
        probe = None
        if config.eval.stats_batch_size:
            probe_source = make_source(
                config.data.name, split="valid", batch_size=config.eval.stats_batch_size, **common
            )
            probe = probe_source.batch_at(0)
    except FileNotFoundError as error:
        raise ConfigError(f"data: {error}") from None
    except ValueError as error:
        raise ConfigError(f"data: {str(error).splitlines()[0]}") from None
    return train, valid, probe


def _check_data_matches_model(config: ml_collections.ConfigDict, task: tasks.Task, source: Any) -> None:
    vocab = getattr(source, "vocab_size", None)
    model_vocab = getattr(task.model, "vocab_size", None)
    if vocab is not None and model_vocab is not None and model_vocab < vocab:
        raise ConfigError(
            f"model.vocab_size={model_vocab} is smaller than the vocabulary of data.name="
            f"{config.data.name!r} ({vocab} tokens); set --config.model.vocab_size={vocab}"
        )
    classes = getattr(source, "num_classes", None)
    model_classes = getattr(task.model, "num_classes", None)
    if classes is not None and model_classes is not None and model_classes != classes:
        raise ConfigError(f"model.num_classes={model_classes} does not match the data source's num_classes={classes}")


# ======================================================================================================
# 2. State: abstract shapes, shardings, init or restore
# ======================================================================================================


@dataclasses.dataclass
class StateLayout:
    """Abstract train state and how it and the batches are sharded on the mesh."""

    abstract_state: TrainState  # ShapeDtypeStruct leaves with .sharding set
    state_shardings: TrainState
    batch_shapes: dict[str, jax.ShapeDtypeStruct]  # global batch, with .sharding
    replicated: NamedSharding


def global_batch_shapes(source: Any, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Global batch shapes (per-process rows x processes) with the batch sharding."""
    sharding = mesh_lib.batch_sharding(mesh)
    return {
        key: jax.ShapeDtypeStruct((shape[0] * jax.process_count(), *shape[1:]), dtype, sharding=sharding)
        for key, (shape, dtype) in source.element_spec.items()
    }


def layout_state(s: Setup) -> StateLayout:
    """Shapes and shardings of the train state, from `jax.eval_shape` of init (no FLOPs, no memory).

    Parameter shardings come from the boxed logical axis names through the config's rules. Optimizer-state
    leaves that mirror a parameter (Adam moments, accumulated gradients) get that parameter's sharding —
    matched by tree path and shape; the rest (counters) are replicated.
    """
    replicated = NamedSharding(s.mesh, PartitionSpec())
    batch_shapes = global_batch_shapes(s.train_source, s.mesh)
    with tracing_context(s):
        boxed = jax.eval_shape(lambda rng: s.task.init(rng, batch_shapes), jax.random.key(0))
    param_shardings = mesh_lib.shardings_for(boxed["params"], s.mesh, s.rules)
    # Outside the rules context: unboxing there would apply sharding constraints to abstract values.
    abstract_params = nn.unbox(boxed["params"])
    abstract_opt = jax.eval_shape(s.tx.init, abstract_params)
    opt_shardings = _mirror_param_shardings(abstract_opt, abstract_params, param_shardings, replicated)
    state_shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt)
    abstract = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract,
        state_shardings,
    )
    return StateLayout(abstract, state_shardings, batch_shapes, replicated)


def _mirror_param_shardings(opt_state: Any, params: Any, param_shardings: Any, default: NamedSharding) -> Any:
    by_path = {
        path: (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree_util.tree_leaves(param_shardings),
            strict=True,
        )
    }

    def pick(path: tuple, leaf: Any) -> NamedSharding:
        for start in range(len(path)):
            match = by_path.get(tuple(path[start:]))
            if match is not None and tuple(match[0]) == tuple(leaf.shape):
                return match[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def init_state(s: Setup, layout: StateLayout, rng: jax.Array) -> TrainState:
    """Fresh parameters and optimizer state, created directly in their shardings."""

    def init(rng: jax.Array) -> TrainState:
        variables = s.task.init(rng, layout.batch_shapes)
        return TrainState.create(nn.unbox(variables["params"]), s.tx)

    with tracing_context(s):
        return jax.jit(init, out_shardings=layout.state_shardings)(rng)


# Model fields a fine-tuning run may set differently from its Hugging Face checkpoint: dtypes come from the config's
# precision, dropout is a training choice, and the attention of a layer may be swapped (its options are compared
# for the layers that keep the checkpoint's mechanism).
_FREE_MODEL_FIELDS = frozenset(
    {"parent", "name", "dtype", "param_dtype", "dropout_rate", "attention", "attention_options"}
)


def hf_model_differences(model: nn.Module, hf_model: nn.Module, *, attention: bool = False) -> list[str]:
    """Fields of `model` (the config's) that differ from `hf_model` (the checkpoint's), as "field=ours (checkpoint:
    theirs)"; the attention options only of layers whose mechanism is the checkpoint's, unless `attention` (then
    any difference in attention or its options counts)."""
    if type(model) is not type(hf_model):
        return [f"model kind {type(model).__name__} (checkpoint: {type(hf_model).__name__})"]
    out = []
    for field in dataclasses.fields(hf_model):
        if field.name in _FREE_MODEL_FIELDS:
            continue
        ours, theirs = getattr(model, field.name), getattr(hf_model, field.name)
        if freeze(ours) != freeze(theirs):
            out.append(f"{field.name}={ours!r} (checkpoint: {theirs!r})")
    layers = model.num_layers
    names, hf_names = per_layer_mechanisms(model.attention, layers), per_layer_mechanisms(hf_model.attention, layers)
    options = per_layer_options(model.attention_options, layers)
    hf_options = per_layer_options(hf_model.attention_options, layers)
    for i in range(layers):
        if attention and names[i] != hf_names[i]:
            out.append(f"attention[{i}]={names[i]!r} (checkpoint: {hf_names[i]!r})")
        if names[i] == hf_names[i] and freeze(options[i]) != freeze(hf_options[i]):
            out.append(f"attention_options[{i}]={options[i]!r} (checkpoint: {hf_options[i]!r})")
    return out


def init_source_kind(init_from: str, *, save_hf: bool = False) -> str:
    """ "hf" (a Hugging Face model directory: it holds config.json) or "workdir" (it holds checkpoints/); ConfigError
    naming `init_from` otherwise, or when `save_hf` is asked of a workdir."""
    path = os.path.expanduser(init_from)
    if os.path.isfile(os.path.join(path, pretrained.checkpoint.CONFIG_FILE)):
        return "hf"
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise ConfigError(
            f"init_from={init_from!r} is neither a Hugging Face model directory (with config.json) nor a workdir "
            "(with checkpoints/)"
        )
    if save_hf:
        raise ConfigError(f"save_hf=True needs a Hugging Face init_from; init_from={init_from!r} is a workdir")
    return "workdir"


def start_from_checkpoint(s: Setup, layout: StateLayout, state: TrainState) -> TrainState:
    """The fresh `state` with the parameters of config.init_from (a Hugging Face directory or a workdir's latest
    checkpoint) and a fresh optimizer state. Parameters the checkpoint lacks keep their init and are listed once.
    A Hugging Face checkpoint loads straight into the state's parameter shardings (no full host copy per device).

    Raises ConfigError: a model config that differs from the Hugging Face checkpoint's (naming the fields), or a
    parameter whose shape differs (naming its path and both shapes).
    """
    log, source = _printer(s.is_primary), os.path.expanduser(s.config.init_from)
    if init_source_kind(s.config.init_from, save_hf=bool(s.config.get("save_hf"))) == "hf":
        # Each parameter straight into the train state's sharding: every device reads only its block of the file.
        hf_model, loaded, _, _ = pretrained.load(source, shardings=layout.state_shardings.params)
        differences = hf_model_differences(s.task.model, hf_model, attention=bool(s.config.get("save_hf")))
        if differences:
            why = "; save_hf=True needs the checkpoint's architecture" if s.config.get("save_hf") else ""
            raise ConfigError(
                f"init_from={s.config.init_from!r}: config.model differs from the checkpoint's model: "
                f"{'; '.join(differences)}{why}"
            )
    else:
        from . import run as run_api  # the run API imports this module

        loaded = jax.device_get(run_api.load_run(source).params)
        loaded = {key: value for key, value in loaded.items() if key != techniques.TECHNIQUE_PARAMS}
    try:
        params, missing, unused = graft_params(state.params, loaded)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if missing:
        log(f"init_from: {len(missing)} parameters are not in the checkpoint and keep their init: {', '.join(missing)}")
    if unused:
        log(f"init_from: {len(unused)} checkpoint parameters have no place in this model: {', '.join(unused)}")
    params = jax.device_put(params, layout.state_shardings.params)
    with tracing_context(s):
        state = jax.jit(lambda p: TrainState.create(p, s.tx), out_shardings=layout.state_shardings)(params)
    log(f"init_from: started from the parameters of {s.config.init_from}")
    return state


def save_hf_directory(s: Setup, params: Any) -> str:
    """Writes `params` (the train state's) as a Hugging Face directory <workdir>/hf with the config.json and
    tokenizer of config.init_from; returns its path (process 0 writes)."""
    source, target = os.path.expanduser(s.config.init_from), os.path.join(s.workdir, "hf")
    params = techniques.effective_params(s.task, params)
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if s.is_primary:
        tokenizer = (
            pretrained.load_tokenizer(source) if os.path.isfile(os.path.join(source, "tokenizer.json")) else None
        )
        pretrained.save(
            target, s.task.model, jax.device_get(params), pretrained.read_config(source), tokenizer=tokenizer
        )
    return target


@contextlib.contextmanager
def tracing_context(s: Setup) -> Iterator[None]:
    """`jax.set_mesh(mesh)` + `nn.logical_axis_rules(rules)`: what tracing the model needs."""
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        yield


# ======================================================================================================
# 3. Step functions
# ======================================================================================================


@dataclasses.dataclass
class Steps:
    """The step functions: train compiled ahead of time, eval/stats jitted (compiled at first use)."""

    train_step: Any  # (state, batch, rng) -> (state, metrics)
    eval_step: Any  # (params, batch) -> loss sums; any batch shape (length extrapolation)
    stats_step: Any  # (params, replicated probe batch) -> attention statistics
    compile_seconds: float  # of the train step


def make_train_step(s: Setup, layout: StateLayout) -> tuple[Any, float]:
    """The train step, jitted with the state/batch shardings, state donated, compiled ahead of time.

    train_step(state, batch, rng) -> (state, metrics): dropout keys are fold_in(rng, state.step), so a
    resumed run draws the same keys; metrics are float32 scalars (loss, accuracy, [perplexity],
    grad_norm, param_norm, learning_rate, and "technique/<name>/<scalar>" of config.techniques).
    With techniques (train/techniques), the step calls their hooks: batch transform before the forward,
    parameter transforms inside it, auxiliary losses after it, state variables written after the update.
    """
    task, tx, schedule, plan = s.task, s.tx, s.schedule, s.plan
    # Weight of the sown "losses" collection; 1.0 (the default) leaves the step as it was, bit for bit.
    sown_weight = float(s.config.get("loss_weights", {}).get("losses", 1.0))
    mutable = ["losses", *(plan.collections if plan is not None else ())]

    def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
        dropout_rng = jax.random.fold_in(rng, state.step)
        if plan is not None:  # technique hook: before the forward (its own key, not the dropout key)
            batch = plan.transform_batch(batch, jax.random.fold_in(dropout_rng, 1), state.step, state.params)

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, ...]]:
            logits, collections = task.apply(
                {"params": params}, batch, deterministic=False, rng=dropout_rng, mutable=mutable
            )
            sums = task.loss_sums(logits, batch)
            # Auxiliary losses the mechanisms sow (load balance, attention distillation) join the objective;
            # each mechanism owns its coefficient, config.loss_weights.losses scales them all.
            aux = sum((jnp.sum(x) for x in jax.tree.leaves(collections.get("losses", {}))), jnp.float32(0.0))
            if sown_weight != 1.0:
                aux = sown_weight * aux
            loss = sums["loss_sum"] / jnp.maximum(sums["weight"], 1e-9) + aux
            if plan is None:
                return loss, (sums, aux, {}, {})
            # Technique hook: after the forward (weighted auxiliary losses, their scalars, state updates).
            forward = None
            if plan.uses_forward:  # techniques that run the model again (adversarial perturbations)

                def forward(p: Any, b: Any) -> Any:
                    return task.apply({"params": p}, b, deterministic=False, rng=dropout_rng)

            extra, technique_metrics = plan.loss(
                params, logits, collections, batch, forward=forward, rng=jax.random.fold_in(dropout_rng, 2)
            )
            return loss + extra, (sums, aux, technique_metrics, collections.get(techniques.TECHNIQUE_PARAMS, {}))

        (_, (sums, aux, technique_metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads, tx)
        metrics = task.metrics(sums)
        if plan is not None:  # technique hook: state variables (e.g. power-iteration vectors) after the update
            new_state = new_state.replace(params=plan.write_state(new_state.params, updates))
            metrics.update(technique_metrics)
            metrics.update(plan.variable_metrics(new_state.params))
        metrics["aux_loss"] = aux
        metrics["grad_norm"] = optim.global_norm(grads)
        metrics["param_norm"] = optim.param_norm(new_state.params)
        metrics["learning_rate"] = schedule(state.step)
        return new_state, metrics

    started = time.perf_counter()
    with tracing_context(s):
        rng_shape = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=layout.replicated)
        jitted = jax.jit(
            train_step,
            in_shardings=(layout.state_shardings, mesh_lib.batch_sharding(s.mesh), layout.replicated),
            out_shardings=(layout.state_shardings, layout.replicated),
            donate_argnums=(0,),
        )
        compiled = jitted.lower(layout.abstract_state, layout.batch_shapes, rng_shape).compile()
    return compiled, time.perf_counter() - started


def make_eval_step(s: Setup, layout: StateLayout) -> Any:
    """eval_step(params, batch) -> {"loss_sum", "correct", "weight"} (deterministic forward)."""

    def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return s.task.loss_sums(s.task.apply({"params": params}, batch), batch)

    return jax.jit(
        eval_step,
        in_shardings=(layout.state_shardings.params, mesh_lib.batch_sharding(s.mesh)),
        out_shardings=layout.replicated,
    )


def make_stats_step(s: Setup, layout: StateLayout) -> Any:
    """stats_step(params, probe) -> per-layer attention statistics, from the sown attention weights.

    A separate function so the train step never materialises [B, H, T, T] probabilities for capture.
    """

    def stats_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        _, collections = s.task.apply({"params": params}, batch, mutable=["intermediates"])
        return attention_stats.attention_stats(collections.get("intermediates", {}))

    return jax.jit(
        stats_step,
        in_shardings=(layout.state_shardings.params, layout.replicated),
        out_shardings=layout.replicated,
    )


def make_steps(s: Setup, layout: StateLayout) -> Steps:
    """All three step functions (the train step compiled now)."""
    train_step, seconds = make_train_step(s, layout)
    return Steps(train_step, make_eval_step(s, layout), make_stats_step(s, layout), seconds)


# ======================================================================================================
# 4. Evaluation
# ======================================================================================================


def evaluate_loss(s: Setup, eval_step: Any, params: Any, source: Any, num_batches: int) -> dict[str, float]:
    """Task metrics ("loss", "accuracy", ["perplexity"]) over the first `num_batches` batches of `source`.

    The source is reset first, so every evaluation sees the same batches; a finite source stops early.
    Sums are accumulated over tokens/examples, so padding rows (weight 0) do not bias the mean.
    """
    source.reset()
    if source.num_batches is not None:
        num_batches = min(num_batches, source.num_batches)
    totals = None
    with tracing_context(s):
        for _ in range(num_batches):
            sums = eval_step(params, mesh_lib.shard_batch(source.next_batch(), s.mesh))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return {key: float(value) for key, value in jax.device_get(s.task.metrics(totals)).items()}


def evaluate(s: Setup, steps: Steps, params: Any) -> dict[str, float]:
    """Validation metrics ("eval/loss", "eval/accuracy", ["eval/perplexity"]) and, on the probe batch,
    "attention/entropy/layer_<i>" and "attention/first_key_mass/layer_<i>"."""
    metrics = evaluate_loss(s, steps.eval_step, params, s.valid_source, s.config.eval.num_batches)
    out = {f"eval/{key}": value for key, value in metrics.items()}
    if s.probe_batch is not None:
        replicated = NamedSharding(s.mesh, PartitionSpec())
        # Built from the same host data on every process, so this is valid multi-process too.
        probe = {
            key: jax.make_array_from_callback(value.shape, replicated, lambda index, v=value: v[index])
            for key, value in s.probe_batch.items()
        }
        with tracing_context(s):
            stats = steps.stats_step(params, probe)
        out.update({key: float(value) for key, value in jax.device_get(stats).items()})
    return out


# ======================================================================================================
# 5. Throughput: FLOPs and MFU
# ======================================================================================================

# Peak dense bf16 FLOP/s per device (vendor datasheets), matched by substring of `device.device_kind`.
# MFU is always reported against this bf16 peak, also for float32 runs (which then look worse, as they are).
PEAK_FLOPS_BY_DEVICE_KIND: tuple[tuple[str, float], ...] = (  # first match wins: specific names first
    ("v6", 918e12),  # TPU v6e (Trillium), device_kind "TPU v6 lite"
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v5", 459e12),  # TPU v5p, device_kind "TPU v5"
    ("v4", 275e12),
    ("v3", 123e12),
    ("h200", 989e12),  # H100/H200 SXM, dense (no sparsity)
    ("h100", 989e12),
    ("a100", 312e12),
    ("l40s", 362e12),
)
# CPU has no meaningful datasheet peak: a nominal 100 GFLOP/s per device keeps MFU a comparable number
# between CPU runs, not an absolute utilisation.
NOMINAL_CPU_PEAK_FLOPS = 100e9


def peak_flops_per_device(device: Any) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for `device`."""
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, peak in PEAK_FLOPS_BY_DEVICE_KIND:
        if key in kind:
            return peak, f"{kind}: datasheet bf16 peak {peak:.3g} FLOP/s"
    if device.platform == "cpu":
        return NOMINAL_CPU_PEAK_FLOPS, f"cpu: NOMINAL peak {NOMINAL_CPU_PEAK_FLOPS:.3g} FLOP/s (not measured)"
    return 0.0, f"{kind}: unknown peak; MFU not reported"


def train_flops_per_token(num_params: int, num_layers: int, num_heads: int, head_dim: int, length: int) -> float:
    """Training FLOPs per token: 6 N (matmuls, forward + backward) + 12 L H Dh T (attention scores and
    weighted values, forward + backward), as in the PaLM paper's appendix B. N counts every parameter
    (a tied embedding is also the output projection); causal masking is not discounted, and non-softmax
    mechanisms are counted as if they were softmax attention."""
    return 6.0 * num_params + 12.0 * num_layers * num_heads * head_dim * length


# ======================================================================================================
# 6. The loop
# ======================================================================================================


# ======================================================================================================
# Cadence evaluators (config.evals)
# ======================================================================================================

# config.evals: a list of {tool, every, options, batch_size (8), num_batches (1)}. Every `every` steps and at the
# last step, evaluator(task, params, batches, options) -> (result, scalars) runs on the first `num_batches`
# batches of `batch_size` rows of the validation split (the same rows every time); the result is appended to
# <workdir>/evals.jsonl as {"step", "tool", "result"} and the scalars go to TensorBoard as evals/<tool>/<name>.
# train never imports eval (tests/core/test_layering.py), so the evaluators are passed in by the caller:
# `run(config, workdir, evaluators={tool: callable})`; eval.analysis.cadence_evaluators() builds them for the
# analysis tools and eval.analysis.train_with_evals(config, workdir) trains with them.
CadenceEvaluator = Callable[[Any, Any, list, Mapping[str, Any]], tuple[Mapping[str, Any], Mapping[str, float]]]


def cadence_entries(
    config: ml_collections.ConfigDict, evaluators: Mapping[str, CadenceEvaluator], divisor: int
) -> list[dict]:
    """config.evals as plain dicts; ConfigError for a tool without an evaluator in `evaluators` or a batch_size that
    is not a multiple of `divisor` (the batch-sharded mesh axes x processes)."""
    entries = [config_checks.as_dict(entry) for entry in config.get("evals") or []]
    for i, entry in enumerate(entries):
        if entry.get("batch_size", 8) % divisor:
            raise ConfigError(
                f"evals[{i}].batch_size={entry.get('batch_size', 8)} must be a multiple of {divisor} (the mesh)"
            )
        if entry["tool"] not in evaluators:
            given = ", ".join(sorted(evaluators)) or "none"
            raise ConfigError(
                f"evals[{i}].tool={entry['tool']!r} has no evaluator in this run (given: {given}); `python -m "
                "train` cannot import eval: run `python -m eval.train` (the same flags) or "
                "eval.analysis.train_with_evals(config, workdir)"
            )
    return entries


def run_cadence_evals(
    s: Setup, evaluators: Mapping[str, CadenceEvaluator], entries: list[dict], step: int, params: Any, writer: Any
) -> None:
    """Runs the config.evals entries due at `step` (see the section comment); the last step runs them all."""
    last = step == s.config.total_steps
    options = {key: value for key, value in s.config.data.to_dict().items() if key != "name" and value is not None}
    for entry in entries:
        if not (last or step % entry["every"] == 0):
            continue
        source = make_source(
            s.config.data.name,
            split="valid",
            batch_size=entry.get("batch_size", 8),
            seq_len=s.config.seq_len,
            seed=s.config.seed,
            **options,
        )
        batches = [source.next_batch() for _ in range(entry.get("num_batches", 1))]
        with tracing_context(s):
            result, scalars = evaluators[entry["tool"]](s.task, params, batches, dict(entry.get("options") or {}))
        writer.scalars(step, {f"evals/{entry['tool']}/{name}": value for name, value in scalars.items()})
        if s.is_primary:
            with open(os.path.join(s.workdir, "evals.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "tool": entry["tool"], "result": result}) + "\n")


def run(
    config: Mapping[str, Any],
    workdir: str,
    *,
    stop_at_step: int | None = None,
    guard: PreemptionGuard | None = None,
    evaluators: Mapping[str, CadenceEvaluator] | None = None,
) -> RunResult:
    """Trains `config` in `workdir`, resuming from the newest checkpoint there that verifies.

    `stop_at_step` ends the run early after that step, with a checkpoint, as a preemption would (the
    schedule still follows `total_steps`); rerunning continues from there. `guard` is an entered
    `PreemptionGuard` (`python -m train` installs one before JAX loads); without one, `run` installs its own
    before setup, so a SIGTERM during setup or compilation returns `RunResult(preempted=True)` at step
    `start_step`, having saved nothing. `evaluators` ({tool: callable}) run the config.evals entries at their
    cadence (see "Cadence evaluators"); every tool config.evals names must be among them.

    The workdir is locked for the run (`WorkdirLocked` if another run holds it). On resume the config saved
    with the checkpoint is compared to `config`: differences in the model, the data or the optimization are
    refused unless `config.allow_changes` names them.

    Raises:
      ConfigError: a config problem, a checkpoint in `workdir` from a different model config, or a config
        that differs from the checkpoint's — before any compilation, with a one-line message.
      WorkdirLocked: another run uses `workdir`.
      CheckpointDamaged: every checkpoint in `workdir` is damaged.
      CheckpointSaveError: a checkpoint could not be written (reported at the step after the failure).
      TrainingDiverged: the loss, gradient norm or parameter norm became nan/inf (nothing is saved after
        the last good checkpoint).
    """
    with contextlib.ExitStack() as stack:
        if guard is None:
            guard = stack.enter_context(PreemptionGuard())
        s = setup(config, workdir)
        divisor = mesh_lib.batch_size_divisor(s.mesh) * jax.process_count()
        cadence = (dict(evaluators or {}), cadence_entries(s.config, evaluators or {}, divisor))
        if guard.should_stop:
            return _stopped_before_first_step(0, None)
        lock = lock_workdir(s.workdir, process_index=jax.process_index(), process_count=jax.process_count())
        if lock is not None:
            stack.callback(lock.release)
        layout = layout_state(s)
        checkpointer = Checkpointer(
            os.path.join(s.workdir, "checkpoints"),
            keep=s.config.keep_checkpoints,
            save_every=s.config.checkpoint_every,
        )
        stack.callback(checkpointer.close)
        state, rng, start_step = restore_or_init(s, layout, checkpointer)
        end_step = s.config.total_steps if stop_at_step is None else min(stop_at_step, s.config.total_steps)
        if start_step >= end_step:
            _printer(s.is_primary)(f"nothing to do: the checkpoint is at step {start_step} (end: {end_step})")
            return RunResult(start_step, start_step, False, _checkpoint_path(checkpointer, start_step), {}, {})
        if guard.should_stop:
            return _stopped_before_first_step(start_step, checkpointer)
        steps = make_steps(s, layout)
        if guard.should_stop:
            return _stopped_before_first_step(start_step, checkpointer)
        # Events logged after the restored step (or, starting from scratch, any at all) by an earlier run in
        # this workdir are dropped, so each step is logged once.
        writer = MetricWriter(s.workdir, is_primary=s.is_primary, purge_step=start_step + 1 if start_step else 0)
        stack.push(_quiet_on_error(writer.close))
        result = _train_loop(s, layout, steps, checkpointer, writer, guard, state, rng, start_step, end_step, cadence)
        if s.config.get("save_hf") and result.step == s.config.total_steps:
            restored, _, _, _ = checkpointer.restore(result.step, abstract_state=layout.abstract_state)
            _printer(s.is_primary)(
                f"wrote the trained model as a Hugging Face directory: {save_hf_directory(s, restored.params)}"
            )
        return result


def _quiet_on_error(close: Any) -> Any:
    """An ExitStack exit callback that runs `close`, but lets its error mask no error already on its way out
    (a full disk fails the checkpoint first and then the metric writer's last flush: the first is reported)."""

    def exit_(exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            close()
        except OSError:
            if exc is None:
                raise
        return False

    return exit_


def _stopped_before_first_step(start_step: int, checkpointer: Checkpointer | None) -> RunResult:
    latest = checkpointer.latest_step() if checkpointer is not None else None
    checkpoint = None if latest is None else _checkpoint_path(checkpointer, latest)
    return RunResult(start_step, start_step, True, checkpoint, {}, {})


def restore_or_init(s: Setup, layout: StateLayout, checkpointer: Checkpointer) -> tuple[TrainState, jax.Array, int]:
    """(state, rng, step): the newest checkpoint that verifies, restored onto the current mesh, or a fresh
    init at step 0.

    Damaged checkpoints newer than it are named and moved to `checkpoints-damaged/`. The checkpoint's saved
    config must match this one except where `config.allow_changes` says (ConfigError listing the
    differences). Restoring also moves the train data iterator to where the checkpoint left it.
    """
    # Made by a jitted function so the keys are global arrays, valid with several processes too.
    split = jax.jit(lambda: tuple(jax.random.split(jax.random.key(s.config.seed))), out_shardings=layout.replicated)
    init_rng, rng = split()
    if checkpointer.latest_step() is None:
        state = init_state(s, layout, init_rng)
        if s.config.get("init_from"):
            state = start_from_checkpoint(s, layout, state)
        return state, rng, 0
    log = _printer(s.is_primary)
    current = jsonable(s.config.to_dict())
    notes: list[str] = []

    def check_drift(meta: dict[str, Any]) -> None:
        step = int(meta["step"])
        where = _checkpoint_path(checkpointer, step)
        notes[:] = config_checks.resume_drift(meta.get("config") or {}, current, step=step, where=where)

    try:
        state, data_state, rng, meta = checkpointer.restore(
            abstract_state=layout.abstract_state, check_meta=check_drift
        )
    except ConfigError:
        raise
    except ValueError as error:  # a checkpoint of another model config: the Checkpointer names the leaf
        raise ConfigError(f"{error}; use another --workdir for a different model") from None
    step = int(meta["step"])
    for damaged, reason in checkpointer.skipped:
        where = _checkpoint_path(checkpointer, damaged)
        moved = checkpointer.set_aside(damaged)
        log(f"checkpoint {where} is damaged ({reason}); moved it to {moved}")
    if checkpointer.skipped:
        log(f"resuming from {_checkpoint_path(checkpointer, step)}, the newest checkpoint that verifies")
    for note in notes:
        log(note)
    if isinstance(data_state, dict) and data_state.get("seed", s.config.seed) != s.config.seed:
        data_state = {**data_state, "seed": s.config.seed}  # reached only when allow_changes names seed
    try:
        s.train_source.set_state(data_state)
    except ValueError as error:
        raise ConfigError(
            f"data: the data-iterator state saved at step {step} does not fit this data source: "
            f"{str(error).splitlines()[0]}"
        ) from None
    log(f"restored checkpoint {_checkpoint_path(checkpointer, step)}")
    return state, rng, step


def _train_loop(
    s: Setup,
    layout: StateLayout,
    steps: Steps,
    checkpointer: Checkpointer,
    writer: MetricWriter,
    guard: PreemptionGuard,
    state: TrainState,
    rng: jax.Array,
    start_step: int,
    end_step: int,
    cadence: tuple[Mapping[str, CadenceEvaluator], list[dict]] = ({}, []),
) -> RunResult:
    """Steps from `start_step` to `end_step`; logs, evaluates, checkpoints, stops on SIGTERM or nan; runs the
    config.evals evaluators (`cadence`: evaluators, entries) at their steps.

    Every step polls the asynchronous checkpoint save, so a failed write stops the run at the next step.
    Every step's train metrics land in exactly one logged row: when the run stops between two log steps
    (SIGTERM, `stop_at_step`), the partial window is logged at the stop step.
    """
    config, log = s.config, _printer(s.is_primary)
    num_params = tasks.count_params(state.params)
    length = s.task.tokens_per_example({k: (v.shape, v.dtype) for k, v in layout.batch_shapes.items()})
    tokens_per_step = config.batch_size * length
    flops_per_step = tokens_per_step * train_flops_per_token(num_params, *tasks.attention_layout(s.task), length)
    peak, peak_note = peak_flops_per_device(jax.devices()[0])
    log(
        f"{config.model.kind} model, {num_params / 1e6:.2f}M parameters, "
        f"attention={config.model.attention!r}, mesh {dict(s.mesh.shape)}; "
        f"train step compiled in {steps.compile_seconds:.1f}s; MFU uses {peak_note}"
    )
    if start_step == 0:
        writer.text(0, "config", "```\n" + str(config) + "\n```")
    progress = ProgressReporter(config.total_steps, tokens_per_step, start_step=start_step)

    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # metrics still on the device
    window: list[dict[str, float]] = []  # fetched metrics since the last log
    window_seconds = 0.0  # time spent in train steps since the last log (not eval / checkpoint time)
    step, preempted = start_step, False
    segment_start = time.perf_counter()
    while step < end_step:
        batch = mesh_lib.shard_batch(s.train_source.next_batch(), s.mesh)
        state, metrics = steps.train_step(state, batch, rng)
        step += 1
        pending.append((step, metrics))
        checkpointer.poll()  # a failed background save stops the run now, not at the next save
        last = step == config.total_steps
        log_now = step % config.log_every == 0 or last
        eval_now = last or (config.eval_every > 0 and step % config.eval_every == 0)
        save_now = last or step % config.checkpoint_every == 0
        cadence_now = bool(cadence[1]) and (last or any(step % entry["every"] == 0 for entry in cadence[1]))
        preempted = guard.should_stop  # a collective with several processes: every process asks
        stop_now = preempted or step == end_step
        if not (log_now or eval_now or save_now or stop_now or cadence_now):
            continue

        # Fetching waits for the device; every pending loss is checked before anything is saved.
        fetched = _fetch(pending)
        pending.clear()
        window_seconds += time.perf_counter() - segment_start
        _check_finite(fetched, checkpointer)
        window.extend(values for _, values in fetched)
        if log_now or (stop_now and window):  # a stop between log steps still logs its steps
            train_metrics = _window_metrics(window, window_seconds, tokens_per_step, flops_per_step, peak)
            writer.scalars(step, train_metrics)
            log(progress.update(step, train_metrics["train/loss"]))
            window, window_seconds = [], 0.0
        if eval_now:
            eval_metrics = evaluate(s, steps, state.params)
            writer.scalars(step, eval_metrics)
            log(f"eval at step {step}: " + _format(eval_metrics, "eval/"))
        if cadence_now:
            run_cadence_evals(s, *cadence, step, state.params, writer)
        if save_now or stop_now:
            data_state = s.train_source.get_state()
            checkpointer.save(step, state=state, data_state=data_state, rng=rng, config=config.to_dict(), force=True)
        writer.flush()
        if stop_now and not last:
            checkpointer.wait()
            why = "preempted (SIGTERM)" if preempted else f"stopped at stop_at_step={end_step}"
            log(f"{why} at step {step}: saved checkpoint {_checkpoint_path(checkpointer, step)}")
            break
        segment_start = time.perf_counter()
    checkpointer.wait()
    latest = checkpointer.latest_step()
    return RunResult(
        step=step,
        start_step=start_step,
        preempted=preempted,
        checkpoint=None if latest is None else _checkpoint_path(checkpointer, latest),
        train_metrics=train_metrics,
        eval_metrics=eval_metrics,
    )


def _fetch(pending: list[tuple[int, dict[str, jax.Array]]]) -> list[tuple[int, dict[str, float]]]:
    host = jax.device_get([metrics for _, metrics in pending])
    return [
        (step, {key: float(value) for key, value in metrics.items()})
        for (step, _), metrics in zip(pending, host, strict=True)
    ]


def _check_finite(fetched: list[tuple[int, dict[str, float]]], checkpointer: Checkpointer) -> None:
    """TrainingDiverged at the first step whose loss, gradient norm or updated parameter norm is nan/inf.

    The parameter norm is of the state the step produced, so a state that passes is safe to save.
    """
    for step, metrics in fetched:
        watched = {name: metrics[name] for name in ("loss", "grad_norm", "param_norm")}
        if all(math.isfinite(value) for value in watched.values()):
            continue
        checkpointer.wait()  # an in-flight save of an earlier (checked) step still counts as good
        good = checkpointer.last_good_step(before=step)  # finite loss, parameters and optimizer state
        where = (
            f"last good checkpoint: {_checkpoint_path(checkpointer, good)} (step {good})"
            if good is not None
            else "no checkpoint was written before it"
        )
        values = ", ".join(f"{name}={value:.4g}" for name, value in watched.items())
        raise TrainingDiverged(f"training diverged at step {step} ({values}); stopped without saving; {where}")


def _window_metrics(
    window: list[dict[str, float]], seconds: float, tokens_per_step: int, flops_per_step: float, peak: float
) -> dict[str, float]:
    """Means of the train metrics over the logging window, plus speed and MFU (against all devices)."""
    out = {f"train/{key}": float(np.mean([m[key] for m in window])) for key in window[0]}
    if "train/perplexity" in out:  # exp of the mean loss, not the mean of per-step exps
        out["train/perplexity"] = math.exp(out["train/loss"])
    step_seconds = seconds / len(window)
    out["perf/step_time_s"] = step_seconds
    out["perf/tokens_per_s"] = tokens_per_step / step_seconds
    if peak > 0:
        out["perf/mfu"] = flops_per_step / step_seconds / (peak * jax.device_count())
    return out


def _format(metrics: Mapping[str, float], prefix: str) -> str:
    return ", ".join(f"{k.removeprefix(prefix)} {v:.4g}" for k, v in metrics.items() if k.startswith(prefix))


def _checkpoint_path(checkpointer: Checkpointer, step: int) -> str:
    return checkpointer.step_path(step)


def _printer(is_primary: bool):
    def log(message: str) -> None:
        if is_primary:
            print(message, flush=True)

    return log
