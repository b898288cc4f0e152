"""ViT: both pools train, patch grid and spatial mechanisms, shape errors, logical axes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attn
from attn.models import ViT, build_model
from attn.models.vit import embed_patches, patch_grid

BATCH, SIZE, CLASSES, PATCH = 2, 16, 5, 4


def small_vit(**fields) -> ViT:
    config = dict(num_classes=CLASSES, patch_size=PATCH, num_layers=2, d_model=32, num_heads=4, mlp_dim=64)
    return build_model("vit", **{**config, "attention": "softmax", **fields})


def images(seed: int = 0, size: int = SIZE) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, size, size, 3))


@pytest.mark.parametrize(("pool", "real_init"), [("cls", True), ("mean", False)])
def test_sgd_step_lowers_loss(pool, real_init, sgd_losses, quick_params):
    model = small_vit(pool=pool, num_layers=1)
    batch, labels = images(), jnp.array([1, 4])
    if real_init:  # compiling the real init costs seconds on CPU, so one case pays for it
        params = jax.jit(model.init)(jax.random.key(1), batch)["params"]
    else:
        params = quick_params(model, batch)["params"]

    def loss_fn(params):
        logits = model.apply({"params": params}, batch)
        assert logits.shape == (BATCH, CLASSES) and logits.dtype == jnp.float32
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    before, after = sgd_losses(loss_fn, params, lr=0.1)
    assert after < before


def test_image_size_must_be_divisible_by_patch_size():
    with pytest.raises(ValueError, match="image size 18x18 is not divisible by patch_size=4"):
        jax.eval_shape(small_vit().init, jax.random.key(0), images(size=18))


def test_parameters_and_sequence_length(boxed_leaves):
    params = jax.eval_shape(small_vit(pool="cls").init, jax.random.key(0), images())["params"]
    assert params["position_embedding"].value.shape == ((SIZE // PATCH) ** 2 + 1, 32)
    assert params["patch_embedding"]["kernel"].value.shape == (PATCH, PATCH, 3, 32)
    for path, leaf in boxed_leaves(params):
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim, (path, leaf.names, leaf.value.shape)
    mean = jax.eval_shape(small_vit(pool="mean").init, jax.random.key(0), images())["params"]
    assert "cls_token" not in mean and mean["position_embedding"].value.shape == ((SIZE // PATCH) ** 2, 32)


class RowMixer(nn.Module):
    """Stand-in spatial mechanism: x [B, h, w, E] -> cumulative sum over h, so the grid layout matters."""

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    dropout_rate: float = 0.0
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        assert x.ndim == 4, x.shape
        self.sow("intermediates", "grid_shape", jnp.zeros(x.shape[1:3]))
        return jnp.cumsum(nn.Dense(x.shape[-1], name="proj")(x), axis=1)


@pytest.fixture
def spatial_registry(monkeypatch):
    """Makes "row_mixer" a registered spatial mechanism for the duration of a test."""
    real_get, real_build = attn.get, attn.build

    def fake_get(name):
        if name != "row_mixer":
            return real_get(name)
        return dataclasses.replace(real_get("softmax"), name=name, input_kind="spatial", module=RowMixer)

    def fake_build(name, **options):
        return RowMixer(**options) if name == "row_mixer" else real_build(name, **options)

    monkeypatch.setattr(attn, "get", fake_get)
    monkeypatch.setattr(attn, "build", fake_build)


def test_spatial_mechanisms_see_the_patch_grid(spatial_registry):
    model = small_vit(pool="mean", attention=["row_mixer", "softmax"])
    out, state = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), images(), mutable=["params", "intermediates"])
    )
    assert out.shape == (BATCH, CLASSES)
    (grid,) = state["intermediates"]["layers_0"]["attention"]["grid_shape"]
    assert grid.shape == (SIZE // PATCH, SIZE // PATCH)
    with pytest.raises(ValueError, match="attention='row_mixer' is a spatial mechanism.*pool='mean'"):
        jax.eval_shape(small_vit(pool="cls", attention="row_mixer").init, jax.random.key(0), images())


def test_spatial_mixing_follows_rows_of_patches(spatial_registry, quick_params):
    # The row mixer is causal over patch rows: changing the last row of patches (the last `grid` tokens in
    # row-major order) must leave the block output of every earlier row unchanged.
    model = small_vit(pool="mean", attention="row_mixer", num_layers=1)
    batch = images()
    params = quick_params(model, batch)
    changed = batch.at[:, -PATCH:].add(1.0)
    capture = lambda x: model.apply(params, x, capture_intermediates=True, mutable=["intermediates"])[1]
    rows = [capture(x)["intermediates"]["layers_0"]["__call__"][0] for x in (batch, changed)]
    grid = SIZE // PATCH
    np.testing.assert_allclose(rows[0][:, :-grid], rows[1][:, :-grid], atol=1e-6)
    assert not np.allclose(rows[0][:, -grid:], rows[1][:, -grid:])


def sincos_reference(rows: int, cols: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's posemb_sincos_2d written out as loops: patch (r, c) in row-major order, q = width // 4
    frequencies temperature ** (-i / (q - 1)); channels [sin(c w_i) | cos(c w_i) | sin(r w_i) | cos(r w_i)]."""
    q = width // 4
    table = np.zeros((rows * cols, width))
    for r in range(rows):
        for c in range(cols):
            for i in range(q):
                omega = 1.0 / temperature ** (i / (q - 1))
                token = r * cols + c
                table[token, i] = np.sin(c * omega)
                table[token, q + i] = np.cos(c * omega)
                table[token, 2 * q + i] = np.sin(r * omega)
                table[token, 3 * q + i] = np.cos(r * omega)
    return table


class PatchEmbedder(nn.Module):
    """The fields embed_patches reads, and a call of it."""

    patch_size: int = PATCH
    d_model: int = 16
    dropout_rate: float = 0.0
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32
    cls_token: bool = False
    position_embedding: str = "sincos2d"

    @nn.compact
    def __call__(self, images):
        grid = patch_grid(images, self.patch_size)
        return embed_patches(
            self, images, grid, cls_token=self.cls_token, deterministic=True, position_embedding=self.position_embedding
        )


@pytest.mark.parametrize("cls_token", [False, True])
def test_sincos2d_patch_embedding_matches_the_numpy_formula(cls_token):
    height, width = 3 * PATCH, 5 * PATCH  # a non-square grid: rows and columns must not be swapped
    pixels = jax.random.normal(jax.random.key(0), (BATCH, height, width, 3))
    module = PatchEmbedder(cls_token=cls_token)
    variables = module.init(jax.random.key(1), pixels)
    params = jax.tree.map(np.asarray, nn.unbox(variables)["params"])
    assert "position_embedding" not in params
    out = np.asarray(module.apply(variables, pixels))
    kernel, bias = params["patch_embedding"]["kernel"], params["patch_embedding"]["bias"]
    patches = np.asarray(pixels).reshape(BATCH, 3, PATCH, 5, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    conv = patches.reshape(BATCH, 15, -1) @ kernel.reshape(-1, 16) + bias
    expected = conv + sincos_reference(3, 5, 16)[None]
    if cls_token:  # the class token is prepended after the positions, as in big_vision: it gets none
        np.testing.assert_allclose(out[:, 0], np.broadcast_to(params["cls_token"][0], (BATCH, 16)), atol=1e-6)
        out = out[:, 1:]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_sincos2d_vit_has_no_position_table_and_rejects_bad_widths():
    params = jax.eval_shape(small_vit(position_embedding="sincos2d").init, jax.random.key(0), images())["params"]
    assert "position_embedding" not in params and "cls_token" in params
    with pytest.raises(ValueError, match="multiple of 4 and >= 8; got 30"):
        jax.eval_shape(small_vit(position_embedding="sincos2d", d_model=30).init, jax.random.key(0), images())
    with pytest.raises(ValueError, match="position_embedding"):
        jax.eval_shape(small_vit(position_embedding="rope").init, jax.random.key(0), images())
