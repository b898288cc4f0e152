"""`gaussian_adaptive`: GAAM ([59] "Gaussian Adaptive Attention is All You Need: Robust Contextual Representations
Across Multiple Modalities"), and the Gaussian core that `density_adaptive` (DAAM, [145]) shares.

GAAM is not q.k attention: each head re-weights its own values by a learned Gaussian of their normalised value
along one axis (the "norm axis" of the official code, github.com/gioannides/Gaussian-Adaptive-Attention). For one
head with values v (layout [B, T, H, D]), statistics over the chosen axis (masked to the valid tokens),

    mu = mean(v),  sigma^2 = var(v)                          population variance over the axis
    y_j = (v - (mu + delta_j)) / sqrt(sigma^2 + eps)         delta_j: learned mean offset of Gaussian j
    g_j = exp(-y_j^2 / (2 (c_j^2 + eps)))                    c_j: learned scaled standard deviation ("c")
    mixture ("gaussian_adaptive"):  g = sum_j softmax(w)_j g_j     (w: learned mixture logits, MHGAAM.py)
    product ("density_adaptive"):   g = prod_j N(y_j; 0, c_j^2)    (the DAAM code; the 1/sqrt(2 pi c^2) constants
                                                                    cancel in the normalisation below)
    a = g / sum_axis(g)                                       the weights sum to 1 along the axis
    out = v * a

computed in the log domain (a = softmax_axis(log g), log g a logsumexp over the mixture), which is exact and never
divides by an underflowed sum. Heads own their parameters delta, c, w [H, G] (G = num_gaussians).

axis="sequence" (default): the statistics and the normalisation run over the tokens of each feature channel —
each token is weighted by how typical its value is for the whole sequence, as in the papers' usage over the
frames/layers of a speech representation. Non-causal; padded tokens (mask lengths) take no part and output 0.
axis="features": over the D features of the head at each token (the official code with the norm axis on the
feature chunk of a head): a per-token gate, causal and stateless (decode needs no cache).

The layer: values v = x W_v (per head, [B, T, H, D]) -> gate -> output projection ("projections"=True); with
projections=False, v is x itself split into H chunks of D (E == H D) and the output is the gated x — exactly the
official parameter-light module (parameters delta, c, w only).

Deviations from the official code (all checked against it): the variance is the population one (torch.var is
unbiased; the factor n/(n-1) is absorbed by c, and a single valid token stays defined); padded tokens are excluded
from the statistics (the official code zeroes them but still counts them); on axis="sequence" heads split the
features, not the tokens (the official module chunks its norm axis into heads, which for variable-length
sequences would tie a head to absolute positions); no sum clamp is needed in the log domain.

Shapes: x [B, T, E] -> [B, T, E]. Time and memory O(B T H D G) (no T x T scores). Exact reductions: with c -> inf
every g_j -> 1, so a is uniform: out = v / n, n = the valid tokens (axis="sequence") or D (axis="features"). No
setting reduces it to softmax attention.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.padding import masked_softmax, padding_lengths, valid_tokens
from attn.core.validation import check_choice, check_positive, check_rank, choice, positive, positive_int
from attn.registry import register

Array = jax.Array

AXES = ("sequence", "features")
COMBINES = ("mixture", "product")


def gaussian_adaptive_weights(
    v: Array,
    mean_offsets: Array,
    scales: Array,
    *,
    mixture_logits: Array | None = None,
    combine: str = "mixture",
    axis: str = "sequence",
    lengths: Array | None = None,
    eps: float = 1e-8,
) -> Array:
    """Normalised Gaussian weights a (see the module docstring) — float32 (float64 for float64 inputs) [B, T, H, D],
    summing to 1 along `axis`.

    Args:
      v: [B, T, H, D] per-head values (any float dtype).
      mean_offsets, scales: [H, G] learned offsets delta and scaled standard deviations c of the G Gaussians.
      mixture_logits: [H, G] mixture logits w (combine="mixture"; None = equal weights). Must be None for "product".
      combine: "mixture" (GAAM: sum_j softmax(w)_j g_j) or "product" (DAAM: prod_j of normal densities).
      axis: "sequence" (statistics over the valid tokens) or "features" (over the D features of each token).
      lengths: int [B] valid tokens per row (padding at the end) or None; padded positions get weight 0.
      eps: added to the variance and to c^2.
    """
    check_rank("v", v, 4, "[batch, length, heads, head_dim]")
    check_choice("combine", combine, COMBINES)
    check_choice("axis", axis, AXES)
    check_positive("eps", eps)
    batch, length, heads, _ = v.shape
    for name, param in (("mean_offsets", mean_offsets), ("scales", scales)):
        if param.ndim != 2 or param.shape[0] != heads:
            raise ValueError(f"{name} has shape {param.shape}; expected [heads={heads}, num_gaussians]")
    if mean_offsets.shape != scales.shape:
        raise ValueError(f"scales has shape {scales.shape}; expected {mean_offsets.shape} like mean_offsets")
    if combine == "product" and mixture_logits is not None:
        raise ValueError("mixture_logits must be None for combine='product' (a product of densities has no weights)")
    if mixture_logits is not None and mixture_logits.shape != mean_offsets.shape:
        raise ValueError(f"mixture_logits has shape {mixture_logits.shape}; expected {mean_offsets.shape}")

    acc = jnp.promote_types(jnp.result_type(v, mean_offsets, scales), jnp.float32)  # float64 stays float64
    x = v.astype(acc)
    valid = valid_tokens(lengths, batch, length)[:, :, None, None]  # [B, T, 1, 1]
    if axis == "sequence":
        reduce = 1
        count = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1).astype(acc)
        mean = jnp.sum(jnp.where(valid, x, 0.0), axis=1, keepdims=True) / count
        var = jnp.sum(jnp.where(valid, (x - mean) ** 2, 0.0), axis=1, keepdims=True) / count
    else:
        reduce = 3
        mean = jnp.mean(x, axis=3, keepdims=True)
        var = jnp.var(x, axis=3, keepdims=True)
    offsets = mean_offsets.astype(acc)[:, None, :]  # [H, 1, G] against [B, T, H, D, G]
    precision = 0.5 / (scales.astype(acc)[:, None, :] ** 2 + eps)
    y = (x - mean)[..., None] - offsets
    log_g = -(y**2) / (var + eps)[..., None] * precision  # [B, T, H, D, G]
    if combine == "product":
        log_a = jnp.sum(log_g, axis=-1)
    else:
        if mixture_logits is None:
            log_mix = jnp.full(mean_offsets.shape, -jnp.log(mean_offsets.shape[1]), acc)
        else:
            log_mix = jax.nn.log_softmax(mixture_logits.astype(acc), axis=-1)
        log_a = jax.nn.logsumexp(log_g + log_mix[:, None, :], axis=-1)
    return masked_softmax(log_a, valid, axis=reduce)


def gaussian_adaptive_attention(
    v: Array,
    mean_offsets: Array,
    scales: Array,
    *,
    mixture_logits: Array | None = None,
    combine: str = "mixture",
    axis: str = "sequence",
    lengths: Array | None = None,
    eps: float = 1e-8,
) -> Array:
    """GAAM (combine="mixture") / DAAM (combine="product") gating: v * a, [B, T, H, D] in v.dtype.

    Arguments as in `gaussian_adaptive_weights`; padded tokens (at or beyond `lengths`) output 0.
    """
    weights = gaussian_adaptive_weights(
        v, mean_offsets, scales, mixture_logits=mixture_logits, combine=combine, axis=axis, lengths=lengths, eps=eps
    )
    valid = valid_tokens(lengths, v.shape[0], v.shape[1])[:, :, None, None]
    return jnp.where(valid, v.astype(weights.dtype) * weights, 0.0).astype(v.dtype)


OPTION_DOCS = {
    "num_gaussians": "Gaussians per head (G): a mixture (GAAM) or a product of densities (DAAM)",
    "axis": "'sequence': statistics over the valid tokens (non-causal); 'features': over each head's features per "
    "token (causal, per-token gate)",
    "projections": "True: value and output projections around the gate; False: gate x itself split into heads "
    "(needs embed == num_heads * head_dim; the official parameter-light module)",
    "initial_scale": "initial value of every scaled standard deviation c (official GAAM: 2.0)",
    "eps": "added to the variance and to c^2",
    "num_kv_heads": "unused (no queries or keys: each head gates its own values)",
}


@register(
    "gaussian_adaptive",
    family="softmax",
    paper="Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple Modalities",
    catalog=59,
    op=gaussian_adaptive_attention,
    input_kind="sequence",
    supports_causal=False,
    supports_decode=False,
    summary="GAAM: values re-weighted by a learned per-head Gaussian mixture of their normalised value (no q.k)",
    option_docs=OPTION_DOCS,
    fidelity="official-code",
    reference="github.com/gioannides/Gaussian-Adaptive-Attention (MHGAAM.py); documented deviations: population "
    "variance, padded tokens excluded from the statistics, heads split the features",
    validators={
        "num_gaussians": positive_int,
        "axis": choice(*AXES),
        "initial_scale": positive,
        "eps": positive,
    },
    supports_gqa=False,
)
class GaussianAdaptiveAttention(AttentionLayer):
    """Multi-head Gaussian adaptive attention (module docstring). x [B, T, E] -> [B, T, E].

    axis="sequence" takes padding lengths only (a causal mask raises); axis="features" accepts any mask (a
    per-token gate; causal by construction) and decode=True (no cache needed).
    """

    num_gaussians: int = 4
    axis: str = "sequence"
    projections: bool = True
    initial_scale: float | None = 2.0
    eps: float = 1e-8

    combine: ClassVar[str] = "mixture"
    mechanism_name: ClassVar[str] = "gaussian_adaptive"

    def scale_init(self) -> Any:
        return nn.initializers.constant(self.initial_scale)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        name = self.mechanism_name
        if call.cross:
            raise ValueError(f"context is not supported by {name} (a self gate); got shape {call.context.shape}")
        if self.axis == "sequence" and call.decode:
            raise ValueError(
                f"decode=True is not supported by {name} with axis='sequence' (its statistics span the whole "
                "sequence); use axis='features' for a causal, per-token gate"
            )
        if not self.projections and call.x.shape[-1] != self.num_heads * self.head_dim:
            raise ValueError(
                f"projections=False needs embed == num_heads * head_dim; got embed={call.x.shape[-1]}, "
                f"num_heads={self.num_heads}, head_dim={self.head_dim}"
            )
        self.valid_lengths(call)

    def valid_lengths(self, call: AttentionCall) -> Array | None:
        """int32 [B] valid tokens (padding at the end) or None. axis="sequence" takes a padding-only mask; on
        axis="features" (a per-token gate) only the padded rows are affected by the mask."""
        if self.axis == "sequence":
            return padding_lengths(call.mask, call.x.shape[0], f"{self.mechanism_name} with axis='sequence'")
        if call.mask is not None and call.mask.q_lengths is not None:
            return jnp.asarray(call.mask.q_lengths, jnp.int32)
        return None

    def project_qkv(self, x: Array, context: Array | None) -> tuple[None, None, Array]:
        """No queries or keys: the per-head values v [B, T, H, D] (x W_v, or x split into heads)."""
        if self.projections:
            return None, None, self.dense_heads(x, self.num_heads, "heads", "value")
        return None, None, x.astype(self.dtype).reshape(*x.shape[:2], self.num_heads, self.head_dim)

    def prepare(self, q: None, k: None, v: Array, call: AttentionCall) -> tuple[None, None, Array, AttentionCall]:
        """No positions and no cache: the statistics of axis="features" are per token; axis="sequence" has no
        decode."""
        return q, k, v, call

    def attend(self, q: None, k: None, v: Array, call: AttentionCall) -> Array:
        """v [B, T, H, D] -> v * a [B, T, H, D] (padded tokens 0); a, the Gaussian weights, is sown as
        "gaussian_weights" and dropped out by the attention-dropout helper."""
        batch, length = v.shape[:2]
        lengths = self.valid_lengths(call)
        shape = (self.num_heads, self.num_gaussians)
        param = lambda n, init: self.param(
            n, nn.with_logical_partitioning(init, ("heads", None)), shape, self.param_dtype
        )
        mean_offsets = param("mean_offset", nn.initializers.zeros)
        scales = param("scale", self.scale_init())
        mixture_logits = param("mixture_logits", nn.initializers.zeros) if self.combine == "mixture" else None
        weights = gaussian_adaptive_weights(
            v,
            mean_offsets,
            scales,
            mixture_logits=mixture_logits,
            combine=self.combine,
            axis=self.axis,
            lengths=lengths,
            eps=self.eps,
        )
        if self.wants_weights():
            self.sow("intermediates", "gaussian_weights", weights)
        weights = self.attention_dropout(weights, call.deterministic)
        valid = valid_tokens(lengths, batch, length)[:, :, None, None]
        return jnp.where(valid, v.astype(weights.dtype) * weights, 0.0).astype(self.dtype)

    def project_out(self, y: Array, features: int) -> Array:
        """[B, T, H, D] -> [B, T, features]: the output projection, or (projections=False) the gated x itself."""
        if not self.projections:
            return y.reshape(*y.shape[:2], features)
        return super().project_out(y, features)
