"""`flowformer`: Flow-Attention ([64] "Flowformer: Linearizing Transformers with Conservation Flows").

Attention is read as a flow network: values are sources, outputs are sinks and phi(q_i) . phi(k_j) is the flow
capacity between them, with phi = sigmoid. With N queries (sinks), M keys (sources) and a small eps (the official
code adds it inside every flow):

    incoming flow of sink i      I_i = (phi(q_i) + eps) . (sum_j phi(k_j) + eps)
    outgoing flow of source j    O_j = (phi(k_j) + eps) . (sum_i phi(q_i) + eps)
    conserved incoming flow      I^_i = (phi(q_i) + eps) . (sum_j phi(k_j) / O_j + eps)
    conserved outgoing flow      O^_j = clip((phi(k_j) + eps) . (sum_i phi(q_i) / I_i + eps), -1, 1)
    competition (sources)        v^_j = M softmax_j(O^) v_j
    allocation (sinks)           o_i = sigmoid(I^_i N / M) (phi(q_i) / I_i) . sum_j phi(k_j) v^_j^T

Causal (the official Flow_Attention_Causal): every sum over j becomes a prefix sum over j <= i, normalised by the
number n_i = i + 1 of terms, and the competition softmax becomes a running one:

    I_i = (phi(q_i) + eps) . (sum_{j<=i} phi(k_j) + eps) / n_i        O_j likewise with the prefix sum of phi(q)
    I^_i = (phi(q_i) + eps) . (sum_{j<=i} phi(k_j) / O_j + eps) / n_i
    O^_j = clip((phi(k_j) + eps) . (sum_{l<=j} phi(q_l) / I_l + eps) / n_j, -1, 1)
    v^_j = n_j exp(O^_j) / sum_{l<=j} exp(O^_l) v_j
    o_i = sigmoid(I^_i) (phi(q_i) / (n_i I_i)) . sum_{j<=i} phi(k_j) v^_j^T

Every prefix sum — the four flows (value column of ones), the running softmax denominator and the output — is a
causal `attn.functional.linear_attention` call, i.e. the chunked (Lightning-2) scan: no cumsum over the whole
sequence, no T x T array, and the carried states make step-by-step decoding exact (`initial_state` /
`return_state`, the position count n continuing from `q_offset`).

Shapes: q [B, N, H, D], k [B, M, KVH, D], v [B, M, KVH, Dv] (k, v repeated to H heads: the flows are per query
head) -> [B, N, H, Dv]. Time O(B H T (C D + D Dv)), memory O(B H T (C + D)); decode state: [B, H, D, Dv] plus four
[B, H, D, 1] flows and one [B, H, 1, 1] softmax denominator. Padding (q_lengths / kv_lengths) removes the padded
tokens from every flow and from N and M. No setting reduces Flow-Attention to softmax attention.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core import dispatch
from attn.core.layer import AttentionCall
from attn.core.linear_scan import linear_attention, repeat_kv
from attn.core.padding import length_mask
from attn.core.validation import check_qkv, positive, positive_int, shape_of
from attn.linear.linear import BASE_OPTION_DOCS, LinearAttentionBase
from attn.registry import register

Array = jax.Array

# Names of the carried causal state (each a linear-attention state [B, H, rows, cols]).
STATE_NAMES = ("kv", "keys", "queries", "keys_out", "queries_in", "competition")


def flow_state_shapes(batch: int, heads: int, dim: int, value_dim: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the causal Flow-Attention state: the output state and the prefix sums of the flows."""
    flow = (batch, heads, dim, 1)
    return {
        "kv": (batch, heads, dim, value_dim),  # sum phi(k_j) v^_j^T
        "keys": flow,  # sum phi(k_j)
        "queries": flow,  # sum phi(q_j)
        "keys_out": flow,  # sum phi(k_j) / O_j
        "queries_in": flow,  # sum phi(q_j) / I_j
        "competition": (batch, heads, 1, 1),  # sum exp(O^_j)
    }


def flow_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    q_lengths: Array | None = None,
    kv_lengths: Array | None = None,
    q_offset: Any = 0,
    initial_state: dict[str, Array] | None = None,
    return_state: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, dict[str, Array]]:
    """Flow-Attention (see the module docstring for the equations); phi = sigmoid is applied to q and k here.

    Args:
      q: [B, N, H, D] queries (before the feature map). k: [B, M, KVH, D]. v: [B, M, KVH, Dv]. H % KVH == 0.
      causal: prefix flows (needs N == M); False: flows over the whole sequence (N != M allowed, cross-attention).
      eps: added inside every flow, as in the official code.
      chunk_size: chunk of the linear-attention scan behind every prefix sum.
      q_lengths, kv_lengths: int [B]; padded queries / keys take no part in any flow; padded rows output 0.
      q_offset: (causal) tokens already processed before this call: the counts n_i start at q_offset + 1.
      initial_state: (causal) the `return_state` of the previous piece (dict of float32 arrays, see
        `flow_state_shapes`), or None for the start of the sequence.
      return_state: (causal) also return the state after the last token.
      implementation: None or "xla" (this jnp code); "pallas" raises.
    Returns:
      out [B, N, H, Dv] in q.dtype, or (out, state) with return_state.
    """
    heads, _ = check_qkv(q, k, v)
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if causal and q_len != kv_len:
        raise ValueError(f"causal flow attention needs q_len == kv_len, got {q_len} and {kv_len}")
    if not causal and (initial_state is not None or return_state):
        raise ValueError("initial_state / return_state need causal=True (non-causal flows cover the whole sequence)")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0")
    dispatch.select(
        "flow_attention", implementation, {"pallas": "no Pallas flow-attention kernel is registered", "xla": None}
    )
    dtype = jnp.result_type(q.dtype, jnp.float32)
    q_valid = (
        jnp.ones((batch, q_len), dtype) if q_lengths is None else length_mask(q_lengths, batch, q_len, "q_lengths")
    )
    kv_valid = (
        jnp.ones((batch, kv_len), dtype) if kv_lengths is None else length_mask(kv_lengths, batch, kv_len, "kv_lengths")
    )
    phi_q = jax.nn.sigmoid(q.astype(dtype)) * q_valid[:, :, None, None]
    phi_k = repeat_kv(jax.nn.sigmoid(k.astype(dtype)) * kv_valid[:, :, None, None], heads)
    values = repeat_kv(v.astype(dtype), heads)
    kv_valid = kv_valid[:, :, None]  # [B, M, 1]

    if causal:
        out, state = _causal_flows(phi_q, phi_k, values, kv_valid, eps, chunk_size, q_offset, initial_state)
    else:
        out, state = _global_flows(phi_q, phi_k, values, q_valid[:, :, None], kv_valid, eps, chunk_size), None
    out = (out * q_valid[:, :, None, None]).astype(q.dtype)
    return (out, state) if return_state else out


def _global_flows(phi_q, phi_k, values, q_valid, kv_valid, eps, chunk_size) -> Array:
    """Non-causal Flow-Attention: sums over the whole sequence, aggregated by the non-causal core."""
    num_sinks = jnp.sum(q_valid, axis=1, keepdims=True)  # N per batch row, [B, 1, 1]
    num_sources = jnp.sum(kv_valid, axis=1, keepdims=True)  # M
    incoming = jnp.einsum("bthd,bhd->bth", phi_q + eps, jnp.sum(phi_k, axis=1) + eps)
    outgoing = jnp.einsum("bshd,bhd->bsh", phi_k + eps, jnp.sum(phi_q, axis=1) + eps)
    conserved_sink = jnp.einsum("bthd,bhd->bth", phi_q + eps, jnp.einsum("bshd,bsh->bhd", phi_k, 1 / outgoing) + eps)
    conserved_source = jnp.einsum("bshd,bhd->bsh", phi_k + eps, jnp.einsum("bthd,bth->bhd", phi_q, 1 / incoming) + eps)
    # Clipped to [-1, 1] (official code, for stability), so exp needs no max subtraction.
    weights = jnp.exp(jnp.clip(conserved_source, -1.0, 1.0)) * kv_valid
    total = jnp.sum(weights, axis=1, keepdims=True)
    competition = num_sources * weights / jnp.where(total > 0, total, 1.0)
    allocation = jax.nn.sigmoid(conserved_sink * num_sinks / jnp.maximum(num_sources, 1.0))
    out = linear_attention(
        phi_q / incoming[..., None], phi_k, values * competition[..., None], causal=False, chunk_size=chunk_size
    )
    return out * allocation[..., None]


def _causal_flows(phi_q, phi_k, values, kv_valid, eps, chunk_size, q_offset, initial_state):
    """Causal Flow-Attention: every prefix sum is a causal linear-attention scan with a carried state."""
    batch, length, heads, dim = phi_q.shape
    shapes = flow_state_shapes(batch, heads, dim, values.shape[-1])
    if initial_state is not None:
        if not isinstance(initial_state, dict) or set(initial_state) != set(STATE_NAMES):
            raise ValueError(f"initial_state must be a dict with keys {STATE_NAMES}, got {type(initial_state)}")
        for name, shape in shapes.items():
            if shape_of(initial_state[name]) != shape:
                raise ValueError(f"initial_state[{name!r}] has shape {shape_of(initial_state[name])}; expected {shape}")
    state: dict[str, Array] = {}

    def prefix(name: str, query: Array, key: Array, value: Array) -> Array:
        start = None if initial_state is None else initial_state[name]
        out, state[name] = linear_attention(
            query, key, value, causal=True, chunk_size=chunk_size, initial_state=start, return_state=True
        )
        return out

    ones = jnp.ones((batch, length, heads, 1), phi_q.dtype)
    count = (jnp.asarray(q_offset, phi_q.dtype) + jnp.arange(1, length + 1, dtype=phi_q.dtype))[None, :, None]
    q_eps, k_eps = phi_q + eps, phi_k + eps
    # (x + eps) . (prefix + eps) = (x + eps) . prefix + eps sum(x + eps)
    q_pad, k_pad = eps * jnp.sum(q_eps, axis=-1), eps * jnp.sum(k_eps, axis=-1)
    incoming = (prefix("keys", q_eps, phi_k, ones)[..., 0] + q_pad) / count  # I_i
    outgoing = (prefix("queries", k_eps, phi_q, ones)[..., 0] + k_pad) / count  # O_j
    conserved_sink = (prefix("keys_out", q_eps, phi_k / outgoing[..., None], ones)[..., 0] + q_pad) / count
    conserved_source = (prefix("queries_in", k_eps, phi_q / incoming[..., None], ones)[..., 0] + k_pad) / count
    weights = jnp.exp(jnp.clip(conserved_source, -1.0, 1.0)) * kv_valid
    running = prefix("competition", ones, weights[..., None], ones)[..., 0]  # sum_{l<=j} exp(O^_l)
    competition = count * weights / jnp.where(running > 0, running, 1.0)
    out = prefix("kv", phi_q / (count * incoming)[..., None], phi_k, values * competition[..., None])
    return out * jax.nn.sigmoid(conserved_sink)[..., None], state


@register(
    "flowformer",
    family="linear",
    paper="Flowformer: Linearizing Transformers with Conservation Flows",
    catalog=64,
    op=flow_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="Flow-Attention: sigmoid kernel, flow conservation, source competition (softmax) and sink allocation",
    option_docs=BASE_OPTION_DOCS,
    fidelity="official-code",
    reference="github.com/thuml/Flowformer: Flow_Attention and Flow_Attention_Causal (eps inside every flow)",
    validators={"chunk_size": positive_int, "eps": positive},
)
class FlowAttention(LinearAttentionBase):
    """Flow-Attention on the chunked-scan core, causal and non-causal. x [B, T, E] -> [B, T, E]."""

    mechanism_name = "flowformer"

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, T, H, D], k/v [B, S, KVH, D] -> [B, T, H, Dv]; decoding continues the cached flow states."""
        causal, q_lengths, kv_lengths = self.mask_parts(call)
        options = dict(
            causal=causal,
            eps=self.eps,
            chunk_size=self.chunk_size,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            implementation=self.implementation,
        )
        if not call.decode:
            return flow_attention(q, k, v, **options)
        # The flow state on the cache protocol: a RecurrentState whose index the template's prepare advanced.
        shapes = flow_state_shapes(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
        keys = tuple(f"flow_{name}" for name in shapes)
        names = tuple((f"flow_{name}", ("batch", "heads", None, None)) for name in shapes)
        if not self.has_variable("cache", keys[0]):  # the cache-creating call is an ordinary forward
            index = self.get_variable("cache", cache_lib.RECURRENT_INDEX)
            zeros = {f"flow_{name}": jnp.zeros(shape, jnp.float32) for name, shape in shapes.items()}
            cache_lib.store_state(self, cache_lib.RecurrentState(zeros, index, names))
            return flow_attention(q, k, v, **options)
        recurrent = cache_lib.load_state(self, keys)
        start = {name: recurrent.state[f"flow_{name}"] for name in shapes}
        y, state = flow_attention(q, k, v, q_offset=call.q_offset, initial_state=start, return_state=True, **options)
        cache_lib.store_state(
            self, recurrent.replace(state={f"flow_{name}": state[name] for name in shapes}, names=names)
        )
        return y
