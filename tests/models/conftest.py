"""Shared helpers for the model tests.

Compiling is the slow part on CPU (a jitted `model.init` costs seconds: one RNG kernel per parameter), so
most tests take parameters from `quick_params` (the real boxed tree from `jax.eval_shape`, filled with numpy
values) and run `jax.jit`-ed applies; the training-step tests use the real `model.init`.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import pytest


def _quick_params(model: nn.Module, *args: Any, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """{"params": boxed tree} shaped like model.init; scales 1, biases 0, kernels N(0, 1/shape[0])."""
    shapes = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias" or leaf.ndim < 2:
            return np.zeros(leaf.shape, leaf.dtype)
        return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(leaf.dtype)

    return {"params": jax.tree_util.tree_map_with_path(fill, shapes)}


@pytest.fixture(scope="session")
def quick_params():
    return _quick_params


def _jit_apply(model: nn.Module) -> Callable[..., Any]:
    """`model.apply`, jitted, with the usual flags static."""
    return jax.jit(model.apply, static_argnames=("mutable", "decode", "deterministic"))


@pytest.fixture(scope="session")
def jit_apply():
    return _jit_apply


def _sgd_losses(loss_fn: Callable[[Any], jax.Array], params: Any, lr: float) -> tuple[float, float]:
    """Loss before and after one plain SGD step `params - lr * grads` (jitted)."""

    @jax.jit
    def step(params):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return loss, loss_fn(params)

    before, after = step(params)
    return float(before), float(after)


@pytest.fixture(scope="session")
def sgd_losses():
    return _sgd_losses


def _boxed_leaves(tree: Any) -> list[tuple[str, Any]]:
    """(path, leaf) for every leaf of a boxed parameter tree, boxes kept as leaves."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


@pytest.fixture(scope="session")
def boxed_leaves():
    return _boxed_leaves
