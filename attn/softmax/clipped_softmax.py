"""`clipped_softmax`: clipped softmax and the per-head conditional gate of the outlier-free transformer.

Paper: "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing" (Bondarenko, Nagel,
Blankevoort, NeurIPS 2023; code github.com/Qualcomm-AI-research/outlier-free-transformers).

Heads that want to "do nothing" push softmax inputs to extremes to reach exact zeros, which creates activation
outliers. Two independent fixes, both here:

Clipped softmax (stretch, then clip, so exact 0 and 1 are reachable with finite logits):

    p      = softmax(scale q k^T + bias + mask)                    (the reference softmax)
    p'     = clip((zeta - gamma) * p + gamma, 0, 1)                zeta >= 1, gamma <= 0
    o      = p' v

  The paper ties gamma to the sequence length, gamma = -alpha / T (option `alpha`; here T is the number of keys
  of the call, i.e. the cache length when decoding); its BERT runs use gamma = -0.025, zeta = 1 ("clipped(-.025:1)").
  Rows of p' need not sum to one: a row can be all zeros (the head's no-op).

Gated attention (conditional per-token gate, applied to the per-head output before the output projection):

    pi_h(x_t) = sigmoid(G_h(x_t,h))    G_h: Linear(E/H -> 1) on the h-th channel chunk of x_t      gate="linear"
                                       or an MLP E/H -> E/(4H) -> 1 with ReLU                       gate="mlp"
                                       or one Linear(E -> H) on all features                        gate="all_features"
    y_t       = concat_h(pi_h(x_t) * o_h,t) W_o

  The gate bias starts at logit(gate_init) (the paper's pi_init; its OPT runs use 0.25).

Shapes: x [B, T, E] -> [B, T, E] (the per-chunk gates need E % H == 0); probabilities float32 [B, H, T, T].
Time O(B H T^2 D), memory O(B H T^2) (the probabilities are materialised: the clip is not an online softmax).

Reduction to softmax: zeta = 1, gamma = 0 (and alpha None), gate = "none" is exactly the `softmax` layer with the
same parameters (clip(p, 0, 1) = p).

Probabilities times values (with GQA grouping) is `attn.core.pipeline.grouped_weighted_values`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.pipeline import grouped_weighted_values
from attn.core.validation import choice, in_range, non_negative, optional
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

GATES = ("none", "linear", "mlp", "all_features")


def check_stretch(zeta: float, gamma: float) -> None:
    if not zeta >= 1.0:
        raise ValueError(f"zeta={zeta!r} must be >= 1 (the clipped softmax stretch factor; 1 = no stretch)")
    if not gamma <= 0.0:
        raise ValueError(f"gamma={gamma!r} must be <= 0 (the clipped softmax stretch factor; 0 = no stretch)")


def clipped_softmax_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    zeta: float = 1.0,
    gamma: float = 0.0,
    causal: bool = False,
    mask: Mask | Array | None = None,
    bias: Array | None = None,
    window: int | tuple[int, int] | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    q_offset: Any = 0,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, dict[str, Array]]:
    """Attention with clipped softmax weights clip((zeta - gamma) softmax(logits) + gamma, 0, 1).

    Args:
      q: [B, Tq, H, D]; k: [B, Tk, KVH, D]; v: [B, Tk, KVH, Dv] (H a multiple of KVH).
      zeta: stretch factor >= 1 (weights near 1 clip to exactly 1). gamma: stretch factor <= 0 (weights below
        -gamma / (zeta - gamma) clip to exactly 0).
      causal, mask, bias, window, segment_ids, scale, softcap, q_offset, implementation: as in
        `attn.functional.softmax_attention` (which computes the softmax probabilities).
      dropout_rate, dropout_rng: dropout on the clipped weights.
      return_probs: also return {"probs": the clipped weights, float32 [B, H, Tq, Tk]}.
    Returns:
      [B, Tq, H, Dv] in q.dtype, or (out, aux).
    """
    check_stretch(zeta, gamma)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r} must be in [0, 1)")
    _, aux = F.softmax_attention(
        q,
        k,
        v,
        causal=causal,
        mask=mask,
        bias=bias,
        window=window,
        segment_ids=segment_ids,
        scale=scale,
        softcap=softcap,
        q_offset=q_offset,
        return_probs=True,
        implementation=implementation,
    )  # the unused softmax output is dead code under jit
    probs = jnp.clip((zeta - gamma) * aux["probs"] + gamma, 0.0, 1.0)
    attended = probs
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        attended = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = grouped_weighted_values(attended, v).astype(q.dtype)
    return (out, {"probs": probs}) if return_probs else out


class PerHeadGate(nn.Module):
    """The outlier-free transformer's conditional per-token gate: x [B, T, E] -> pi [B, T, H, 1] in (0, 1)."""

    num_heads: int
    kind: str = "linear"
    init_probability: float = 0.25
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        heads, features = self.num_heads, x.shape[-1]
        bias_init = nn.initializers.constant(math.log(self.init_probability / (1.0 - self.init_probability)))
        param = lambda name, init, shape, names: jnp.asarray(
            self.param(name, nn.with_logical_partitioning(init, names), shape, self.param_dtype), jnp.float32
        )
        x = x.astype(jnp.float32)
        if self.kind == "all_features":
            kernel = param("kernel", nn.initializers.lecun_normal(), (features, heads), ("embed", "heads"))
            logits = x @ kernel + param("bias", bias_init, (heads,), ("heads",))
            return jax.nn.sigmoid(logits)[..., None]
        if features % heads:
            raise ValueError(
                f"clipped_softmax gate={self.kind!r} splits x into num_heads={heads} chunks, but its feature size "
                f"{features} is not divisible by {heads}; use gate='all_features'"
            )
        chunk = features // heads
        xh = x.reshape(*x.shape[:-1], heads, chunk)  # [B, T, H, E/H]
        fan_in = nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
        if self.kind == "linear":
            kernel = param("kernel", fan_in, (heads, chunk, 1), ("heads", "head_dim", None))
        else:  # "mlp": E/H -> E/(4H) -> 1 per head, as in the paper's MLP gate
            hidden = max(chunk // 4, 1)
            w1 = param("hidden_kernel", fan_in, (heads, chunk, hidden), ("heads", "head_dim", None))
            b1 = param("hidden_bias", nn.initializers.zeros, (heads, hidden), ("heads", None))
            xh = jax.nn.relu(jnp.einsum("bthc,hcm->bthm", xh, w1) + b1)
            kernel = param("kernel", fan_in, (heads, hidden, 1), ("heads", None, None))
        logits = jnp.einsum("bthc,hco->btho", xh, kernel) + param("bias", bias_init, (heads,), ("heads",))[:, None]
        return jax.nn.sigmoid(logits)


@register(
    "clipped_softmax",
    family="softmax",
    paper="Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing",
    catalog=118,
    op=clipped_softmax_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="clipped softmax clip((zeta-gamma) p + gamma, 0, 1) and an optional conditional per-head output gate",
    has_attention_weights=True,
    validators={
        "zeta": in_range(1.0, math.inf),
        "gamma": in_range(-math.inf, 0.0),
        "alpha": optional(non_negative),
        "gate": choice(*GATES),
        "gate_init": in_range(0.0, 1.0, low_inclusive=False, high_inclusive=False),
    },
    option_docs={
        "zeta": "clipped softmax stretch factor zeta >= 1 (1 = none)",
        "gamma": "clipped softmax stretch factor gamma <= 0 (0 = none); ignored when alpha is set",
        "alpha": "if set, gamma = -alpha / T with T the number of keys (the paper's length-scaled gamma)",
        "gate": "gated attention: 'none', 'linear' (per head on its x chunk), 'mlp' (per-head MLP) or 'all_features'",
        "gate_init": "initial gate probability pi_init in (0, 1) (the gate bias starts at logit(pi_init))",
    },
    fidelity="paper",
    reference="the paper's clipped softmax clip((zeta - gamma) p + gamma, 0, 1) with gamma = -alpha / T and its "
    "conditional gates (linear, MLP, all features); code github.com/Qualcomm-AI-research/outlier-free-transformers",
)
class ClippedSoftmaxAttention(MultiHeadAttention):
    """Softmax attention with clipped-softmax weights and an optional per-head gate. x [B, T, E] -> [B, T, E]."""

    zeta: float = 1.0
    gamma: float = -0.025
    alpha: float | None = None
    gate: str = "none"
    gate_init: float = 0.25

    def prob_mod(self, weights: Array, call: AttentionCall) -> Array:
        """clip((zeta - gamma) p + gamma, 0, 1), with gamma = -alpha / T when alpha is set (T = number of keys)."""
        check_stretch(self.zeta, self.gamma)
        gamma = self.gamma if self.alpha is None else -self.alpha / weights.shape[-1]
        return jnp.clip((self.zeta - gamma) * weights + gamma, 0.0, 1.0)

    def output_gate(self, x: Array) -> Array | None:
        if self.gate == "none":
            return None
        return PerHeadGate(
            self.num_heads, kind=self.gate, init_probability=self.gate_init, param_dtype=self.param_dtype, name="gate"
        )(x)
