"""The differentiation rule shared by the GPU and TPU kernels: a `jax.custom_vjp` around a backend's forward and
backward launchers, the GQA reduction of per-query-head dK/dV, and the decay gradient from the exact identity below.

Decay gradient. With a = log(lambda) for one head and positions t = 0..T-1, the forward is

    o_t = sum_{s<=t} e^{a(t-s)} (q_t . k_s) v_s + e^{a(t+1)} q_t S_0
    S_T = e^{aT} S_0 + sum_s e^{a(T-1-s)} k_s v_s^T

Substituting q~_t = e^{at} q_t, k~_s = e^{-as} k_s and X = e^a S_0 leaves o_t = sum_{s<=t} (q~_t . k~_s) v_s + q~_t X
and S_T = e^{a(T-1)} (X + sum_s k~_s v_s^T): a enters only through these rescalings, so the chain rule gives exactly

    dL/da = sum_t t (q_t . dq_t) - sum_s s (k_s . dk_s) + <dS_0, S_0> + (T - 1) <dS_T, S_T>

(dq, dk the full gradients, dk per query head, <,> the Frobenius product), summed over the batch; then
dL/dlambda = dL/da / lambda is applied by JAX through the `log` in api.py. The kernels therefore need no extra
output for the decay. The sum is taken in float32; its terms grow like t, so at long T it carries a relative
rounding error ~ T * eps_f32 of the largest term (accumulation order, not an approximation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST


def decay_gradient(
    q: Array, k: Array, dq: Array, dk_per_head: Array, s0: Array, ds0: Array, final: Array, dfinal: Array
) -> Array:
    """dL/d(log lambda) [H] from the identity in the module docstring.

    q, dq [B, T, H, Dk]; k [B, T, KVH, Dk]; dk_per_head [B, T, H, Dk] (before the GQA sum); s0, ds0, final, dfinal
    [B, H, Dk, Dv]. All read as float32.
    """
    batch, length, heads, key_dim = q.shape
    kv_heads = k.shape[2]
    f32 = jnp.float32
    positions = jnp.arange(length, dtype=f32)
    q_term = jnp.einsum("bthd,bthd->bth", q.astype(f32), dq.astype(f32), precision=_HI)
    dk_grouped = dk_per_head.astype(f32).reshape(batch, length, kv_heads, heads // kv_heads, key_dim)
    k_term = jnp.einsum("btjgd,btjd->btjg", dk_grouped, k.astype(f32), precision=_HI).reshape(batch, length, heads)
    boundary = jnp.sum(ds0 * s0, axis=(0, 2, 3)) + (length - 1) * jnp.sum(dfinal * final, axis=(0, 2, 3))
    return jnp.einsum("t,bth->h", positions, q_term - k_term, precision=_HI) + boundary


def sum_groups(x: Array, kv_heads: int) -> Array:
    """[B, T, H, D] per query head -> [B, T, KVH, D]: the gradient of a kv head shared by H // KVH query heads."""
    batch, length, heads, dim = x.shape
    return x.reshape(batch, length, kv_heads, heads // kv_heads, dim).sum(axis=3)


def make_lightning(forward: Callable, backward: Callable) -> Callable:
    """Wraps a backend's launchers into a differentiable f(q, k, v, log_decay, s0, chunk, interpret) -> (out, S_T).

    forward(q, k, v, log_decay, s0, chunk, interpret) -> (out [B, T, H, Dv] in q.dtype, S_T f32 [B, H, Dk, Dv]).
    backward(q, k, v, log_decay, s0, dout, dfinal, chunk, interpret)
        -> (dq [B, T, H, Dk], dk, dv per query head [B, T, H, D], dS_0 [B, H, Dk, Dv]), all float32.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def lightning(q, k, v, log_decay, s0, chunk, interpret):
        return forward(q, k, v, log_decay, s0, chunk, interpret)

    def lightning_fwd(q, k, v, log_decay, s0, chunk, interpret):
        out, final = forward(q, k, v, log_decay, s0, chunk, interpret)
        return (out, final), (q, k, v, log_decay, s0, final)

    def lightning_bwd(chunk, interpret, residuals, cotangents):
        q, k, v, log_decay, s0, final = residuals
        dout, dfinal = cotangents
        dfinal = dfinal.astype(jnp.float32)
        dq, dk_per_head, dv_per_head, ds0 = backward(q, k, v, log_decay, s0, dout, dfinal, chunk, interpret)
        dlog_decay = decay_gradient(q, k, dq, dk_per_head, s0, ds0, final, dfinal)
        kv_heads = k.shape[2]
        return (
            dq.astype(q.dtype),
            sum_groups(dk_per_head, kv_heads).astype(k.dtype),
            sum_groups(dv_per_head, kv_heads).astype(v.dtype),
            dlog_decay.astype(log_decay.dtype),
            ds0.astype(s0.dtype),
        )

    lightning.defvjp(lightning_fwd, lightning_bwd)
    return lightning
