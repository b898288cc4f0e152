"""Every channel module: registry spec, NHWC shape preserved under jit, finite non-zero gradients, named axes,
bfloat16 error within a plain-jnp baseline."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn

SEED_TITLES = {
    "eca": "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks",
    "ela": "ELA: Efficient Local Attention for Deep Convolutional Neural Networks",
    "ulsam": "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks",
    "polarized": "Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
    "lka": "Visual Attention Network",
    "cape": "Learning Neural PDE Solvers with Parameter-Guided Channel Attention",
    "dual_attention": "Multi-scale self-guided attention for medical image segmentation",
    "class_semantic": "Class Semantics-based Attention for Action Detection",
    "medusa": "MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for Medical Image "
    "Analysis",
}
# Options that fit the small 8x8 test map (cape's defaults need a 32x32 map).
OPTIONS = {"cape": {"pool": 2, "modes": 1, "width": 8, "kernel_size": 3}}


def call_kwargs(name: str) -> dict:
    return {"condition": jnp.array([[0.5, 2.0], [1.0, 0.1]])} if name == "cape" else {}


def test_channel_family_is_registered_with_its_papers():
    assert attn.list_mechanisms(family="channel") == sorted(SEED_TITLES)
    for name, title in SEED_TITLES.items():
        spec = attn.get(name)
        assert (spec.family, spec.input_kind, spec.paper) == ("channel", "channels", title)
        assert not spec.supports_causal and not spec.supports_decode
        assert all(option.doc for option in spec.options.values())
        assert "num_heads" not in spec.options


@pytest.mark.parametrize("name", sorted(SEED_TITLES))
def test_shape_jit_and_finite_gradients(name, quick_params):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 16)), jnp.float32)
    module = attn.build(name, **OPTIONS.get(name, {}))
    kwargs = call_kwargs(name)
    boxed = jax.eval_shape(module.init, jax.random.key(0), x, **kwargs)["params"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))[0]:
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, path

    def loss(params, x):
        y = module.apply({"params": params}, x, **kwargs)
        return jnp.mean(jnp.sin(y)), y

    params = quick_params(module, x, **kwargs)
    (value, y), (grad_p, grad_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert np.isfinite(float(value))
    leaves = [np.asarray(g) for g in jax.tree.leaves(grad_p)] + [np.asarray(grad_x)]
    assert all(np.isfinite(g).all() for g in leaves)
    assert np.abs(leaves[-1]).sum() > 0 and sum(np.abs(g).sum() for g in leaves[:-1]) > 0


@pytest.mark.parametrize("name", sorted(SEED_TITLES))
def test_rejects_input_that_is_not_a_feature_map(name):
    module = attn.build(name, **OPTIONS.get(name, {}))
    bad = jnp.zeros((2, 8, 8, 4, 4)) if name == "class_semantic" else jnp.zeros((2, 64, 16))
    with pytest.raises(ValueError, match="x must be"):
        jax.eval_shape(module.init, jax.random.key(0), bad, **call_kwargs(name))


def relative_error(y, want):
    """max|y - want| / max|want|, in float32."""
    y, want = np.asarray(y, np.float32), np.asarray(want, np.float32)
    return float(np.abs(y - want).max() / np.abs(want).max())


def squeeze_excitation_bf16_error(x):
    """The bf16 baseline: the relative error, against float32, of a plain-jnp squeeze-and-excitation gate (the
    family's defining computation: pool over H, W, dense C -> C/4, ReLU, dense, sigmoid, scale x) computed in
    bfloat16 on the same x [B, H, W, C]."""
    channels = x.shape[-1]
    rng = np.random.default_rng(1)
    w1 = jnp.asarray(rng.standard_normal((channels, channels // 4)) / np.sqrt(channels), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((channels // 4, channels)) / np.sqrt(channels // 4), jnp.float32)

    def gate(x, w1, w2):
        scale = jax.nn.sigmoid(jax.nn.relu(jnp.mean(x, axis=(1, 2)) @ w1) @ w2)
        return x * scale[:, None, None, :]

    low = [a.astype(jnp.bfloat16) for a in (x, w1, w2)]
    return relative_error(gate(*low), gate(x.astype(jnp.float32), w1, w2))


@pytest.mark.parametrize("name", sorted(SEED_TITLES))
def test_bfloat16_error_is_within_the_plain_jnp_baseline(name, quick_params, jitted):
    """dtype=bfloat16 keeps float32 params, returns bfloat16, and its error against the same module in float32 (same
    params, same bf16-representable x) is at most 2x the error of a plain-jnp bf16 squeeze-and-excitation gate, plus
    1e-3: DESIGN's low-precision criterion, with the family's defining computation as the reference (channel
    modules have no separate kernel; measured errors are 0.002-0.008 against a baseline of 0.005)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 16)), jnp.bfloat16)
    # dual_attention's encoder-decoder is plain convolutions; its PAM and CAM are what bfloat16 can break.
    options = {**OPTIONS.get(name, {}), **({"guidance": False} if name == "dual_attention" else {})}
    module, module16 = attn.build(name, **options), attn.build(name, dtype=jnp.bfloat16, **options)
    params = quick_params(module, x.astype(jnp.float32), **call_kwargs(name))
    y16 = jax.block_until_ready(jitted(module16)({"params": params}, x, **call_kwargs(name)))
    assert y16.shape == x.shape and y16.dtype == jnp.bfloat16
    y32 = jitted(module)({"params": params}, x.astype(jnp.float32), **call_kwargs(name))
    params16 = nn.unbox(jax.eval_shape(module16.init, jax.random.key(0), x, **call_kwargs(name)))["params"]
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params16))  # param_dtype stays float32
    error, baseline = relative_error(y16, y32), squeeze_excitation_bf16_error(x)
    assert error <= 2 * baseline + 1e-3, f"bf16 relative error {error:.3g}; plain-jnp baseline {baseline:.3g}"
