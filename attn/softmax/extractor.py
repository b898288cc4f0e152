"""`extractor`: the Extractors (SHE, HE, WE, ME), causal sequence mixers that replace self-attention.

Paper: "Attention Is Not All You Need Anymore" (Zhe Chen, 2023, arXiv 2308.07661), with the follow-up
"Interpretation of the Transformer and Improvement of the Extractor" (arXiv 2311.12678).

STATUS — RECONSTRUCTION. The paper's body (its equations) could not be read from this environment: only the
abstract was reachable, and no official code exists. What the abstract fixes: four drop-in replacements for
self-attention; SHE ("super high-performance") is the full form, HE ("higher-performance"), WE ("worthwhile") and
ME ("minimalist") are successive simplifications of SHE with lower compute/memory and shorter critical paths;
text generation is treated as a variable-length Markov chain (causal). The one concrete description found is a
third-party Flax module (not by the author) for SHE: per-position trainable matrices applied to each input, a
causal running sum scaled by 1/sqrt(length) (attributed there to the follow-up paper), multiplied elementwise by a
linear "adjustment" of the current input. The HE/WE/ME forms below are our reading of "simplifications": the
per-position matrix becomes a per-position vector (HE), a per-position scalar (WE), or nothing (ME).

Absolute or relative position weights: not settled by a primary source. The search was repeated (arXiv 2308.07661
and 2311.12678: only abstract pages are stored; code search: no implementation by the author). The third-party SHE
indexes its per-position matrices by the absolute position s of the input (one matrix per time index, applied
before the prefix sum), and this layer follows it; a relative form (weights indexed by t - s) would make the mix a
causal convolution and need the last max_length inputs, not a running sum, as decoding state. The layer is
experimental until the paper's equations are checked.

Implemented, per head h (heads partition the channels; v and g have head_dim D each):

    v_s = x_s W_v,   g_t = x_t W_g                                     ("value", "adjust" projections)
    e_s = v_s P_s      SHE: P_s a trainable [D, D] matrix per position s (and head)
        = v_s ⊙ p_s    HE:  p_s a trainable [D] vector per position
        = a_s v_s      WE:  a_s a trainable scalar per position
        = v_s          ME
    c_t = (1 / n(t)) sum_{s <= t} e_s        n(t) = sqrt(t + 1) ("sqrt"), t + 1 ("mean") or 1 ("none")
    y_t = concat_h(g_t ⊙ c_t) W_o

Positions s, t are absolute (0-based), so the layer needs `max_length` >= the sequence length; P_s, p_s, a_s are
initialised to I, 1, 1 (every variant starts as ME and learns its position weights). Causal by construction: y_t
reads x_0..x_t only (any mask must be causal; there is no non-causal form). Decoding keeps the running sum
sum_{s<t} e_s [B, H, D] and the position in the "cache" collection, O(H D) state per sequence (no KV cache).

Shapes: x [B, T, E] -> [B, T, E]. Time O(B T H D^2) for SHE (a prefix sum after a per-token matmul), O(B T H D)
for HE/WE/ME, plus the projections; memory O(B T H D); parameters max_length * H * D^2 (SHE), * H * D (HE), * H
(WE). No reduction to softmax attention exists (there are no attention weights; nothing is sown).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.masks import Mask
from attn.core.pipeline import accumulation_dtype
from attn.core.validation import check_choice, choice, positive_int
from attn.registry import register

Array = jax.Array

VARIANTS = ("she", "he", "we", "me")
LENGTH_SCALINGS = ("sqrt", "mean", "none")
RUNNING_SUM_AXES = (("running_sum", ("batch", "heads", "head_dim")),)


def _identity_matrices(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """[L, H, D, D] stacks of identity matrices (SHE starts as ME)."""
    del key
    return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)


def extractor_mix(
    e: Array, g: Array, *, start: Any = 0, carry: Array | None = None, length_scaling: str = "sqrt"
) -> tuple[Array, Array]:
    """The Extractor's causal mixing (see the module doc), given the per-position terms.

    e: [B, T, H, D] the terms e_s of positions start..start+T-1; g: [B, T, H, D] the adjustments g_t.
    carry: [B, H, D] sum of e_s over the positions before `start` (None = zero), in float32 (float64 for float64
    inputs), as is the arithmetic.
    Returns (g ⊙ c [B, T, H, D] in g.dtype, the updated carry [B, H, D]).
    """
    check_choice("length_scaling", length_scaling, LENGTH_SCALINGS)
    dtype = accumulation_dtype(e, g)
    sums = jnp.cumsum(e.astype(dtype), axis=1)
    if carry is not None:
        sums = sums + carry[:, None]
    count = (start + jnp.arange(e.shape[1]) + 1).astype(dtype)[None, :, None, None]
    if length_scaling == "sqrt":
        sums = sums / jnp.sqrt(count)
    elif length_scaling == "mean":
        sums = sums / count
    total = jnp.sum(e.astype(dtype), axis=1) + (0.0 if carry is None else carry)
    return (g.astype(dtype) * sums).astype(g.dtype), total


def _check_mask(mask: Mask | None) -> None:
    if mask is None:
        return
    unsupported = [
        name
        for name in ("q_segment_ids", "prefix_lengths", "block_mask", "dense", "mask_fn", "window")
        if getattr(mask, name) is not None
    ]
    if not mask.causal or unsupported:
        raise ValueError(
            "extractor is a causal sequence mixer: mask must be None or attn.Mask(causal=True) (optionally with "
            f"q_lengths/kv_lengths for right padding); got causal={mask.causal}"
            + (f" with unsupported parts {unsupported}" if unsupported else "")
        )


@register(
    "extractor",
    family="softmax",
    paper="Attention Is Not All You Need Anymore",
    catalog=110,
    op=extractor_mix,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="Extractors (SHE/HE/WE/ME): causal prefix sums of position-weighted values, gated by the input",
    option_docs={
        "variant": "'she' (per-position matrices), 'he' (vectors), 'we' (scalars) or 'me' (none)",
        "max_length": "longest sequence (positions 0..max_length-1 each have their own weights)",
        "length_scaling": "divide the running sum at position t by sqrt(t+1) ('sqrt'), t+1 ('mean') or 1 ('none')",
        "dropout_rate": "dropout on the mixed output c_t (active when deterministic=False)",
        "num_kv_heads": "unused (the Extractor has no keys); must be None or num_heads",
        "capture": "unused (the Extractor has no attention weights to sow)",
        "implementation": "unused (pure jnp)",
    },
    fidelity="reconstructed",
    reference="the abstract of arXiv 2308.07661 (body and official code not available) and a third-party Flax SHE "
    "module; HE/WE/ME are this module's reading of 'simplifications'",
    validators={"variant": choice(*VARIANTS), "max_length": positive_int, "length_scaling": choice(*LENGTH_SCALINGS)},
    supports_gqa=False,
)
class Extractor(AttentionLayer):
    """An Extractor (causal, self-mixing only). x [B, T, E] -> [B, T, E]."""

    variant: str = "he"
    max_length: int = 512
    length_scaling: str = "sqrt"

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if self.kv_heads != self.num_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} is not supported by extractor; use None (no keys)")
        if call.cross:
            raise ValueError(f"extractor mixes its own sequence; got a context of shape {call.context.shape}")
        if call.positions is not None:
            raise ValueError(
                "extractor weights absolute positions 0..T-1 itself; positions must be None, got shape "
                f"{jnp.shape(call.positions)}"
            )
        _check_mask(call.mask)
        if call.x.shape[1] > self.max_length:
            raise ValueError(f"sequence length {call.x.shape[1]} exceeds max_length={self.max_length} of extractor")

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, None, Array]:
        """(g, None, v): the adjustments g_t = x_t W_g take the queries' place, v_s = x_s W_v; there are no keys."""
        v = self.dense_heads(x, self.num_heads, "heads", "value")
        g = self.dense_heads(x, self.num_heads, "heads", "adjust")
        return g, None, v

    def prepare(self, g: Array, k: None, v: Array, call: AttentionCall) -> tuple[Array, None, Array, AttentionCall]:
        """Positions are the absolute 0..T-1 (continuing from the running state in `attend` when decoding)."""
        return g, k, v, call

    def attend(self, g: Array, k: None, v: Array, call: AttentionCall) -> Array:
        """g, v [B, T, H, D] -> g ⊙ c [B, T, H, D]; decoding continues the running sum kept in the "cache"
        collection. Dropout (the attention-dropout helper) acts on the mixed output."""
        batch, length = v.shape[:2]
        carry = start = recurrent = None
        if call.decode:  # the running sum on the cache protocol (a RecurrentState)
            recurrent = cache_lib.load_state(self, ("running_sum",))
            if recurrent is None:  # the creating call: an ordinary forward, then a zero state
                shape = (batch, self.num_heads, self.head_dim)
                zeros = {"running_sum": jnp.zeros(shape, accumulation_dtype(v, g))}
                recurrent = cache_lib.RecurrentState(zeros, jnp.array(0, jnp.int32), RUNNING_SUM_AXES)
                cache_lib.store_state(self, recurrent)
                recurrent = None
            else:
                carry, start = recurrent.state["running_sum"], recurrent.index
        e = self.position_terms(v, 0 if start is None else start)
        y, total = extractor_mix(
            e, g, start=0 if start is None else start, carry=carry, length_scaling=self.length_scaling
        )
        if recurrent is not None:
            state = cache_lib.RecurrentState({"running_sum": total}, start + length, RUNNING_SUM_AXES)
            cache_lib.store_state(self, state)
        return self.attention_dropout(y, call.deterministic)

    def position_terms(self, v: Array, start: Any) -> Array:
        """e_s for positions start..start+T-1 of v [B, T, H, D] (see the module doc)."""
        heads, dim, length = self.num_heads, self.head_dim, v.shape[1]
        if self.variant == "me":
            return v
        if self.variant == "she":
            shape, axes, init = (
                (self.max_length, heads, dim, dim),
                (None, "heads", "head_dim", None),
                _identity_matrices,
            )
        elif self.variant == "he":
            shape, axes, init = (self.max_length, heads, dim), (None, "heads", "head_dim"), nn.initializers.ones
        else:
            shape, axes, init = (self.max_length, heads), (None, "heads"), nn.initializers.ones
        table = self.param("position_weights", nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
        # Decoding past max_length clamps to the last rows (dynamic_slice semantics); the creating call checked T.
        rows = jnp.asarray(jax.lax.dynamic_slice_in_dim(table, start, length, axis=0), self.dtype)
        if self.variant == "she":
            return jnp.einsum("bthd,thde->bthe", v, rows)
        if self.variant == "he":
            return v * rows[None]
        return v * rows[None, :, :, None]
