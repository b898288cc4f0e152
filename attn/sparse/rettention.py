"""`rettention`: Re-ttention, very sparse attention for diffusion transformers corrected by the attention statistics of
earlier denoising steps: the kept keys' share of the softmax mass (the denominator ratio) rescales the sparse
attention, and a cached residual adds back what the sparse attention misses.

Paper: "Re-ttention: Ultra Sparse Visual Generation via Attention Statistical Reshape" (Chen, Mills, Jiang, Gao, Niu,
NeurIPS 2025, arXiv 2505.22918; code github.com/cccrrrccc/Re-ttention module/pixart_processor.py). Training-free; no
parameters beyond the softmax layer's. Per (batch row, head, query i), s_ij = scale q_i . k_j, kept set
S_i = { j : |i - j| <= window // 2 } (the official local window of width int(keep_rate T)):

    full step      o_i = softmax_j(s_ij) v_j                                  (exact attention over every key)
                   rho_i = sum_{j in S_i} exp(s_ij) / sum_j exp(s_ij)          the kept keys' mass (cached)
    refresh step   a full step, and r_i = o_i - rho_i o^S_i (cached residual),  o^S_i = softmax_{j in S_i}(s_ij) v_j
    sparse step    o_i = rho_i o^S_i + r_i,   then rho_i <- rho_i + ratio_step   (the official += 0.04)

Schedule over the denoising steps t = 0, 1, ... (the "rettention" collection's step counter): t < warmup_steps are full
steps; t >= warmup_steps with (t - warmup_steps) % refresh_interval == 0 and t < refresh_until are refresh steps (the
official: warmup 5, refresh at 5, 10, 15); the others are sparse steps. The sparse attention o^S runs on the
block-sparse core with single-token blocks over the window's key ids (cost O(T window D)); full and refresh steps are
exact dense attention with its lse (`attn.core.softmax`), which gives rho = exp(lse^S - lse).

State: call the layer with `mutable=["rettention"]` once per denoising step and pass the returned collection back
(step int32 [], ratio float32 [B, H, T], residual float32 [B, T, H, Dv]). Without that collection (an ordinary call,
e.g. training) the layer is the softmax layer's attention, exactly (attention dropout included).

Reductions: with ratio_step = 0, a sparse step on the same input as the refresh step before it returns the full
attention exactly (rho o^S + r = o: the correction is exact while the attention is unchanged); every step full
(warmup_steps beyond the last step), or a call without the collection, is `softmax` (tests/sparse/
test_rettention.py).

Deviations (fidelity "official-code"): the official processors add the residual after the output projection (the
same, since the projection is linear); the official mask is the diffusers dense additive mask (-1e5), here the core
skips the masked keys. Self-attention over one token sequence; no causal masking, no decoding; dropout applies to
ordinary calls only (the denoising steps are inference; the official has none).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attn.core.block_sparse import block_sparse_attention
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.softmax import softmax_attention
from attn.core.validation import check_qkv, in_range, int_at_least, positive_int
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

_COLLECTION = "rettention"
_KEEP_RATE = in_range(0.0, 1.0, low_inclusive=False)
_NON_NEGATIVE_INT = int_at_least(0)


def window_indices(length: int, window: int) -> Array:
    """int32 [1, 1, T, window | 1] key ids of the official local window (|i - j| <= window // 2), -1 outside [0, T)."""
    positive_int("window", window)
    half = int(window) // 2
    ids = jnp.arange(length)[:, None] + jnp.arange(-half, half + 1)[None, :]
    return jnp.where((ids >= 0) & (ids < length), ids, -1).astype(jnp.int32)[None, None]


def rettention_parts(q: Array, k: Array, v: Array, *, window: int, scale: float | None = None) -> dict[str, Array]:
    """The full and the sparse attention of one step and the kept mass.

    q [B, T, H, D], k [B, T, KVH, D], v [B, T, KVH, Dv] -> {"full": [B, T, H, Dv], "sparse": o^S [B, T, H, Dv],
    "ratio": rho float32 [B, H, T]} (float32 outputs)."""
    check_qkv(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"rettention is self-attention: q {q.shape} and k {k.shape} need the same length")
    full, full_aux = softmax_attention(q, k, v, scale=scale, return_lse=True, implementation="xla")
    sparse, sparse_aux = rettention_sparse(q, k, v, window=window, scale=scale, return_lse=True)
    ratio = jnp.exp(sparse_aux["lse"].astype(jnp.float32) - full_aux["lse"].astype(jnp.float32))
    return {"full": full.astype(jnp.float32), "sparse": sparse.astype(jnp.float32), "ratio": ratio}


def rettention_sparse(
    q: Array, k: Array, v: Array, *, window: int, scale: float | None = None, return_lse: bool = False
) -> Any:
    """o^S [B, T, H, Dv]: softmax over the local window on the block-sparse core (block_size 1); with return_lse,
    (o^S, {"lse": float32 [B, H, T]})."""
    ids = window_indices(q.shape[1], window)
    return block_sparse_attention(q, k, v, block_indices=ids, block_size=1, scale=scale, return_lse=return_lse)


def step_kind(step: Array, *, warmup_steps: int, refresh_interval: int, refresh_until: int) -> Array:
    """int32: 0 full step, 1 refresh step, 2 sparse step, for the denoising step counter `step` (see the schedule)."""
    after = step - warmup_steps
    refresh = (after >= 0) & (after % refresh_interval == 0) & (step < refresh_until)
    return jnp.where(step < warmup_steps, 0, jnp.where(refresh, 1, 2)).astype(jnp.int32)


@register(
    "rettention",
    family="sparse",
    paper="Re-ttention: Ultra Sparse Visual Generation via Attention Statistical Reshape",
    catalog=133,
    op=None,
    input_kind="sequence",
    supports_causal=False,
    supports_decode=False,
    summary="diffusion-step sparse attention over a local window, rescaled by the kept keys' softmax mass and "
    "corrected by a residual, both cached from the last full-attention step (state in the 'rettention' collection)",
    fidelity="official-code",
    reference="arXiv 2505.22918 (Sec. 3: denominator ratio, residual caching) and github.com/cccrrrccc/Re-ttention "
    "module/pixart_processor.py (local window of int(sparsity T), get_attention_scores_and_ratio, "
    "get_attention_scores_with_denominator_ratio, full steps < 5, refresh at 5/10/15, cached_ratio += 0.04)",
    option_docs={
        "keep_rate": "window width as a fraction of the tokens: window = max(int(keep_rate T), 1) (official sparsity)",
        "warmup_steps": "first denoising steps with full attention (official 5)",
        "refresh_interval": "after warmup, a refresh (full) step every this many steps (official 5)",
        "refresh_until": "no refresh from this step on (official 20: refresh at 5, 10, 15)",
        "ratio_step": "added to the cached ratio after every sparse step (official 0.04)",
    },
    validators={
        "keep_rate": _KEEP_RATE,
        "warmup_steps": _NON_NEGATIVE_INT,
        "refresh_interval": positive_int,
        "refresh_until": _NON_NEGATIVE_INT,
        "ratio_step": in_range(-1.0, 1.0),
    },
)
class ReAttention(MultiHeadAttention):
    """Re-ttention: statistics-corrected very sparse attention across denoising steps. x [B, T, E] -> [B, T, E]
    (state: the "rettention" collection, see the module docstring)."""

    keep_rate: float = 0.031
    warmup_steps: int = 5
    refresh_interval: int = 5
    refresh_until: int = 20
    ratio_step: float = 0.04

    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        name = self.registry_name or type(self).__name__
        if call.decode or call.cross:
            raise ValueError(f"{name} is self-attention of a diffusion transformer: no decode, no context")
        mask = call.mask if call.mask is not None else Mask()
        given = [f for f in Mask.__dataclass_fields__ if getattr(mask, f) not in (None, False)]
        if given or self.window is not None or self.softcap is not None or self.position in ("alibi", "t5", "shaw"):
            raise ValueError(
                f"{name} takes no mask (its window is the keep_rate); got mask fields {given}, window={self.window!r}, "
                f"softcap={self.softcap!r}, position={self.position!r}"
            )

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, Dv]."""
        length = q.shape[1]
        window = max(int(self.keep_rate * length), 1)
        if not self.is_mutable_collection(_COLLECTION):
            return super().attend(q, k, v, call)  # an ordinary call: the softmax layer's attention (and dropout)
        batch, heads, value_dim = q.shape[0], q.shape[2], v.shape[-1]
        step = self.variable(_COLLECTION, "step", lambda: jnp.zeros((), jnp.int32))
        ratio = self.variable(_COLLECTION, "ratio", lambda: jnp.ones((batch, heads, length), jnp.float32))
        residual = self.variable(
            _COLLECTION, "residual", lambda: jnp.zeros((batch, length, heads, value_dim), jnp.float32)
        )
        kind = step_kind(
            step.value,
            warmup_steps=self.warmup_steps,
            refresh_interval=self.refresh_interval,
            refresh_until=self.refresh_until,
        )

        def dense(operands):
            q, k, v, _, old_residual = operands
            parts = rettention_parts(q, k, v, window=window, scale=self.scale)
            fresh = parts["full"] - parts["ratio"].transpose(0, 2, 1)[..., None] * parts["sparse"]
            return parts["full"], parts["ratio"], jnp.where(kind == 1, fresh, old_residual)

        def sparse(operands):
            q, k, v, old_ratio, old_residual = operands
            part = rettention_sparse(q, k, v, window=window, scale=self.scale).astype(jnp.float32)
            out = old_ratio.transpose(0, 2, 1)[..., None] * part + old_residual
            return out, old_ratio + self.ratio_step, old_residual

        operands = (q, k, v, ratio.value, residual.value)
        out, ratio.value, residual.value = jax.lax.cond(kind == 2, sparse, dense, operands)
        step.value = step.value + 1
        return out.astype(q.dtype)
