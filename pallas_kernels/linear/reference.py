"""Recurrent (token-by-token) causal linear attention in pure jnp: the reference the kernels are tested against.

    S_t = lambda_h S_{t-1} + k_t v_t^T        (S_{-1} = initial_state, lambda_h = decay[h], 1 without decay)
    o_t = q_t S_t

Shapes: q, k [B, T, H | KVH, Dk], v [B, T, KVH, Dv]; out [B, T, H, Dv] in q.dtype; state f32 [B, H, Dk, Dv].
O(T Dk Dv) time, sequential over T (`lax.scan`); computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.linear.validation import check_lightning_args

Array = jax.Array


def lightning_attention_reference(
    q: Array,
    k: Array,
    v: Array,
    *,
    decay: Array | None = None,
    initial_state: Array | None = None,
    return_state: bool = False,
) -> Array | tuple[Array, Array]:
    """Same arguments and results as `lightning_attention`, minus chunk_size/backend/interpret."""
    batch, _, heads, key_dim, value_dim, kv_heads = check_lightning_args(q, k, v, decay, initial_state)
    groups = heads // kv_heads
    qf = q.astype(jnp.float32)
    kf = jnp.repeat(k.astype(jnp.float32), groups, axis=2)
    vf = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
    lam = jnp.ones((heads,), jnp.float32)
    if decay is not None:
        lam = jnp.broadcast_to(jnp.asarray(decay, jnp.float32), (heads,))
    state = (
        jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
        if initial_state is None
        else jnp.asarray(initial_state, jnp.float32)
    )

    def step(carry, inputs):
        qt, kt, vt = inputs  # [B, H, D]
        carry = lam[None, :, None, None] * carry + kt[..., :, None] * vt[..., None, :]
        return carry, jnp.einsum("bhd,bhde->bhe", qt, carry, precision=jax.lax.Precision.HIGHEST)

    final, out = jax.lax.scan(step, state, tuple(jnp.moveaxis(x, 1, 0) for x in (qf, kf, vf)))
    out = jnp.moveaxis(out, 0, 1).astype(q.dtype)
    return (out, final) if return_state else out
