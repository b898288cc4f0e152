"""Lightning attention on TPU: Pallas Mosaic forward and backward kernels (differentiable via custom_vjp.py).

Same equations as gpu.py (see its docstring and tiles.py). Layout [B, H, T, D] (the wrapper transposes, so each
block's last two dims are (chunk, head_dim)); grid (B, H, N) with the chunk axis last and "arbitrary": the [Dk, Dv]
float32 state lives in a VMEM scratch buffer across the chunk steps of one (batch, head):

    forward  (chunks 0..N-1):  O_n, then S <- end S + (gam ⊙ K_n)^T V_n;        S_T written at the last step
    dq       (chunks 0..N-1):  dQ_n = (dO_n V_n^T ⊙ W) K_n + lam ⊙ (dO_n S^T), same update of S
    dk/dv    (chunks N-1..0, index_maps reversed): dK_n, dV_n from R, then R <- end R + (lam ⊙ Q_n)^T dO_n;
             R starts at dS_T, its last value is dS_0
Decay (log lambda per head) is read from SMEM. dK/dV are written per query head (GQA reduced in the wrapper).
Mosaic constraints respected: head dims zero-padded to multiples of 128 (lanes), chunk a multiple of 8 (sublanes),
T padded to a multiple of the chunk. chunk_size default: 128 (clipped to T rounded up to 8).
Work O(T C (Dk + Dv) + T Dk Dv) per head; memory O(T D) plus a Dk x Dv scratch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.linear.custom_vjp import make_lightning
from pallas_kernels.linear.padding import pad_axes, round_up
from pallas_kernels.linear.tiles import NN, NT, TN, decay_tiles, dot_f32, dot_inputs

Array = jax.Array

DEFAULT_CHUNK = 128
LANES = 128


def tpu_chunk_size(chunk_size: int | None, length: int) -> int:
    """The chunk the TPU kernel uses: the default min(128, T rounded up to 8), or chunk_size (a multiple of 8)."""
    if chunk_size is None:
        return min(DEFAULT_CHUNK, round_up(length, 8))
    if chunk_size % 8:
        raise ValueError(f"chunk_size={chunk_size} is not valid for the TPU kernel; expected a multiple of 8")
    return chunk_size


def _params(interpret: bool, scratch_dims):
    return {
        "interpret": pltpu.InterpretParams() if interpret else False,
        "compiler_params": pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        "scratch_shapes": [pltpu.VMEM(scratch_dims, jnp.float32)],
    }


def _valid(length: int, chunk: int, n):
    return jnp.minimum(chunk, length - n * chunk)


# ------------------------------------------------------------------------------------------------------- kernels
def _forward_kernel(a_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, final_ref, state_ref, *, chunk, length, num_chunks):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...]

    weights, lam, gam, end = decay_tiles(a_ref[pl.program_id(1)], _valid(length, chunk, n), chunk)
    q, k, v, state = q_ref[...], k_ref[...], v_ref[...], state_ref[...]
    scores = dot_inputs(q, k, NT) * weights
    o_ref[...] = (dot_f32(scores, v, NN) + lam * dot_f32(q, state, NN)).astype(o_ref.dtype)
    state_ref[...] = end * state + dot_f32(gam * k.astype(jnp.float32), v, TN)

    @pl.when(n == num_chunks - 1)
    def _():
        final_ref[...] = state_ref[...]


def _dq_kernel(a_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, state_ref, *, chunk, length, num_chunks):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...]

    weights, lam, gam, end = decay_tiles(a_ref[pl.program_id(1)], _valid(length, chunk, n), chunk)
    k, v, do, state = k_ref[...], v_ref[...], do_ref[...], state_ref[...]
    dscores = dot_inputs(do, v, NT) * weights
    dq_ref[...] = dot_f32(dscores, k, NN) + lam * dot_f32(do, state, NT)
    state_ref[...] = end * state + dot_f32(gam * k.astype(jnp.float32), v, TN)


def _dkdv_kernel(
    a_ref, q_ref, k_ref, v_ref, do_ref, dfinal_ref, dk_ref, dv_ref, ds0_ref, dstate_ref, *, chunk, length, num_chunks
):
    step = pl.program_id(2)
    n = num_chunks - 1 - step  # the chunk this step sees (index_maps run the chunks in reverse)

    @pl.when(step == 0)
    def _():
        dstate_ref[...] = dfinal_ref[...]

    weights, lam, gam, end = decay_tiles(a_ref[pl.program_id(1)], _valid(length, chunk, n), chunk)
    q, k, v, do, dstate = q_ref[...], k_ref[...], v_ref[...], do_ref[...], dstate_ref[...]
    scores = dot_inputs(q, k, NT) * weights
    dscores = dot_inputs(do, v, NT) * weights
    dk_ref[...] = dot_f32(dscores, q, TN) + gam * dot_f32(v, dstate, NT)
    dv_ref[...] = dot_f32(scores, do, TN) + gam * dot_f32(k, dstate, NN)
    dstate_ref[...] = end * dstate + dot_f32(lam * q.astype(jnp.float32), do, TN)

    @pl.when(step == num_chunks - 1)
    def _():
        ds0_ref[...] = dstate_ref[...]


# ------------------------------------------------------------------------------------------------------- launchers
def _to_kernel_layout(x: Array, padded_len: int, dim_pad: int) -> Array:
    """[B, T, H, D] -> zero-padded [B, H, T_pad, D_pad]."""
    return pad_axes(jnp.swapaxes(x, 1, 2), {2: padded_len, 3: dim_pad})


def _from_kernel_layout(x: Array, length: int, dim: int) -> Array:
    return jnp.swapaxes(x[:, :, :length, :dim], 1, 2)


def _geometry(q: Array, k: Array, v: Array, chunk: int):
    batch, length, heads, key_dim = q.shape
    padded_len = round_up(length, chunk)
    dk_pad, dv_pad = round_up(key_dim, LANES), round_up(v.shape[3], LANES)
    return batch, length, heads, heads // k.shape[2], padded_len, dk_pad, dv_pad


def _specs(chunk, dk_pad, dv_pad, groups, num_chunks, reverse):
    def at(n):
        return num_chunks - 1 - n if reverse else n

    def tile(dim, per_kv):
        return pl.BlockSpec((None, None, chunk, dim), lambda b, h, n: (b, h // groups if per_kv else h, at(n), 0))

    state = pl.BlockSpec((None, None, dk_pad, dv_pad), lambda b, h, n: (b, h, 0, 0))
    decay = pl.BlockSpec(memory_space=pltpu.SMEM)
    return tile, state, decay


def _forward(q, k, v, log_decay, s0, chunk, interpret):
    batch, length, heads, groups, padded_len, dk_pad, dv_pad = _geometry(q, k, v, chunk)
    num_chunks = padded_len // chunk
    qp, kp = (_to_kernel_layout(x, padded_len, dk_pad) for x in (q, k))
    vp = _to_kernel_layout(v, padded_len, dv_pad)
    s0p = pad_axes(s0, {2: dk_pad, 3: dv_pad})
    tile, state, decay = _specs(chunk, dk_pad, dv_pad, groups, num_chunks, reverse=False)
    kernel = functools.partial(_forward_kernel, chunk=chunk, length=length, num_chunks=num_chunks)
    out, final = pl.pallas_call(
        kernel,
        grid=(batch, heads, num_chunks),
        in_specs=[decay, tile(dk_pad, False), tile(dk_pad, True), tile(dv_pad, True), state],
        out_specs=[tile(dv_pad, False), state],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, padded_len, dv_pad), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, dk_pad, dv_pad), jnp.float32),
        ],
        name="lightning_forward_tpu",
        **_params(interpret, (dk_pad, dv_pad)),
    )(log_decay, qp, kp, vp, s0p)
    return _from_kernel_layout(out, length, v.shape[3]), final[:, :, : q.shape[3], : v.shape[3]]


def _backward(q, k, v, log_decay, s0, dout, dfinal, chunk, interpret):
    batch, length, heads, groups, padded_len, dk_pad, dv_pad = _geometry(q, k, v, chunk)
    num_chunks = padded_len // chunk
    qp, kp = (_to_kernel_layout(x, padded_len, dk_pad) for x in (q, k))
    vp = _to_kernel_layout(v, padded_len, dv_pad)
    dop = _to_kernel_layout(dout.astype(v.dtype), padded_len, dv_pad)
    s0p = pad_axes(s0, {2: dk_pad, 3: dv_pad})
    dfinalp = pad_axes(dfinal, {2: dk_pad, 3: dv_pad})
    sizes = dict(chunk=chunk, length=length, num_chunks=num_chunks)
    grid = (batch, heads, num_chunks)

    tile, state, decay = _specs(chunk, dk_pad, dv_pad, groups, num_chunks, reverse=False)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **sizes),
        grid=grid,
        in_specs=[decay, tile(dk_pad, True), tile(dv_pad, True), tile(dv_pad, False), state],
        out_specs=tile(dk_pad, False),
        out_shape=jax.ShapeDtypeStruct((batch, heads, padded_len, dk_pad), jnp.float32),
        name="lightning_dq_tpu",
        **_params(interpret, (dk_pad, dv_pad)),
    )(log_decay, kp, vp, dop, s0p)

    tile, state, decay = _specs(chunk, dk_pad, dv_pad, groups, num_chunks, reverse=True)
    dk, dv, ds0 = pl.pallas_call(
        functools.partial(_dkdv_kernel, **sizes),
        grid=grid,
        in_specs=[decay, tile(dk_pad, False), tile(dk_pad, True), tile(dv_pad, True), tile(dv_pad, False), state],
        out_specs=[tile(dk_pad, False), tile(dv_pad, False), state],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, padded_len, dk_pad), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, padded_len, dv_pad), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, dk_pad, dv_pad), jnp.float32),
        ],
        name="lightning_dkdv_tpu",
        **_params(interpret, (dk_pad, dv_pad)),
    )(log_decay, qp, kp, vp, dop, dfinalp)
    key_dim, value_dim = q.shape[3], v.shape[3]
    return (
        _from_kernel_layout(dq, length, key_dim),
        _from_kernel_layout(dk, length, key_dim),
        _from_kernel_layout(dv, length, value_dim),
        ds0[:, :, :key_dim, :value_dim],
    )


lightning_attention_tpu = make_lightning(_forward, _backward)
lightning_attention_tpu.__doc__ = """f(q, k, v, log_decay [H], s0 [B, H, Dk, Dv], chunk, interpret) -> (out, S_T).

Validated, normalised arguments (see api.py); differentiable in q, k, v, log_decay and s0."""
