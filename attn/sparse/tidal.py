"""`tidal`: TidalDecode, position-persistent sparse attention for decoding: a few token-selection layers run full
attention and pick the positions with the highest scores; the layers after them attend only to those positions.

Paper: "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention" (Yang, Zhang, Chen,
Li, Jia, 2024, arXiv 2410.05076; code github.com/DerrickYLJ/TidalDecode, src/tidal_build/modify_llama.py
`llama_tidal_attention_forward`, checked against a copy in the public code index). Training-free; no parameters
beyond the softmax layer's. A stack of layers l = 0..L-1 (this layer's `layer_index`, filled in by the models):

    l < sparse_layer_start                      full attention (every call)
    l in {sparse_layer_start, correction_layer} full attention; at a decode step also select, per query head h,
        P_h = top_{budget-1}( s_hj : j < p )  U  { p }       s_hj = q_h . k_j (logits), p = the current position,
        (budget = min(top_k, cache length); fewer when fewer precede p; the current token is always kept)
    any other l >= sparse_layer_start           at a decode step: o_h = softmax_{j in P_h}(scale q_h . k_j) v_j with
                                                the P of the last selection layer before it; else full attention

Prefill and multi-token chunks are full attention at every layer (the official prefill); a decode step is a call
with decode=True and one query. The sparse layers run the block-sparse core with single-token blocks over the
selected positions, so their cost follows the budget, not the context.

Cross-layer seam: the selection layer puts P (int32 [B, H, 1, budget], -1 unused) into the block stack's carry
(`attn.core.layer_carry`, opened by `attn.models.trunk.block_stack`), and later layers of the same call read it.
Outside a stack (a layer applied on its own) there is no carry and every call is full attention; a sparse layer
whose stack ran no selection layer before it raises. Models without tidal layers never touch the carry.

Reduction: top_k >= the context length selects every position, so decoding equals `softmax` decoding exactly
(tests/sparse/test_tidal.py); the forward (decode=False) is causal `softmax` at every layer.

Deviations (fidelity "official-code"): the official treats a multi-token decode chunk as sparse; here chunks are full
attention. The paper's optional cache-correction is not reproduced. Positions: any of the softmax layer's except the
logits biases (alibi, t5, shaw) and windows, which the selection would ignore (refused).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn.core import intervention_state
from attn.core.block_sparse import block_sparse_attention
from attn.core.layer import AttentionCall
from attn.core.layer_carry import current_carry
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS
from attn.core.validation import check_qkv, int_at_least, positive_int
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

CARRY_KEY = "tidal_positions"
_NON_NEGATIVE_INT = int_at_least(0)


def tidal_positions(q: Array, k: Array, *, top_k: int, position: Any) -> Array:
    """The token-selection layer's pick for one decode step: int32 [B, H, 1, min(top_k, L)] cache slots, -1 unused.

    q [B, 1, H, D] at `position` (int, maybe traced), k [B, L, KVH, D] the dense cache (slot j holds position j):
    the top_k - 1 largest logits q . k_j over j < position (ties: the lower slot), and the current slot."""
    heads, kv_heads = check_qkv(q, k, k)
    positive_int("top_k", top_k)
    if q.shape[1] != 1:
        raise ValueError(f"tidal_positions selects for one decode query; got q of shape {q.shape}")
    length = k.shape[1]
    budget = min(int(top_k), length)
    keys = jnp.repeat(k, heads // kv_heads, axis=2).astype(jnp.float32)
    logits = jnp.einsum("bqhd,bjhd->bhqj", q.astype(jnp.float32), keys)  # [B, H, 1, L]
    position = jnp.asarray(position, jnp.int32)
    earlier = jnp.arange(length) < position
    parts = []
    if budget > 1:
        values, ids = jax.lax.top_k(jnp.where(earlier, logits, -jnp.inf), budget - 1)
        parts.append(jnp.where(values > -jnp.inf, ids, -1))
    parts.append(jnp.broadcast_to(position, (*logits.shape[:3], 1)))
    return jnp.concatenate(parts, axis=-1).astype(jnp.int32)


@register(
    "tidal",
    family="sparse",
    paper="TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention",
    catalog=124,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="decoding with a few token-selection layers (full attention, top-k positions per head) whose positions "
    "the following layers reuse for sparse attention (cross-layer carry of the model's block stack)",
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "window": "must be None (the selection ranks every cached position)",
        "top_k": "token budget per head at a decode step, the current token included (official 256)",
        "sparse_layer_start": "first token-selection layer; the layers before it are dense (official 2)",
        "correction_layer": "the re-selection layer (official enable_tidal default 13)",
        "layer_index": "0-based index of this layer in its stack (filled in by the models)",
    },
    validators={
        **SOFTMAX_VALIDATORS,
        "top_k": positive_int,
        "sparse_layer_start": _NON_NEGATIVE_INT,
        "correction_layer": _NON_NEGATIVE_INT,
        "layer_index": _NON_NEGATIVE_INT,
    },
    fidelity="official-code",
    reference="arXiv 2410.05076 (Sec. 3: token selection layers, position persistent sparse attention) and "
    "github.com/DerrickYLJ/TidalDecode src/tidal_build/modify_llama.py (dense below sparse_layer_start and at "
    "prefill; selection and re-selection layers: full attention, top budget-1 logits of the past plus the current "
    "token per head; other layers: softmax over the stored positions)",
    layer_fields=("layer_index",),
    has_attention_weights=True,
)
class TidalAttention(MultiHeadAttention):
    """TidalDecode: full attention at the selection layers, their positions reused by the later layers at decode
    steps. x [B, T, E] -> [B, T, E]."""

    top_k: int = 256
    sparse_layer_start: int = 2
    correction_layer: int = 13
    layer_index: int = 0

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if self.window is not None or self.softcap is not None or self.position in ("alibi", "t5", "shaw"):
            raise ValueError(
                f"tidal ranks positions by q . k and attends on the block-sparse core: window={self.window!r}, "
                f"softcap={self.softcap!r} and position={self.position!r} (a logits bias) are not supported; expected "
                "window=None, softcap=None and position 'rope' or 'none'"
            )

    def role(self) -> str:
        """ "full", "select" or "sparse": what this layer does at a decode step."""
        if self.layer_index < self.sparse_layer_start:
            return "full"
        if self.layer_index in (self.sparse_layer_start, self.correction_layer):
            return "select"
        return "sparse"

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, Tq, H, D], k/v [B, Tk, KVH, D] (the cache at a decode step) -> [B, Tq, H, Dv]."""
        carry = current_carry()
        step = call.decode and not call.cross and q.shape[1] == 1
        role = self.role()
        if not step or carry is None or role == "full":
            return super().attend(q, k, v, call)
        if role == "select":
            carry[CARRY_KEY] = tidal_positions(q, k, top_k=self.top_k, position=call.q_offset)
            return super().attend(q, k, v, call)
        targeted = intervention_state.targeted_stages(self) & set(intervention_state.MATRIX_STAGES)
        if targeted or self.wants_weights():
            raise ValueError(
                f"tidal layer_index={self.layer_index} attends to the selected positions on the block-sparse core at "
                f"decode steps: interventions or captures of {sorted(targeted) or 'attention weights'} are not "
                "served there (they are at prefill, at forward calls and at the selection layers)"
            )
        positions = carry.get(CARRY_KEY)
        if positions is None:
            raise ValueError(
                f"tidal layer_index={self.layer_index} is a sparse layer (>= sparse_layer_start="
                f"{self.sparse_layer_start}) but no token-selection layer ran before it in this stack; expected "
                f"layer {self.sparse_layer_start} to be a tidal layer"
            )
        return block_sparse_attention(
            q,
            k,
            v,
            block_indices=positions,
            block_size=1,
            causal=True,
            q_offset=call.q_offset,
            scale=self.scale,
            implementation={"xla": "xla", "pallas": "pallas"}.get(self.implementation),
        )
