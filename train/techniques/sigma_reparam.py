"""σReparam: every weight matrix reparametrised by its spectral norm (Zhai et al., ICML 2023, "Stabilizing Transformer
Training by Preventing Attention Entropy Collapse", catalog [159]).

Each kernel W (viewed as a matrix M [n_in, n_out], the layout y = x M of a flax kernel) is used as

    Ŵ = (γ / σ(W)) W

with γ a learned scalar and σ(W) the spectral norm, estimated by one power-iteration step per forward from a
persistent vector u ∈ R^{n_out} (official JAX code, speech/layers.py SNDense):

    v  = normalize(M u)            (stop-gradient)
    u' = normalize(Mᵀ v)           (stop-gradient; stored as the next u after a train step)
    σ  = vᵀ M u'                   (differentiable in M)

normalize(x) = x / max(|x|₂, 1e-12) (torch.nn.functional.normalize, used by the PyTorch SpectralNormedWeight).
At init u is the top right singular vector of M (from an SVD) and γ = σ(W_init) (PyTorch vision/layers.py SNLinear:
`sigma` initialised to the SVD spectral norm; gamma_init="one" gives the JAX speech code's γ = 1). Evaluation
runs the same power step from the stored u but does not store it (the official `if self.training` copy).

Which weights: every parameter named "kernel" with two or more axes: attention q/k/v/output projections, MLP
matrices, the patch embedding, output heads (the official convert_to_sn converts every nn.Linear and nn.Conv2d;
embedding tables and norm scales are not reparametrised). A kernel with more than two axes is the matrix of the
linear map it applies: q/k/v [E, H, D] -> [E, H·D]; an output projection [H, Dv, E] (last logical axis "embed")
-> [H·Dv, E]; a convolution [kh, kw, C, E] -> [kh·kw·C, E].

The official recipe also removes LayerNorm (their "σReparam alone" runs keep pre-LN for LMs); this technique does
only the reparametrisation: pick `model.norm` yourself.

Variables (params["techniques"]["sigma_reparam"]): "gamma" (trainable scalars) and "u" (state, not trained),
both nested like the kernels they belong to. No-op setting: the technique absent from config.techniques.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.core import validation

from .base import Option, Technique, register

NORMALIZE_EPS = 1e-12


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x), NORMALIZE_EPS)


def input_axes(names: tuple[Any, ...] | None, ndim: int) -> int:
    """How many leading axes of a kernel contract with the input: all but the last for a kernel of more than two
    axes whose last logical axis is "embed" (output projections, convolutions), else one."""
    if ndim > 2 and names is not None and names[-1] == "embed":
        return ndim - 1
    return 1


def as_matrix(kernel: jax.Array, out_size: int) -> jax.Array:
    """`kernel` as [n_in, n_out] with n_out = `out_size` (the length of its u vector)."""
    return kernel.reshape(-1, out_size)


def power_step(matrix: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(σ, u'): one power-iteration step on `matrix` [n_in, n_out] from `u` [n_out]; σ is differentiable in
    `matrix`, u' is not."""
    matrix32 = matrix.astype(jnp.float32)
    frozen = jax.lax.stop_gradient(matrix32)
    v = _normalize(frozen @ u)
    u_next = jax.lax.stop_gradient(_normalize(frozen.T @ v))
    v = jax.lax.stop_gradient(v)
    return v @ matrix32 @ u_next, u_next


def _kernel_paths(params: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(path of dict keys, leaf) of every "kernel" with >= 2 axes (leaves may be boxed)."""
    found = []
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]:
        keys = tuple(str(getattr(entry, "key", entry)) for entry in path)
        value = leaf.unbox() if is_box(leaf) else leaf
        if keys and keys[-1] == "kernel" and np.ndim(value) >= 2:
            found.append((keys, leaf))
    return found


def _get(tree: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        tree = tree[key]
    return tree


def _set(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _replace(tree: Mapping[str, Any], keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of nested dict `tree` with `value` at `keys` (only the dicts on the path are copied)."""
    out = dict(tree)
    if len(keys) == 1:
        out[keys[0]] = value
    else:
        out[keys[0]] = _replace(tree[keys[0]], keys[1:], value)
    return out


@register
class SigmaReparam(Technique):
    """σReparam (see the module docstring for the equations)."""

    name = "sigma_reparam"
    fidelity = "official-code"
    reference = (
        "Zhai et al. 2023 Sec. 4 (Eq. 4); apple/ml-sigma-reparam speech/layers.py SNDense (power step, u state) and "
        "vision/layers.py SpectralNormedWeight/SNLinear (SVD init of u, gamma = sigma(W_init), normalize eps)"
    )
    model_kinds = ("decoder", "encoder", "vit", "encoder_decoder", "vlm")
    options = {
        "gamma_init": Option(
            "sigma",
            validation.choice("sigma", "one"),
            "initial γ: 'sigma' = σ(W_init), so Ŵ = W at init (PyTorch code); 'one' (JAX speech code)",
        ),
    }
    state_variables = ("u",)

    def init_variables(self, rng: jax.Array, params: Any) -> dict[str, Any]:
        gamma: dict[str, Any] = {}
        u: dict[str, Any] = {}
        for keys, leaf in _kernel_paths(params):
            names = getattr(leaf, "names", None)
            kernel = jnp.asarray(leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf, jnp.float32)
            n_in = input_axes(names, kernel.ndim)
            matrix = kernel.reshape(math.prod(kernel.shape[:n_in]), -1)
            _, s, vh = jnp.linalg.svd(matrix, full_matrices=False)
            _set(u, keys, vh[0])
            _set(gamma, keys, s[0] if self.gamma_init == "sigma" else jnp.ones((), jnp.float32))
        return {"gamma": gamma, "u": u}

    def transform_params(self, params: Any, variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        u_next: dict[str, Any] = {}
        out = params
        for keys, kernel in _kernel_paths(params):
            u = _get(variables["u"], keys)
            gamma = _get(variables["gamma"], keys)
            sigma, new_u = power_step(as_matrix(kernel, u.shape[0]), u)
            _set(u_next, keys, new_u)
            out = _replace(out, keys, ((gamma / sigma) * kernel.astype(jnp.float32)).astype(kernel.dtype))
        return out, {"u": u_next}

    def variable_metrics(self, variables: Mapping[str, Any]) -> dict[str, jax.Array]:
        gammas = jnp.stack(jax.tree.leaves(variables["gamma"]))
        return {"gamma_mean": jnp.mean(gammas), "gamma_max": jnp.max(gammas)}
