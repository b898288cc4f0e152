"""[168] DGQ (Ryu et al., ICLR 2025, "DGQ: Distribution-Aware Group Quantization for Text-to-Image Diffusion
Models"): post-training quantization of a text-to-image denoiser's activations and attention scores that keeps the
activation outliers (group quantization with a scale per cluster of channels) and quantizes the attention
probabilities with a prompt-specific logarithmic quantizer. Here as intervention rules on a DiT (`attn.models.DiT`).

Attention scores (stage attention_weights [B, H, Nq, Nk], of the selected layers). With b bits, levels 0..2^b - 1 and
delta the maximum of the row's sample (computed at every call from the prompt's own map: prompt-specific, the
official `T2ILogQuantizer` with real_time=True):

    log:      q = clip(round(-log2(A / delta)), 0, 2^b - 1),      A_hat = delta 2^(-q)
    uniform:  q = clip(round(A / s), 0, 2^b - 1), s = delta / (2^b - 1),   A_hat = s q     (the official non-log
              always-zero quantizer, here with the same per-call delta instead of a calibrated one)

Activations (stage head_outputs [B, N, H, Dv]: the input of each attention layer's output projection). Calibration
records each channel's (H, Dv entry) minimum and maximum over calibration inputs, and each token's (pixel's) over the
channels; the axis whose (min, max) spread is larger is grouped (pixel-wise or channel-wise outliers), by k-means on
the (min, max) pairs into `groups` clusters (`kmeans_groups`). A cluster g with range [lo_g, hi_g] (the min and max
over its members) quantizes its members with uniform affine b-bit codes:

    s_g = (hi_g - lo_g) / (2^b - 1),   z_g = round(-lo_g / s_g)
    x_hat = s_g (clip(round(x / s_g) + z_g, 0, 2^b - 1) - z_g)

Shapes: the rules act on every selected layer's attention_weights [B, H, Nq, Nk] and head_outputs [B, N, H, Dv].

Fidelity: official code (ugonfor/DGQ: quant/quant_layer_text.py `T2ILogQuantizer` (log2 codes, clamp to [0, 2^b - 1],
delta = x.max() with real_time), quant/quant_layer.py `UniformAffineQuantizer.done_group_num` (per-in/out-channel
min/max, the larger spread chosen, KMeans on (min, max), cluster min/max -> delta, zero point) and
diffusers_rewrite/sd.py `Attention_forward` (where the quantizers sit). Not reproduced: weight quantization
(BRECQ-style reconstruction), the q/k/v quantizers before the scores (no stage exposes q and k), the start-token
exception (a DiT caption has no start token); delta is per sample rather than per call batch.

No-op: bits=None and attention_bits=None give no rules, so the model's output is bit-identical. bits outside 2..16
raise ValueError naming the argument; activation quantization without a calibration names `calibration`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn import interventions as iv
from attn.models.dit import check_cross_attention
from attn.steer.registry import register

Array = jax.Array
_TINY = 1e-8


# ---------------------------------------------------------------------------------------------------- quantizers
def log_quantize(weights: Array, bits: int) -> Array:
    """Prompt-specific log2 quantization of attention weights [B, ...] >= 0: delta = max over each sample,
    q = clip(round(-log2(A / delta)), 0, 2^bits - 1), returns delta 2^(-q) (same shape and dtype)."""
    x = weights.astype(jnp.float32)
    delta = jnp.max(x.reshape(x.shape[0], -1), axis=-1).reshape((-1,) + (1,) * (x.ndim - 1))
    delta = jnp.maximum(delta, _TINY)
    q = jnp.clip(jnp.round(-jnp.log2(x / delta)), 0, 2**bits - 1)
    return (delta * jnp.exp2(-q)).astype(weights.dtype)


def uniform_quantize_weights(weights: Array, bits: int) -> Array:
    """Uniform always-zero quantization of attention weights [B, ...]: s = max over each sample / (2^bits - 1),
    returns s clip(round(A / s), 0, 2^bits - 1)."""
    x = weights.astype(jnp.float32)
    delta = jnp.max(x.reshape(x.shape[0], -1), axis=-1).reshape((-1,) + (1,) * (x.ndim - 1))
    step = jnp.maximum(delta, _TINY) / (2**bits - 1)
    return (step * jnp.clip(jnp.round(x / step), 0, 2**bits - 1)).astype(weights.dtype)


def affine_quantize(x: Array, step: Array, zero_point: Array, bits: int) -> Array:
    """Uniform affine fake quantization: step (clip(round(x / step) + zero_point, 0, 2^bits - 1) - zero_point), with
    step and zero_point broadcastable to x."""
    q = jnp.clip(jnp.round(x / step) + zero_point, 0, 2**bits - 1)
    return (step * (q - zero_point)).astype(x.dtype)


def kmeans_groups(points: np.ndarray, groups: int, *, iterations: int = 50) -> np.ndarray:
    """Cluster labels int [P] of points float [P, 2] ((min, max) pairs) by Lloyd's k-means with centres initialised
    at evenly spaced points of the order by min + max (deterministic). groups >= P gives every point its own group."""
    points = np.asarray(points, np.float64)
    count = len(points)
    if groups >= count:
        return np.arange(count)
    order = np.argsort(points.sum(axis=1), kind="stable")
    centres = points[order[np.linspace(0, count - 1, groups).round().astype(int)]].copy()
    labels = np.zeros(count, int)
    for _ in range(iterations):
        distance = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
        labels = distance.argmin(axis=1)
        moved = np.array([points[labels == g].mean(0) if np.any(labels == g) else centres[g] for g in range(groups)])
        if np.allclose(moved, centres):
            break
        centres = moved
    return labels


def group_parameters(
    channel_min: np.ndarray, channel_max: np.ndarray, groups: int, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """(step, zero_point) float32 [P] per entry from per-entry ranges [P]: k-means groups of the (min, max) pairs,
    each group quantized over [min of its mins, max of its maxes] (official: 'minmax' cluster ranges)."""
    labels = kmeans_groups(np.stack([channel_min, channel_max], 1), groups)
    step, zero = np.zeros(len(labels), np.float32), np.zeros(len(labels), np.float32)
    for g in np.unique(labels):
        lo, hi = float(channel_min[labels == g].min()), float(channel_max[labels == g].max())
        s = max((hi - lo) / (2**bits - 1), _TINY)
        step[labels == g], zero[labels == g] = s, round(-lo / s)
    return step, zero


@dataclasses.dataclass(frozen=True)
class GroupCalibration:
    """Per layer path: the ranges of head_outputs [B, N, H, Dv] seen in calibration. channel_min/max float32 [H * Dv]
    (over batch and tokens), token_min/max float32 [N] (over batch and channels)."""

    ranges: Mapping[str, dict[str, np.ndarray]]

    def parameters(self, path: str, groups: int, bits: int, shape: tuple[int, ...]) -> tuple[Array, Array]:
        """(step, zero_point) broadcastable to head_outputs of `shape` [B, N, H, Dv]: grouped over the axis (channels
        or tokens) whose min/max spread is larger (official `done_group_num`)."""
        if path not in self.ranges:
            raise ValueError(f"calibration has no ranges for {path!r}; it has {sorted(self.ranges)}")
        r = self.ranges[path]
        spread = lambda lo, hi: (hi.max() - hi.min()) + (lo.max() - lo.min())  # noqa: E731
        if spread(r["channel_min"], r["channel_max"]) >= spread(r["token_min"], r["token_max"]):
            step, zero = group_parameters(r["channel_min"], r["channel_max"], groups, bits)
            return jnp.asarray(step.reshape(1, 1, *shape[2:])), jnp.asarray(zero.reshape(1, 1, *shape[2:]))
        step, zero = group_parameters(r["token_min"], r["token_max"], groups, bits)
        return jnp.asarray(step.reshape(1, -1, 1, 1)), jnp.asarray(zero.reshape(1, -1, 1, 1))


def calibrate(model: Any, params: Any, batches: Iterable[tuple[Array, Array, Array]], *, module: str = "*") -> Any:
    """GroupCalibration from calibration inputs: each batch (x [B, H, W, C], times [B], captions [B, L]) is run with
    head_outputs captured in the layers matching `module`; ranges are the min / max over every batch."""
    run = jax.jit(
        lambda x, t, c: iv.run_with_cache(model, {"params": params}, x, t, c, names=("head_outputs",), layers=[module])[
            1
        ]
    )
    ranges: dict[str, dict[str, np.ndarray]] = {}
    for x, times, captions in batches:
        for path, entry in run(x, times, captions).items():
            y = np.asarray(entry["head_outputs"], np.float32)  # [B, N, H, Dv]
            flat = y.reshape(y.shape[0], y.shape[1], -1)
            seen = {
                "channel_min": flat.min(axis=(0, 1)),
                "channel_max": flat.max(axis=(0, 1)),
                "token_min": flat.min(axis=(0, 2)),
                "token_max": flat.max(axis=(0, 2)),
            }
            if path not in ranges:
                ranges[path] = seen
            else:
                old = ranges[path]
                ranges[path] = {
                    k: (np.minimum if k.endswith("min") else np.maximum)(old[k], v) for k, v in seen.items()
                }
    if not ranges:
        raise ValueError("batches gave no calibration data (empty, or `module` selects no attention layer)")
    return GroupCalibration(ranges)


def _check_bits(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16):
        raise ValueError(f"{name}={value!r} must be None (no quantization) or an int in 2..16")


# ---------------------------------------------------------------------------------------------------- the system
@register(
    "dgq",
    paper="[168] DGQ: Distribution-Aware Group Quantization for Text-to-Image Diffusion Models (Ryu et al., ICLR 2025)",
    fidelity="official-code",
    reference=(
        "ugonfor/DGQ quant/quant_layer_text.py T2ILogQuantizer (real_time delta = max, log2 codes clamped to "
        "[0, 2^b - 1]); quant/quant_layer.py UniformAffineQuantizer.done_group_num (in/out-channel min-max, larger "
        "spread, KMeans on (min, max), cluster min-max -> delta, zero point); diffusers_rewrite/sd.py "
        "Attention_forward. Weight quantization and the q/k/v quantizers are not reproduced"
    ),
    no_op="bits=None and attention_bits=None (no rules)",
)
@dataclasses.dataclass(frozen=True)
class Dgq:
    """bits: activation (head_outputs) bits, None = full precision; attention_bits: attention-weight bits, None = full
    precision; log_quantizer: log2 (True) or uniform (False) attention-weight codes; groups: k-means groups of the
    activation quantizer; module: which attention layers ("*": every one, the caption encoder's included; "layers_*":
    the denoiser's blocks only, as the official code, which leaves the text encoder in full precision;
    "*/cross_attention": the cross-attention only)."""

    bits: int | None = 8
    attention_bits: int | None = 8
    log_quantizer: bool = True
    groups: int = 8
    module: str = "*"

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        _check_bits("attention_bits", self.attention_bits)
        if not isinstance(self.log_quantizer, bool):
            raise ValueError(f"log_quantizer={self.log_quantizer!r} must be a bool")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups={self.groups!r} must be an int >= 1")

    def rules(self, model: Any, calibration: GroupCalibration | None = None) -> tuple[iv.Rule, ...]:
        """Rules for `attn.intervene` on the DiT `model` (ValueError naming `model` without cross-attention; naming
        `calibration` when bits is set and no GroupCalibration is given)."""
        check_cross_attention(model, argument="model")
        rules = []
        if self.attention_bits is not None:
            quantize = log_quantize if self.log_quantizer else uniform_quantize_weights
            bits = self.attention_bits
            rules.append(iv.hook("attention_weights", lambda w, path: quantize(w, bits), module=self.module))
        if self.bits is not None:
            if not isinstance(calibration, GroupCalibration):
                raise ValueError(
                    f"calibration={calibration!r}: activation quantization (bits={self.bits}) needs the "
                    "GroupCalibration that attn.steer.dgq.calibrate returns"
                )
            groups, bits = self.groups, self.bits

            def activations(y: Array, path: str) -> Array:
                step, zero = calibration.parameters(path, groups, bits, y.shape)
                return affine_quantize(y, step, zero, bits)

            rules.append(iv.hook("head_outputs", activations, module=self.module))
        return tuple(rules)
