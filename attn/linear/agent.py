"""`agent`: Agent Attention ([24] "Agent Attention: On the Integration of Softmax and Linear Attention").

Attention as a quadruple (Q, A, K, V): n agent tokens A (n << N) first aggregate the keys and values for the
queries, then broadcast the result back to every query. With sigma the softmax over the last axis and
s = 1 / sqrt(d):

    A   = pool(Q)                                   (adaptive average pooling of the queries to n tokens)
    V_A = sigma(s A K^T + B_1) V                    agent aggregation  [n, Dv]
    O   = sigma(s Q A^T + B_2) V_A + DWC(V)         agent broadcast, plus a depthwise convolution of V

which is the generalised linear attention phi_q(Q) phi_k(K)^T V with phi_q(Q) = sigma(s Q A^T + B_2) and
phi_k(K) = sigma(s A K^T + B_1)^T (each factor row-stochastic, so the N x N product is too). B_1 [n, N] and
B_2 [N, n] are the agent biases, learned at a low resolution R along the token axis and linearly interpolated to
the sequence length; DWC is a depthwise convolution over the tokens (kernel `dwc_kernel_size`) that the paper adds
to restore feature diversity. Facts from the official code (LeapLabTHU/Agent-Attention): agents are
AdaptiveAvgPool of the projected queries, the scale 1/sqrt(d) is applied in both softmaxes, the biases are
trunc-normal(0.02) initialised (7 x 7 maps bilinearly interpolated, plus row/column terms), DWC is 3 x 3.

Sequence vs spatial: this layer is the 1-D form for x [B, N, E]: pooling bins are contiguous runs of tokens, the
biases are interpolated along the sequence, the convolution is 1-D. The paper's vision models pool a 2-D grid
(7 x 7 agents), interpolate 2-D biases and use a 3 x 3 convolution on the patch grid; on a flattened grid the
1-D pooling mixes tokens of neighbouring rows instead.

Agent attention is not causal (every agent pools all queries and sees all keys), so it takes no causal mask and
has no decode mode. Padding (q_lengths / kv_lengths) is honoured: agents pool the valid queries only (bins over
each row's own length), padded keys get no weight, padded values are zeroed before the convolution.

Shapes: x [B, N, E] -> [B, N, E]. Time O(B H N n D), memory O(B H N n) (no N x N array, except for the
attention weights sown on request). With num_agents = N the pooling is the identity (A = Q); no setting reduces
it to softmax attention (it is a product of two softmaxes).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core.conv import HeadwiseDepthwiseConv, kernel_size_or_off
from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.linear_scan import linear_mask_parts, repeat_kv
from attn.core.masks import Mask
from attn.core.validation import check_qkv, optional, positive, positive_int, shape_of
from attn.registry import register

Array = jax.Array


def adaptive_pool_matrix(length: int, num_bins: int, lengths: Array | None = None) -> Array:
    """Averaging weights of adaptive average pooling, float32 [B|1, num_bins, length].

    Bin i of a row with valid length L covers tokens floor(i L / n) .. ceil((i + 1) L / n) - 1 (PyTorch's
    AdaptiveAvgPool rule), so with n == L it is the identity. `lengths` int [B] (None: every row has `length`).
    """
    valid = jnp.full((1,), length, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    bins = jnp.arange(num_bins, dtype=jnp.int32)[None, :]
    start = (bins * valid[:, None]) // num_bins
    end = -((-(bins + 1) * valid[:, None]) // num_bins)  # ceil
    tokens = jnp.arange(length, dtype=jnp.int32)[None, None, :]
    inside = (tokens >= start[..., None]) & (tokens < end[..., None])
    return inside.astype(jnp.float32) / jnp.maximum(end - start, 1)[..., None].astype(jnp.float32)


def interpolate_bias(bias: Array, length: int) -> Array:
    """Linear interpolation of the last axis of bias [..., R] to [..., length] (half-pixel centres, like PyTorch's
    interpolate(align_corners=False); no antialiasing)."""
    return jax.image.resize(bias.astype(jnp.float32), bias.shape[:-1] + (length,), method="linear", antialias=False)


def agent_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    num_agents: int | None = None,
    agents: Array | None = None,
    aggregation_bias: Array | None = None,
    broadcast_bias: Array | None = None,
    scale: float | None = None,
    q_lengths: Array | None = None,
    kv_lengths: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, dict[str, Array]]:
    """Agent aggregation then agent broadcast (the two softmax stages; the DWC term belongs to the layer).

    Args:
      q: [B, N, H, D]. k: [B, M, KVH, D]. v: [B, M, KVH, Dv]. H % KVH == 0 (GQA: agents are per query head).
      num_agents: n; the agents are the adaptive average pooling of q's valid rows. Or give `agents` [B, n, H, D].
      aggregation_bias: B_1, broadcastable to [B, H, n, M]. broadcast_bias: B_2, broadcastable to [B, H, N, n].
      scale: logit scale of both stages (default 1/sqrt(D)).
      q_lengths, kv_lengths: int [B] padding lengths (padded queries are not pooled and output 0).
      dropout_rate, dropout_rng: dropout on both probability matrices.
      return_probs: also return {"aggregation": [B, H, n, M], "broadcast": [B, H, N, n]} (float32).
      implementation: backend of the two softmax stages (see `attn.functional.softmax_attention`).
    Returns:
      out [B, N, H, Dv] in q.dtype, or (out, probs).
    """
    check_qkv(q, k, v)
    batch, q_len, heads, dim = q.shape
    if (agents is None) == (num_agents is None):
        raise ValueError(f"give exactly one of num_agents={num_agents!r} and agents (got {shape_of(agents)})")
    if agents is None:
        if not (isinstance(num_agents, int) and num_agents > 0):
            raise ValueError(f"num_agents={num_agents!r} must be a positive int")
        pool = adaptive_pool_matrix(q_len, num_agents, q_lengths)
        agents = jnp.einsum("bnt,bthd->bnhd", pool, q.astype(jnp.float32)).astype(q.dtype)
    elif shape_of(agents)[0] != batch or shape_of(agents)[2:] != (heads, dim):
        raise ValueError(
            f"agents has shape {shape_of(agents)}; expected [batch, n, heads, head_dim] = ({batch}, n, {heads}, {dim})"
        )
    rngs = (None, None) if dropout_rng is None else tuple(jax.random.split(dropout_rng))
    common = dict(scale=scale, dropout_rate=dropout_rate, return_probs=return_probs, implementation=implementation)
    aggregated = F.softmax_attention(
        agents,
        k,
        v,
        bias=aggregation_bias,
        mask=None if kv_lengths is None else Mask(kv_lengths=kv_lengths),
        dropout_rng=rngs[0],
        **common,
    )
    broadcast = F.softmax_attention(
        q,
        agents,
        aggregated[0] if return_probs else aggregated,
        bias=broadcast_bias,
        mask=None if q_lengths is None else Mask(q_lengths=q_lengths),
        dropout_rng=rngs[1],
        **common,
    )
    if not return_probs:
        return broadcast
    return broadcast[0], {"aggregation": aggregated[1]["probs"], "broadcast": broadcast[1]["probs"]}


@register(
    "agent",
    family="linear",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention",
    catalog=24,
    op=agent_attention,
    input_kind="sequence",
    supports_causal=False,
    supports_decode=False,
    summary="agent tokens pooled from Q: softmax(QA^T) softmax(AK^T) V + agent biases + depthwise conv of V",
    option_docs={
        "num_agents": "number n of agent tokens (adaptive average pooling of the queries; paper: 49 = 7 x 7)",
        "agent_bias": "learn the agent biases B_1 (agents x keys) and B_2 (queries x agents)",
        "bias_resolution": "points R of the learned biases along the token axis, interpolated to the length",
        "dwc_kernel_size": "kernel of the depthwise convolution of V added to the output (0 = off; paper: 3)",
        "scale": "logit scale of both softmax stages (None = 1/sqrt(head_dim))",
    },
    fidelity="paper",
    reference="the paper's agent aggregation / broadcast equations with agent biases and DWC; pooling, scale and bias "
    "init from github.com/LeapLabTHU/Agent-Attention; 1-D form of the 2-D vision layer",
    validators={
        "num_agents": positive_int,
        "bias_resolution": positive_int,
        "dwc_kernel_size": kernel_size_or_off,
        "scale": optional(positive),
    },
)
class AgentAttention(AttentionLayer):
    """Agent Attention (non-causal self-attention). x [B, N, E] -> [B, N, E]."""

    num_agents: int = 49
    agent_bias: bool = True
    bias_resolution: int = 49
    dwc_kernel_size: int = 3
    scale: float | None = None

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.cross:
            raise ValueError(
                "agent attention is self-attention here (its DWC term adds conv(V) at each query's position); "
                f"got a context of shape {call.context.shape}"
            )
        if call.decode:
            raise ValueError("decode=True is not supported by agent attention: it is not causal (no KV cache)")
        if self.mask_parts(call)[0]:
            raise ValueError(
                "agent attention is not causal: its agents pool every query and see every key; got a causal mask"
            )

    def mask_parts(self, call: AttentionCall) -> tuple[bool, Array | None, Array | None]:
        """(causal, q_lengths, kv_lengths) of the call's mask; other mask parts raise."""
        return linear_mask_parts(call.mask, "agent")

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """No positions (the agent biases carry the token order) and no cache (validate rejects decode)."""
        return q, k, v, call

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, N, H, D], k/v [B, N, KVH, D] -> [B, N, H, Dv]: agent aggregation, broadcast, plus DWC(V)."""
        _, q_lengths, kv_lengths = self.mask_parts(call)
        length = q.shape[1]
        aggregation_bias = broadcast_bias = None
        if self.agent_bias:
            init = nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), ("heads", None, None))
            shape = (self.num_heads, self.num_agents, self.bias_resolution)
            aggregation_bias = interpolate_bias(self.param("aggregation_bias", init, shape, self.param_dtype), length)
            broadcast_bias = jnp.swapaxes(
                interpolate_bias(self.param("broadcast_bias", init, shape, self.param_dtype), length), -1, -2
            )
        capture = self.wants_weights()
        result = agent_attention(
            q,
            k,
            v,
            num_agents=self.num_agents,
            aggregation_bias=None if aggregation_bias is None else aggregation_bias[None],
            broadcast_bias=None if broadcast_bias is None else broadcast_bias[None],
            scale=self.scale,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
            return_probs=capture,
            implementation=self.implementation,
        )
        if capture:
            y, probs = result
            self.sow(
                "intermediates",
                "attention_weights",
                jnp.einsum("bhtn,bhns->bhts", probs["broadcast"], probs["aggregation"]),
            )
        else:
            y = result
        if self.dwc_kernel_size:
            values = repeat_kv(v, self.num_heads)
            if kv_lengths is not None:  # padded values must not leak into valid rows through the kernel
                values = values * (jnp.arange(length) < jnp.asarray(kv_lengths)[:, None])[:, :, None, None]
            conv = HeadwiseDepthwiseConv(
                self.dwc_kernel_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dwc"
            )
            y = y + conv(values).astype(y.dtype)
            if q_lengths is not None:
                y = y * (jnp.arange(length) < jnp.asarray(q_lengths)[:, None])[:, :, None, None].astype(y.dtype)
        return y
