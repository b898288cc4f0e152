"""Per-layer statistics for `python -m eval.analysis`: activation outliers, captured outputs, attention sinks.

Activation outliers follow "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing"
(Bondarenko et al., 2023), whose released code measures, per token, the Pearson kurtosis of the hidden vector

    kurt(x_t) = mean_e (x_te - mu_t)^4 / (mean_e (x_te - mu_t)^2)^2          (3 for a Gaussian, no "excess")

and the infinity norm max |x|. A single outlier channel of magnitude c among E channels gives about E, so large
kurtosis means a few channels dominate.

Outputs are captured without touching the models: `capture_outputs()` is a flax method interceptor that, during
an apply with the "intermediates" collection mutable, sows

    layers_<i>/block_input                 [B, T, E]  the residual stream entering block i
    layers_<i>/block_output                [B, T, E]  the residual stream after block i (a TransformerBlock)
    layers_<i>/attention/attention_output  [B, T, E]  the attention sublayer's output, before the residual add
    final_norm/norm_input                  [B, T, E]  what the model's final norm normalises
    final_norm/norm_inverse_scale          [B, T, 1]  1 / sqrt(var + eps) (LayerNorm) or 1 / sqrt(mean x^2 + eps)
                                                      (RMSNorm): the factor that linearises the norm
    final_norm/norm_centred                []         1.0 when the norm subtracts the mean (LayerNorm), else 0.0

next to the `attention_weights` softmax layers already sow (read with `attn.attention_stats`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.models.block import TransformerBlock

BLOCK_INPUT = "block_input"
BLOCK_OUTPUT = "block_output"
ATTENTION_OUTPUT = "attention_output"
NORM_INPUT = "norm_input"
NORM_INVERSE_SCALE = "norm_inverse_scale"
NORM_CENTRED = "norm_centred"


# ---------------------------------------------------------------------------------------------- outliers
def kurtosis(x: jax.Array, axis: int = -1) -> jax.Array:
    """Pearson kurtosis mean((x - mu)^4) / var^2 along `axis` (population moments), float32; nan where the
    values along `axis` are all equal. x: any float array; returns x's shape without `axis`."""
    x = jnp.asarray(x, jnp.float32)
    centred = x - jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.mean(centred**2, axis=axis)
    fourth = jnp.mean(centred**4, axis=axis)
    return jnp.where(var > 0, fourth / jnp.where(var > 0, var, 1.0) ** 2, jnp.nan)


def activation_stats(x: jax.Array) -> dict[str, jax.Array]:
    """Outlier statistics of activations x [..., E] (features last): float32 scalars

    max_abs        max |x| over everything (the infinity norm)
    rms            sqrt(mean x^2), the typical magnitude max_abs is compared with
    kurtosis       mean over tokens of the per-token kurtosis over the E features
    kurtosis_max   the largest per-token kurtosis
    """
    x = jnp.asarray(x, jnp.float32)
    per_token = kurtosis(x, axis=-1)
    return {
        "max_abs": jnp.max(jnp.abs(x)),
        "rms": jnp.sqrt(jnp.mean(x**2)),
        "kurtosis": jnp.nanmean(per_token),
        "kurtosis_max": jnp.nanmax(per_token),
    }


def first_key_mass_by_head(probs: jax.Array) -> jax.Array:
    """Mean probability on key 0 per head: float32 [H] for probabilities [B, H, Tq, Tk]."""
    return jnp.mean(jnp.asarray(probs, jnp.float32)[..., 0], axis=(0, 2))


def uniform_causal_first_key_mass(length: int) -> float:
    """First-key mass of uniform causal attention over `length` tokens: mean_i 1 / (i + 1), the no-sink baseline
    (query i sees i + 1 keys)."""
    if length < 1:
        raise ValueError(f"length={length!r} must be a positive int")
    return float(np.mean(1.0 / np.arange(1, length + 1)))


# ---------------------------------------------------------------------------------------------- capture
def _sow_outputs(next_fun: Any, args: tuple, kwargs: dict, context: nn.module.InterceptorContext) -> Any:
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not module.is_mutable_collection("intermediates"):
        return out
    if isinstance(module, TransformerBlock):
        module.sow("intermediates", BLOCK_INPUT, args[0] if args else kwargs["x"])
        module.sow("intermediates", BLOCK_OUTPUT, out)
    elif module.name == "final_norm" and isinstance(module, nn.LayerNorm | nn.RMSNorm):
        _sow_norm_statistics(module, args[0] if args else kwargs["x"])
    elif module.name == "attention" and isinstance(module.parent, TransformerBlock):
        # Mechanisms that wrap a parent's __call__ (output gates) pass here twice; the outer call, sown last,
        # is the sublayer's output.
        module.sow("intermediates", ATTENTION_OUTPUT, out)
    return out


def _sow_norm_statistics(module: nn.LayerNorm | nn.RMSNorm, x: jax.Array) -> None:
    """The statistics flax's LayerNorm / RMSNorm divide by (computed in float32, as they reduce)."""
    x32 = jnp.asarray(x, jnp.float32)
    centred = isinstance(module, nn.LayerNorm)
    second = jnp.mean(x32**2, axis=-1, keepdims=True)
    if centred:
        second = second - jnp.mean(x32, axis=-1, keepdims=True) ** 2
    module.sow("intermediates", NORM_INPUT, x)
    module.sow("intermediates", NORM_INVERSE_SCALE, jax.lax.rsqrt(jnp.maximum(second, 0.0) + module.epsilon))
    module.sow("intermediates", NORM_CENTRED, jnp.asarray(float(centred)))


@contextlib.contextmanager
def capture_outputs() -> Iterator[None]:
    """Within this context, applies with mutable "intermediates" also sow block inputs and outputs, attention
    outputs and the final norm's statistics (see the module docstring)."""
    with nn.intercept_methods(_sow_outputs):
        yield
