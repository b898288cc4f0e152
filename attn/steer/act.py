"""ACT, the attention calibration technique [61] ("Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large
Language Models without Training through Attention Calibration", Yu et al., ICML 2024).

Attention sinks appear not only at the first token: later tokens can also draw large attention (hidden sinks), and
in some heads that hurts accuracy. In each calibrated head, on the input at hand (causal self-attention weights A
[Tq, Tk], queries at absolute positions o + i with o = Tk - Tq):

    m_j = sum_i A_ij / n_j,         n_j = #{i : o + i >= j}        mean attention key j receives from the queries
                                                                     that can see it
    S   = {j > 0 : m_j > threshold}                                 hidden sinks (the first token is never one)
    A'_ij = beta A_ij                                      j in S   sink attention scaled down by beta
    A'_ij = A_ij + (1 - beta) (sum_{s in S} A_is) A_ij / sum_{k not in S} A_ik      j not in S
                                                                     the freed mass spread over the other keys in
                                                                     proportion to their attention

so every row keeps its mass (masked keys have A = 0 and receive nothing). A row whose attention lies only on
sinks has nowhere to move it and is left unchanged. Heads are chosen offline on a calibration set: each candidate
head is calibrated alone, and the heads that raise the task score above the uncalibrated model are kept
(`search_heads`).

No-op: beta = 1 (bit-identical), or an empty head_config (no rules). Shapes: the rule acts on attention_weights
[B, H, Tq, Tk] of the selected self-attention layers; `hidden_sinks` gives bool [B, H, Tk].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn import interventions as iv
from attn.steer.common import SELF_ATTENTION, HeadConfig, check_head_config, model_geometry, require_weights
from attn.steer.registry import register


def visible_queries(q_len: int, kv_len: int) -> jax.Array:
    """n_j: how many of the q_len causal queries (the last q_len positions of kv_len) see key j: int32 [kv_len]."""
    offset = kv_len - q_len
    return jnp.clip(q_len - jnp.maximum(jnp.arange(kv_len) - offset, 0), 0, q_len)


def hidden_sinks(weights: jax.Array, threshold: float) -> jax.Array:
    """S per head: keys j > 0 whose mean received attention m_j exceeds `threshold`. weights [B, H, Tq, Tk] ->
    bool [B, H, Tk]."""
    q_len, kv_len = weights.shape[-2:]
    count = visible_queries(q_len, kv_len)
    mean = jnp.sum(weights, axis=-2) / jnp.maximum(count, 1).astype(weights.dtype)
    return (mean > threshold) & (jnp.arange(kv_len) > 0) & (count > 0)


def calibrate(weights: jax.Array, threshold: float, beta: float) -> jax.Array:
    """ACT on weights [B, H, Tq, Tk] (every head given): the equations of the module docstring."""
    sink = hidden_sinks(weights, threshold)[..., None, :]  # [B, H, 1, Tk]
    on_sinks = jnp.where(sink, weights, 0.0)
    rest = weights - on_sinks
    freed = (1.0 - beta) * jnp.sum(on_sinks, axis=-1, keepdims=True)
    rest_mass = jnp.sum(rest, axis=-1, keepdims=True)
    spread = rest + freed * rest / jnp.where(rest_mass > 0, rest_mass, 1.0)
    out = jnp.where(sink, beta * weights, spread)
    return jnp.where(rest_mass > 0, out, weights)


@register(
    "act",
    paper="[61] Unveiling and Harnessing Hidden Attention Sinks (ACT, Yu et al., ICML 2024)",
    fidelity="official-code",
    reference=(
        "GATECH-EIC/ACT models/llama_modelling_aug.py atten_process_eval: column sums of the post-softmax map divided "
        "by (T - j), threshold THRES=0.1, sink columns times BETA=0.4, the freed mass (1-beta) * row sink mass spread "
        "by the row's non-sink attention ratios; heads from the per-head calibration search of scripts/calibration.sh "
        "(keep heads that raise calibration accuracy). Differences: the first token is excluded by position (the code "
        "drops the first detected sink, which is the first token whenever it is one), rows with no non-sink mass are "
        "left as they are (the code divides by zero there), and the calibration search may include every layer (the "
        "code searches layers 2..30 of 32)"
    ),
    no_op="beta=1 (bit-identical), or head_config={} (no rules)",
)
@dataclasses.dataclass(frozen=True)
class Act:
    """head_config: {layer: heads} to calibrate; beta in [0, 1]: the factor on hidden-sink attention; threshold in
    (0, 1): the mean received attention above which a key (other than the first) is a sink."""

    head_config: Mapping[int, Sequence[int]]
    beta: float = 0.4
    threshold: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta={self.beta!r} must be a number in [0, 1] (1: no calibration)")
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not 0.0 < self.threshold < 1.0
        ):
            raise ValueError(f"threshold={self.threshold!r} must be a number in (0, 1)")

    def rules(self, model: Any) -> tuple[iv.Rule, ...]:
        """Rules for `attn.intervene` calibrating the selected heads of `model`. ValueError for a layer or head
        outside the model, or a calibrated layer without attention weights."""
        num_layers, num_heads = model_geometry(model)
        config = check_head_config(self.head_config, num_layers, num_heads)
        require_weights(model, "act", list(config))
        threshold, beta = float(self.threshold), float(self.beta)

        def fn(weights: jax.Array, path: str) -> jax.Array:
            return calibrate(weights, threshold, beta)

        return tuple(
            iv.hook("attention_weights", fn, layers=[layer], heads=list(heads), module=SELF_ATTENTION)
            for layer, heads in config.items()
        )


def search_heads(
    score: Callable[[HeadConfig], float], model: Any, *, layers: Sequence[int] | None = None
) -> tuple[HeadConfig, Any]:
    """ACT's calibration search: calibrate each head of `layers` (default all) alone, keep those whose score beats
    score({}) (the uncalibrated model). Returns ({layer: heads}, gains float64 [L, H], NaN where not searched)."""
    num_layers, num_heads = model_geometry(model)
    layers = list(range(num_layers)) if layers is None else list(layers)
    check_head_config({layer: () for layer in layers}, num_layers, num_heads)
    base = score({})
    gains = np.full((num_layers, num_heads), np.nan)
    for layer in layers:
        gains[layer] = [score({layer: (head,)}) - base for head in range(num_heads)]
    keep = {layer: tuple(h for h in range(num_heads) if gains[layer, h] > 0) for layer in layers}
    return {layer: heads for layer, heads in keep.items() if heads}, gains
