"""Every channel module: registry spec, NHWC shape preserved under jit, finite non-zero gradients, named axes,
bfloat16 computation."""

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


@pytest.mark.parametrize("name", sorted(SEED_TITLES))
def test_bfloat16_computation_dtype(name, quick_params, jitted):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 16)), jnp.bfloat16)
    # dual_attention's encoder-decoder is plain convolutions; its PAM and CAM are what bfloat16 can break.
    options = {**OPTIONS.get(name, {}), **({"guidance": False} if name == "dual_attention" else {})}
    module = attn.build(name, dtype=jnp.bfloat16, **options)
    params = quick_params(module, x, **call_kwargs(name))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))  # param_dtype stays float32
    y = jax.block_until_ready(jitted(module)({"params": params}, x, **call_kwargs(name)))
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(y, np.float32)).all()
