"""The small CNN: one SGD step lowers the loss with every channel-attention module, per-stage mechanisms and
options, the condition path, sown auxiliary losses, logical axes, and field errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attn
from attn.models.cnn import CNN

BATCH, SIZE, CLASSES = 4, 8, 3
IMAGES = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, SIZE, SIZE, 3)), jnp.float32)
LABELS = jnp.array([0, 2, 1, 2])
CONDITION = jnp.array([[0.5, 1.0], [2.0, 0.1], [1.0, 1.0], [0.3, 0.9]])
# Fits cape to the 8x8 and 4x4 stage maps (its defaults target 32x32 PDE grids and larger).
OPTIONS = {"cape": {"pool": 2, "modes": 1, "width": 8, "kernel_size": 3}}
# The train-step test runs dual_attention without its encoder-decoder guide, whose compile would double the
# test's time; the guided path has its own gradient test (tests/channel) and its loss test below.
TRAIN_OPTIONS = {**OPTIONS, "dual_attention": {"guidance": False}}


def small_cnn(**fields) -> CNN:
    return CNN(**{"num_classes": CLASSES, "widths": (16, 32), **fields})


def fan_in_params(model: CNN, **kwargs):
    """Parameters shaped like model.init without compiling it: kernels N(0, 1/fan_in) with fan_in = all but the
    last axis, norm scales 1, the rest 0 (e.g. dual_attention's gamma, so each PAM/CAM starts as the identity)."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), IMAGES, **kwargs))["params"]
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if leaf.ndim >= 2:
            return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(leaf.dtype)
        return np.full(leaf.shape, 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("attention", [None, *attn.list_mechanisms(family="channel")])
def test_sgd_step_lowers_the_loss(attention, sgd_losses):
    # Compiling the train step dominates the time, so modules get a one-stage CNN; the plain CNN keeps two
    # stages (downsampling block, shortcut projection). Parameters come from eval_shape: a jitted real init
    # compiles one RNG program per parameter.
    widths = (16, 32) if attention is None else (16,)
    model = small_cnn(widths=widths, attention=attention, attention_options=TRAIN_OPTIONS.get(attention, {}))
    kwargs = {"condition": CONDITION} if attention == "cape" else {}
    params = fan_in_params(model, **kwargs)

    def loss_fn(params):
        logits, state = model.apply({"params": params}, IMAGES, mutable=["losses"], **kwargs)
        assert logits.shape == (BATCH, CLASSES) and logits.dtype == jnp.float32
        auxiliary = sum(jnp.sum(v) for v in jax.tree.leaves(state.get("losses", {})))
        return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean() + 0.01 * auxiliary

    before, after = sgd_losses(loss_fn, params, lr=0.05)
    assert np.isfinite(before) and after < before


def test_per_stage_mechanisms_and_options(boxed_leaves):
    model = small_cnn(
        attention=("ela", None), attention_options=({"variant": "T", "norm_groups": 8}, {}), blocks_per_stage=(1, 2)
    )
    params = jax.eval_shape(model.init, jax.random.key(0), IMAGES)["params"]
    assert params["stage_0_block_0"]["attention"]["conv"]["kernel"].value.shape == (5, 1, 16)  # ELA-T: k = 5
    assert "attention" not in params["stage_1_block_0"] and "stage_1_block_1" in params
    assert "shortcut" in params["stage_1_block_0"] and "shortcut" not in params["stage_1_block_1"]
    for path, leaf in boxed_leaves(params):
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim, (path, leaf.names, leaf.value.shape)


def test_dual_attention_sows_one_reconstruction_loss_per_block():
    model = small_cnn(attention="dual_attention")
    variables = jax.eval_shape(model.init, jax.random.key(0), IMAGES)
    _, state = jax.eval_shape(lambda v: model.apply(v, IMAGES, mutable=["losses"]), variables)
    assert sorted(state["losses"]) == ["stage_0_block_0", "stage_1_block_0"]
    assert state["losses"]["stage_0_block_0"]["attention"]["reconstruction"][0].shape == ()


@pytest.mark.parametrize(
    ("fields", "kwargs", "message"),
    [
        ({"attention": "softmax"}, {}, "attention='softmax' has input kind 'sequence'"),
        ({"attention": "eca"}, {"condition": CONDITION}, "no attention mechanism of this CNN takes a condition"),
        ({"attention": "cape", "attention_options": OPTIONS["cape"]}, {}, "cape needs condition"),
        ({"attention": ("eca",)}, {}, "attention has 1 entries but there are 2 stages"),
        ({"norm_groups": 5}, {}, "norm_groups=5"),
        ({"widths": ()}, {}, "widths=()"),
        ({"attention": "ecaa"}, {}, "did you mean 'eca'"),
    ],
)
def test_bad_fields_are_named(fields, kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        jax.eval_shape(small_cnn(**fields).init, jax.random.key(0), IMAGES, **kwargs)
