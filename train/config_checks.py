"""Validation of a training config before anything is built or compiled.

Every problem a user can fix in the config stops the run here with a one-line `ConfigError` that names the
field, its value and what was expected: an unknown field (with the closest valid name), a bad value, an
unknown attention mechanism or option, a missing data path. Checks that need the mesh (batch divisibility)
run in `check_batch_against_mesh` once the mesh exists, still before compilation.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax

import attn

from . import tasks


class ConfigError(ValueError):
    """A config problem the user must fix; its message is one line."""


# The run-level fields the trainer reads, per section (configs/common.py gives them defaults and comments).
# `model` fields depend on model.kind (tasks.model_fields); `data` fields are the source's options.
RUN_FIELDS: dict[str, frozenset[str]] = {
    "": frozenset(
        {
            "seed",
            "total_steps",
            "batch_size",
            "seq_len",
            "log_every",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "model",
            "data",
            "optimizer",
            "precision",
            "mesh",
            "eval",
            "distributed",
            "allow_changes",
            "techniques",
            "loss_weights",
            "evals",
            "init_from",
            "trainable",
            "frozen",
            "save_hf",
        }
    ),
    "loss_weights": frozenset({"losses"}),
    "optimizer": frozenset(
        {
            "learning_rate",
            "warmup_steps",
            "schedule",
            "min_lr_ratio",
            "weight_decay",
            "b1",
            "b2",
            "eps",
            "clip_norm",
            "grad_accum_steps",
        }
    ),
    "precision": frozenset({"compute_dtype"}),
    "mesh": frozenset({"shape", "axes", "rules"}),
    "eval": frozenset({"num_batches", "stats_batch_size"}),
    "distributed": frozenset({"initialize", "coordinator_address", "num_processes", "process_id"}),
}

COMPUTE_DTYPES = ("float32", "bfloat16")
# Run-level fields a config may leave out (configs written before they existed still load).
OPTIONAL_RUN_FIELDS = frozenset(
    {"allow_changes", "techniques", "loss_weights", "evals", "init_from", "trainable", "frozen", "save_hf"}
)
# Their values when absent: a checkpoint saved before a field existed resumes under a config holding its default.
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "techniques": [],
    "loss_weights.losses": 1.0,
    "evals": [],
    "init_from": "",
    "trainable": [],
    "frozen": [],
    "save_hf": False,
}


def check_config(config: Mapping[str, Any]) -> None:
    """Raises ConfigError for the first problem in `config` (a ConfigDict or nested dict); else None."""
    config = as_dict(config)
    check_known_fields(config)
    _check_run_values(config)
    _check_model(config["model"])
    _check_data(config["data"])
    _check_techniques(config)
    check_evals(config.get("evals") or [])
    _check_init_and_freeze(config)


def as_dict(config: Any) -> dict[str, Any]:
    """A nested plain-dict copy of a ConfigDict (ConfigDicts are not `Mapping`s), or `config` itself."""
    return config.to_dict() if hasattr(config, "to_dict") else config


# --- unknown fields -----------------------------------------------------------------------------------


def valid_fields(config: Mapping[str, Any], section: str) -> frozenset[str]:
    """The field names allowed in `section` ("" = top level, "model", "optimizer", ...) of `config`."""
    if section == "model":
        return tasks.model_fields(config["model"].get("kind", "decoder"))
    if section == "data":
        return frozenset(config["data"])  # options are checked by the data source itself
    if section == "model.attention_options":
        return frozenset(config["model"]["attention_options"])  # checked against the mechanism's options
    return RUN_FIELDS[section]


def check_known_fields(config: Mapping[str, Any]) -> None:
    """ConfigError naming the first field that the trainer does not know, and the closest valid name."""
    config = as_dict(config)
    for section, keys in _sections(config):
        valid = valid_fields(config, section)
        for key in keys:
            if key not in valid:
                raise ConfigError(unknown_field_message(_join(section, key), valid))
    missing = RUN_FIELDS[""] - set(config) - OPTIONAL_RUN_FIELDS
    if missing:
        raise ConfigError(f"config is missing field(s) {sorted(missing)}; start from configs/common.py")


def unknown_field_message(dotted: str, valid: Iterable[str]) -> str:
    """'unknown config field 'a.b'; did you mean 'a.c'? (valid: ...)' — one line."""
    section, _, key = dotted.rpartition(".")
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {_join(section, close[0])!r}?" if close else ""
    return f"unknown config field {dotted!r}{hint} (valid fields here: {', '.join(valid)})"


def unknown_override_message(config: Mapping[str, Any], dotted: str, *, flag: str = "--config.") -> str | None:
    """For a `--config.<dotted>=...` override: a message if `dotted` names no field of `config`, else None.

    config_flags itself refuses such overrides with a traceback; `train/__main__.py` uses this to say
    which field is wrong and what the closest valid one is (and `eval.sweep` for its `--set <dotted>=...`,
    with `flag="--set "`: the message starts with the flag as the user typed it).
    """
    node: Any = as_dict(config)
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            section = ".".join(parts[:depth])
            if section == "model.attention_options":
                return (
                    f"{flag}{dotted}: {part!r} is not set in this config; pass mechanism options as one "
                    f"dict, e.g. --config.model.attention_options=\"{{'{part}': ...}}\""
                )
            valid = list(node) if isinstance(node, Mapping) else []
            return f"{flag}{dotted}: " + unknown_field_message(".".join(parts[: depth + 1]), valid)
        node = node[part]
    return None


def _sections(config: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    sections = [("", list(config))]
    for name in RUN_FIELDS:
        if name and isinstance(config.get(name), Mapping):
            sections.append((name, list(config[name])))
    if isinstance(config.get("model"), Mapping):
        sections.append(("model", list(config["model"])))
    return sections


def _join(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


# --- values -------------------------------------------------------------------------------------------


def _check_run_values(config: Mapping[str, Any]) -> None:
    for name, minimum in (
        ("total_steps", 1),
        ("batch_size", 1),
        ("seq_len", 1),
        ("log_every", 1),
        ("eval_every", 0),
        ("checkpoint_every", 1),
        ("keep_checkpoints", 1),
        ("seed", 0),
    ):
        _check_int(name, config[name], minimum)
    _check_int("eval.num_batches", config["eval"]["num_batches"], 1)
    _check_int("eval.stats_batch_size", config["eval"]["stats_batch_size"], 0)
    _check_int("optimizer.grad_accum_steps", config["optimizer"]["grad_accum_steps"], 1)
    _check_int("optimizer.warmup_steps", config["optimizer"]["warmup_steps"], 0)
    learning_rate = config["optimizer"]["learning_rate"]
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float) or learning_rate < 0:
        raise ConfigError(f"optimizer.learning_rate={learning_rate!r} must be a number >= 0")
    dtype = config["precision"]["compute_dtype"]
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"precision.compute_dtype={dtype!r} must be one of {COMPUTE_DTYPES}")
    shape, axes = tuple(config["mesh"]["shape"]), tuple(config["mesh"]["axes"])
    if len(shape) != len(axes):
        raise ConfigError(f"mesh.shape={shape} and mesh.axes={axes} must have the same length")
    dist = config["distributed"]
    if dist["initialize"]:
        count, index = dist["num_processes"], dist["process_id"]
        if (count is None) != (index is None):
            raise ConfigError(
                "distributed.num_processes and distributed.process_id must be given together "
                f"(got {count!r} and {index!r}); leave both None to auto-detect"
            )
        if count is not None and not 0 <= index < count:
            raise ConfigError(f"distributed.process_id={index} must be in [0, num_processes={count})")


def _check_init_and_freeze(config: Mapping[str, Any]) -> None:
    """init_from: a path (str; what it holds is checked when it is used, so a saved run whose init_from is gone still
    loads); save_hf needs an init_from; trainable, frozen: sequences of regexes (whether they match parameters is
    checked once the model exists)."""
    source = config.get("init_from") or ""
    if not isinstance(source, str):
        raise ConfigError(f"init_from={source!r} must be a path (str): a Hugging Face directory or a workdir")
    if config.get("save_hf") and not source:
        raise ConfigError("save_hf=True needs init_from to name a Hugging Face model directory")
    for field in ("trainable", "frozen"):
        patterns = config.get(field) or ()
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise ConfigError(f"{field}={patterns!r} must be a list of regexes (str) over parameter paths")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")


# --- model: kind and attention mechanism ---------------------------------------------------------------


def _check_model(model: Mapping[str, Any]) -> None:
    kind = model["kind"]
    if kind not in tasks.MODEL_KINDS:
        raise ConfigError(f"model.kind={kind!r} must be one of {tasks.MODEL_KINDS}")
    names = [model["attention"]] if isinstance(model["attention"], str) else list(model["attention"])
    options = dict(model["attention_options"]) if isinstance(model["attention_options"], Mapping) else {}
    for name in names:
        if name is None and kind == "cnn":  # a cnn stage without attention
            continue
        try:
            spec = attn.get(name)
        except KeyError as error:  # the registry's message lists the closest names
            raise ConfigError(f"model.attention: {error.args[0]}") from None
        if spec.input_kind not in tasks.INPUT_KINDS[kind]:
            raise ConfigError(
                f"model.attention={name!r} takes {spec.input_kind!r} inputs; a {kind} model needs a "
                f"mechanism with input_kind in {tasks.INPUT_KINDS[kind]}"
            )
        if kind in ("decoder", "encoder_decoder", "vlm") and not spec.supports_causal:
            causal = [n for n in attn.list_mechanisms() if attn.get(n).supports_causal]
            raise ConfigError(
                f"model.attention={name!r} does not support causal masking, which a decoder needs; "
                f"causal mechanisms: {', '.join(causal)}"
            )
        for option in options:
            if option not in spec.options:
                valid = sorted(spec.options)
                close = difflib.get_close_matches(option, valid, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"model.attention_options: {option!r} is not an option of mechanism {name!r}{hint} "
                    f"(valid: {', '.join(valid)})"
                )


# --- training techniques (train/techniques) ---------------------------------------------------------------------


def _check_techniques(config: Mapping[str, Any]) -> None:
    """ConfigError for an unknown technique (with the closest names), an option it does not have or a value out of
    its range, a technique on a model kind it does not train, or one needing attention weights on a mechanism
    without them; and for a bad config.loss_weights.losses."""
    from . import techniques

    weight = (config.get("loss_weights") or {}).get("losses", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise ConfigError(f"loss_weights.losses={weight!r} must be a number >= 0 (1.0 = the mechanisms' own)")
    try:
        techniques.check_techniques(config)
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None


# --- cadence evaluators (config.evals) ------------------------------------------------------------------------

EVAL_ENTRY_FIELDS = frozenset({"tool", "every", "options", "batch_size", "num_batches"})


def check_evals(evals: Any) -> None:
    """ConfigError unless `evals` is a list of {tool: str, every: int > 0, options: dict (optional), batch_size,
    num_batches: int > 0 (optional)} (which tools exist is checked by the trainer against the evaluators it got)."""
    if not isinstance(evals, list | tuple):
        raise ConfigError(f"evals={evals!r} must be a list of {{tool, every, options}} dicts")
    for i, entry in enumerate(evals):
        entry = as_dict(entry)
        if not isinstance(entry, Mapping) or not isinstance(entry.get("tool"), str):
            raise ConfigError(f"evals[{i}]={entry!r} must be a dict with 'tool' (a name) and 'every' (steps)")
        unknown = sorted(set(entry) - EVAL_ENTRY_FIELDS)
        if unknown:
            raise ConfigError(f"evals[{i}] has unknown fields {unknown}; valid: {', '.join(sorted(EVAL_ENTRY_FIELDS))}")
        for name in ("every", "batch_size", "num_batches"):
            value = entry.get(name, 1 if name != "every" else None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"evals[{i}].{name}={value!r} must be a positive int")
        if not isinstance(entry.get("options") or {}, Mapping):
            raise ConfigError(f"evals[{i}].options={entry['options']!r} must be a dict of the tool's options")


# --- data ------------------------------------------------------------------------------------------------


def _check_data(data: Mapping[str, Any]) -> None:
    path = data.get("path")
    if path is not None and not os.path.exists(os.path.expanduser(str(path))):
        raise ConfigError(f"data.path={str(path)!r} does not exist (set --config.data.path to a file or folder)")


# --- the model built at config-check time ------------------------------------------------------------------


def check_model_builds(config: Mapping[str, Any], task: tasks.Task, element_spec: Mapping[str, Any]) -> None:
    """ConfigError (one line) if the configured model cannot be built: heads that do not split into kv heads, or
    a value inside `model.attention_options` (or any model field) that a mechanism rejects when it runs.

    Every mechanism's option checks run on its first call, so this traces `task.init` on a one-example batch with
    the data source's shapes (`element_spec`: key -> (shape [rows, ...], dtype)) under `jax.eval_shape`: no FLOPs,
    no compilation, no parameters allocated.
    """
    model = as_dict(config)["model"]
    heads, kv_heads = model.get("num_heads"), model.get("num_kv_heads")
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0 and heads % kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={kv_heads} must divide model.num_heads={heads} "
            "(MHA: equal, GQA: a divisor, MQA: 1; None = num_heads)"
        )
    batch = {key: jax.ShapeDtypeStruct((1, *shape[1:]), dtype) for key, (shape, dtype) in element_spec.items()}
    try:
        jax.eval_shape(lambda rng: task.init(rng, batch), jax.random.key(0))
    except (ValueError, TypeError, KeyError) as error:
        detail = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        detail = next((line.strip() for line in str(detail).splitlines() if line.strip()), type(error).__name__)
        options = model.get("attention_options") or {}
        raise ConfigError(
            f"model.attention={model.get('attention')!r} with attention_options={dict(options)!r} "
            f"cannot be built: {detail}"
        ) from None


def check_batch_against_mesh(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """ConfigError if the global batch does not split evenly over the mesh's batch axes and processes."""
    from . import mesh as mesh_lib

    try:
        mesh_lib.check_batch_size(batch_size, mesh)
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    if batch_size % jax.process_count():
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by the number of processes ({jax.process_count()})"
        )


# --- resuming: the config saved with the checkpoint against the current one ---------------------------------

# Fields that may change between the runs sharing a workdir: they change neither the model, nor the data
# stream, nor the optimization (a field named here covers everything under it). Any other difference is
# refused unless --config.allow_changes names it.
RESUME_FREE_FIELDS = frozenset(
    {
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "eval",
        "evals",
        "mesh",
        "distributed",
        "allow_changes",
    }
)


def allowed_changes(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The dotted field names of `config.allow_changes` ("total_steps,model.attention" or a sequence)."""
    value = as_dict(config).get("allow_changes") or ()
    names = value.split(",") if isinstance(value, str) else list(value)
    return tuple(name.strip() for name in names if str(name).strip())


def resume_drift(saved: Mapping[str, Any], current: Mapping[str, Any], *, step: int, where: str) -> list[str]:
    """Compares the config saved with a checkpoint to the current one before resuming from it.

    Args:
      saved: the checkpoint's config, as plain JSON (nested dicts, lists for tuples).
      current: this run's config, as plain JSON; its `allow_changes` names differences to accept.
      step: the checkpoint's step (where the learning rate is compared).
      where: the checkpoint's path, for the message.

    Returns:
      One line per accepted difference worth saying: the accepted fields, and how the learning-rate
      schedule changes at the checkpoint's step when `total_steps` or an optimizer field changed.

    Raises:
      ConfigError: a difference outside `RESUME_FREE_FIELDS` that `allow_changes` does not name (all of
        them listed, one line), or an `allow_changes` name that is no config field.
    """
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    for key, default in OPTIONAL_DEFAULTS.items():
        if key not in flat_saved and flat_current.get(key, _ABSENT) == default:
            flat_saved[key] = default
    allow = allowed_changes(current)
    for name in allow:
        fields = (*_flatten(saved, keep_empty=True), *_flatten(current, keep_empty=True))
        if not any(_covers(name, key) for key in fields):
            raise ConfigError(
                f"allow_changes names {name!r}, which is no config field (give dotted names, e.g. "
                f"--config.allow_changes=total_steps,optimizer.learning_rate)"
            )
    changed = [
        key
        for key in sorted(set(flat_saved) | set(flat_current))
        if flat_saved.get(key, _ABSENT) != flat_current.get(key, _ABSENT)
        and not any(_covers(free, key) for free in RESUME_FREE_FIELDS)
    ]
    refused = [key for key in changed if not any(_covers(name, key) for name in allow)]
    if refused:
        listing = ", ".join(_describe_change(key, flat_saved, flat_current) for key in refused)
        raise ConfigError(
            f"the checkpoint {where} was written with a different config: {listing}; resume with the saved "
            f"values, use another --workdir, or accept the changes with "
            f"--config.allow_changes={','.join(refused)}"
        )
    notes = []
    if changed:
        listing = ", ".join(_describe_change(key, flat_saved, flat_current) for key in changed)
        notes.append(f"resuming with config changes accepted by allow_changes: {listing}")
    schedule = _schedule_note(saved, current, changed, step)
    if schedule:
        notes.append(schedule)
    return notes


_ABSENT = "(absent)"


def _flatten(tree: Mapping[str, Any], prefix: str = "", *, keep_empty: bool = False) -> dict[str, Any]:
    """{"model.attention": ..., "model.attention_options.window": ...}; empty sections only if `keep_empty`."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = _join(prefix, str(key))
        if isinstance(value, Mapping) and (value or not keep_empty):
            out.update(_flatten(value, dotted, keep_empty=keep_empty))
        else:
            out[dotted] = value
    return out


def _covers(name: str, key: str) -> bool:
    return key == name or key.startswith(name + ".")


def _describe_change(key: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    before, after = saved.get(key, _ABSENT), current.get(key, _ABSENT)
    show = lambda value: value if value is _ABSENT else repr(value)  # noqa: E731
    return f"{key} {show(before)} -> {show(after)}"


def _schedule_note(saved: Mapping[str, Any], current: Mapping[str, Any], changed: list[str], step: int) -> str | None:
    """One line on the learning rate when an accepted change (total_steps, optimizer.*) moves its schedule."""
    if not any(_covers("total_steps", key) or _covers("optimizer", key) for key in changed):
        return None
    from . import optim

    try:
        _, before = optim.make_optimizer(saved["optimizer"], saved["total_steps"])
        _, after = optim.make_optimizer(current["optimizer"], current["total_steps"])
    except (KeyError, TypeError, ValueError):  # the current one is checked by setup; the saved one may be old
        return None
    was, now = float(before(step)), float(after(step))
    return (
        f"learning-rate schedule changed: {saved['optimizer'].get('schedule')} decay to step "
        f"{saved['total_steps']} -> {current['optimizer'].get('schedule')} decay to step {current['total_steps']}; "
        f"at step {step} the learning rate is {now:.4g} (was {was:.4g})"
    )
