"""Every shipped config loads, passes the trainer's checks, documents itself and builds its model."""

import ast
import importlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import attn
from attn.models.fields import with_layer_fields
from train import config_checks, tasks
from train.data import make_source

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


def _param_shapes(task, config):
    """The model's parameter tree of `config` as ShapeDtypeStructs (nothing is computed)."""
    variables = jax.eval_shape(lambda rng: task.init(rng, _abstract_batch(config)), jax.random.key(0))
    return nn.unbox(variables["params"])


def _param_count(task, config):
    return tasks.count_params(_param_shapes(task, config))


def _shapes(tree):
    return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def _attention_sublayers(params):
    """{path: subtree} of every sublayer named "attention" in a parameter tree."""
    found = {}

    def walk(tree, path):
        for key, value in tree.items():
            if key == "attention":
                found[path + key] = value
            elif isinstance(value, dict):
                walk(value, path + key + "/")

    walk(params, "")
    return found


def _standalone_attention_shapes(model, x_shape, layer_index, mask=None):
    """Parameter shapes of `model.attention` built alone with the model's heads, head width and options (per-layer
    fields filled for layer `layer_index`), on an input of x_shape."""
    head_dim = model.head_dim or model.d_model // model.num_heads
    layer = attn.build(
        model.attention,
        num_heads=model.num_heads,
        head_dim=head_dim,
        num_kv_heads=model.num_kv_heads,
        **with_layer_fields(
            model.attention, model.attention_options, layer_index=layer_index, num_layers=model.num_layers
        ),
    )
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    variables = jax.eval_shape(lambda key, x: layer.init(key, x, mask=mask), jax.random.key(0), x)
    return _shapes(nn.unbox(variables["params"]))


def _decoder_param_count(model):
    """Parameter count of a `decoder` model from its config fields alone: tied or untied token embedding, learned
    positions, per layer q/k/v/out (no biases), two norms (RMSNorm: scale; LayerNorm: scale and bias) and the MLP
    (SwiGLU: three matrices; GELU: two; no biases), and the final norm."""
    e, heads = model.d_model, model.num_heads
    head_dim = model.head_dim or e // heads
    kv_heads = model.num_kv_heads or heads
    norm = e if model.norm == "rmsnorm" else 2 * e
    mlp = (3 if model.mlp == "swiglu" else 2) * e * model.mlp_dim
    layer = 2 * e * heads * head_dim + 2 * e * kv_heads * head_dim + 2 * norm + mlp
    embedding = model.vocab_size * e * (1 if model.tie_embeddings else 2)
    positions = model.max_len * e if model.position_embedding == "learned" else 0
    return embedding + positions + model.num_layers * layer + norm


ALL_NAMES = tuple(
    sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f not in ("__init__.py", "common.py"))
)
ALL_CASES = [(name, preset) for name in ALL_NAMES for preset in importlib.import_module(f"configs.{name}").PRESETS]


@pytest.mark.parametrize("name,preset", ALL_CASES)
def test_every_config_model_takes_its_own_data(name, preset):
    """Every preset of every config file: the trainer's checks pass, and the model initialises, runs and gives a
    loss on batches shaped exactly as its data source's element_spec says (nothing is computed: eval_shape)."""
    config = _load(name, preset)
    config_checks.check_config(config)
    options = {key: value for key, value in config.data.to_dict().items() if key != "name" and value is not None}
    source = make_source(
        config.data.name, split="valid", batch_size=config.batch_size, seq_len=config.seq_len, seed=0, **options
    )
    batch = {key: jax.ShapeDtypeStruct(shape, dtype) for key, (shape, dtype) in source.element_spec.items()}
    task = tasks.build_task(config.model, config.precision.compute_dtype)
    variables = jax.eval_shape(lambda rng: task.init(rng, batch), jax.random.key(0))
    assert tasks.count_params(nn.unbox(variables["params"])) > 0
    sums = jax.eval_shape(lambda v, b: task.loss_sums(task.apply(v, b), b), variables, batch)
    assert sums["loss_sum"].shape == () and sums["weight"].shape == (), sums


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_config_documents_itself(name):
    """The docstring gives the exact command, the hardware and the result to expect (or the one measured)."""
    module = importlib.import_module(f"configs.{name}")
    doc = module.__doc__ or ""
    assert f"python -m train --config configs/{name}.py" in doc and "Hardware:" in doc, name
    assert "Expected" in doc or "Measured" in doc, name
    assert "" in module.PRESETS, f"{name}: the default preset '' is missing"


@pytest.mark.parametrize("name,preset", CASES)
def test_config_loads_passes_checks_and_builds(name, preset):
    config = _load(name, preset)
    config_checks.check_config(config)
    task = tasks.build_task(config.model, config.precision.compute_dtype)
    params = _param_shapes(task, config)
    sublayers = _attention_sublayers(params)
    stacks = 2 if config.model.kind in ("encoder_decoder", "vlm") else 1  # encoder (or vision) stack + decoder
    if config.model.kind == "cnn":  # one attention module per residual block
        assert len(sublayers) == config.model.blocks_per_stage * len(config.model.widths)
    else:
        assert len(sublayers) == stacks * config.model.num_layers, sorted(sublayers)
    if config.model.kind == "decoder":
        assert tasks.count_params(params) == _decoder_param_count(config.model)


def test_lm_125m_is_gpt2_small_sized():
    config = _load("lm_125m", "")
    assert (config.model.num_layers, config.model.d_model, config.model.num_heads) == (12, 768, 12)
    assert config.seq_len == 1024 and config.precision.compute_dtype == "bfloat16"
    count = _param_count(tasks.build_task(config.model, "bfloat16"), config)
    assert 80e6 < count < 130e6, count


@pytest.mark.parametrize(
    "mlp, norm, tie_embeddings, position_embedding, num_kv_heads",
    [("gelu", "layernorm", False, "learned", 1), ("swiglu", "rmsnorm", True, "none", None)],
)
def test_decoder_parameter_count_follows_its_fields(mlp, norm, tie_embeddings, position_embedding, num_kv_heads):
    config = _load("lm_tiny", "smoke")
    model = config.model
    model.mlp, model.norm, model.tie_embeddings = mlp, norm, tie_embeddings
    model.position_embedding, model.num_kv_heads = position_embedding, num_kv_heads
    assert _param_count(tasks.build_task(model), config) == _decoder_param_count(model)


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


SMOKE_OPTIONS = {"kivi": {"group_size": 4, "residual": 8}}


@pytest.mark.parametrize(
    "mechanism",
    [n for n in attn.list_mechanisms() if attn.get(n).input_kind == "sequence" and attn.get(n).supports_causal],
)
def test_any_causal_mechanism_can_be_chosen_by_name(mechanism):
    config = _load("lm_tiny", "smoke")
    config.model.attention = mechanism
    config.model.num_heads = 4  # some mechanisms give each head a different pattern (s2_attention)
    # kivi's default quantization groups (32 channels) are wider than the smoke model's 8-wide heads
    config.model.attention_options = SMOKE_OPTIONS.get(mechanism, {})
    config_checks.check_config(config)
    sublayers = _attention_sublayers(_param_shapes(tasks.build_task(config.model), config))
    assert sorted(sublayers) == [f"layers_{i}/attention" for i in range(config.model.num_layers)]
    for i in range(config.model.num_layers):
        x_shape = (1, config.seq_len, config.model.d_model)
        want = _standalone_attention_shapes(config.model, x_shape, i, mask=attn.Mask(causal=True))
        assert _shapes(sublayers[f"layers_{i}/attention"]) == want, (mechanism, i)


@pytest.mark.parametrize("mechanism", [n for n in attn.list_mechanisms() if attn.get(n).input_kind == "spatial"])
def test_any_spatial_mechanism_can_be_chosen_by_name_for_vit(mechanism):
    config = _load("vit_tiny", "")  # the 8x8 patch grid fits every mechanism's default window
    config.model.attention = mechanism
    config_checks.check_config(config)
    sublayers = _attention_sublayers(_param_shapes(tasks.build_task(config.model), config))
    grid = config.data.image_size // config.model.patch_size
    assert sorted(sublayers) == [f"layers_{i}/attention" for i in range(config.model.num_layers)]
    for i in range(config.model.num_layers):
        want = _standalone_attention_shapes(config.model, (1, grid, grid, config.model.d_model), i)
        assert _shapes(sublayers[f"layers_{i}/attention"]) == want, (mechanism, i)
