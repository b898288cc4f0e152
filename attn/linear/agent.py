"""`agent` and `agent_2d`: Agent Attention ([24] "Agent Attention: On the Integration of Softmax and Linear Attention").

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

Two forms, two registry names, because a registry entry has one input kind and the models hand a grid only to
"spatial" mechanisms (attn.models.block: a ViT with a pooling head, the VLM's image encoder):

  `agent` ("sequence", x [B, N, E]): the 1-D adaptation. Pooling bins are contiguous runs of tokens, the biases are
    learned at R points and linearly interpolated along the sequence, the convolution is 1-D. It honours padding.
  `agent_2d` ("spatial", x [B, h, w, E]): the paper's vision form (agent_pvt / agent_swin in the official code).
    n = p x p agents are the 2-D adaptive average pooling of the query grid (agent a = (i, j) in row-major order);
    the biases are the paper's "agent bias", each the sum of a block term and row and column terms:
      B_1[a, (y, x)] = bilinear(P_a)[y, x] + P^row_a[y] + P^col_a[x]     P [H, n, R, R] (official an_bias, 7 x 7),
                                                                        P^row [H, n, h], P^col [H, n, w] (ah, aw)
      B_2[(y, x), a] = bilinear(G_a)[y, x] + G^row_a[y] + G^col_a[x]     G [H, n, R, R] (na_bias), G^row [H, h, n],
                                                                        G^col [H, w, n] (ha, wa)
    with bilinear the half-pixel interpolation of the R x R map to the h x w grid (PyTorch's
    interpolate(mode="bilinear", align_corners=False)); the row and column terms are learned at the grid size of
    the first call (as the official code fixes them to its window or patch grid). DWC is a depthwise
    k x k convolution (official: 3 x 3, zero padding, with bias) of V on the grid, per (head, channel).
    Deviation: the DWC kernel is initialised with lecun_normal (the official code has PyTorch's default init).
    On a flattened grid the 1-D form pools runs of tokens that cross rows, so `agent_2d` is the form to use for
    images.

Agent attention is not causal (every agent pools all queries and sees all keys), so it takes no causal mask and
has no decode mode. `agent` honours padding (q_lengths / kv_lengths): agents pool the valid queries only (bins
over each row's own length), padded keys get no weight, padded values are zeroed before the convolution. `agent_2d`
takes no mask (a spatial layer). Not implemented: agent_pvt's spatial reduction of the keys/values (sr_ratio > 1).

Shapes: x [B, N, E] (or [B, h, w, E] with N = h w) -> same. Time O(B H N n D), memory O(B H N n) (no N x N array,
except for the attention weights sown on request). With num_agents = N (1-D) or p = h = w (2-D) the pooling is
the identity (A = Q); no setting reduces it to softmax attention (it is a product of two softmaxes).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core.conv import HeadwiseDepthwiseConv, conv, kernel_size_or_off
from attn.core.layer import AttentionCall, AttentionLayer, SpatialAttentionLayer
from attn.core.linear_scan import linear_mask_parts, repeat_kv
from attn.core.masks import Mask
from attn.core.validation import OptionValidator, check_qkv, check_rank, optional, positive, positive_int, shape_of
from attn.registry import register

Array = jax.Array


def adaptive_pool_matrix(
    length: int, num_bins: int, lengths: Array | None = None, dtype: jnp.dtype = jnp.float32
) -> Array:
    """Averaging weights of adaptive average pooling, [B|1, num_bins, length] in `dtype`.

    Bin i of a row with valid length L covers tokens floor(i L / n) .. ceil((i + 1) L / n) - 1 (PyTorch's
    AdaptiveAvgPool rule), so with n == L it is the identity. `lengths` int [B] (None: every row has `length`).
    """
    valid = jnp.full((1,), length, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    bins = jnp.arange(num_bins, dtype=jnp.int32)[None, :]
    start = (bins * valid[:, None]) // num_bins
    end = -((-(bins + 1) * valid[:, None]) // num_bins)  # ceil
    tokens = jnp.arange(length, dtype=jnp.int32)[None, None, :]
    inside = (tokens >= start[..., None]) & (tokens < end[..., None])
    return inside.astype(dtype) / jnp.maximum(end - start, 1)[..., None].astype(dtype)


def adaptive_pool_grid(x: Array, side: int, dtype: jnp.dtype) -> Array:
    """2-D adaptive average pooling of x [B, h, w, ...] to a side x side grid, flattened row-major: [B, side^2, ...].

    Separable: rows pooled with adaptive_pool_matrix(h, side), columns with adaptive_pool_matrix(w, side) (PyTorch's
    AdaptiveAvgPool2d bins), computed in `dtype` and returned in x.dtype.
    """
    rows = adaptive_pool_matrix(x.shape[1], side, dtype=dtype)[0]
    cols = adaptive_pool_matrix(x.shape[2], side, dtype=dtype)[0]
    pooled = jnp.einsum("iy,jx,byx...->bij...", rows, cols, x.astype(dtype))
    return pooled.reshape(x.shape[0], side * side, *x.shape[3:]).astype(x.dtype)


def interpolate_bias(bias: Array, length: int) -> Array:
    """Linear interpolation of the last axis of bias [..., R] to [..., length] (half-pixel centres, like PyTorch's
    interpolate(align_corners=False); no antialiasing)."""
    return jax.image.resize(bias.astype(jnp.float32), bias.shape[:-1] + (length,), method="linear", antialias=False)


def interpolate_bias_grid(bias: Array, size: tuple[int, int], dtype: jnp.dtype) -> Array:
    """Bilinear interpolation of the last two axes of bias [..., R1, R2] to [..., h, w] in `dtype` (half-pixel
    centres, like PyTorch's interpolate(mode="bilinear", align_corners=False); no antialiasing)."""
    return jax.image.resize(bias.astype(dtype), bias.shape[:-2] + tuple(size), method="linear", antialias=False)


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


# num_agents of the 2-D form: the agents are a p x p grid.
square_int = OptionValidator(
    lambda v: positive_int.test(v) and math.isqrt(v) ** 2 == v, "a positive perfect square (p x p agents)", "p^2"
)


@register(
    "agent_2d",
    family="linear",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention",
    catalog=24,
    op=agent_attention,
    input_kind="spatial",
    supports_causal=False,
    supports_decode=False,
    summary="agent attention on the h x w grid: p x p agents pooled from Q, 2-D agent biases, 3x3 depthwise conv of V",
    option_docs={
        "num_agents": "number n = p^2 of agent tokens, a p x p adaptive average pooling of the query grid (paper: 49)",
        "agent_bias": "learn the agent biases B_1 (agents x keys) and B_2 (queries x agents): R x R block maps "
        "interpolated to the grid plus row and column terms",
        "bias_resolution": "side R of the learned block bias maps (official: 7), bilinearly interpolated to h x w",
        "dwc_kernel_size": "kernel k of the k x k depthwise convolution of V added to the output (0 = off; paper: 3)",
        "scale": "logit scale of both softmax stages (None = 1/sqrt(head_dim))",
    },
    fidelity="official-code",
    reference="github.com/LeapLabTHU/Agent-Attention agent_transformer/models/agent_pvt.py and agent_swin.py "
    "(AgentAttention: AdaptiveAvgPool2d agents of q, an/ah/aw and na/ha/wa biases, scale in both softmaxes, 3x3 "
    "depthwise conv of v) and the paper's agent aggregation / broadcast equations; DWC init differs",
    validators={
        "num_agents": square_int,
        "bias_resolution": positive_int,
        "dwc_kernel_size": kernel_size_or_off,
        "scale": optional(positive),
    },
)
class AgentAttention2D(SpatialAttentionLayer):
    """Agent Attention on a 2-D token grid (the paper's vision form). x [B, h, w, E] -> [B, h, w, E]."""

    num_agents: int = 49
    agent_bias: bool = True
    bias_resolution: int = 7
    dwc_kernel_size: int = 3
    scale: float | None = None

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        check_rank(
            "x", call.x, 4, "[batch, height, width, embed] (agent_2d pools a 2-D grid; use `agent` for sequences)"
        )

    def grid_biases(self, height: int, width: int, dtype: jnp.dtype) -> tuple[Array, Array]:
        """(B_1 [1, H, n, h w], B_2 [1, H, h w, n]) in `dtype`: interpolated block maps plus row and column terms."""
        heads, agents, side = self.num_heads, self.num_agents, self.bias_resolution
        tokens = height * width

        def bias(name: str, shape: tuple[int, ...]) -> Array:
            init = nn.with_logical_partitioning(
                nn.initializers.truncated_normal(0.02), ("heads",) + (None,) * (len(shape) - 1)
            )
            return jnp.asarray(self.param(name, init, shape, self.param_dtype), dtype)

        block = interpolate_bias_grid(bias("aggregation_bias", (heads, agents, side, side)), (height, width), dtype)
        rows = bias("aggregation_bias_rows", (heads, agents, height))[..., :, None]
        cols = bias("aggregation_bias_cols", (heads, agents, width))[..., None, :]
        aggregation = (block + rows + cols).reshape(heads, agents, tokens)
        block = interpolate_bias_grid(bias("broadcast_bias", (heads, agents, side, side)), (height, width), dtype)
        rows = jnp.swapaxes(bias("broadcast_bias_rows", (heads, height, agents)), -1, -2)[..., :, None]
        cols = jnp.swapaxes(bias("broadcast_bias_cols", (heads, width, agents)), -1, -2)[..., None, :]
        broadcast = jnp.swapaxes((block + rows + cols).reshape(heads, agents, tokens), -1, -2)
        return aggregation[None], broadcast[None]

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, h, w, H, D], k/v [B, h, w, KVH, D] -> [B, h, w, H, Dv]: agent aggregation, broadcast, plus DWC(V).

        Sows the N x N product of the two probability matrices float32 [B, H, N, N] as attention_weights when
        captured."""
        batch, height, width, heads, _ = q.shape
        tokens = height * width
        compute = jnp.promote_types(q.dtype, jnp.float32)
        agents = adaptive_pool_grid(q, math.isqrt(self.num_agents), compute)
        biases = self.grid_biases(height, width, compute) if self.agent_bias else (None, None)
        flat = lambda t: t.reshape(batch, tokens, *t.shape[3:])  # noqa: E731
        capture = self.wants_weights()
        result = agent_attention(
            flat(q),
            flat(k),
            flat(v),
            agents=agents,
            aggregation_bias=biases[0],
            broadcast_bias=biases[1],
            scale=self.scale,
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
        y = y.reshape(batch, height, width, heads, -1)
        if self.dwc_kernel_size:
            values = repeat_kv(flat(v), heads)
            channels = heads * values.shape[-1]
            dwc = conv(
                channels,
                self.dwc_kernel_size,
                groups=channels,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="dwc",
            )
            y = y + dwc(values.reshape(batch, height, width, channels)).reshape(y.shape).astype(y.dtype)
        return y
