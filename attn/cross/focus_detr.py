"""`focus_detr`: foreground token selection with dual attention; only the top-scored tokens query the encoder layer.

Paper: "Less is More: Focus Attention for Efficient DETR" (Zheng et al., ICCV 2023; official code in detrex,
projects/focus_detr/modeling/focus_detr_transformer.py: `MaskPredictor`, `focus_rho`, `cascade_set`; and
transformer_layer.py: the "OESM" step of `Focus_DETR_BaseTransformerLayer`).

A foreground token selector scores every token; the top Kf = ceil(keep_ratio * T) tokens are the foreground and are
the only queries of the layer (the others are not updated: their output is 0, so the block's residual keeps them).
Among the foreground tokens, the top Ko object tokens (by the multi-category score times the foreground score) first
attend to each other (the dual attention's self-attention, with its own projections), then every foreground token
attends to all tokens:

    s_t   = MLP(concat(h_t[:, :E/2], mean_u h_u[:, E/2:])),  h = GELU(W1 LayerNorm(x))        foreground score [B, T]
    F     = top-Kf_t s_t                                       (foreground tokens, [B, Kf])
    m_f   = max_c sigmoid(W_c x_f) * sigmoid(s_f),  O = top-Ko_{f in F} m_f   (object tokens, [B, Ko])
    x_o  <- x_o + Attn(x_O -> x_O) * (1 + m_o - stop_gradient(m_o))   (object self-attention, o in O)
    o_f   = softmax_t(q(x_f) k(x_t)^T / sqrt(d)) v(x_t) * g_f,  o_t = 0 for t not in F                [B, T, H, D]
    g_f   = 1 + sigmoid(s_f) - stop_gradient(sigmoid(s_f))     (value 1: the scorer's gradient path)

Deviations from the paper, for a single-scale ViT encoder: (1) one feature scale, so no top-down modulation of the
scores across scales; (2) the paper trains the scorer with foreground labels (focal loss on the tokens inside boxes) and
the multi-category predictor with class labels; here both learn from the task loss, the scorer through the
straight-through gate g, the class predictor W_c through the like gate on the object outputs (forward values exactly 1);
the scores are sown as intermediates `foreground_scores` [B, T] for a caller that has labels; (3) the official
deformable attention samples a few points per query; this layer's foreground queries attend every token densely (the
token-selection saving stays: Kf x T instead of T x T logits); (4) the block's MLP still runs on every token (the
official layer applies its FFN to the foreground tokens only).
Official values: keep ratio (focus_rho) 0.5 of the tokens, int(rho T) + 1, with a per-layer cascade
(1.0, 0.8, 0.6, 0.6, 0.4, 0.2) of it; 300 object tokens out of ~15k.

Shapes: x [B, T, E] -> [B, T, E]. Cost: Kf x T logits for the main attention plus Ko x Ko for the object attention
plus O(B T E) for the scorer.

Exact reduction: keep_ratio = 1.0 with object_tokens = 0 is `softmax` self-attention with position="none" and the
same query/key/value/out parameters (every token is a query; the gate's value is 1).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall, OutputProjection
from attn.core.pipeline import mix, scores, softmax_weights
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import choice, in_range, non_negative_int, positive_int
from attn.models.layers import make_norm
from attn.registry import register

Array = jax.Array


def gather_tokens(x: Array, index: Array) -> Array:
    """Rows `index` int [B, K] of x [B, T, ...] -> [B, K, ...]."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)


def scatter_tokens(base: Array, index: Array, rows: Array) -> Array:
    """base [B, T, ...] with rows [B, K, ...] written at `index` int [B, K] (distinct per row)."""
    return jax.vmap(lambda b, i, r: b.at[i].set(r))(base, index, rows)


def logical_dense(features: int, axes: tuple[str | None, str | None], *, dtype: Any, param_dtype: Any, name: str):
    """nn.Dense (with bias) whose kernel and bias carry the logical axis names `axes` (kernel) and axes[1:] (bias)."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


def selected_count(keep_ratio: float, length: int) -> int:
    """Foreground tokens Kf = ceil(keep_ratio * length), at least 1."""
    return max(1, min(length, math.ceil(keep_ratio * length - 1e-9)))


def select_foreground(scores_: Array, keep: int) -> Array:
    """Indices int32 [B, keep] of the top-`keep` scores [B, T] (highest first; no gradient through the choice)."""
    if not 1 <= keep <= scores_.shape[-1]:
        raise ValueError(f"keep={keep} must be in [1, {scores_.shape[-1]}] (the number of tokens)")
    return jax.lax.top_k(jax.lax.stop_gradient(scores_), keep)[1].astype(jnp.int32)


class ForegroundScorer(nn.Module):
    """The foreground token selector's score MLP: x [B, T, E] -> float32 [B, T].

    LayerNorm -> Dense(hidden) -> GELU; the first half of the features stays per token, the second half is averaged
    over the tokens (a global context); then Dense(hidden/2) -> GELU -> Dense(hidden/4) -> GELU -> Dense(1).
    """

    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def dense(features: int, axes: tuple[str | None, str | None], name: str) -> nn.Dense:
            return logical_dense(features, axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        h = make_norm("layernorm", dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        h = nn.gelu(dense(self.hidden, ("embed", "mlp"), "in")(h))
        half = self.hidden // 2
        glob = jnp.broadcast_to(jnp.mean(h[..., half:], axis=1, keepdims=True), h[..., half:].shape)
        h = jnp.concatenate([h[..., :half], glob], axis=-1)
        h = nn.gelu(dense(max(1, self.hidden // 2), ("mlp", None), "hidden_0")(h))
        h = nn.gelu(dense(max(1, self.hidden // 4), (None, None), "hidden_1")(h))
        return dense(1, (None, None), "score")(h)[..., 0].astype(jnp.float32)


@register(
    "focus_detr",
    family="cross",
    paper="Less is More: Focus Attention for Efficient DETR",
    catalog=182,
    op=select_foreground,
    input_kind="sequence",
    supports_causal=False,
    supports_decode=False,
    summary="foreground token selector: only the top-scored tokens query; top object tokens also self-attend",
    fidelity="official-code",
    reference="detrex projects/focus_detr (focus_detr_transformer.py: MaskPredictor local/global score MLP, "
    "focus_rho=0.5 top-k foreground queries scattered back; transformer_layer.py OESM: top-k of max class score x "
    "foreground score self-attend); arXiv 2307.12612; single scale, task-loss-trained scorer (see docstring)",
    validators={
        **SOFTMAX_VALIDATORS,
        "position": choice("none"),
        "keep_ratio": in_range(0.0, 1.0, low_inclusive=False),
        "object_tokens": non_negative_int,
        "object_classes": positive_int,
        "scorer_hidden": positive_int,
    },
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "position": "'none' only (ViTs add learned positions to the tokens)",
        "keep_ratio": "share of tokens kept as foreground queries, ceil(keep_ratio * T) (1.0 with object_tokens=0: "
        "plain softmax self-attention)",
        "object_tokens": "Ko: foreground tokens that also self-attend among themselves (0 = off; at most Kf)",
        "object_classes": "outputs of the multi-category score predictor that ranks the object tokens",
        "scorer_hidden": "hidden width of the foreground score MLP",
    },
)
class FocusAttention(SoftmaxAttentionLayer):
    """Softmax attention from the top-scored tokens of x [B, T, E] to all of x; other tokens get 0. -> [B, T, E]."""

    position: str = "none"
    keep_ratio: float = 0.5
    object_tokens: int = 0
    object_classes: int = 4
    scorer_hidden: int = 32

    # The weights are [B, H, Kf, T] over the selected queries: interventions select heads, not query positions.
    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    def setup(self) -> None:
        # Defined here so that project_qkv and prepare share one scorer (called twice, one set of parameters).
        self.scorer = ForegroundScorer(self.scorer_hidden, dtype=self.dtype, param_dtype=self.param_dtype)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.context is not None:
            raise ValueError(f"focus_detr is encoder self-attention; got a context of shape {call.context.shape}")
        if call.decode:
            raise ValueError("focus_detr does not decode (decode=True): it is an encoder layer")
        if call.mask is not None:
            raise ValueError(f"focus_detr takes no mask (got {call.mask!r}): every token is a key")
        if call.positions is not None:
            raise ValueError("focus_detr takes no positions (position='none'; add positions to the tokens)")
        keep = selected_count(self.keep_ratio, call.x.shape[1])
        if self.object_tokens > keep:
            raise ValueError(
                f"object_tokens={self.object_tokens} exceeds the {keep} foreground tokens (keep_ratio="
                f"{self.keep_ratio} of {call.x.shape[1]}); expected object_tokens <= ceil(keep_ratio * T)"
            )

    def foreground(self, x: Array) -> tuple[Array, Array]:
        """(scores float32 [B, T], foreground indices int32 [B, Kf])."""
        score = self.scorer(x)
        return score, select_foreground(score, selected_count(self.keep_ratio, x.shape[1]))

    def object_attention(self, tokens: Array, foreground_scores: Array) -> Array:
        """The dual attention's first half: the top `object_tokens` of tokens [B, Kf, E] (ranked by the max class
        sigmoid times the foreground sigmoid) attend to each other; their outputs are added to them. -> [B, Kf, E]."""
        classes = logical_dense(
            self.object_classes, ("embed", None), dtype=self.dtype, param_dtype=self.param_dtype, name="classes"
        )
        rank = jnp.max(jax.nn.sigmoid(classes(tokens).astype(jnp.float32)), -1) * jax.nn.sigmoid(foreground_scores)
        index = select_foreground(rank, self.object_tokens)
        objects = gather_tokens(tokens, index)
        q, k, v = (self.dense_heads(objects, self.num_heads, "heads", f"object_{n}") for n in ("query", "key", "value"))
        weights, _ = softmax_weights(scores(q, k, scale=self.scale))
        heads = mix(weights, v).astype(tokens.dtype)
        out = OutputProjection(
            tokens.shape[-1],
            use_bias=self.output_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="object_out",
        )(heads)
        chosen = gather_tokens(rank, index)
        straight = (1.0 + chosen - jax.lax.stop_gradient(chosen)).astype(tokens.dtype)  # value 1, trains `classes`
        return scatter_tokens(tokens, index, objects + out.astype(tokens.dtype) * straight[..., None])

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        """q [B, Kf, H, D] from the (object-attended) foreground tokens; k, v [B, T, KVH, D] from all of x."""
        score, index = self.foreground(x)
        tokens = gather_tokens(x, index)
        if self.object_tokens:
            tokens = self.object_attention(tokens, gather_tokens(score, index))
        q = self.dense_heads(tokens, self.num_heads, "heads", "query")
        k = self.dense_heads(x, self.kv_heads, "kv_heads", "key")
        v = self.dense_heads(x, self.kv_heads, "kv_heads", "value")
        return q, k, v

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, Any]:
        score, index = self.foreground(call.x)
        self.sow("intermediates", "foreground_scores", score)
        batch, length = call.x.shape[0], call.x.shape[1]
        kv_positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        gate = jax.nn.sigmoid(gather_tokens(score, index))
        call = call.replace(q_positions=index, kv_positions=kv_positions, state=(index, gate))
        return q, k, v, call

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """Foreground outputs [B, Kf, H, D], times the straight-through gate, scattered into zeros [B, T, H, D]."""
        index, gate = call.state
        y = super().attend(q, k, v, call)
        straight = (1.0 + gate - jax.lax.stop_gradient(gate)).astype(y.dtype)
        y = y * straight[:, :, None, None]
        base = jnp.zeros((y.shape[0], call.x.shape[1], *y.shape[2:]), y.dtype)
        return scatter_tokens(base, index, y)
