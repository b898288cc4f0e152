"""Padding and masked-softmax helpers: padding lengths from a `Mask` (attentive pooling, the Gaussian gates whose
statistics are taken over the tokens), the valid-position masks of per-row lengths (linear scan, linear mechanisms,
model pooling, the kernel bridge), and a softmax restricted to allowed positions (pooling, Combiner, SEA)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attn.core.masks import Mask

Array = jax.Array


def padding_lengths(mask: Mask | None, batch: int, mechanism: str) -> Array | None:
    """int32 [batch] valid-token counts from a padding-only mask (kv_lengths, else q_lengths), or None.

    A reduction over the whole sequence has no query/key pairs, so only padding can be honoured: causal, window,
    segment, block, dense and function masks raise a ValueError naming `mechanism`.
    """
    if mask is None:
        return None
    if not isinstance(mask, Mask):
        raise TypeError(f"mask for {mechanism} must be an attn.Mask with padding lengths, got {type(mask).__name__}")
    other = [
        f.name
        for f in dataclasses.fields(mask)
        if f.name not in ("q_lengths", "kv_lengths") and getattr(mask, f.name) not in (None, False)
    ]
    if other:
        raise ValueError(
            f"mask for {mechanism} may only hold padding lengths (q_lengths / kv_lengths): it reduces over the "
            f"whole sequence, so {other} cannot apply"
        )
    lengths = mask.kv_lengths if mask.kv_lengths is not None else mask.q_lengths
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (batch,):
        raise ValueError(f"mask lengths have shape {lengths.shape}; expected [batch] = ({batch},)")
    return lengths


def length_mask(lengths: Any, batch: int, length: int, name: str) -> Array:
    """float32 [batch, length]: 1 where the position is below the row's length (valid), 0 for padding."""
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"{name} has shape {lengths.shape}; expected [batch] = ({batch},)")
    return (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.float32)


def valid_tokens(lengths: Any, batch: int, length: int) -> Array:
    """bool [batch, length]: True below each row's length (all True when lengths is None)."""
    if lengths is None:
        return jnp.ones((batch, length), bool)
    return length_mask(lengths, batch, length, "lengths") > 0


def masked_softmax(logits: Array, valid: Array, axis: int = -1) -> Array:
    """float32 softmax (float64 for float64 logits) of `logits` along `axis`, over the positions where `valid`
    (broadcastable) is True.

    Padded positions get weight exactly 0, and a row with no valid token is all zeros (not NaN, in value or
    gradient): the masked logits are a finite minimum, not -inf.
    """
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    logits = logits.astype(dtype)
    valid = jnp.broadcast_to(valid, logits.shape)
    masked = jnp.where(valid, logits, jnp.finfo(dtype).min)
    weights = jax.nn.softmax(masked, axis=axis)
    return jnp.where(valid, weights, 0.0)
