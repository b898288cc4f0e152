"""Loading a Hugging Face model directory into an `attn.models` model, and saving one back.

    model, params, tokenizer, hf_config = load("path/to/llama")          # params: the "params" collection
    logits = model.apply({"params": params}, tokens)
    save("out/llama", model, params, hf_config, tokenizer=tokenizer)    # config.json + safetensors (+ tokenizer.json)

A directory holds config.json, model.safetensors or model.safetensors.index.json with its shards, and optionally
tokenizer.json. `load` reads config.json through the architecture's explicit translation (attn.pretrained.gpt2,
.llama, .mistral, .qwen2), checks that the checkpoint holds exactly the tensors the model needs, with the shapes it
needs, and reads each parameter from its tensor. Given a mesh (or `shardings`, e.g. a train state's), each parameter
is created as a sharded array whose devices read only their own block of the tensor (safetensors slices), never a
full host copy per device.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.core.sharding import DEFAULT_RULES, shardings_for
from attn.pretrained.architecture import DTYPE_KEYS, Architecture
from attn.pretrained.bert import BERT
from attn.pretrained.gpt2 import GPT2
from attn.pretrained.layouts import TensorRule, join_parameters, read_block, tensor_shape
from attn.pretrained.llama import LLAMA
from attn.pretrained.mistral import MISTRAL
from attn.pretrained.qwen2 import QWEN2
from attn.pretrained.safetensors_files import SafetensorsFiles, write_safetensors
from attn.pretrained.vit import VIT, VIT_CLASSIFIER

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

# A config.json without `architectures` is looked up by model_type; the last of a model_type wins (vit: ViTModel).
ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch for arch in (GPT2, LLAMA, MISTRAL, QWEN2, BERT, VIT_CLASSIFIER, VIT)
}


def read_config(path: str | pathlib.Path) -> dict[str, Any]:
    """config.json of a model directory as a dict; FileNotFoundError naming the file when it is missing."""
    file = pathlib.Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: a Hugging Face model directory needs its {CONFIG_FILE}")
    config = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds {type(config).__name__}; expected a JSON object")
    return config


def architecture_of(config: Mapping[str, Any]) -> Architecture:
    """The supported architecture a config.json names (its single `architectures` entry, else its `model_type`)."""
    names = config.get("architectures") or []
    supported = sorted(ARCHITECTURES)
    if len(names) > 1:
        raise ValueError(f"config.json architectures={names!r} lists several classes; expected one of {supported}")
    if names:
        if names[0] not in ARCHITECTURES:
            raise ValueError(
                f"config.json architectures={names!r} is not supported by attn.pretrained; supported: {supported}"
            )
        return ARCHITECTURES[names[0]]
    by_type = {arch.model_type: arch for arch in ARCHITECTURES.values()}
    model_type = config.get("model_type")
    if model_type not in by_type:
        raise ValueError(
            f"config.json model_type={model_type!r} (no architectures entry) is not supported by attn.pretrained; "
            f"supported: {supported} (model types {sorted(by_type)})"
        )
    return by_type[model_type]


def load_tokenizer(path: str | pathlib.Path) -> Any:
    """The `tokenizers.Tokenizer` of a model directory's tokenizer.json (FileNotFoundError naming the file when it is
    missing; other tokenizer formats such as vocab.json + merges.txt or tokenizer.model are not read)."""
    from tokenizers import Tokenizer

    file = pathlib.Path(path) / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: attn.pretrained reads tokenizers from {TOKENIZER_FILE} only")
    return Tokenizer.from_file(str(file))


def abstract_params(model: nn.Module, example: Any = None) -> Any:
    """The boxed (logically partitioned) "params" tree of `model` as jax.ShapeDtypeStruct leaves, without computing,
    from initialising it on `example` (None: tokens int32 [1, 1])."""
    example = jnp.zeros((1, 1), jnp.int32) if example is None else example
    return jax.eval_shape(lambda: model.init(jax.random.key(0), example))["params"]


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]
    return {tuple(str(getattr(key, "key", key)) for key in path): leaf for path, leaf in leaves}


def _unboxed(leaf: Any) -> Any:
    return leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf


def _resolve_names(arch: Architecture, rules: list[TensorRule], files: SafetensorsFiles) -> list[TensorRule]:
    """Rules with the checkpoint's spelling of the names (without `optional_prefix` when the file omits it)."""
    present = set(files.names())
    prefix = arch.optional_prefix
    if prefix and not any(name.startswith(prefix) for name in present):
        return [
            dataclasses.replace(rule, name=rule.name[len(prefix) :]) if rule.name.startswith(prefix) else rule
            for rule in rules
        ]
    return rules


def _check_tensors(
    arch: Architecture, rules: list[TensorRule], shapes: dict[tuple[str, ...], tuple[int, ...]], files: SafetensorsFiles
) -> None:
    """ValueError naming a missing tensor (with the shape the config implies), a tensor whose shape differs (both
    shapes), or a tensor the model has no parameter for."""
    for rule in rules:
        expected = tensor_shape(rule, shapes[rule.path])
        if rule.name not in files.file_of:
            raise ValueError(
                f"checkpoint tensor {rule.name!r} with shape {expected} (from config.json) is missing from "
                f"{files.directory}"
            )
        found = files.shape(rule.name)
        if found != expected:
            raise ValueError(
                f"checkpoint tensor {rule.name!r} has shape {found} but config.json implies {expected} "
                f"(parameter {'/'.join(rule.path)} {shapes[rule.path]})"
            )
    used = {rule.name for rule in rules}
    for name in files.names():
        if name not in used and not arch.no_parameter(name) and name != "lm_head.weight":
            raise ValueError(
                f"checkpoint tensor {name!r} {files.shape(name)} has no parameter in the {arch.name} model that "
                "config.json describes"
                + (f" ({arch.unsupported_tensors[name]})" if name in arch.unsupported_tensors else "")
            )


def _check_tied_head(rules: list[TensorRule], files: SafetensorsFiles, tied: bool) -> None:
    """A tied model's checkpoint may still store lm_head.weight; it must then equal the token embedding."""
    if "lm_head.weight" not in files.file_of or any(rule.name == "lm_head.weight" for rule in rules):
        return
    if not tied:
        return
    embedding = next(rule.name for rule in rules if rule.path == ("embedding", "embedding"))
    if not np.array_equal(files.read("lm_head.weight"), files.read(embedding)):
        raise ValueError(
            f"config.json ties the output head to {embedding!r}, but the checkpoint's lm_head.weight differs from it"
        )


def load(
    path: str | pathlib.Path,
    *,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    axis_rules: Any = None,
    shardings: Any = None,
) -> tuple[nn.Module, dict[str, Any], Any, dict[str, Any]]:
    """Load a Hugging Face model directory.

    Args:
      path: directory with config.json, model.safetensors (or model.safetensors.index.json and shards) and,
        optionally, tokenizer.json.
      dtype: parameter and compute dtype of the model (e.g. jnp.bfloat16); None keeps the checkpoint's.
      mesh: a device mesh to load onto: every parameter becomes a jax.Array with a NamedSharding from its logical
        axes (`attn.core.sharding.shardings_for` with `axis_rules`, default `attn.core.sharding.DEFAULT_RULES`),
        and each device's block is read straight from the file. None gives arrays on the default device.
      axis_rules: logical-axis rules for `mesh` (anything `attn.core.sharding.logical_rules` accepts).
      shardings: the placement of parameters by their path, a tree of nested dicts like the params whose leaves are
        `jax.sharding.Sharding`s (e.g. a train state's parameter shardings, for fine-tuning): each parameter it
        holds is created with that sharding, each device (of every process) reading only its block; it takes
        precedence over `mesh`. Parameters it lacks, or whose shape its sharding cannot tile (a model that differs
        from the checkpoint's), are placed as without it.
    Returns:
      (model, params, tokenizer, hf_config): an `attn.models.DecoderLM` (an `attn.models.Encoder` for BertModel, an
        `attn.models.ViT` for ViTModel),
      its "params" collection (unboxed),
      a `tokenizers.Tokenizer` (None when the directory has no tokenizer.json) and config.json as a dict.
    Raises:
      ValueError for an unsupported architecture (listing the supported ones) or config setting (naming it), a
      missing, superfluous or mis-shaped tensor (naming it, with both shapes); FileNotFoundError for missing files.
    """
    path = pathlib.Path(path)
    hf_config = read_config(path)
    arch = architecture_of(hf_config)
    with SafetensorsFiles(path) as files:
        model = arch.fit_to_tensors(arch.build_model(hf_config, np.float32), files.file_of)
        tensor_rules = _resolve_names(arch, arch.tensor_rules(model, hf_config), files)
        if dtype is None:
            dtype = files.dtype(tensor_rules[0].name)
        model = arch.fit_to_tensors(arch.build_model(hf_config, jnp.dtype(dtype)), files.file_of)
        abstract = _flat(abstract_params(model, arch.example_input(hf_config)))
        shapes = {key: tuple(_unboxed(leaf).shape) for key, leaf in abstract.items()}
        covered = {rule.path for rule in tensor_rules}
        if covered != set(shapes):  # a defect of the architecture's rules, not of the checkpoint
            raise RuntimeError(
                f"{arch.name}: tensor rules miss the parameters {sorted(set(shapes) - covered)} and name absent ones "
                f"{sorted(covered - set(shapes))}"
            )
        _check_tensors(arch, tensor_rules, shapes, files)
        _check_tied_head(tensor_rules, files, getattr(model, "tie_embeddings", False))
        placements = {}
        if mesh is not None:
            placed = shardings_for(list(abstract.values()), mesh, axis_rules or DEFAULT_RULES)
            placements = dict(zip(abstract, placed, strict=True))
        if shardings is not None:
            given = _flat(shardings)
            placements.update({key: given[key] for key in shapes if key in given and _tiles(given[key], shapes[key])})
        flat = {}
        target = jnp.dtype(dtype)
        for rule in tensor_rules:
            shape = shapes[rule.path]

            def block(index: Any, rule: TensorRule = rule, shape: tuple[int, ...] = shape) -> np.ndarray:
                return read_block(files, rule, shape, index).astype(target, copy=False)

            if rule.path in placements:
                flat[rule.path] = jax.make_array_from_callback(shape, placements[rule.path], block)
            else:
                flat[rule.path] = jnp.asarray(block(None))
    tokenizer = load_tokenizer(path) if (path / TOKENIZER_FILE).is_file() else None
    return model, _nest(flat), tokenizer, hf_config


def _tiles(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> bool:
    """Whether `sharding` can place an array of `shape` (its rank fits and its tiling divides every axis)."""
    if not isinstance(sharding, jax.sharding.Sharding):
        raise ValueError(f"shardings holds {sharding!r}; expected jax.sharding.Sharding leaves")
    try:
        sharding.shard_shape(shape)
    except (ValueError, IndexError):
        return False
    return True


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _differences(model: nn.Module, expected: nn.Module) -> list[str]:
    out = []
    for field in dataclasses.fields(model):
        if field.name in ("parent", "name"):
            continue
        ours, theirs = getattr(model, field.name), getattr(expected, field.name)
        if ours != theirs:
            out.append(f"{field.name}={ours!r} (config.json gives {theirs!r})")
    return out


def save(
    path: str | pathlib.Path,
    model: nn.Module,
    params: Any,
    hf_config: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write `params` of `model` as a Hugging Face model directory: config.json (hf_config, its dtype entry set to the
    parameters' dtype), the safetensors file(s) (sharded with an index above `max_shard_bytes`) and, with
    `tokenizer`, tokenizer.json. Tensor names, layouts and dtypes are those of `load`, so loading a directory and
    saving it again reproduces every tensor byte for byte.

    `model` must be the model hf_config describes (ValueError naming each field that differs, e.g. an attention
    swapped for another mechanism, which the architecture cannot express). `params` is the "params" collection or
    a variables dict holding one, boxed or not, on any devices.
    """
    arch = architecture_of(hf_config)
    params = params["params"] if isinstance(params, Mapping) and "params" in params else params
    flat = {key: np.asarray(jax.device_get(_unboxed(leaf))) for key, leaf in _flat(params).items()}
    dtypes = {value.dtype for value in flat.values()}
    if len(dtypes) != 1:
        raise ValueError(f"params mix dtypes {sorted(map(str, dtypes))}; expected one parameter dtype to save")
    (dtype,) = dtypes
    tensor_rules = arch.tensor_rules(model, hf_config)
    # The variant (e.g. without a pooler) that the tensors `model` writes describe, as `load` would find it.
    written = dict.fromkeys((rule.name for rule in tensor_rules), pathlib.Path(path))
    differences = _differences(model, arch.fit_to_tensors(arch.build_model(hf_config, model.param_dtype), written))
    if differences:
        raise ValueError(f"model differs from the {arch.name} that hf_config describes: {'; '.join(differences)}")
    expected = {rule.path for rule in tensor_rules}
    if set(flat) != expected:
        extra, absent = sorted(set(flat) - expected), sorted(expected - set(flat))
        raise ValueError(
            f"params do not match the model: missing {['/'.join(p) for p in absent]}, "
            f"unexpected {['/'.join(p) for p in extra]}"
        )
    by_name: dict[str, list[TensorRule]] = {}
    for rule in tensor_rules:
        by_name.setdefault(rule.name, []).append(rule)
    tensors = {}
    for name, group in by_name.items():
        group = sorted(group, key=lambda rule: rule.part)
        tensors[name] = join_parameters(group, [flat[rule.path] for rule in group])
    path = pathlib.Path(path)
    write_safetensors(path, tensors, max_shard_bytes=max_shard_bytes)
    config = dict(hf_config)
    for key in DTYPE_KEYS:
        if key in config:
            config[key] = jnp.dtype(dtype).name
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(str(path / TOKENIZER_FILE))
