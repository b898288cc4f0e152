"""Every shipped config loads, passes the trainer's checks, documents itself and builds its model."""

import ast
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

import attn
from train import config_checks, tasks

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
NAMES = ("lm_tiny", "lm_125m", "mqar", "vit_tiny", "encoder_tiny", "seq2seq_tiny", "vlm_tiny", "cnn_tiny")
CASES = [(name, preset) for name in NAMES for preset in importlib.import_module(f"configs.{name}").PRESETS]


def _load(name, preset):
    return importlib.import_module(f"configs.{name}").get_config(preset)


def _abstract_batch(config):
    """ShapeDtypeStructs of one batch for `config` without touching the data pipeline."""
    b, t = config.batch_size, config.seq_len
    kind = config.model.kind
    if kind in ("vit", "cnn", "vlm"):
        size = config.data.image_size
        images = {"images": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)}
        return images if kind != "vlm" else {**images, "inputs": jax.ShapeDtypeStruct((b, 10), jnp.int32)}
    if kind == "encoder_decoder":
        return {
            "sources": jax.ShapeDtypeStruct((b, t), jnp.int32),
            "inputs": jax.ShapeDtypeStruct((b, t + 1), jnp.int32),
        }
    return {"inputs": jax.ShapeDtypeStruct((b, t), jnp.int32)}


def _param_count(task, config):
    variables = jax.eval_shape(lambda rng: task.init(rng, _abstract_batch(config)), jax.random.key(0))
    return tasks.count_params(variables["params"])


@pytest.mark.parametrize("name,preset", CASES)
def test_config_loads_passes_checks_and_builds(name, preset):
    config = _load(name, preset)
    config_checks.check_config(config)
    task = tasks.build_task(config.model, config.precision.compute_dtype)
    assert _param_count(task, config) > 0


def test_lm_125m_is_gpt2_small_sized():
    config = _load("lm_125m", "")
    assert (config.model.num_layers, config.model.d_model, config.model.num_heads) == (12, 768, 12)
    assert config.seq_len == 1024 and config.precision.compute_dtype == "bfloat16"
    count = _param_count(tasks.build_task(config.model, "bfloat16"), config)
    assert 80e6 < count < 130e6, count


@pytest.mark.parametrize("name", NAMES)
def test_docstring_gives_command_hardware_and_expectation(name):
    doc = importlib.import_module(f"configs.{name}").__doc__
    assert f"python -m train --config configs/{name}.py --workdir" in doc
    assert "Hardware:" in doc and "Expected" in doc


def _assignments_without_comment(path):
    """Lines of `path` that assign a config field (`x.y = ...` at function level) without a comment."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    missing = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            line = lines[node.end_lineno - 1]
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if "#" not in line and not above.startswith("#"):
                missing.append(line.strip())
    return missing


def test_every_shared_field_has_a_comment():
    assert _assignments_without_comment(os.path.join(CONFIG_DIR, "common.py")) == []


def test_shared_fields_match_the_trainer_schema():
    from configs import common

    config = common.base_config()
    for section, fields in config_checks.RUN_FIELDS.items():
        node = config if not section else config[section]
        assert set(node.keys()) == set(fields), section


@pytest.mark.parametrize(
    "mechanism",
    [n for n in attn.list_mechanisms() if attn.get(n).input_kind == "sequence" and attn.get(n).supports_causal],
)
def test_any_causal_mechanism_can_be_chosen_by_name(mechanism):
    config = _load("lm_tiny", "smoke")
    config.model.attention = mechanism
    config.model.num_heads = 4  # some mechanisms give each head a different pattern (s2_attention)
    config_checks.check_config(config)
    assert _param_count(tasks.build_task(config.model), config) > 0


@pytest.mark.parametrize("mechanism", [n for n in attn.list_mechanisms() if attn.get(n).input_kind == "spatial"])
def test_any_spatial_mechanism_can_be_chosen_by_name_for_vit(mechanism):
    config = _load("vit_tiny", "")  # the 8x8 patch grid fits every mechanism's default window
    config.model.attention = mechanism
    config_checks.check_config(config)
    assert _param_count(tasks.build_task(config.model), config) > 0
