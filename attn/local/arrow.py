"""`arrow`: arrow-shaped attention with LogN scaling on the global token, from SeNER, "Small Language Model Makes an
Effective Long Text Extractor" (Chen, Zhang, Tang; catalog [30]; code THUDM/scholar-profiling/sener).

The first `num_global` tokens ([CLS] in SeNER, num_global = 1) are global: they attend to every key and every query
attends to them; the other tokens attend to a local band around themselves. The mask is an arrow (a full first
row and column plus a diagonal band):

    allowed(i, j) = i < G  or  j < G  or  i - left <= j <= i + right          (G = num_global)

SeNER uses the bidirectional band |i - j| <= 128 (one-sided window 128) over DeBERTa. With a causal mask the same
pattern is a sink + sliding window decoder pattern (and decoding with the KV cache works). LogN scaling multiplies
the logits of the global queries by

    lambda_i = log(n_i) / log(n_train)          for i < G  (1 for the other queries)

where n_i is the number of keys query i may see and n_train = `logn_base_length` (512, DeBERTa's training
length), so the entropy of the global token's attention stays stable as the text grows (lambda = 1 at the training
length). SeNER's code multiplies the [CLS] row of logits, position terms included, by log(n) / log(512) with n the
(padded) input length, which is n_i for the bidirectional [CLS] row; here the factor also scales the rows of the
other global tokens and, with causal masking, uses the keys a row actually sees. Scaling q_i (and the
position-bias row) by lambda_i scales exactly those logits. The local tokens' rows are unscaled.

    o_i = softmax_j(lambda_i (q_i k_j^T / sqrt(D) + bias_ij) + (-inf where not allowed(i, j))) v_j

Shapes: x [B, T, E] -> [B, T, E]. Time and memory O(T (G + left + right + 1)) pairs with a kernel that skips masked
blocks (O(T^2) in the dense reference path). local_window >= T - 1 with logn_scaling=False reduces exactly to
`softmax` (every pair allowed); num_global = 0 with logn_scaling=False gives plain sliding-window attention.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.validation import OptionValidator, int_at_least, non_negative_int, normalize_window
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ArrowPattern:
    """The arrow mask as a hashable `Mask.mask_fn`: global rows/columns plus a (left, right) band."""

    num_global: int
    left: int
    right: int

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        band = (kv_idx >= q_idx - self.left) & (kv_idx <= q_idx + self.right)
        return (q_idx < self.num_global) | (kv_idx < self.num_global) | band


def _is_band(local_window: Any) -> bool:
    try:
        return normalize_window(local_window) is not None
    except ValueError:
        return False


LOCAL_WINDOW = OptionValidator(
    _is_band, "an int w >= 0 (|i - j| <= w) or a pair (left, right) of non-negative ints", "int >= 0 or (left, right)"
)


# arrow's band is its own mask; a sliding window would cut the global rows as well.
NO_WINDOW = OptionValidator(
    lambda v: v is None, "None (a window would also cut the global rows; arrow's band is set by local_window)", "None"
)


def local_band(local_window: Any) -> tuple[int, int]:
    """local_window as (left, right); ValueError naming `local_window` otherwise."""
    LOCAL_WINDOW("local_window", local_window)
    return normalize_window(local_window)


def arrow_mask(num_global: int, local_window: int | tuple[int, int], base: Mask | None = None) -> Mask:
    """`base` (causal, padding, ...) AND the arrow pattern. local_window: int w (= (w, w)) or (left, right)."""
    base = Mask() if base is None else base
    if base.mask_fn is not None:
        raise ValueError(
            "arrow builds its own mask_fn; the given mask already has one; pass causal, padding or a block mask"
        )
    left, right = local_band(local_window)
    return base.replace(mask_fn=ArrowPattern(num_global, left, right))


def logn_factors(mask: Mask, q_len: int, kv_len: int, *, q_offset: Any, num_global: int, base_length: int) -> Array:
    """float32 [B|1, H|1, q_len]: log(n_i) / log(base_length) for global query rows, 1 elsewhere, with n_i the
    number of keys row i may see under `mask` (at least 1).

    Only the first min(num_global, q_len) rows of the chunk can hold global queries (absolute positions are
    q_offset + i >= i), so the mask is evaluated on those rows alone: O(num_global kv_len).
    """
    rows = min(num_global, q_len)
    visible = jnp.sum(mask.tile(0, rows, 0, kv_len, q_offset=q_offset), axis=-1, dtype=jnp.int32)
    factor = jnp.log(jnp.maximum(visible, 1).astype(jnp.float32)) / math.log(base_length)
    is_global = (q_offset + jnp.arange(rows, dtype=jnp.int32)) < num_global
    factor = jnp.where(is_global, factor, 1.0)
    return jnp.pad(factor, [(0, 0), (0, 0), (0, q_len - rows)], constant_values=1.0)


@register(
    "arrow",
    family="local",
    paper="Small Language Model Makes an Effective Long Text Extractor",
    catalog=30,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="SeNER arrow attention: global first token(s) + local band, LogN-scaled logits on the global rows",
    option_docs={
        "local_window": "band of the non-global tokens: int w (|i - j| <= w) or (left, right); SeNER uses 128",
        "num_global": "number of leading global tokens ([CLS]); they see and are seen by every token",
        "logn_scaling": "multiply the global rows' logits by log(n) / log(logn_base_length), n = keys they see",
        "logn_base_length": "training length n_train of LogN scaling (factor 1 at this many keys; SeNER 512)",
    },
    fidelity="official-code",
    reference="THUDM/scholar-profiling (sener): arrow mask and LogN scaling log(n) / log(512) of the [CLS] row; "
    "extended here to several global tokens and causal masks",
    validators={
        "local_window": LOCAL_WINDOW,
        "num_global": non_negative_int,
        "logn_base_length": int_at_least(2),
        "window": NO_WINDOW,
    },
    has_attention_weights=True,
)
class ArrowAttention(MultiHeadAttention):
    """Arrow attention (SeNER): x [B, T, E] -> [B, T, E]; bidirectional unless the mask is causal."""

    local_window: int | tuple[int, int] = 128
    num_global: int = 1
    logn_scaling: bool = True
    logn_base_length: int = 512

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.cross:
            raise ValueError(f"arrow is self-attention; got a context of shape {call.context.shape}")

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The softmax layer's positions and cache, then the arrow mask over the call's mask and LogN scaling of the
        global rows: q [B, Tq, H, D] and the position bias rows are multiplied by lambda_i."""
        q, k, v, call = super().prepare(q, k, v, call)
        pattern = arrow_mask(self.num_global, self.local_window, call.mask)
        bias = call.bias
        if self.logn_scaling and self.num_global > 0:
            factor = logn_factors(
                pattern,
                q.shape[1],
                k.shape[1],
                q_offset=call.q_offset,
                num_global=self.num_global,
                base_length=self.logn_base_length,
            )  # [B|1, H|1, Tq]
            q = q * jnp.swapaxes(factor, 1, 2)[..., None].astype(q.dtype)
            if bias is not None:
                bias = bias * factor[..., None]
        return q, k, v, call.replace(mask=pattern, bias=bias)
