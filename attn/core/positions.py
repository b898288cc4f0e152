"""Positional encodings shared by all mechanisms: RoPE (with scaling), ALiBi, T5 and Shaw relative positions,
and learned absolute embeddings.

Conventions: `positions` are int32 [batch, length] (or [length]) absolute token positions; biases are float32
[batch|1, heads, q_len, kv_len] and are added to the scaled logits.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.core.validation import check_choice, check_positive

Array = jax.Array

ROPE_SCALINGS = (None, "linear", "ntk", "yarn", "llama3")
YARN_RAMPS = ("code", "paper")


# ---------------------------------------------------------------------------------------------------- RoPE
def rope_frequencies(
    head_dim: int,
    *,
    base: float = 10000.0,
    scaling: str | None = None,
    factor: float = 1.0,
    original_max_len: int = 2048,
    yarn_beta_fast: float = 32.0,
    yarn_beta_slow: float = 1.0,
    yarn_ramp: str = "code",
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> tuple[np.ndarray, float]:
    """Inverse frequencies theta_i = base^(-2i/d), i < d/2, after context-extension scaling.

    scaling:
      None      plain RoPE (Su et al., RoFormer).
      "linear"  position interpolation: theta_i / factor.
      "ntk"     NTK-aware: base * factor^(d / (d - 2)).
      "yarn"    YaRN (Peng et al. 2023): theta_i' = (1 - w_i) theta_i + w_i theta_i / factor, a ramp w_i from
                extrapolation (w = 0, short wavelengths) to interpolation (w = 1, long ones), plus the attention
                temperature sqrt(1/t) = 0.1 ln(factor) + 1 (1 for factor <= 1) multiplied into q and k. `yarn_ramp`:
        "code"  (default) the ramp of the YaRN authors' code (jquesnelle/yarn), `transformers`
                (`_compute_yarn_parameters`) and vLLM, which YaRN checkpoints (Qwen2.5, DeepSeek, ...) were trained
                with: linear in the pair index i between the correction dims
                    low = max(floor(c(beta_fast)), 0),  high = min(ceil(c(beta_slow)), head_dim - 1),
                    c(n) = head_dim ln(original_max_len / (2 pi n)) / (2 ln base)   (the pair that turns n times),
                w_i = clip((i - low) / (high - low), 0, 1) (high += 0.001 when low == high).
        "paper" the paper's gamma(r) (Sec. 3.2, "NTK-by-parts"): linear in the number of rotations
                r_i = original_max_len theta_i / (2 pi) over the original context, w_i = 1 - clip((r_i - beta_slow) /
                (beta_fast - beta_slow), 0, 1). It differs from "code" in the transition pairs (at head_dim 64,
                factor 4, base 1e4, original_max_len 2048: pairs 9-20 of 32, by up to a factor 1.8).
      "llama3"  Llama 3.1's frequency bands (Meta's `apply_scaling`, transformers' `_compute_llama3_parameters`): with
                wavelength l_i = 2 pi / theta_i and L = original_max_len, pairs with l_i > L / low_freq_factor are
                interpolated (theta_i / factor), pairs with l_i < L / high_freq_factor kept, and those between get
                (1 - s_i) theta_i / factor + s_i theta_i, s_i = (L / l_i - low_freq_factor) / (high_freq_factor -
                low_freq_factor). No magnitude multiplier.
    Returns (inv_freq float64 [head_dim // 2], magnitude multiplier for q and k).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for RoPE")
    check_choice("rope_scaling", scaling, ROPE_SCALINGS)
    check_positive("rope_base", base)
    check_positive("rope_scaling_factor", factor)
    check_choice("rope_yarn_ramp", yarn_ramp, YARN_RAMPS)
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    if scaling == "ntk":
        base = base * factor ** (head_dim / (head_dim - 2))
    inv_freq = base**-exponents
    multiplier = 1.0
    if scaling == "linear":
        inv_freq = inv_freq / factor
    elif scaling == "yarn" and factor > 1.0:
        if yarn_ramp == "code":
            interpolate = _yarn_code_ramp(head_dim, base, original_max_len, yarn_beta_fast, yarn_beta_slow)
        else:
            rotations = original_max_len * inv_freq / (2 * math.pi)  # turns of each pair over the original context
            interpolate = 1.0 - np.clip((rotations - yarn_beta_slow) / (yarn_beta_fast - yarn_beta_slow), 0.0, 1.0)
        inv_freq = interpolate * inv_freq / factor + (1.0 - interpolate) * inv_freq
        multiplier = 0.1 * math.log(factor) + 1.0
    elif scaling == "llama3":
        if not 0 < low_freq_factor < high_freq_factor:
            raise ValueError(
                f"rope_low_freq_factor={low_freq_factor} and rope_high_freq_factor={high_freq_factor} must satisfy "
                "0 < low < high"
            )
        wavelength = 2 * math.pi / inv_freq
        smooth = (original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        keep = np.where(wavelength > original_max_len / low_freq_factor, 0.0, np.clip(smooth, 0.0, 1.0))
        keep = np.where(wavelength < original_max_len / high_freq_factor, 1.0, keep)
        inv_freq = (1.0 - keep) * inv_freq / factor + keep * inv_freq
    return inv_freq, multiplier


def _yarn_code_ramp(
    head_dim: int, base: float, original_max_len: int, beta_fast: float, beta_slow: float
) -> np.ndarray:
    """Interpolation weight of each frequency pair, float64 [head_dim // 2], as YaRN's released code computes it."""

    def correction_dim(turns: float) -> float:
        return head_dim * math.log(original_max_len / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # the released code's guard against a zero-width ramp
    return np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray | Array, multiplier: float = 1.0) -> Array:
    """Rotates pairs (x[..., i], x[..., i + d/2]) by angle positions * inv_freq[i] (half-split layout).

    x: [batch, length, heads, head_dim]; positions: int [batch, length] or [length]. Returns x's shape and dtype.
    """
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None]
    compute = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 for float64 inputs
    angles = positions[..., None].astype(compute) * jnp.asarray(inv_freq, compute)  # [B, T, d/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(compute), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if multiplier != 1.0:
        rotated = rotated * multiplier
    return rotated.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------- ALiBi
def alibi_slopes(num_heads: int) -> np.ndarray:
    """Head slopes of ALiBi (Press et al.): geometric 2^(-8/n) for n a power of two; otherwise the slopes of
    the closest smaller power of two followed by every other slope of the next one. float32 [num_heads]."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, np.float32)


def alibi_bias(num_heads: int, q_positions: Array, kv_positions: Array) -> Array:
    """ALiBi bias -slope_h * |i - j|: float32 [batch|1, heads, q_len, kv_len] from positions [B|1, T] or [T]."""
    distance = _relative(q_positions, kv_positions)  # [B, 1, Tq, Tk], j - i
    slopes = jnp.asarray(alibi_slopes(num_heads))[None, :, None, None]
    return -slopes * jnp.abs(distance).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------- relative
def _relative(q_positions: Array, kv_positions: Array) -> Array:
    q = jnp.asarray(q_positions, jnp.int32)
    k = jnp.asarray(kv_positions, jnp.int32)
    q = q[None] if q.ndim == 1 else q
    k = k[None] if k.ndim == 1 else k
    return (k[:, None, None, :] - q[:, None, :, None]).astype(jnp.int32)  # [B, 1, Tq, Tk]


def t5_relative_buckets(relative: Array, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
    """T5 bucketing of relative positions (kv - q): exact buckets for small distances, logarithmic up to
    `max_distance`, then saturating. With `bidirectional`, half the buckets are for keys after the query."""
    buckets = jnp.zeros_like(relative)
    n = num_buckets
    if bidirectional:
        n //= 2
        buckets = buckets + (relative > 0).astype(jnp.int32) * n
        distance = jnp.abs(relative)
    else:
        distance = jnp.maximum(-relative, 0)
    max_exact = n // 2
    is_small = distance < max_exact
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (n - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, n - 1)
    return buckets + jnp.where(is_small, distance, large)


class T5RelativeBias(nn.Module):
    """T5 relative-position bias: a learned scalar per (bucket, head). Output float32 [B|1, H, Tq, Tk]."""

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q_positions: Array, kv_positions: Array, *, bidirectional: bool) -> Array:
        table = self.param(
            "relative_bias",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("relative_buckets", "heads")),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        buckets = t5_relative_buckets(
            _relative(q_positions, kv_positions),
            bidirectional=bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )[:, 0]  # [B, Tq, Tk]
        return jnp.moveaxis(jnp.asarray(table, jnp.float32)[buckets], -1, 1)


class ShawRelativeLogits(nn.Module):
    """Shaw et al. relative position representations (key side): logits_ij += q_i . a_clip(j - i).

    The embeddings a_r, r in [-K, K], are shared across heads as in the paper. Computed as q @ A^T then a
    gather, never a [Tq, Tk, D] tensor. Returns float32 [B, H, Tq, Tk] (unscaled: multiply by the softmax scale).
    """

    head_dim: int
    max_distance: int = 16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q: Array, q_positions: Array, kv_positions: Array) -> Array:
        k_max = self.max_distance
        table = self.param(
            "relative_keys",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("relative_distance", "head_dim")),
            (2 * k_max + 1, self.head_dim),
            self.param_dtype,
        )
        per_distance = jnp.einsum("bqhd,rd->bhqr", q.astype(jnp.float32), jnp.asarray(table, jnp.float32))
        index = jnp.clip(_relative(q_positions, kv_positions), -k_max, k_max) + k_max  # [B|1, 1, Tq, Tk]
        index = jnp.broadcast_to(index, (q.shape[0], q.shape[2], *index.shape[2:]))
        return jnp.take_along_axis(per_distance, index, axis=-1)


# ---------------------------------------------------------------------------------------------------- absolute
class LearnedPositionEmbedding(nn.Module):
    """Learned absolute position embedding table [max_len, features] with axes ("length", "embed").

    positions int [B, T] (or [T]) -> float [B|1, T, features] in `dtype`. A traced position outside [0, max_len)
    gathers NaN (jnp.take's fill mode), so the error shows in the loss instead of silently reusing a row.
    """

    max_len: int
    features: int
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, positions: Array) -> Array:
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            (self.max_len, self.features),
            self.param_dtype,
        )
        positions = jnp.asarray(positions)
        positions = positions if positions.ndim > 1 else positions[None]
        return jnp.take(jnp.asarray(table, self.dtype), positions, axis=0, mode="fill", fill_value=jnp.nan)
