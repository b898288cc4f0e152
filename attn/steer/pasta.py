"""PASTA, post-hoc attention steering (Zhang et al. 2023, "Tell Your Model Where to Attend"): the core operator
AutoPASTA [161] builds on.

The user emphasises a set G of prompt tokens. In every selected head (l, h) and for every query i, the attention
on the prompt tokens outside G is scaled by a coefficient 0 < alpha <= 1 and the row renormalised:

    A'_ij = c_ij A_ij / Z_i,    c_ij = alpha if j < P and j not in G, else 1,    Z_i = sum_j c_ij A_ij

(P: the prompt length, the keys the spans index; keys past the prompt, the generated tokens while decoding, keep
c = 1). As the official code does it, the factor enters the logits before the softmax, which gives exactly the
renormalised rule above:

    logits'_ij = logits_ij + log(alpha)    for j < P, j not in G        (official: added to the attention mask)

Heads are chosen by model profiling: steer one head at a time on a small labelled set and keep the k heads with
the best task score (`select_heads`; PASTA's "model profiling").

No-op: alpha = 1 (log 1 = 0 is added: bit-identical output), an empty head_config (no rules), or a row with no
emphasised token (that row is left unsteered).

Shapes: spans a mask [B, P] (1 on emphasised tokens) or per row a (start, stop) / list of them with seq_len=P;
the rules act on attention_logits [B, H, Tq, Tk] of the selected self-attention layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn import interventions as iv
from attn.steer.common import (
    SELF_ATTENTION,
    HeadConfig,
    check_head_config,
    model_geometry,
    profile_heads,
    require_weights,
    span_mask,
    top_heads,
)
from attn.steer.registry import register


def steering_hook(emphasis: jax.Array, alpha: float) -> Callable[[jax.Array, str], jax.Array]:
    """The logit edit: fn(logits [B, H, Tq, Tk], path) adding log(alpha) at the prompt keys outside the emphasised
    set, for the rows of emphasis [B, P] that emphasise something."""
    log_alpha = math.log(alpha)
    batch, prompt = emphasis.shape
    has_span = jnp.any(emphasis > 0, axis=-1, keepdims=True)
    down = (emphasis <= 0) & has_span  # [B, P]

    def steer(logits: jax.Array, path: str) -> jax.Array:
        if logits.shape[0] != batch:
            raise ValueError(f"spans cover {batch} rows; the model call at {path} has batch {logits.shape[0]}")
        keys = logits.shape[-1]
        scaled = down[:, :keys] if keys <= prompt else jnp.pad(down, ((0, 0), (0, keys - prompt)))
        return jnp.where(scaled[:, None, None, :], logits + jnp.asarray(log_alpha, logits.dtype), logits)

    return steer


@register(
    "pasta",
    paper="PASTA (Zhang et al. 2023, arXiv 2311.02262), the operator of [161] AutoPASTA",
    fidelity="official-code",
    reference=(
        "QingruZhang/PASTA pastalib/pasta.py: edit_attention_mask adds log(alpha) to the attention mask of the "
        "selected heads at the prompt keys outside the emphasised range (scale_position='exclude', all queries, keys "
        "< input_len); head_config {layer: heads} from per-head profiling (paper section 3.2). Several spans are "
        "one emphasised set here (the code's multi-section variant adds log(alpha) once per span)"
    ),
    no_op="alpha=1 (bit-identical), or head_config={} (no rules)",
)
@dataclasses.dataclass(frozen=True)
class Pasta:
    """head_config: {layer: heads} to steer; alpha in (0, 1]: the factor on the non-emphasised prompt tokens."""

    head_config: Mapping[int, Sequence[int]]
    alpha: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha!r} must be a number in (0, 1] (1: no steering)")

    def rules(self, model: Any, spans: Any, *, seq_len: int | None = None) -> tuple[iv.Rule, ...]:
        """Rules for `attn.intervene`: steer the selected heads of `model` toward `spans`.

        spans: a mask [B, P] or per-row spans (then seq_len=P is required). ValueError for a layer or head outside
        the model, a span outside the sequence, or a steered layer without attention weights.
        """
        num_layers, num_heads = model_geometry(model)
        config = check_head_config(self.head_config, num_layers, num_heads)
        require_weights(model, "pasta", list(config))
        if hasattr(spans, "shape"):
            if len(spans.shape) != 2:
                raise ValueError(f"spans as a mask must be [batch, prompt_len]; got shape {tuple(spans.shape)}")
            emphasis = span_mask(spans, spans.shape[0], spans.shape[1])
        else:
            if not isinstance(seq_len, int) or seq_len < 1:
                raise ValueError(f"seq_len={seq_len!r}: per-row spans need the prompt length (an int >= 1)")
            emphasis = span_mask(spans, len(spans), seq_len)
        steer = steering_hook(emphasis, float(self.alpha))
        return tuple(
            iv.hook("attention_logits", steer, layers=[layer], heads=list(heads), module=SELF_ATTENTION)
            for layer, heads in config.items()
        )


def select_heads(score: Callable[[HeadConfig], float], model: Any, k: int) -> tuple[HeadConfig, Any]:
    """PASTA's model profiling: score each head steered alone (score({layer: (head,)}) -> task accuracy on a small
    set), keep the k best. Returns ({layer: heads}, scores float64 [L, H])."""
    num_layers, num_heads = model_geometry(model)
    scores = profile_heads(score, num_layers, num_heads)
    return top_heads(scores, k), scores
