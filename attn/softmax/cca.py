"""`cca`: Core Context Aware attention: group-pooled core tokens and a local window under one softmax.

Paper: "Core Context Aware Attention for Long Context Language Modeling" (Chen, You, Zhang, Li, Li, Wang, Tan,
ICML 2025, published as "Core Context Aware Transformers for Long Context Language Modeling"; project page
github.com/chenyaofo/CCA-Attention).

Globality-aware pooling: split the sequence into m = floor(T / g) complete groups of g tokens; the last query of
each group scores its group's keys and the group is merged into one core token by those weights:

    w_t   = softmax_j(scale q_{tg+g-1} . k_j),   j in group t = [tg, tg + g)
    c_t   = sum_j w_t[j] x_j,   so  k^G_t = c_t W_k = sum_j w_t[j] k_j,   v^G_t = sum_j w_t[j] v_j

Locality-preserving module and fusion: query p attends, in ONE softmax, to the core tokens of the groups that end
before its local window and to the raw tokens of the window, which starts at a group boundary so that every
earlier token is covered exactly once (either inside a core or raw):

    n(p)  = max(0, floor((p - s + 1) / g))       visible core tokens (groups entirely before the window)
    o_p   = softmax(scale q_p [k^G_0..k^G_{n(p)-1}; k_{n(p) g}..k_p]^T) [v^G_0..; v_{n(p) g}..v_p]

(the paper's j = max(0, floor((i - s) / g)) and window start k = i - s - ((i - s) mod g) in 1-based indexing).
A group's core only mixes tokens up to its last one, which precedes the window, so the layer is causal. With
RoPE the pooled keys are the pooled rotated keys.

Shapes: x [B, T, E] -> [B, T, E]; s = local_window, g = group_size. The structured cost is O(B H T (T/g + s + g) D)
time and O(B H T (T/g + s + g)) memory; this reference evaluates the [T, T/g + T] logits densely (the mask keeps
the structure). The sown attention weights are the effective per-token weights [B, H, T, T] (core weight spread
back over its group by w_t), and the output equals those weights times V exactly.

Reduction to softmax: group_size=1 (each core is its token) or local_window >= T (no cores) is exactly causal
softmax attention (the `softmax` layer with the same parameters, up to summation order). Causal masks only;
no decoding (the cores need the queries of past group ends), no sliding window, softcap or relative biases.

The layer overrides the template's `attend` (one softmax over cores and raw tokens is not the pipeline's [Tq, Tk]
logits matrix), so interventions may target its `head_outputs` only; the effective weights are still captured.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.validation import check_positive, check_qkv, choice, positive_int
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

POSITIONS = ("rope", "none")


def core_tokens(q: Array, k: Array, v: Array, *, group_size: int, scale: float | None = None):
    """Core keys and values of the complete groups.

    q: [B, T, H, D]; k, v: [B, T, KVH, D]. Returns (core_k [B, m, H, D], core_v [B, m, H, Dv],
    weights float32 [B, m, H, g]) with m = T // group_size; weights[b, t, h] are the fusion weights of group t
    (softmax of the group's last query of head h against the group's keys).
    """
    batch, length, heads, dim = q.shape
    kv_heads, groups, g = k.shape[2], heads // k.shape[2], group_size
    m = length // g
    scale = dim**-0.5 if scale is None else scale
    q_last = q[:, g - 1 : m * g : g].reshape(batch, m, kv_heads, groups, dim)
    kg = k[:, : m * g].reshape(batch, m, g, kv_heads, dim)
    vg = v[:, : m * g].reshape(batch, m, g, kv_heads, v.shape[-1])
    logits = jnp.einsum("btkhd,btjkd->btkhj", q_last, kg, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1)  # [B, m, KVH, G, g]
    core_k = jnp.einsum("btkhj,btjkd->btkhd", weights.astype(k.dtype), kg, preferred_element_type=jnp.float32)
    core_v = jnp.einsum("btkhj,btjkd->btkhd", weights.astype(v.dtype), vg, preferred_element_type=jnp.float32)
    return (
        core_k.reshape(batch, m, heads, dim).astype(k.dtype),
        core_v.reshape(batch, m, heads, v.shape[-1]).astype(v.dtype),
        weights.reshape(batch, m, heads, g),
    )


def cca_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    group_size: int,
    local_window: int,
    mask: Mask | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, dict[str, Array]]:
    """Causal CCA attention (see the module doc). q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, Dv].

    mask: None (causal) or a causal `attn.Mask` whose other parts (e.g. kv_lengths) also restrict the raw keys
    and, through each group's last token, the cores. dropout_rate, dropout_rng: dropout on the weights over
    [cores; tokens] (as in `attn.functional.softmax_attention`). return_probs: also return {"probs": the
    effective per-token weights float32 [B, H, T, T]}.
    """
    heads, kv_heads = check_qkv(q, k, v)
    check_positive("group_size", group_size)
    check_positive("local_window", local_window)
    batch, length = q.shape[0], q.shape[1]
    if k.shape[1] != length:
        raise ValueError(f"cca is self-attention: q has {length} positions but k has {k.shape[1]}")
    if mask is not None and (mask.q_segment_ids is not None or mask.window is not None):
        raise ValueError("cca supports causal masks with lengths; segment ids and sliding windows are not supported")
    mask = Mask(causal=True) if mask is None else mask.replace(causal=True)
    g = group_size
    core_k, core_v, weights = core_tokens(q, k, v, group_size=g, scale=scale)
    m = core_k.shape[1]

    p = jnp.arange(length)[:, None]
    visible_cores = jnp.minimum(jnp.maximum(p - local_window + 1, 0) // g, m)  # [T, 1]
    allowed_cores = jnp.arange(m)[None, :] < visible_cores  # [T, m]
    allowed_local = (jnp.arange(length)[None, :] >= visible_cores * g) & (jnp.arange(length)[None, :] <= p)
    base = mask.materialize(length, length)  # [B|1, H|1, T, T]: lengths/padding of the raw keys
    group_ends = jnp.arange(m) * g + g - 1
    allowed = jnp.concatenate([allowed_cores & base[..., group_ends], allowed_local & base], axis=-1)

    keys = jnp.concatenate([core_k, jnp.repeat(k, heads // kv_heads, axis=2)], axis=1)
    values = jnp.concatenate([core_v, jnp.repeat(v, heads // kv_heads, axis=2)], axis=1)
    result = F.softmax_attention(
        q,
        keys,
        values,
        mask=allowed,
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        return_probs=return_probs,
        implementation=implementation,
    )
    if not return_probs:
        return result
    out, aux = result
    probs = aux["probs"]  # [B, H, T, m + T]
    spread = jnp.einsum("bhqt,bthj->bhqtj", probs[..., :m], weights).reshape(batch, heads, length, m * g)
    token_weights = probs[..., m:].at[..., : m * g].add(spread)
    return out, {"probs": token_weights}


@register(
    "cca",
    family="softmax",
    paper="Core Context Aware Attention for Long Context Language Modeling",
    catalog=190,
    op=cca_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="core-context-aware: importance-pooled group core tokens plus a local window in one causal softmax",
    option_docs={
        "position": "'rope' or 'none'",
        "group_size": "tokens per group g merged into one core token (paper default 16)",
        "local_window": "local window s of raw tokens (paper default 1024; it grows to the group boundary)",
        "window": "must be None (the local window is local_window)",
        "softcap": "must be None (not supported by cca)",
    },
    fidelity="paper",
    reference="the paper's globality-aware pooling and locality-preserving module (its indices j = max(0, floor((i - "
    "s) / g)) and window start); project page github.com/chenyaofo/CCA-Attention",
    validators={
        "position": choice(*POSITIONS),
        "group_size": positive_int,
        "local_window": positive_int,
        "window": choice(None),
        "softcap": choice(None),
    },
)
class CCAAttention(MultiHeadAttention):
    """Core Context Aware attention (causal). x [B, T, E] -> [B, T, E]."""

    group_size: int = 16
    local_window: int = 1024

    # The weights come from one softmax over [cores; local tokens] (not a [Tq, Tk] logits matrix), so the pipeline's
    # matrix stages do not apply; the effective per-token weights are still captured as "attention_weights".
    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.decode:
            raise ValueError("cca does not support decode=True (its cores need the queries of past group ends)")
        if call.cross:
            raise ValueError("cca is causal self-attention; got a context (cross-attention is not supported)")
        if call.mask is None or not call.mask.causal:
            raise ValueError("cca is causal attention: pass mask=attn.Mask(causal=True)")

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, Dv] (the position bias is None: 'rope' or 'none')."""
        capture = self.wants_weights()
        result = cca_attention(
            q,
            k,
            v,
            group_size=self.group_size,
            local_window=self.local_window,
            mask=call.mask,
            scale=self.scale,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
            return_probs=capture,
            implementation=self.implementation,
        )
        if capture:
            result, aux = result
            self.sow_capture("attention_weights", aux["probs"])
        return result
