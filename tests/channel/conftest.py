"""Helpers for the channel-attention tests.

A jitted `module.init` costs seconds on CPU (one RNG program per parameter), so tests take the parameter tree's
shapes from `jax.eval_shape` and fill it with numpy values instead. Applies run jitted (`jitted`): compiling one
program is several times cheaper than running a fresh forward op by op, which compiles every op separately.
"""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest


def _abstract_params(module: nn.Module, *args, **kwargs):
    """The unboxed parameter tree of `module.init(...)` as jax.ShapeDtypeStruct leaves (nothing is computed)."""
    shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)
    return nn.unbox(shapes)["params"]


def _quick_params(module: nn.Module, *args, seed: int = 0, **kwargs):
    """Random parameters shaped like `module.init`: kernels N(0, 1/fan_in) (fan_in = all but the last axis),
    vectors and scalars 0.5 N(0, 1), plus 1 for names containing "scale" (norm scales)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2:
            return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(leaf.dtype)
        value = 0.5 * rng.standard_normal(leaf.shape) + (1.0 if "scale" in name else 0.0)
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, _abstract_params(module, *args, **kwargs))


def _jitted(module: nn.Module):
    """`module.apply` under jax.jit, with the `mutable` and `capture_intermediates` flags static."""
    return jax.jit(module.apply, static_argnames=("mutable", "capture_intermediates"))


def _count(params) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def _features(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="session")
def abstract_params():
    return _abstract_params


@pytest.fixture(scope="session")
def quick_params():
    return _quick_params


@pytest.fixture(scope="session")
def jitted():
    return _jitted


@pytest.fixture(scope="session")
def count():
    return _count


@pytest.fixture(scope="session")
def features():
    return _features
