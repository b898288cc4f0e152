"""VAR, visual attention redistribution [35] ("See What You Are Told: Visual Attention Sink in Large Multimodal
Models", Kang et al., ICLR 2025).

Some image tokens draw much of the text's attention whatever the text says (visual attention sinks). Like the
language model's own sinks (BOS), they carry a massive activation in a few fixed hidden-state dimensions D_sink.
VAR finds them and recycles their attention to the other image tokens, in the heads that look at the image.

Sinks (per decoder layer l, from the hidden state h_j entering the block, RMS-normalised without weight):

    sink_j  =  max_{d in D_sink} |h_j[d]| / rms(h_j)  >  tau          (text tokens can be sinks too, e.g. BOS)

Image-centric rows (per head h and text query i; I the image tokens, S the sinks):

    s_i = sum_{j in I} A_ij  >=  summ          the row looks at the image
    sum_{j in I and S} A_ij / (s_i + |I| 1e-6)  <=  rho     and not mostly at its visual sinks

(only in a layer where at least one image token is a sink). In those rows, with 0 <= p <= 1:

    A'_ij = p A_ij                                                    j in S   (visual and text sinks)
    A'_ij = A_ij + (1 - p) (sum_{k in S} A_ik) A_ij / sum_{k in I, not S} A_ik     j in I, not S
    A'_ij = A_ij                                                      otherwise

so each row keeps its mass and the freed sink attention goes to the non-sink image tokens in proportion to their
attention. By default every decoder layer but the last is redistributed (the code skips the last layer).

Adaptation: D_sink are properties of a pretrained LLM (e.g. {1415, 2533} for LLaMA-2); for a model trained here,
`sink_dimensions` takes the k dimensions with the largest RMS-normalised activation over a calibration batch, and tau
must be below sqrt(d_model) (the largest value a normalised coordinate can take; the paper's tau = 20 assumes
d_model = 4096). Sinks are found on the unsteered forward pass (`find_sinks`, one extra pass); the official code
reads them from the steered pass's hidden states, which differ from the unsteered ones after the first steered
layer.

No-op: p = 1 (bit-identical), or layers=() (no rules). Shapes: sinks bool [L, B, Tk]; the rule acts on the decoder's
attention_weights [B, H, Tq, Tk].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn import interventions as iv
from attn.steer.registry import register
from attn.steer.vision import (
    DECODER_SELF_ATTENTION,
    block_inputs,
    check_layers,
    check_span,
    decoder_geometry,
    image_key_mask,
    query_positions,
)


def normalized_magnitudes(hidden: jax.Array, eps: float = 1e-6) -> jax.Array:
    """|h| / rms(h) per coordinate: hidden [..., D] -> float32 [..., D] (the code's weightless RMSNorm)."""
    hidden = hidden.astype(jnp.float32)
    return jnp.abs(hidden * jax.lax.rsqrt(jnp.mean(hidden * hidden, axis=-1, keepdims=True) + eps))


def sink_dimensions(hidden: jax.Array, k: int = 2) -> tuple[int, ...]:
    """The k hidden dimensions with the largest normalised activation anywhere in hidden [..., D] (massive
    activations), sorted."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be an int >= 1")
    peak = jnp.max(normalized_magnitudes(hidden).reshape(-1, hidden.shape[-1]), axis=0)
    return tuple(sorted(int(d) for d in jnp.argsort(-peak)[:k]))


def sink_tokens(hidden: jax.Array, dims: Sequence[int], tau: float) -> jax.Array:
    """Tokens whose normalised activation exceeds tau in one of `dims`: hidden [..., T, D] -> bool [..., T]."""
    bad = [d for d in dims if not 0 <= d < hidden.shape[-1]]
    if bad or not dims:
        raise ValueError(f"sink_dims={tuple(dims)} must be non-empty dimensions in [0, {hidden.shape[-1]})")
    return jnp.max(normalized_magnitudes(hidden)[..., jnp.asarray(dims)], axis=-1) > tau


def redistribute(
    weights: jax.Array, sinks: jax.Array, image_span: tuple[int, int], p: float, rho: float, summ: float
) -> jax.Array:
    """VAR on weights [B, H, Tq, Tk] with sinks bool [B, Tk]: the equations of the module docstring (every head;
    the image-centric rows are chosen here)."""
    q_len, kv_len = weights.shape[-2:]
    image = image_key_mask(image_span, kv_len)  # [Tk]
    sink = sinks[:, None, None, :kv_len]  # [B, 1, 1, Tk]
    visual_sink = sink & image
    image_mass = jnp.sum(jnp.where(image, weights, 0.0), axis=-1)  # [B, H, Tq]
    portion = jnp.sum(jnp.where(visual_sink, weights, 0.0), axis=-1) / (image_mass + jnp.sum(image) * 1e-6)
    text_query = (query_positions(q_len, kv_len) >= image_span[1])[None, None, :]
    has_visual_sink = jnp.any(visual_sink, axis=-1)  # [B, 1, 1]
    rows = (portion <= rho) & (image_mass >= summ) & text_query & has_visual_sink
    receivers = image & ~sink
    base = jnp.sum(jnp.where(receivers, weights, 0.0), axis=-1, keepdims=True)
    freed = (1.0 - p) * jnp.sum(jnp.where(sink, weights, 0.0), axis=-1, keepdims=True)
    out = jnp.where(sink, p * weights, weights)
    out = out + jnp.where(receivers, freed * weights / jnp.where(base > 0, base, 1.0), 0.0)
    return jnp.where((rows[..., None]) & (base > 0), out, weights)


def visual_sink_mass(weights: jax.Array, sinks: jax.Array, image_span: tuple[int, int]) -> jax.Array:
    """Attention of the text queries on visual sinks, per head: weights [B, H, Tq, Tk], sinks [B, Tk] -> float32
    [B, H] (mean over text queries)."""
    q_len, kv_len = weights.shape[-2:]
    visual_sink = sinks[:, None, None, :kv_len] & image_key_mask(image_span, kv_len)
    mass = jnp.sum(jnp.where(visual_sink, weights, 0.0), axis=-1)  # [B, H, Tq]
    text = query_positions(q_len, kv_len) >= image_span[1]
    return jnp.sum(jnp.where(text, mass, 0.0), axis=-1) / jnp.maximum(jnp.sum(text), 1)


@register(
    "var",
    paper="[35] See What You Are Told: Visual Attention Sink in Large Multimodal Models (VAR, Kang et al., ICLR 2025)",
    fidelity="official-code",
    reference=(
        "arXiv 2503.03321 sections 4-5 and the VisAttnSink code as read in the fork benmagnifico/VisAttnSink "
        "src/logic/logic.py (DimProspector: |RMSNorm(h)| over D_sink > tau=20; HeadFork: image share >= summ=0.2 and "
        "visual-sink share <= rho=0.5 per (head, query); VARProcessor: sinks times p=0.6, freed visual and text sink "
        "mass spread over the non-sink image tokens by their attention, last layer skipped). Differences: D_sink "
        "found from the model's massive activations (sink_dimensions) instead of a per-LLM table, sinks read from the "
        "unsteered pass, rows with no non-sink image attention left unchanged (the code divides by zero there)"
    ),
    no_op="p=1 (bit-identical), or layers=() (no rules)",
)
@dataclasses.dataclass(frozen=True)
class Var:
    """p in [0, 1]: the factor on sink attention; rho, summ in [0, 1]: the image-centric row thresholds; tau > 0: the
    sink threshold on normalised activations; sink_dims: D_sink (None: `sink_dimensions` of the input, k=2);
    layers: decoder layers to redistribute (None: all but the last)."""

    p: float = 0.6
    rho: float = 0.5
    summ: float = 0.2
    tau: float = 20.0
    sink_dims: Sequence[int] | None = None
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        for name in ("p", "rho", "summ"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau > 0:
            raise ValueError(f"tau={self.tau!r} must be a number > 0")

    def find_sinks(self, model: Any, variables: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """Sink tokens entering each decoder layer on the unsteered pass: bool [L, B, N + T]."""
        decoder_geometry(model, "var")
        hidden = block_inputs(model, variables, images, tokens)
        dims = tuple(self.sink_dims) if self.sink_dims is not None else sink_dimensions(hidden)
        return sink_tokens(hidden, dims, float(self.tau))

    def rules(self, model: Any, sinks: jax.Array, image_span: Sequence[int]) -> tuple[iv.Rule, ...]:
        """Rules for `attn.intervene` redistributing the selected decoder layers of `model`.

        sinks: bool [L, B, Tk] (from `find_sinks`); image_span: the image tokens' (start, stop) in the decoder's
        sequence. ValueError for a layer outside the decoder, a span outside the sequence, sinks of the wrong shape,
        or a decoder layer without attention weights.
        """
        num_layers, _ = decoder_geometry(model, "var")
        layers = check_layers(self.layers, num_layers, range(num_layers - 1))
        if getattr(sinks, "ndim", None) != 3 or sinks.shape[0] != num_layers:
            raise ValueError(
                f"sinks must be bool [num_layers={num_layers}, batch, seq_len]; "
                f"got shape {getattr(sinks, 'shape', None)}"
            )
        span = check_span(image_span, sinks.shape[-1], "image_span")
        p, rho, summ = float(self.p), float(self.rho), float(self.summ)

        def rule(layer: int) -> iv.Rule:
            def fn(weights: jax.Array, path: str) -> jax.Array:
                return redistribute(weights, sinks[layer], span, p, rho, summ)

            return iv.hook("attention_weights", fn, layers=[layer], module=DECODER_SELF_ATTENTION)

        return tuple(rule(layer) for layer in layers)
