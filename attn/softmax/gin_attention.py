"""`gin_attention`: GIN-Attention, the attention matrix as a per-head graph adjacency with a GIN node update.

Paper: "Graph-Aware Isomorphic Attention for Adaptive Dynamics in Transformers" (Buehler, 2025; arXiv 2501.02393;
code github.com/lamm-mit/Graph-Aware-Transformers, `LlamaAttentionGIN` in src/xgpt/Attention_GNN.py).

Per head h (tokens are nodes, the causal attention matrix is a weighted directed adjacency):

    A_h     = softmax(alpha * q_h k_g^T / sqrt(d) + mask)           alpha: learnable sharpening scalar (sharpening)
    A_h    <- phi(A_h - tau) * mask                                  optional thresholding (threshold_mode)
    z_i     = (1 + eps_h) h_i + sum_j A_h[i, j] h_j                  GIN aggregation; h = value vectors of head h
    o_i     = MLP_h(z_i) = W2_h silu(RMSNorm(W1_h z_i))              per-head MLP, D -> m D -> D (gin_mlp)
    y       = concat_h(o_h) W_o

phi for threshold_mode: "relu" relu(a - tau), "silu" silu(a - tau), "softplus" softplus(a - tau), "sigmoid"
sigmoid(beta (a - tau)) with beta = 10, "binary" 1[a > tau] (no gradient through A). After phi the mask is applied
again (the code's "ensure causality" step), so masked pairs stay 0. tau is `threshold` (learnable with
learnable_threshold). This is the paper's sparsified adjacency of Sparse-GIN; the paper's fine-tuning variant
(a GIN branch added to a frozen pretrained attention output with a trainable scale) is a training recipe on top of
this layer and is not a separate mechanism here.

Paper vs official code (both checked; we follow the paper's equation where they differ):
  - self term: the paper's GIN update is (1 + eps) h_i; the code computes eps * h_i with eps initialised at 0.
    Here eps is per head, initialised at `epsilon_init` (0.0: the paper/GIN default; -1.0 reproduces the code's
    initial state).
  - node features: the code uses the layer input itself, split into heads, as h (no value projection);
    node_features="input" does that (needs num_kv_heads * head_dim == embed), "value" (default) uses v = x W_v.
  - MLP: Linear(D, mD) -> dropout -> RMSNorm(mD) -> SiLU -> Linear(mD, D), m = mlp_multiplier (code default 2);
    the dropout inside it is omitted. The code also offers an MLP pair-scoring adjacency and differential
    attention; those are not implemented.

In the layer, A is the attention pipeline's weights (attn/core/softmax_layer.py): the sharpening scales q in
`prepare`, the thresholding is the `prob_mod` stage, and `attend` adds the self term and the MLP to the pipeline's
A h. Without thresholding a plain call takes the fused softmax path; captures and interventions on
`attention_logits` / `attention_weights` see (and change) the adjacency.

Shapes: x [B, T, E] -> [B, T, E]; adjacency [B, H, T, T]. Time O(B H T^2 D + B T H m D^2), memory O(B H T^2).
The update of token i only reads A[i, :] and h at visible keys, so causal masks, padding, GQA/MQA (A_h reads the
values of kv head g = h // (H / KVH)) and the KV cache work as in `softmax`.

Identity (tested): gin_mlp=False, sharpening=False, threshold_mode="none" give y = (A V + (1 + eps) V) W_o, so
epsilon_init=-1 is exactly the `softmax` layer with the same q/k/v/o parameters, and epsilon_init=0 is `softmax`
plus (x W_v) W_o (the GIN self-loop).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.validation import check_choice, choice, positive
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

POSITIONS = ("rope", "none")
THRESHOLD_MODES = ("none", "relu", "silu", "softplus", "sigmoid", "binary")
NODE_FEATURES = ("value", "input")
SIGMOID_SHARPNESS = 10.0  # the official code's beta for the sigmoid threshold


def threshold_adjacency(adjacency: Array, mode: str, threshold: Array | float) -> Array:
    """phi(A - tau) for the threshold modes (see the module doc). adjacency float32 [B, H, Tq, Tk]."""
    check_choice("threshold_mode", mode, THRESHOLD_MODES)
    shifted = adjacency - threshold
    if mode == "none":
        return adjacency
    if mode == "relu":
        return jax.nn.relu(shifted)
    if mode == "silu":
        return jax.nn.silu(shifted)
    if mode == "softplus":
        return jax.nn.softplus(shifted)
    if mode == "sigmoid":
        return jax.nn.sigmoid(SIGMOID_SHARPNESS * shifted)
    return (shifted > 0).astype(adjacency.dtype)


@register(
    "gin_attention",
    family="softmax",
    paper="Graph-Aware Isomorphic Attention for Adaptive Dynamics in Transformers",
    catalog=139,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="GIN-Attention: softmax attention as a graph adjacency, GIN update MLP((1+eps) h + A h) per head",
    option_docs={
        "position": "'rope' or 'none'",
        "gin_mlp": "apply the per-head GIN MLP (False: identity, for the reduction to softmax)",
        "mlp_multiplier": "GIN MLP hidden width = mlp_multiplier * head_dim (official default 2)",
        "epsilon_init": "initial per-head GIN eps in (1 + eps) h_i (0.0 = GIN default; -1.0 = no self term)",
        "sharpening": "learnable scalar alpha multiplying the logits before the softmax",
        "sharpening_init": "initial alpha",
        "threshold_mode": "adjacency sparsification: 'none', 'relu', 'silu', 'softplus', 'sigmoid' or 'binary'",
        "threshold": "threshold tau of threshold_mode",
        "learnable_threshold": "make tau a trained parameter",
        "node_features": "'value' (h = x W_v) or 'input' (h = x split into heads, as the official code)",
    },
    fidelity="paper",
    reference="arXiv 2501.02393: GIN update (1 + eps) h_i + sum_j A_ij h_j over the (sparsified) attention adjacency; "
    "compared with github.com/lamm-mit/Graph-Aware-Transformers LlamaAttentionGIN, the paper followed where they "
    "differ",
    validators={
        "position": choice(*POSITIONS),
        "mlp_multiplier": positive,
        "threshold_mode": choice(*THRESHOLD_MODES),
        "node_features": choice(*NODE_FEATURES),
    },
    has_attention_weights=True,
)
class GINAttention(MultiHeadAttention):
    """GIN-Attention. x [B, T, E] -> [B, T, E] (self-attention)."""

    gin_mlp: bool = True
    mlp_multiplier: float = 2.0
    epsilon_init: float = 0.0
    sharpening: bool = True
    sharpening_init: float = 1.0
    threshold_mode: str = "none"
    threshold: float = 0.2
    learnable_threshold: bool = False
    node_features: str = "value"

    def validate(self, call: AttentionCall) -> None:
        if call.cross:
            raise ValueError(
                "gin_attention is self-attention (the GIN self term (1 + eps) h_i needs the query token's own node "
                f"features); got a context of shape {call.context.shape}"
            )
        super().validate(call)
        if self.node_features == "input" and self.kv_heads * self.head_dim != call.x.shape[-1]:
            raise ValueError(
                f"node_features='input' splits x into heads: num_kv_heads * head_dim = {self.kv_heads * self.head_dim}"
                f" must equal the embed size {call.x.shape[-1]}"
            )

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        q = self.dense_heads(x, self.num_heads, "heads", "query")
        k = self.dense_heads(x, self.kv_heads, "kv_heads", "key")
        if self.node_features == "input":
            v = x.reshape(*x.shape[:2], self.kv_heads, self.head_dim)
        else:
            v = self.dense_heads(x, self.kv_heads, "kv_heads", "value")
        if self.qk_norm:
            q, k = self.head_norm(q, "query_norm"), self.head_norm(k, "key_norm")
        return q, k, v

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The `softmax` layer's RoPE and cache, then the sharpening alpha q (alpha q . k = the sharpened logits)."""
        q, k, v, call = super().prepare(q, k, v, call)
        if self.sharpening:
            alpha = self.param(
                "sharpening", nn.with_logical_partitioning(nn.initializers.constant(self.sharpening_init), ()), ()
            )
            q = q * jnp.asarray(alpha, q.dtype)
        return q, k, v, call

    @classmethod
    def overrides_stages(cls) -> bool:
        # prob_mod is the identity unless threshold_mode is set, and explicit_reason asks for the stages then
        return False

    def explicit_reason(self, call: AttentionCall) -> str | None:
        return "" if self.threshold_mode != "none" else super().explicit_reason(call)

    def prob_mod(self, weights: Array, call: AttentionCall) -> Array:
        """The sparsified adjacency phi(A - tau), masked again (the official code's "ensure causality" step)."""
        if self.threshold_mode == "none":
            return weights
        tau = self.threshold
        if self.learnable_threshold:
            tau = self.param(
                "threshold", nn.with_logical_partitioning(nn.initializers.constant(self.threshold), ()), ()
            )
        adjacency = threshold_adjacency(weights, self.threshold_mode, tau)
        allowed = self.full_mask(call)
        if allowed is None:
            return adjacency
        return jnp.where(allowed.materialize(*weights.shape[-2:], q_offset=call.q_offset), adjacency, 0.0)

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, Tq, H, D], k/v [B, Tk, KVH, D] (the whole cache when decoding) -> GIN output [B, Tq, H, D]: the
        adjacency aggregation A h (the pipeline's stages, or the fused path when nothing asks for A), the self term
        (1 + eps) h_i and the per-head MLP."""
        heads, q_len = self.num_heads, q.shape[1]
        aggregated = super().attend(q, k, v, call)
        # The node's own features: the query tokens' values (rows q_offset.. of the cache when decoding).
        own = jax.lax.dynamic_slice_in_dim(v, call.q_offset, q_len, axis=1)
        own = jnp.repeat(own, heads // v.shape[2], axis=2)
        eps = self.param(
            "epsilon", nn.with_logical_partitioning(nn.initializers.constant(self.epsilon_init), ("heads",)), (heads,)
        )
        z = aggregated + (1.0 + jnp.asarray(eps, q.dtype))[:, None] * own.astype(q.dtype)
        return self.gin_update(z) if self.gin_mlp else z

    def gin_update(self, z: Array) -> Array:
        """Per-head MLP_h: [B, T, H, D] -> [B, T, H, D], D -> m D -> D with RMSNorm and SiLU."""
        heads, dim = self.num_heads, self.head_dim
        hidden = max(1, int(round(self.mlp_multiplier * dim)))

        def weight(name, shape, axes, init):
            return jnp.asarray(
                self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype), self.dtype
            )

        dense = nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
        w1 = weight("gin_in", (heads, dim, hidden), ("heads", "head_dim", "mlp"), dense)
        w2 = weight("gin_out", (heads, hidden, dim), ("heads", "mlp", "head_dim"), dense)
        norm_scale = weight("gin_norm", (heads, hidden), ("heads", "mlp"), nn.initializers.ones)
        h = jnp.einsum("bthd,hdm->bthm", z.astype(self.dtype), w1)
        if self.use_bias:
            h = h + weight("gin_in_bias", (heads, hidden), ("heads", "mlp"), nn.initializers.zeros)
        h32 = h.astype(jnp.float32)
        h = (h32 * jax.lax.rsqrt(jnp.mean(h32**2, axis=-1, keepdims=True) + 1e-6)).astype(self.dtype) * norm_scale
        out = jnp.einsum("bthm,hmd->bthd", jax.nn.silu(h), w2)
        if self.use_bias:
            out = out + weight("gin_out_bias", (heads, dim), ("heads", "head_dim"), nn.initializers.zeros)
        return out
