"""`concept_centric`: Concept-Centric Transformers' shared global workspace, tokens cross-attending to concept slots.

Paper: "Concept-Centric Transformers: Enhancing Model Interpretability through Object-Centric Concept Learning within a
Shared Global Workspace" (Hong, Park, Pavlic; WACV 2024; arXiv 2305.15775; code github.com/jyhong0304/
concept_centric_transformers, ctc/model_utils.py `ConceptSlotAttention`, `CrossAttention` and the SlotC* models).

A bottlenecked memory of S concept slots is written from the context by slot attention (competition of the slots
for each context token: softmax over slots), then every token of x reads the concepts by cross-attention; the
head-averaged cross-attention weights are the concept explanation the paper supervises. With c [B, N, Ec]:

    c' = LN(c);  k_s = c' W_k / sqrt(Ec);  v_s = c' W_v                         slot keys, values   [B, N, Ec]
    s_0 = slot_init                                                              learned, per slot   [S, Ec]
    repeat slot_iterations times:
        A   = softmax_slots(k_s (LN(s) W_q)^T)                                  [B, N, S] (0 at padded tokens)
        U   = ((A + eps) / sum_n (A + eps))^T v_s                               weighted mean        [B, S, Ec]
        s   = GRU(U, s)
    concepts = s + concept_position                                             [B, S, Ec]
    o_i = softmax_j(q_i k_j^T / sqrt(D)) v_j,  q = x W_q, k = concepts W_k, v = concepts W_v   (heads)  [B, Tq, E]

GRU is PyTorch's GRUCell (r, z, n gates; h' = (1 - z) n + z h). The official ConceptSlotAttention draws s_0 from a
Gaussian N(mu, sigma) shared by all slots at every forward; here s_0 is learned per slot (as in the official
ConceptQuerySlotAttention / BO-QSA variant and its text model), so the layer is deterministic. eps = 1e-8.

Captures: `attention_weights` [B, H, Tq, S] (their mean over heads is the paper's concept explanation) and
`concept_assignment` [B, N, S] (A of the last iteration) under "intermediates" with capture=True.

Shapes: x [B, Tq, E], context [B, N, Ec] (the paper's form: context = x) -> [B, Tq, E]; mask None or
attn.Mask(kv_lengths=...) for a padded context. Cost: O(B N S Ec) per slot iteration plus O(B Tq S H D).
Causality: every query row reads the same concepts, so outputs are causal in x; the concepts pool the whole context.

Exact reduction: none to softmax attention (the keys are concepts, not context tokens); with one slot every token
reads the same vector, softmax of a single key = 1.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.conv import layer_norm
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import non_negative_int, positive, positive_int
from attn.cross.context import check_context_width, require_context
from attn.registry import register

Array = jax.Array


def slot_assignment(keys: Array, queries: Array, valid: Array | None = None) -> Array:
    """A = softmax over slots of keys queries^T: keys [B, N, C], queries [B, S, C] -> [B, N, S]; rows of invalid
    tokens (valid bool [B, N] False) are 0."""
    logits = jnp.einsum("bnc,bsc->bns", keys, queries)
    weights = jax.nn.softmax(logits, axis=-1)
    return weights if valid is None else jnp.where(valid[:, :, None], weights, 0.0)


def slot_updates(assignment: Array, values: Array, epsilon: float, valid: Array | None = None) -> Array:
    """U = ((A + eps) / sum_n (A + eps))^T v: assignment [B, N, S], values [B, N, C] -> [B, S, C] (eps only on valid
    tokens, so padded ones add nothing)."""
    shifted = assignment + epsilon if valid is None else jnp.where(valid[:, :, None], assignment + epsilon, 0.0)
    shifted = shifted / jnp.sum(shifted, axis=1, keepdims=True)
    return jnp.einsum("bns,bnc->bsc", shifted, values)


def context_validity(mask: Mask | None, context: Array) -> Array | None:
    """bool [B, N] of the valid context tokens from a padding mask (kv_lengths), or None; ValueError for any other
    mask field (the concepts pool the context, so only its padding can be masked)."""
    if mask is None:
        return None
    if not isinstance(mask, Mask) or not mask.replace(kv_lengths=None).is_empty():
        raise ValueError(
            f"concept_centric accepts only context padding (attn.Mask(kv_lengths=...)); got mask={mask!r}: the "
            "queries read concept slots, not context tokens, so causal, window or segment masks do not apply"
        )
    if mask.kv_lengths is None:
        return None
    lengths = jnp.broadcast_to(jnp.asarray(mask.kv_lengths), (context.shape[0],))
    return jnp.arange(context.shape[1])[None, :] < lengths[:, None]


@register(
    "concept_centric",
    family="cross",
    paper="Concept-Centric Transformers: Enhancing Model Interpretability through Object-Centric Concept Learning "
    "within a Shared Global Workspace",
    catalog=27,
    op=slot_assignment,
    input_kind="cross",
    supports_causal=False,
    supports_decode=False,
    summary="slot attention writes S concept slots from the context; tokens cross-attend to the concepts",
    fidelity="official-code",
    reference="github.com/jyhong0304/concept_centric_transformers ctc/model_utils.py (ConceptSlotAttention: LN, "
    "k / sqrt(slot_size), softmax over slots, (A + eps) weighted mean, GRUCell; CrossAttention q(x), kv(concepts)) "
    "and the SlotC* models (concepts + slot_pos); learned per-slot initial slots instead of a shared Gaussian draw",
    has_attention_weights=True,
    validators={
        **SOFTMAX_VALIDATORS,
        "num_concepts": positive_int,
        "slot_iterations": non_negative_int,
        "slot_epsilon": positive,
    },
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "num_concepts": "S: concept slots in the shared workspace",
        "slot_iterations": "slot-attention rounds that write the workspace from the context (0 = the learned slots)",
        "slot_epsilon": "eps added to the slot assignment before its weighted mean",
    },
)
class ConceptCentricAttention(SoftmaxAttentionLayer):
    """x [B, Tq, E] reads S concepts written from context [B, N, Ec] by slot attention -> [B, Tq, E]."""

    num_concepts: int = 10
    slot_iterations: int = 3
    slot_epsilon: float = 1e-8

    def validate(self, call: AttentionCall) -> None:
        require_context(
            "concept_centric",
            call.context,
            "[batch, context_length, context_embed] (context=x for the paper's single-stream form)",
        )
        super().validate(call)
        if call.decode:
            raise ValueError("concept_centric does not decode (decode=True): the concepts pool the whole context")
        check_context_width(self, call.context, "slot_key")
        context_validity(call.mask, call.context)

    def dense(self, features: int, name: str, names: tuple[Any, Any], bias: bool = False) -> nn.Dense:
        """A Dense module [.., C] -> [.., features] whose kernel carries the logical axis `names`."""
        return nn.Dense(
            features,
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
            name=name,
        )

    def workspace(self, context: Array, valid: Array | None) -> Array:
        """The concept slots written from context [B, N, Ec] (valid bool [B, N] or None) -> [B, S, Ec]."""
        width = context.shape[-1]
        normed = layer_norm(dtype=self.dtype, param_dtype=self.param_dtype, name="context_norm")(context)
        keys = self.dense(width, "slot_key", ("embed", None))(normed) * width**-0.5
        values = self.dense(width, "slot_value", ("embed", None))(normed)
        init = self.param(
            "slot_init",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), (None, "embed")),
            (self.num_concepts, width),
            self.param_dtype,
        )
        slots = jnp.broadcast_to(jnp.asarray(init, self.dtype), (context.shape[0], self.num_concepts, width))
        slot_norm = layer_norm(dtype=self.dtype, param_dtype=self.param_dtype, name="slot_norm")
        slot_query = self.dense(width, "slot_query", ("embed", None))
        gru_input = self.dense(3 * width, "slot_gru_input", ("embed", "mlp"), bias=True)
        gru_hidden = self.dense(3 * width, "slot_gru_hidden", ("embed", "mlp"), bias=True)
        assignment = None
        for _ in range(self.slot_iterations):
            assignment = slot_assignment(keys, slot_query(slot_norm(slots)), valid)
            updates = slot_updates(assignment, values, self.slot_epsilon, valid)
            slots = gru_cell(gru_input(updates), gru_hidden(slots), slots)
        if assignment is not None and self.wants_weights():
            self.sow("intermediates", "concept_assignment", assignment)
        position = self.param(
            "concept_position",
            nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
            (self.num_concepts, width),
            self.param_dtype,
        )
        return slots + jnp.asarray(position, self.dtype)

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        """q [B, Tq, H, D] from x; the context passes through as k and v until prepare writes the concepts."""
        return self.dense_heads(x, self.num_heads, "heads", "query"), context, context

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, Any]:
        concepts = self.workspace(call.context, context_validity(call.mask, call.context))
        k = self.dense_heads(concepts, self.kv_heads, "kv_heads", "key")
        v = self.dense_heads(concepts, self.kv_heads, "kv_heads", "value")
        return super().prepare(q, k, v, call.replace(mask=None))


def gru_cell(gates_x: Array, gates_h: Array, state: Array) -> Array:
    """PyTorch's GRUCell from its gate pre-activations: gates_x = x W_i + b_i, gates_h = h W_h + b_h, each [..., 3C]
    in (r, z, n) order, state h [..., C] -> (1 - z) n + z h, r = sigmoid(.), z = sigmoid(.), n = tanh(x_n + r h_n)."""
    rx, zx, nx = jnp.split(gates_x, 3, axis=-1)
    rh, zh, nh = jnp.split(gates_h, 3, axis=-1)
    reset, update = jax.nn.sigmoid(rx + rh), jax.nn.sigmoid(zx + zh)
    candidate = jnp.tanh(nx + reset * nh)
    return (1.0 - update) * candidate + update * state
