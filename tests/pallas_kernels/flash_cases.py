"""Shared pieces of the flash-attention kernel tests: random inputs, gradients of every float input, tolerances,
and the low-precision XLA baseline of the bf16 criterion (DESIGN.md, "Kernels")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash import flash_attention_reference
from pallas_kernels.flash.reference import visibility

# DESIGN.md: fp32 forward 1e-5 where the order of sums matches, 2e-5 otherwise (tiles); gradients twice that.
FORWARD_TOL = 2e-5
GRAD_TOL = 4e-5
# Small blocks so that a few dozen tokens already cross several q and kv blocks.
SMALL_BLOCKS = dict(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)
GRAD_NAMES = ("q", "k", "v", "bias", "u", "v_factor", "sinks")


def make_inputs(
    seed: int,
    batch: int,
    q_len: int,
    kv_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    dtype=jnp.float32,
    bias_shape: tuple[int, ...] | None = None,
    factor_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    sinks: bool = False,
    segments: bool = False,
) -> dict:
    """q, k, v (and the requested extras) as a dict of keyword arguments for flash_attention(_reference)."""
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    args = dict(
        q=normal((batch, q_len, heads, head_dim)).astype(dtype),
        k=normal((batch, kv_len, kv_heads, head_dim)).astype(dtype),
        v=normal((batch, kv_len, kv_heads, head_dim)).astype(dtype),
    )
    if bias_shape is not None:
        args["bias"] = normal(bias_shape, 0.5)
    if factor_shapes is not None:
        args["bias_factors"] = (normal(factor_shapes[0], 0.4), normal(factor_shapes[1], 0.4))
    if sinks:
        args["sinks"] = normal((heads,))
    if segments:
        # Sorted ids (packed sequences); kv has an id the queries lack and vice versa, so some rows see nothing.
        q_seg = np.sort(rng.integers(0, 4, (batch, q_len)), axis=1)
        kv_seg = np.sort(rng.integers(1, 5, (batch, kv_len)), axis=1)
        args["segment_ids"] = (jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32))
    return args


def split_float_inputs(args: dict) -> tuple[dict, dict]:
    """(differentiable float inputs by GRAD_NAMES, everything else)."""
    floats, rest = {}, dict(args)
    for name in ("q", "k", "v", "bias", "sinks"):
        if name in rest:
            floats[name] = rest.pop(name)
    if "bias_factors" in rest:
        floats["u"], floats["v_factor"] = rest.pop("bias_factors")
    return floats, rest


def value_and_grads(fn, args: dict, **options) -> tuple[jax.Array, dict, dict]:
    """(out, stats or {}, gradients of sum(out * w) w.r.t. every float input) for fn = flash_attention(_reference)."""
    floats, rest = split_float_inputs(args)

    def loss(floats):
        kw = dict(rest, **options)
        for name in ("bias", "sinks"):
            if name in floats:
                kw[name] = floats[name]
        if "u" in floats:
            kw["bias_factors"] = (floats["u"], floats["v_factor"])
        result = fn(floats["q"], floats["k"], floats["v"], return_stats=True, **kw)
        out, stats = result
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jnp.sum(out.astype(jnp.float32) * weights), (out, stats)

    grads, (out, stats) = jax.grad(loss, has_aux=True)(floats)
    return out, stats, grads


def assert_close(actual, expected, tol, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol,
                               err_msg=what)  # fmt: skip


def xla_low_precision(q, k, v, *, causal=False, window=None, segment_ids=None):
    """Plain XLA attention with every op in the inputs' dtype (the baseline of FlashAttention's bf16 criterion)."""
    groups = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    s = jnp.einsum("bihd,bjhd->bhij", q, kk, preferred_element_type=q.dtype) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    visible = visibility(q.shape[1], k.shape[1], causal=causal, window=window, segment_ids=segment_ids)
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    p = jnp.where(visible, p, 0).astype(q.dtype)
    return jnp.einsum("bhij,bjhd->bihd", p, vv, preferred_element_type=q.dtype)


def check_low_precision_forward(kernel_out, args: dict, **mask_options) -> tuple[float, float]:
    """Kernel error vs the f32 reference <= 2 x (low-precision XLA error) + 1e-3; returns both errors."""
    f32 = {name: args[name].astype(jnp.float32) for name in ("q", "k", "v")}
    exact = flash_attention_reference(f32["q"], f32["k"], f32["v"], **mask_options)
    baseline = xla_low_precision(args["q"], args["k"], args["v"], **mask_options)
    kernel_err = float(jnp.max(jnp.abs(kernel_out.astype(jnp.float32) - exact)))
    xla_err = float(jnp.max(jnp.abs(baseline.astype(jnp.float32) - exact)))
    assert kernel_err <= 2 * xla_err + 1e-3, (kernel_err, xla_err)
    return kernel_err, xla_err
