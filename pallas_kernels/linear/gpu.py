"""Lightning attention on GPU: Pallas on Triton, forward and backward kernels (differentiable via custom_vjp.py).

Layout [B, T, H, D] (no transposes). Each program handles one (batch, head, block of Dv columns) and walks the
chunks of C tokens in order inside the kernel (`lax.fori_loop`), carrying the [Dk, block_dv] state in float32:

    forward   O_n  = (Q_n K_n^T ⊙ W) V_n + lam ⊙ (Q_n S_{n-1})           S_n = end S_{n-1} + (gam ⊙ K_n)^T V_n
    dq pass   dQ_n = (dO_n V_n^T ⊙ W) K_n + lam ⊙ (dO_n S_{n-1}^T)        (same forward recurrence for S)
    dk/dv     dK_n = (dO_n V_n^T ⊙ W)^T Q_n + gam ⊙ (V_n R_n^T)           reverse order over chunks, with
              dV_n = (Q_n K_n^T ⊙ W)^T dO_n + gam ⊙ (K_n R_n)              R_{n-1} = end R_n + (lam ⊙ Q_n)^T dO_n,
                                                                          R_N = dS_T; R_0 is dS_0
(W, lam, gam, end from tiles.py). A Dv block sees only its columns of V, dO and the state, so dQ and dK are partial
sums over Dv blocks, added in the wrapper. Work O(T C (Dk + Dv) + T Dk Dv) per head, memory O(T D): linear in T.

Triton constraints respected: chunk C a power of two >= 16, head dims zero-padded to powers of two >= 16, T padded
to a multiple of C (so every load is a full tile), fp32 accumulation. chunk_size default: 64 (clipped to the next
power of two >= 16 of T). block_dv = min(64, padded Dv).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.linear.custom_vjp import make_lightning
from pallas_kernels.linear.padding import next_power_of_two, pad_axes, round_up
from pallas_kernels.linear.tiles import NN, NT, TN, decay_tiles, dot_f32, dot_inputs

Array = jax.Array

DEFAULT_CHUNK = 64
BLOCK_DV = 64


def gpu_chunk_size(chunk_size: int | None, length: int) -> int:
    """The chunk the GPU kernel uses: the default min(64, pow2 >= T, >= 16), or chunk_size (a power of two >= 16)."""
    if chunk_size is None:
        return min(DEFAULT_CHUNK, next_power_of_two(length))
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size} is not valid for the GPU kernel; expected a power of two >= 16")
    return chunk_size


def _params(interpret: bool):
    return {"interpret": interpret, "compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=1)}


def _valid(length: int, chunk: int, n):
    return jnp.minimum(chunk, length - n * chunk)


# ------------------------------------------------------------------------------------------------------- kernels
def _forward_kernel(a_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, final_ref, *, chunk, length, num_chunks):
    a = a_ref[...]

    def body(n, state):
        rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        weights, lam, gam, end = decay_tiles(a, _valid(length, chunk, n), chunk)
        scores = dot_inputs(q, k, NT) * weights
        o_ref[rows, :] = (dot_f32(scores, v, NN) + lam * dot_f32(q, state, NN)).astype(o_ref.dtype)
        return end * state + dot_f32(gam * k.astype(jnp.float32), v, TN)

    final_ref[...] = jax.lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def _dq_kernel(a_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, *, chunk, length, num_chunks):
    a = a_ref[...]

    def body(n, state):
        rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        weights, lam, gam, end = decay_tiles(a, _valid(length, chunk, n), chunk)
        dscores = dot_inputs(do, v, NT) * weights
        dq_ref[rows, :] = dot_f32(dscores, k, NN) + lam * dot_f32(do, state, NT)
        return end * state + dot_f32(gam * k.astype(jnp.float32), v, TN)

    jax.lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def _dkdv_kernel(a_ref, q_ref, k_ref, v_ref, do_ref, dfinal_ref, dk_ref, dv_ref, ds0_ref, *, chunk, length, num_chunks):
    a = a_ref[...]

    def body(i, dstate):
        n = num_chunks - 1 - i
        rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        weights, lam, gam, end = decay_tiles(a, _valid(length, chunk, n), chunk)
        scores = dot_inputs(q, k, NT) * weights  # [C_i, C_j]
        dscores = dot_inputs(do, v, NT) * weights
        dk_ref[rows, :] = dot_f32(dscores, q, TN) + gam * dot_f32(v, dstate, NT)
        dv_ref[rows, :] = dot_f32(scores, do, TN) + gam * dot_f32(k, dstate, NN)
        return end * dstate + dot_f32(lam * q.astype(jnp.float32), do, TN)

    ds0_ref[...] = jax.lax.fori_loop(0, num_chunks, body, dfinal_ref[...].astype(jnp.float32))


# ------------------------------------------------------------------------------------------------------- launchers
def _geometry(q: Array, v: Array, chunk: int):
    batch, length, heads, key_dim = q.shape
    padded_len = round_up(length, chunk)
    dk_pad, dv_pad = next_power_of_two(key_dim), next_power_of_two(v.shape[3])
    block_dv = min(BLOCK_DV, dv_pad)
    return batch, length, heads, padded_len, dk_pad, dv_pad, block_dv


def _specs(padded_len, dk_pad, block_dv, groups):
    seq_k = pl.BlockSpec((None, padded_len, None, dk_pad), lambda b, h, j: (b, 0, h, 0))
    seq_k_kv = pl.BlockSpec((None, padded_len, None, dk_pad), lambda b, h, j: (b, 0, h // groups, 0))
    seq_v = pl.BlockSpec((None, padded_len, None, block_dv), lambda b, h, j: (b, 0, h, j))
    seq_v_kv = pl.BlockSpec((None, padded_len, None, block_dv), lambda b, h, j: (b, 0, h // groups, j))
    state = pl.BlockSpec((None, None, dk_pad, block_dv), lambda b, h, j: (b, h, 0, j))
    decay = pl.BlockSpec((None,), lambda b, h, j: (h,))
    partial_k = pl.BlockSpec((None, None, padded_len, None, dk_pad), lambda b, h, j: (j, b, 0, h, 0))
    return seq_k, seq_k_kv, seq_v, seq_v_kv, state, decay, partial_k


def _forward(q, k, v, log_decay, s0, chunk, interpret):
    batch, length, heads, padded_len, dk_pad, dv_pad, block_dv = _geometry(q, v, chunk)
    groups = heads // k.shape[2]
    qp, kp = (pad_axes(x, {1: padded_len, 3: dk_pad}) for x in (q, k))
    vp = pad_axes(v, {1: padded_len, 3: dv_pad})
    s0p = pad_axes(s0, {2: dk_pad, 3: dv_pad})
    seq_k, seq_k_kv, seq_v, seq_v_kv, state, decay, _ = _specs(padded_len, dk_pad, block_dv, groups)
    kernel = functools.partial(_forward_kernel, chunk=chunk, length=length, num_chunks=padded_len // chunk)
    out, final = pl.pallas_call(
        kernel,
        grid=(batch, heads, dv_pad // block_dv),
        in_specs=[decay, seq_k, seq_k_kv, seq_v_kv, state],
        out_specs=[seq_v, state],
        out_shape=[
            jax.ShapeDtypeStruct((batch, padded_len, heads, dv_pad), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, dk_pad, dv_pad), jnp.float32),
        ],
        name="lightning_forward",
        **_params(interpret),
    )(log_decay, qp, kp, vp, s0p)
    return out[:, :length, :, : v.shape[3]], final[:, :, : q.shape[3], : v.shape[3]]


def _backward(q, k, v, log_decay, s0, dout, dfinal, chunk, interpret):
    batch, length, heads, padded_len, dk_pad, dv_pad, block_dv = _geometry(q, v, chunk)
    groups = heads // k.shape[2]
    num_dv_blocks = dv_pad // block_dv
    qp, kp = (pad_axes(x, {1: padded_len, 3: dk_pad}) for x in (q, k))
    vp = pad_axes(v, {1: padded_len, 3: dv_pad})
    dop = pad_axes(dout.astype(v.dtype), {1: padded_len, 3: dv_pad})
    s0p = pad_axes(s0, {2: dk_pad, 3: dv_pad})
    dfinalp = pad_axes(dfinal, {2: dk_pad, 3: dv_pad})
    seq_k, seq_k_kv, seq_v, seq_v_kv, state, decay, partial_k = _specs(padded_len, dk_pad, block_dv, groups)
    sizes = dict(chunk=chunk, length=length, num_chunks=padded_len // chunk)
    grid = (batch, heads, num_dv_blocks)
    partial_shape = jax.ShapeDtypeStruct((num_dv_blocks, batch, padded_len, heads, dk_pad), jnp.float32)

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **sizes),
        grid=grid,
        in_specs=[decay, seq_k_kv, seq_v_kv, seq_v, state],
        out_specs=partial_k,
        out_shape=partial_shape,
        name="lightning_dq",
        **_params(interpret),
    )(log_decay, kp, vp, dop, s0p)
    dk, dv, ds0 = pl.pallas_call(
        functools.partial(_dkdv_kernel, **sizes),
        grid=grid,
        in_specs=[decay, seq_k, seq_k_kv, seq_v_kv, seq_v, state],
        out_specs=[partial_k, seq_v, state],
        out_shape=[
            partial_shape,
            jax.ShapeDtypeStruct((batch, padded_len, heads, dv_pad), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, dk_pad, dv_pad), jnp.float32),
        ],
        name="lightning_dkdv",
        **_params(interpret),
    )(log_decay, qp, kp, vp, dop, dfinalp)
    key_dim, value_dim = q.shape[3], v.shape[3]
    return (
        dq.sum(axis=0)[:, :length, :, :key_dim],
        dk.sum(axis=0)[:, :length, :, :key_dim],
        dv[:, :length, :, :value_dim],
        ds0[:, :, :key_dim, :value_dim],
    )


lightning_attention_gpu = make_lightning(_forward, _backward)
lightning_attention_gpu.__doc__ = """f(q, k, v, log_decay [H], s0 [B, H, Dk, Dv], chunk, interpret) -> (out, S_T).

Validated, normalised arguments (see api.py); differentiable in q, k, v, log_decay and s0."""
