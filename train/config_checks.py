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
from train import tasks


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
        }
    ),
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


def check_config(config: Mapping[str, Any]) -> None:
    """Raises ConfigError for the first problem in `config` (a ConfigDict or nested dict); else None."""
    config = as_dict(config)
    check_known_fields(config)
    _check_run_values(config)
    _check_model(config["model"])
    _check_data(config["data"])


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
    missing = RUN_FIELDS[""] - set(config)
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


# --- data ------------------------------------------------------------------------------------------------


def _check_data(data: Mapping[str, Any]) -> None:
    path = data.get("path")
    if path is not None and not os.path.exists(os.path.expanduser(str(path))):
        raise ConfigError(f"data.path={str(path)!r} does not exist (set --config.data.path to a file or folder)")


def check_batch_against_mesh(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """ConfigError if the global batch does not split evenly over the mesh's batch axes and processes."""
    from train import mesh as mesh_lib

    try:
        mesh_lib.check_batch_size(batch_size, mesh)
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    if batch_size % jax.process_count():
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by the number of processes ({jax.process_count()})"
        )
