"""RSQ [163] (Sung et al. 2025, "RSQ: Learning from Important Tokens Leads to Better Quantized LLMs"): layer-wise
weight quantization (GPTQ) whose reconstruction objective weights every calibration token by its importance, the
attention it receives ("attention concentration", AttnCon).

For a linear layer y = W x (W [d_out, d_in]) and calibration inputs X_s [T, d_in] of S sequences:

    a_{s,j}  = sum_h sum_i A^{(s)}_{h,i,j}                    attention token j of sequence s receives (AttnCon)
    r_{s,j}  = lo + (hi - lo) (a_{s,j} - min_j a) / (max_j a - min_j a)       min-max to [lo, hi] (1 and 3)
    w_{s,j}  = T r_{s,j} / sum_j r_{s,j}                      normalised to mean 1 per sequence
    H        = 2 / S  sum_s  X_s^T diag(w_s) X_s               the Hessian of sum_s ||(W - Q) X_s^T diag(w_s)^1/2||^2
    GPTQ     Hinv = upper Cholesky factor of (H + damp I)^-1,  damp = percdamp mean(diag H); for columns c = 0..d_in-1:
             q_c = quant(W_c);   e = (W_c - q_c) / Hinv_cc;   W_{c'} -= e Hinv_{c c'}   for c' > c

quant is per output row: symmetric (scale = max|W_row| / (2^(b-1) - 1), codes in [-2^(b-1), 2^(b-1) - 1]) or
asymmetric (scale = (max - min) / (2^b - 1), zero = round(-min / scale)), the row ranges taken from W before the
loop (always including 0). Uniform importance (w = 1) is plain GPTQ. Columns whose diagonal of H is 0 are set to 0.

This follows the official code (ylsung/rsq, fake_quant/input_weighting_module.py OriginalAttentionWeighting with
normalize="default", fake_quant/gptq_utils.py GPTQ.add_batch / fasterquant, fake_quant/quant_utils.py
WeightQuantizer): the rotation step (QuaRot's Hadamard rotations) is not part of this module; the column loop is the
unblocked form of GPTQ's block updates (the same arithmetic in another order); no act-order, groups or clipping
search. Cost: O(d_in^3 + d_out d_in^2) for one layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def attention_concentration(weights: Array, *, low: float = 1.0, high: float = 3.0) -> Array:
    """AttnCon importance r float32 [S, T] from attention weights [S, H, Tq, T] (one calibration sequence per row):
    the attention each key receives, summed over heads and queries, min-max scaled to [low, high]."""
    if weights.ndim != 4:
        raise ValueError(f"weights has shape {weights.shape}; expected [sequences, heads, q_len, kv_len]")
    if not low < high:
        raise ValueError(f"low={low!r}, high={high!r}: expected low < high")
    received = jnp.sum(weights.astype(jnp.float32), axis=(1, 2))
    lo, hi = jnp.min(received, axis=-1, keepdims=True), jnp.max(received, axis=-1, keepdims=True)
    scaled = (received - lo) / jnp.where(hi > lo, hi - lo, 1.0)
    return jnp.clip(scaled * (high - low) + low, low, high)


def weighted_hessian(x: Array, importance: Array | None = None) -> Array:
    """H float32 [d_in, d_in] = 2 / S sum_s X_s^T diag(w_s) X_s from inputs x [S, T, d_in] and importance [S, T] (w_s
    its rows normalised to mean 1; None: plain GPTQ)."""
    if x.ndim != 3:
        raise ValueError(f"x has shape {x.shape}; expected [sequences, tokens, d_in]")
    xf = x.astype(jnp.float32)
    if importance is None:
        weight = jnp.ones(x.shape[:2], jnp.float32)
    else:
        if importance.shape != x.shape[:2]:
            raise ValueError(f"importance has shape {importance.shape}; expected {x.shape[:2]} (sequences, tokens)")
        imp = importance.astype(jnp.float32)
        weight = imp / jnp.sum(imp, axis=-1, keepdims=True) * x.shape[1]
    return 2.0 / x.shape[0] * jnp.einsum("stc,st,std->cd", xf, weight, xf)


def row_quantizer(w: Array, bits: int, symmetric: bool) -> tuple[Array, Array, int, int]:
    """(scale [d_out, 1], zero [d_out, 1], low code, high code) of GPTQ's per-row quantizer for w [d_out, d_in]."""
    wmin = jnp.minimum(jnp.min(w, axis=1, keepdims=True), 0.0)
    wmax = jnp.maximum(jnp.max(w, axis=1, keepdims=True), 0.0)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale = jnp.maximum(jnp.maximum(-wmin, wmax), 1e-5) / top
        return scale, jnp.zeros_like(scale), -(top + 1), top
    both_zero = (wmin == 0) & (wmax == 0)
    wmin, wmax = jnp.where(both_zero, -1.0, wmin), jnp.where(both_zero, 1.0, wmax)
    scale = jnp.maximum(wmax - wmin, 1e-5) / (2**bits - 1)
    return scale, jnp.round(-wmin / scale), 0, 2**bits - 1


def gptq(w: Array, hessian: Array, *, bits: int = 4, symmetric: bool = True, percdamp: float = 0.01) -> Array:
    """GPTQ's quantized weights (dequantized, float32 [d_out, d_in]) of w [d_out, d_in] under hessian [d_in, d_in]
    (see the module docstring)."""
    if w.ndim != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"w {w.shape} and hessian {hessian.shape}: expected [d_out, d_in] and [d_in, d_in]")
    if bits not in range(2, 9):
        raise ValueError(f"bits={bits!r} must be an int in [2, 8]")
    if percdamp < 0:
        raise ValueError(f"percdamp={percdamp!r} must be >= 0")
    return _gptq(w, hessian, bits, symmetric, float(percdamp))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _gptq(w: Array, hessian: Array, bits: int, symmetric: bool, percdamp: float) -> Array:
    w = w.astype(jnp.float32)
    h = hessian.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    w = jnp.where(dead[None, :], 0.0, w)
    scale, zero, lo, hi = row_quantizer(w, bits, symmetric)
    damp = percdamp * jnp.mean(jnp.diag(h))
    h = h + damp * jnp.eye(h.shape[0])
    inverse = jnp.linalg.inv(h)
    hinv = jnp.linalg.cholesky(inverse).T  # upper factor: inverse = U^T U
    columns = jnp.arange(w.shape[1])

    def step(carry: Array, c: Array) -> tuple[Array, Array]:
        col = carry[:, c][:, None]
        q = (jnp.clip(jnp.round(col / scale) + zero, lo, hi) - zero) * scale
        err = (col - q) / hinv[c, c]
        carry = carry - err * jnp.where(columns > c, hinv[c], 0.0)[None, :]
        return carry, q[:, 0]

    _, quantized = jax.lax.scan(step, w, columns)
    return quantized.T


def rsq_quantize(
    w: Array,
    x: Array,
    weights: Array | None,
    *,
    bits: int = 4,
    symmetric: bool = True,
    percdamp: float = 0.01,
    low: float = 1.0,
    high: float = 3.0,
) -> Array:
    """RSQ's quantization of a linear layer w [d_out, d_in] from its calibration inputs x [S, T, d_in] and the
    attention weights [S, H, T, T] of the layer's attention on the same sequences (None: plain GPTQ)."""
    importance = None if weights is None else attention_concentration(weights, low=low, high=high)
    return gptq(w, weighted_hessian(x, importance), bits=bits, symmetric=symmetric, percdamp=percdamp)
