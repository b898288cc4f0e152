"""Linear attention with an optional per-step decay, computed three ways that agree: the shared core of every
linear / recurrent mechanism (`attn.functional.linear_attention`).

With phi the feature map, q_t = phi(q_t), k_t = phi(k_t) and a decay lambda_t in (0, 1] (1 when there is none):

    S_t = lambda_t S_{t-1} + k_t v_t^T,     o_t = q_t S_t                         (causal; S_0 = initial_state)
    S   = S_0 + sum_t k_t v_t^T,            o_t = q_t S                           (non-causal)
    o_t = sum_s lambda^|t-s| (q_t . k_s) v_s                 (non-causal with a per-head decay: a causal pass, a
                                                              causal pass over the reversed sequence, minus s = t)

Unrolled, o_t = sum_{s<=t} (q_t . k_s) prod_{r=s+1..t} lambda_r v_s + (prod_{r<=t} lambda_r) q_t S_0.

normalize=True divides by the same sum taken over k alone, o_t = q_t S_t / (q_t z_t + eps) with
z_t = lambda_t z_{t-1} + k_t (Katharopoulos et al.'s denominator). It is computed by appending a column of ones to
v, so the normaliser is the last column of the state: the state is then [B, H, Dk, Dv + 1].

Forms (`form=`):
  "quadratic"  the masked T x T matrix (q k^T ⊙ D) v with D_ts = prod_{r=s+1..t} lambda_r. Reference only:
               O(T^2) time and memory.
  "recurrent"  `lax.scan` over tokens with the [Dk, Dv] state. O(T Dk Dv) time, sequential.
  "chunked"    Lightning Attention-2 (Qin et al.): the sequence is cut into chunks of C tokens; inside a chunk
               ordinary masked attention with the intra-chunk decay matrix, between chunks the carried state
               (`lax.scan` over chunks):
                   O_n   = [(Q_n K_n^T) ⊙ D_n] V_n + Λ_n Q_n S_{n-1}
                   S_n   = a_n S_{n-1} + (Γ_n K_n)^T V_n
               with c the cumulative log-decay inside the chunk, D_n[i, j] = exp(c_i - c_j) (j <= i),
               Λ_n = diag(exp(c_i)), Γ_n = diag(exp(c_C - c_j)), a_n = exp(c_C). Cumulative products are taken
               within a chunk only, never over the whole sequence. O(T C D + T Dk Dv) time, O(T (C + D) + T/C Dk Dv)
               memory: linear in T, no T x T array. A length that is not a multiple of C is padded with zero
               keys/values and decay 1, which changes neither the outputs nor the final state.
The default (form=None) is "chunked" with chunk min(chunk_size, T) (a decode step of one token is one chunk).

Shapes: q [B, Tq, H, D], k [B, Tk, KVH, D], v [B, Tk, KVH, Dv] (GQA/MQA: k and v are repeated to H heads, because
a per-head decay makes the state per query head). Computation runs in float32 (or wider if the inputs are).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.core import dispatch, kernels
from attn.core.feature_maps import FeatureMap, resolve_feature_map
from attn.core.masks import Mask
from attn.core.padding import length_mask
from attn.core.validation import check_qkv, shape_of

Array = jax.Array

FORMS = ("chunked", "recurrent", "quadratic")

# Mask parts a linear-attention state cannot represent (it sums every visible key into one matrix).
_UNSUPPORTED_MASK_PARTS = ("q_segment_ids", "prefix_lengths", "block_mask", "dense")


def linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = True,
    decay: Array | float | None = None,
    feature_map: str | FeatureMap | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    q_lengths: Array | None = None,
    kv_lengths: Array | None = None,
    initial_state: Array | None = None,
    return_state: bool = False,
    form: str | None = None,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """Causal or non-causal linear attention with an optional decay (see the module docstring for the equations).

    Args:
      q: [B, Tq, H, D] queries. k: [B, Tk, KVH, D] keys. v: [B, Tk, KVH, Dv] values. H % KVH == 0.
        Causal mode needs Tq == Tk.
      causal: o_t sees keys s <= t (the state recurrence); False: every query sees every key.
      decay: None (lambda = 1), a float or float [H] per-head constant in (0, 1] (TransNormerLLM / Lightning),
        or float [B, T, H] per step (data-dependent, e.g. a sigmoid gate; causal only), strictly positive.
        Non-causal with a per-head decay weighs key s by lambda^|t - s| (no initial_state / return_state then).
      feature_map: applied to q and k: "identity", "elu_plus_one", "relu", "silu", a callable
        [..., D] -> [..., Dk], or None (q and k are used as given).
      normalize: divide by q_t . z_t + eps, z_t the decayed sum of the (mapped) keys.
      eps: added to that denominator.
      chunk_size: tokens per chunk of the chunked form (clipped to the sequence length).
      q_lengths: int [B]; query rows at or beyond the length are padding and get output 0.
      kv_lengths: int [B]; keys at or beyond the length are padding and contribute nothing.
      initial_state: float [B, H, Dk, Dv (+1 if normalize)], the state before the first token (default 0), e.g.
        the `return_state` of the previous piece of the sequence.
      return_state: also return the state after the last token (same shape, float32).
      form: None / "chunked", "recurrent" or "quadratic" (reference; builds the T x T matrix).
      implementation: None (the Pallas lightning kernel on GPU/TPU when the call allows it — causal, no or a
        per-head decay, chunked form — else this jnp code), "xla" (this jnp code), "pallas" (the kernel; raises
        where it cannot serve the call, e.g. on CPU).
    Returns:
      out [B, Tq, H, Dv] in q.dtype, or (out, final_state) when return_state.
    """
    heads, kv_heads = check_qkv(q, k, v)
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if causal and q_len != kv_len:
        raise ValueError(
            f"causal linear attention needs as many queries as keys, got q_len={q_len} and kv_len={kv_len}; "
            "use causal=False for cross-attention"
        )
    if not (isinstance(chunk_size, (int, np.integer)) and chunk_size > 0):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    if form is not None and form not in FORMS:
        raise ValueError(f"form={form!r} is not supported; expected None or one of {FORMS}")
    phi = resolve_feature_map(feature_map)
    dtype = jnp.result_type(q.dtype, jnp.float32)

    qf, kf = q.astype(dtype), k.astype(dtype)
    if phi is not None:
        qf, kf = phi(qf), phi(kf)
        if qf.shape[:-1] != q.shape[:-1] or kf.shape[:-1] != k.shape[:-1] or qf.shape[-1] != kf.shape[-1]:
            raise ValueError(
                f"feature_map must map [..., D] to [..., Dk] on the last axis only; it turned q {q.shape} into "
                f"{qf.shape} and k {k.shape} into {kf.shape}"
            )
    vf = v.astype(dtype)
    if kv_lengths is not None:
        kf = kf * length_mask(kv_lengths, batch, kv_len, "kv_lengths")[:, :, None, None]
    kf, vf = repeat_kv(kf, heads), repeat_kv(vf, heads)
    if normalize:
        vf = jnp.concatenate([vf, jnp.ones(vf.shape[:-1] + (1,), dtype)], axis=-1)

    log_decay = _log_decay(decay, batch, kv_len, heads, causal, dtype)
    state_shape = (batch, heads, qf.shape[-1], vf.shape[-1])
    if initial_state is None:
        state = jnp.zeros(state_shape, dtype)
    else:
        if shape_of(initial_state) != state_shape:
            layout = "[B, H, Dk, Dv + 1] (the last column is the normaliser)" if normalize else "[B, H, Dk, Dv]"
            raise ValueError(f"initial_state has shape {shape_of(initial_state)}; expected {layout} = {state_shape}")
        state = jnp.asarray(initial_state).astype(dtype)

    choice = dispatch.select(
        "linear_attention",
        implementation,
        {
            "pallas": kernels.lightning_unavailable(causal, decay, form, heads, qf.shape[-1], vf.shape[-1]),
            "xla": None,
        },
    )

    form = form or "chunked"
    if causal and choice != "pallas" and form == "chunked":
        out, final = _chunked(qf, kf, vf, log_decay, state, min(int(chunk_size), kv_len), token_major=True)
        return _finish(out, final, q, q_lengths, normalize, eps, return_state)

    # [B, H, T, D] from here on.
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (qf, kf, vf))

    def causal_form(q_, k_, v_, g_, s_):
        if form == "quadratic":
            return _quadratic(q_, k_, v_, g_, s_)
        if form == "recurrent":
            return _recurrent(q_, k_, v_, g_, s_)
        return _chunked(q_, k_, v_, g_, s_, min(int(chunk_size), kv_len))

    if causal and choice == "pallas":
        out, final = kernels.lightning_attention_call(qh, kh, vh, log_decay, state)
    elif causal:
        out, final = causal_form(qh, kh, vh, log_decay, state)
    elif log_decay is not None:
        if initial_state is not None or return_state or q_len != kv_len:
            raise ValueError(
                "non-causal attention with a decay is one bidirectional pass: it needs q_len == kv_len (got "
                f"{q_len}, {kv_len}) and takes no initial_state / return_state"
            )
        out = (
            _quadratic_bidirectional(qh, kh, vh, log_decay)
            if form == "quadratic"
            else _bidirectional(qh, kh, vh, log_decay, state, causal_form)
        )
        final = None
    else:
        out, final = (
            _quadratic_noncausal(qh, kh, vh, state) if form == "quadratic" else _global_state(qh, kh, vh, state)
        )
    return _finish(jnp.swapaxes(out, 1, 2), final, q, q_lengths, normalize, eps, return_state)


def _finish(
    out: Array, final: Array | None, q: Array, q_lengths: Array | None, normalize: bool, eps: float, return_state: bool
) -> Array | tuple[Array, Array]:
    """out [B, Tq, H, Dv(+1)] -> the normalised, length-masked output in q.dtype (and the final state)."""
    if normalize:
        out = out[..., :-1] / (out[..., -1:] + eps)
    if q_lengths is not None:
        out = out * length_mask(q_lengths, q.shape[0], q.shape[1], "q_lengths")[:, :, None, None]
    out = out.astype(q.dtype)
    return (out, final) if return_state else out


def repeat_kv(x: Array, heads: int) -> Array:
    """[B, T, KVH, D] -> [B, T, heads, D], each kv head repeated for its group of query heads (GQA/MQA)."""
    if x.shape[2] == heads:
        return x
    return jnp.repeat(x, heads // x.shape[2], axis=2)


def linear_mask_parts(mask: Mask | None, mechanism: str) -> tuple[bool, Array | None, Array | None]:
    """Splits an `attn.Mask` into what a linear-attention state can honour: (causal, q_lengths, kv_lengths).

    Raises ValueError naming the parts it cannot honour (segment ids, windows, prefix-LM, block/dense masks,
    mask functions): the state sums every visible key, so a per-pair mask has nowhere to go.
    """
    if mask is None:
        return False, None, None
    if not isinstance(mask, Mask):
        raise ValueError(f"mask must be an attn.Mask or None for {mechanism}, got {type(mask).__name__}")
    parts = [name for name in _UNSUPPORTED_MASK_PARTS if getattr(mask, name) is not None]
    if mask.window is not None:
        parts.append("window")
    if mask.mask_fn is not None:
        parts.append("mask_fn")
    if parts:
        raise ValueError(
            f"{mechanism} cannot honour the mask part(s) {', '.join(parts)}; a linear-attention state supports "
            "only causal, q_lengths and kv_lengths"
        )
    return mask.causal, mask.q_lengths, mask.kv_lengths


# ---------------------------------------------------------------------------------------------------- helpers
def _log_decay(decay: Any, batch: int, length: int, heads: int, causal: bool, dtype: Any) -> Array | None:
    """log(lambda) as [B|1, H, T], or None for no decay."""
    if decay is None:
        return None
    if isinstance(decay, (int, float, np.ndarray, np.number)):
        values = np.asarray(decay, np.float64)
        if not np.all((values > 0) & (values <= 1)):
            raise ValueError(f"decay must lie in (0, 1], got values from {values.min()} to {values.max()}")
    decay = jnp.asarray(decay, dtype)
    if decay.ndim == 0:
        decay = jnp.broadcast_to(decay, (heads,))
    if decay.shape == (heads,):
        return jnp.broadcast_to(jnp.log(decay)[None, :, None], (1, heads, length))
    if decay.shape == (batch, length, heads):
        if not causal:
            raise ValueError(
                "a data-dependent decay [batch, length, heads] needs causal=True; non-causal attention takes a "
                "per-head decay [heads] (weights lambda^|t - s|)"
            )
        return jnp.swapaxes(jnp.log(decay), 1, 2)
    raise ValueError(
        f"decay has shape {decay.shape}; expected a scalar, [heads] = ({heads},) or [batch, length, heads] = "
        f"({batch}, {length}, {heads})"
    )


def _causal_weights(log_decay: Array | None, size: int) -> Array:
    """Lower-triangular weights [.., size, size]: 1, or exp(c_i - c_j) from the cumulative log-decay c (last axis).

    The exponent is masked before exp so the upper triangle (c_i - c_j > 0) can neither overflow nor give NaN
    gradients.
    """
    tri = jnp.tril(jnp.ones((size, size), jnp.bool_))
    if log_decay is None:
        return tri.astype(jnp.float32)
    cum = jnp.cumsum(log_decay, axis=-1)
    diff = jnp.where(tri, cum[..., :, None] - cum[..., None, :], 0.0)
    return jnp.where(tri, jnp.exp(diff), 0.0)


# ---------------------------------------------------------------------------------------------------- forms
def _global_state(q: Array, k: Array, v: Array, state: Array) -> tuple[Array, Array]:
    """Non-causal: one state for the whole sequence, no T x T matrix."""
    final = state + jnp.einsum("bhsd,bhse->bhde", k, v)
    return jnp.einsum("bhtd,bhde->bhte", q, final), final


def _quadratic_noncausal(q: Array, k: Array, v: Array, state: Array) -> tuple[Array, Array]:
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k)
    out = jnp.einsum("bhts,bhse->bhte", scores, v) + jnp.einsum("bhtd,bhde->bhte", q, state)
    return out, state + jnp.einsum("bhsd,bhse->bhde", k, v)


def _quadratic_bidirectional(q: Array, k: Array, v: Array, log_decay: Array) -> Array:
    """Non-causal with a per-head decay: weights lambda^|t - s| on the full T x T matrix (reference)."""
    cum = jnp.cumsum(log_decay, axis=-1)
    weights = jnp.exp(-jnp.abs(cum[..., :, None] - cum[..., None, :]))
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k) * weights
    return jnp.einsum("bhts,bhse->bhte", scores, v)


def _bidirectional(q: Array, k: Array, v: Array, log_decay: Array, zeros: Array, causal_form) -> Array:
    """lambda^|t - s| without a T x T matrix: the causal pass (s <= t), plus the causal pass over the reversed
    sequence (s >= t), minus the s == t term counted twice."""
    forward, _ = causal_form(q, k, v, log_decay, zeros)
    flip = functools.partial(jnp.flip, axis=2)
    backward, _ = causal_form(flip(q), flip(k), flip(v), flip(log_decay), zeros)
    diagonal = jnp.einsum("bhtd,bhtd->bht", q, k)[..., None] * v
    return forward + flip(backward) - diagonal


def _quadratic(q: Array, k: Array, v: Array, log_decay: Array | None, state: Array) -> tuple[Array, Array]:
    """The masked T x T form (reference). The cumulative decay here runs over the whole sequence."""
    length = q.shape[2]
    weights = _causal_weights(log_decay, length)
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k) * weights
    carried = jnp.einsum("bhtd,bhde->bhte", q, state)
    if log_decay is None:
        out = jnp.einsum("bhts,bhse->bhte", scores, v) + carried
        return out, state + jnp.einsum("bhsd,bhse->bhde", k, v)
    cum = jnp.cumsum(log_decay, axis=-1)  # [B|1, H, T]
    out = jnp.einsum("bhts,bhse->bhte", scores, v) + jnp.exp(cum)[..., None] * carried
    to_end = jnp.exp(cum[..., -1:] - cum)[..., None]  # decay from step s to the last step
    final = jnp.exp(cum[..., -1])[..., None, None] * state + jnp.einsum("bhsd,bhse->bhde", k * to_end, v)
    return out, final


def _recurrent(q: Array, k: Array, v: Array, log_decay: Array | None, state: Array) -> tuple[Array, Array]:
    """`lax.scan` over tokens: S_t = lambda_t S_{t-1} + k_t v_t^T, o_t = q_t S_t."""
    time_major = [jnp.moveaxis(x, 2, 0) for x in (q, k, v)]
    if log_decay is not None:
        time_major.append(jnp.moveaxis(log_decay, 2, 0))

    def step(carry, inputs):
        qt, kt, vt = inputs[:3]
        if log_decay is not None:
            carry = jnp.exp(inputs[3])[..., None, None] * carry
        carry = carry + kt[..., :, None] * vt[..., None, :]
        return carry, jnp.einsum("bhd,bhde->bhe", qt, carry)

    final, out = jax.lax.scan(step, state, tuple(time_major))
    return jnp.moveaxis(out, 0, 2), final


def _chunked(
    q: Array, k: Array, v: Array, log_decay: Array | None, state: Array, chunk: int, *, token_major: bool = False
) -> tuple[Array, Array]:
    """Lightning Attention-2: masked attention inside chunks, the state carried across chunks by `lax.scan`.

    q, k [B, H, T, Dk], v [B, H, T, Dv] (token_major: [B, T, H, D], the layout callers hold), log_decay [B|1, H, T]
    or None, state [B, H, Dk, Dv]. The inputs are cut into chunk-major blocks [N, B, H, C, .] and each scan step does
    the whole chunk (intra-chunk attention, the carried-state term and the state update), so the only state-sized
    arrays are the carry: no per-chunk [B, H, N, Dk, Dv] stack is written. token_major=True goes from [B, T, H, D] to
    the blocks in one transpose (and back for the output): a head-major swap first costs XLA one more copy of each
    input and of each gradient. Returns (out [B, H, T, Dv] (token_major: [B, T, H, Dv]), final state [B, H, Dk, Dv])."""
    time_axis = 1 if token_major else 2
    batch, length = q.shape[0], q.shape[time_axis]
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length

    def blocks(x: Array, axis: int) -> Array:  # time on `axis` -> [N, B, H, C, ..], zero-padded
        if pad:
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, pad)
            x = jnp.pad(x, widths)
        x = x.reshape(x.shape[:axis] + (num_chunks, chunk) + x.shape[axis + 1 :])
        if axis == 1:  # [B, N, C, H, ..] -> [N, B, H, C, ..]
            return jnp.transpose(x, (1, 0, 3, 2) + tuple(range(4, x.ndim)))
        return jnp.moveaxis(x, 2, 0)  # [B, H, N, C, ..] -> [N, B, H, C, ..]

    xs = (blocks(q, time_axis), blocks(k, time_axis), blocks(v, time_axis))
    if log_decay is not None:
        xs = xs + (blocks(log_decay, 2),)  # [N, B|1, H, C]; padding has decay 1 (log 0)

    def step(carry, inputs):
        qn, kn, vn = inputs[:3]  # [B, H, C, D]
        gn = inputs[3] if log_decay is not None else None
        scores = jnp.einsum("bhcd,bhsd->bhcs", qn, kn) * _causal_weights(gn, chunk)
        out = jnp.einsum("bhcs,bhse->bhce", scores, vn)
        inter = jnp.einsum("bhcd,bhde->bhce", qn, carry)
        if gn is None:
            return carry + jnp.einsum("bhsd,bhse->bhde", kn, vn), out + inter
        cum = jnp.cumsum(gn, axis=-1)  # within the chunk only
        to_end = jnp.exp(cum[..., -1:] - cum)[..., None]
        carry = jnp.exp(cum[..., -1])[..., None, None] * carry + jnp.einsum("bhsd,bhse->bhde", kn * to_end, vn)
        return carry, out + jnp.exp(cum)[..., None] * inter

    final, out = jax.lax.scan(step, state, xs)  # out [N, B, H, C, Dv]
    if token_major:
        out = jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(batch, num_chunks * chunk, out.shape[2], -1)
        return out[:, :length], final
    out = jnp.moveaxis(out, 0, 2).reshape(batch, out.shape[2], num_chunks * chunk, -1)[:, :, :length]
    return out, final
