"""`BlockSelectorLayer`: the layer every block selector of `attn.sparse` shares (not registered itself).

    q, k, v   = projections, RoPE (the softmax layer's `prepare`)
    indices   = select(q, k, causal, q_offset)           int32 [B, H, ceil(Tq / block_size), max_selected]
    o         = block_sparse_attention(q, k, v, indices)  exact softmax over the selected key blocks [B, Tq, H, Dv]

The selection runs in `prepare`, after RoPE (the selectors score rotated queries and keys, like the attention
itself), and is recorded twice in the call: as indices (`call.state`) for the block-sparse core, and as a block
mask merged into the call's mask (`attn.Mask(block_mask=..., block_size=(bs, bs))`). `attend` takes the core when it
can compute everything the call asks for: no window, softcap or position bias, a mask that is at most causal, no
intervention on the logits or weights and no active attention dropout. Otherwise the softmax layer's own path runs
with the merged mask (dense cost, the same function: softmax restricted to the selected blocks), so interventions
and attention dropout work unchanged. Captures (`attention_weights`, ...) keep the core's output and compute the
masked weights beside it, so recording never changes the result.

Selection is discrete: indices carry no gradient. Gradients flow to q, k, v through the selected entries only, and
are those of the masked softmax wherever a small change of q and k selects the same blocks.

Decoding is not supported (the selectors are prefill / forward-pass methods); cross-attention is allowed where the
selector allows it (queries at positions 0..Tq-1 over the context).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attn.core import intervention_state, pipeline
from attn.core.block_sparse import block_sparse_attention
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

# The layer's `implementation` option -> the core's (the core has an XLA path and a Pallas kernel).
_CORE_IMPLEMENTATIONS = {"xla": "xla", "pallas": "pallas"}
# Mask fields the core cannot apply (it applies causal only); any of them sends the call to the dense masked path.
_MATRIX_CAPTURES = ("attention_logits", "attention_weights", "key_mass", "lse")
_MASK_ARRAYS = ("q_lengths", "kv_lengths", "q_segment_ids", "kv_segment_ids", "prefix_lengths", "dense")


def non_causal_mask_fields(mask: Mask | None) -> list[str]:
    """The fields set in `mask` besides `causal` and `block_size` (lengths, segments, prefix, dense, mask_fn,
    window, block_mask): what a selector that applies a causal mask only cannot honour."""
    mask = mask if mask is not None else Mask()
    fields = (*_MASK_ARRAYS, "mask_fn", "window", "block_mask")
    return [field for field in fields if getattr(mask, field) is not None]


def check_causal_rope_only(layer: Any, call: AttentionCall, name: str) -> None:
    """ValueError naming what `layer` (a causal-mask, RoPE-or-no-positions selector) cannot honour in `call`."""
    given = non_causal_mask_fields(call.mask)
    if given or layer.window is not None or layer.softcap is not None or layer.position in ("alibi", "t5", "shaw"):
        raise ValueError(
            f"{name} supports a causal mask and RoPE (or no positions) only; got mask fields {given}, "
            f"window={layer.window!r}, softcap={layer.softcap!r}, position={layer.position!r}"
        )


def indices_to_block_mask(block_indices: Array, num_k_blocks: int) -> Array:
    """int [B, H, nq, S] key block ids (-1 = padding) -> bool [B, H, nq, num_k_blocks]."""
    ids = jnp.asarray(block_indices)
    return jnp.any(ids[..., None] == jnp.arange(num_k_blocks, dtype=ids.dtype), axis=-2)


class BlockSelectorLayer(MultiHeadAttention):
    """Softmax attention restricted to the key blocks `select` picks per query block. x [B, T, E] -> [B, T, E].

    Subclasses implement `select(q, k, *, causal, q_offset) -> int32 [B, H, nq, S]` and declare `block_size`.
    """

    block_size: int = 64

    # The core has no probability matrix; the dense masked path (and the capture beside the core) provides them.
    intervention_stages: ClassVar[tuple[str, ...]] = ("attention_logits", "attention_weights", "head_outputs")

    def select(self, q: Array, k: Array, *, causal: bool, q_offset: Any) -> Array:
        raise NotImplementedError(f"{type(self).__name__} must implement select(q, k, causal=, q_offset=)")

    def select_with_values(self, q: Array, k: Array, v: Array, *, causal: bool, q_offset: Any) -> Array:
        """The selection `prepare` runs: `select(q, k)`; selectors that also read the values override this."""
        return self.select(q, k, causal=causal, q_offset=q_offset)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.decode:
            raise ValueError(
                f"decode=True is not supported by {self.registry_name or type(self).__name__}: it selects key blocks "
                "for a forward (prefill) pass; decode with a dense layer over the same parameters"
            )

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The softmax layer's positions, then the selection: indices in `call.state`, the block mask in the mask."""
        q, k, v, call = super().prepare(q, k, v, call)
        mask = call.mask if call.mask is not None else Mask()
        if mask.block_mask is not None:
            raise ValueError(
                f"{self.registry_name} selects its own key blocks; the given mask already has a block_mask (block_size="
                f"{mask.block_size}); pass padding, segments or a mask_fn instead"
            )
        causal = mask.causal
        indices = jax.lax.stop_gradient(self.select_with_values(q, k, v, causal=causal, q_offset=call.q_offset))
        n_k = -(-k.shape[1] // self.block_size)
        merged = mask.replace(
            block_mask=indices_to_block_mask(indices, n_k), block_size=(self.block_size, self.block_size)
        )
        plain = mask.window is None and mask.mask_fn is None and all(getattr(mask, f) is None for f in _MASK_ARRAYS)
        return q, k, v, call.replace(mask=merged, state={"block_indices": indices, "causal": causal, "plain": plain})

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, Tq, H, D], k/v [B, Tk, KVH, D] -> [B, Tq, H, Dv]: the block-sparse core, or the dense masked path.

        Captures alone keep the core's output (the weights are computed beside it for the record, so capturing never
        changes the result); interventions on the logits or weights, and attention dropout, take the dense path."""
        name = self.registry_name or type(self).__name__
        core_fits = call.state["plain"] and self.window is None and self.softcap is None and call.bias is None
        if not core_fits:
            intervention_state.log_once(
                name,
                "window, softcap, a position bias or a mask beyond causal: the selected blocks are evaluated densely",
            )
            return super().attend(q, k, v, call)
        targeted = intervention_state.targeted_stages(self) & set(intervention_state.MATRIX_STAGES)
        if targeted or self.effective_dropout(call.deterministic) > 0.0:
            return super().attend(q, k, v, call)
        out = block_sparse_attention(
            q,
            k,
            v,
            block_indices=call.state["block_indices"],
            block_size=self.block_size,
            causal=call.state["causal"],
            q_offset=call.q_offset,
            scale=self.scale,
            implementation=_CORE_IMPLEMENTATIONS.get(self.implementation),
        )
        if any(self.records(capture) for capture in _MATRIX_CAPTURES):
            logits = self.attention_logits(q, k, call)
            self.sow_capture("attention_logits", logits)
            weights = self.attention_weights(logits, call)
            self.sow_capture("attention_weights", weights)
            self.sow_capture("key_mass", pipeline.key_mass(weights))
        return out
