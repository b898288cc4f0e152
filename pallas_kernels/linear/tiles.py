"""Per-chunk decay tiles and dot helpers shared by the GPU and TPU kernel bodies (traceable inside Pallas kernels).

For chunk n of C tokens, of which `valid` = min(C, T - n C) are real (the rest is zero padding), the cumulative
log-decay inside the chunk is c_i = a * min(i + 1, valid): padding rows get decay 1, exactly as if the sequence
stopped at T, so the carried/final state is S_T and not S_{T_padded}. Then

    W[i, j] = exp(c_i - c_j) for j <= i (else 0)      intra-chunk decay matrix      [C, C]
    lam_i   = exp(c_i)                                 decay applied to the carried state   [C, 1]
    gam_j   = exp(c_end - c_j)                         decay from token j to the chunk end  [C, 1]
    end     = exp(c_end),  c_end = a * valid           decay of the state across the chunk  scalar

a = log(lambda) <= 0, so every exponent is <= 0 (no overflow); the exponent is masked before exp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

NN = ((1,), (0,))  # a @ b
NT = ((1,), (1,))  # a @ b.T
TN = ((0,), (0,))  # a.T @ b


def decay_tiles(a: Array, valid: Array, chunk: int) -> tuple[Array, Array, Array, Array]:
    """(W [C, C], lam [C, 1], gam [C, 1], end scalar) for log-decay a and `valid` real tokens in the chunk."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    lower = rows >= cols
    cum_rows = a * jnp.minimum(rows + 1, valid).astype(jnp.float32)
    cum_cols = a * jnp.minimum(cols + 1, valid).astype(jnp.float32)
    weights = jnp.where(lower, jnp.exp(jnp.where(lower, cum_rows - cum_cols, 0.0)), 0.0)
    cum = a * jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) + 1, valid).astype(jnp.float32)
    c_end = a * valid.astype(jnp.float32)
    return weights, jnp.exp(cum), jnp.exp(c_end - cum), jnp.exp(c_end)


def dot_inputs(x: Array, y: Array, dims) -> Array:
    """Product of two raw input tiles (same dtype): native precision operands, float32 accumulation (full f32
    precision for f32 inputs; no TF32)."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jax.lax.dot_general(x, y, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def dot_f32(x: Array, y: Array, dims) -> Array:
    """Product involving decay-weighted tiles or the state: both operands in float32 at full precision, so the
    carried state never loses bits to the input dtype."""
    return jax.lax.dot_general(
        x.astype(jnp.float32),
        y.astype(jnp.float32),
        (dims, ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
