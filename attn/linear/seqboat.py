"""`seqboat`: SeqBoat ([3] "Sparse Modular Activation for Efficient Sequence Modeling", Ren et al., NeurIPS 2023).

A multi-dimensional damped EMA (MEGA's SSM) encodes every token; a latent configurator on its states decides, per
token, whether the Gated Attention Unit (GAU) runs (Sparse Modular Activation); the activated tokens are compressed
into a shorter sequence, the GAU does local attention over them, and its outputs are scattered back (skipped tokens
get 0 from the attention path). Equations (official code github.com/renll/SeqBoat, `SeqBoatUnit`,
`MultiHeadEMA`, `LatentConfigurator`), x [B, T, E] the (already normalised) input:

  EMA     p = sigmoid(delta), a = sigmoid(alpha), phi = 1 - p a                    (each [E, N], N = ema_dim)
          h_t = phi * h_{t-1} + p beta x_t,   ema_t = sum_n gamma_n sqrt(1/N) h_t[n] + omega x_t
          (bidirectional: plus the same recursion run right-to-left with its own parameters)
          mx = silu(ema(x))                                                                      [B, T, E]
  skip    hx = mx W_x + b_x                                                                      [B, T, E]
  router  pi = softmax((mx W_c + b_c) / tau),  tau = exp(log_tau) learned, tau_0 = init_temperature_scale
          * sqrt(E);  a_t = argmax_k pi_t[k] (k = 1: activate),  c_t = max_k pi_t[k]
          (argmax blocks the gradient, c_t carries it: the paper's Fig. 2)
  compress  the activated tokens, in order: m = mx[a = 1], with their original positions
  GAU     z = silu(m W_z), r = silu(m W_r), v = silu(m W_v); q = z * gamma_q + beta_q, k = z * gamma_k + beta_k
          o_i = sum_{j : i - w <= j <= i} softmax_j(q_i . k_j / sqrt(d)) v_j     (indices in the compressed
          sequence: a window of w activated tokens; bidirectional: |i - j| <= w; RoPE at the original positions)
          g = (o * r) W_h + b_h
  extract  y_t = hx_t + a_t c_t g_{rank(t)}       (rank(t) = the position of token t in the compressed sequence)

The layer returns y; the transformer block around it adds the residual (the official unit adds the residual
itself and applies silu to the sum: that post-activation is left out here, as the block owns the residual).

Router modes: "argmax" (the official learned-temperature configurator above; deterministic in training and eval),
"gumbel" (the configurator's alternative: in training (deterministic=False) Gumbel noise is added to the logits
before the tempered softmax, using the "dropout" rng; in eval the choice is the argmax and c_t = 1, as for the
official hard one-hot eval), "always" (the official `always_act`: no configurator, every token active, c_t = 1;
this is the dense GAU of MEGA-style hybrids). num_heads = 1 is the paper's single-head GAU; num_heads > 1 splits z
(per-head scale/offset) and v into heads.

`capacity` (a fraction of T) caps the number of activated tokens per row statically (jit needs static shapes):
tokens activated after the first ceil(capacity T) are skipped, which keeps causality. Without it the compressed
sequence keeps T slots (the activated tokens first), which is exact but saves no compute under jit.
`form="masked"` is the reference: the same computation without compression, as a dense [T, T] mask over the
original sequence (allowed iff both tokens are active and their ranks are within the window); it equals
`form="compressed"` (tested).

Cost (compressed form, T' = ceil(capacity T) slots): EMA O(B T E N + B E T log T) (FFT convolution, as the
official code), local attention O(B T' w (d + dv)) time and O(B T' w H) memory (blocks of w activated tokens, each
attending to its own and the previous block), projections O(B T' E (d H + 2 dv H)). Decoding is not supported.
No option reduces it to plain softmax attention (the EMA, gates and silu projections stay).

Shapes: x [B, T, E] -> [B, T, E]. Masks: None (bidirectional) or attn.Mask(causal=True). The `head_outputs`
stage (interventions, captures) sees the gated GAU outputs o * r split into heads, [B, T', H, dv], in the order
of the compressed sequence for form='compressed' (T' slots), over the original tokens for form='masked'.

Shared helpers defined here (candidates for attn/core if another mechanism needs them): `damped_ema` (MEGA EMA by
FFT convolution), `compress_tokens` / `extract_tokens` (stable static-shape compaction), `local_window_attention`
(blocked sliding-window softmax attention through attn.functional.softmax_attention).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.core import positions as pos
from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.masks import Mask
from attn.core.validation import choice, in_range, optional, positive, positive_int
from attn.registry import register

Array = jax.Array

ROUTERS = ("argmax", "gumbel", "always")
FORMS = ("compressed", "masked")
POSITIONS = ("rope", "none")


# ---------------------------------------------------------------------------------------------------- EMA
def ema_kernel(delta: Array, alpha: Array, beta: Array, gamma: Array, length: int) -> Array:
    """K[e, l] = sum_n gamma[e, n] sqrt(1/N) p beta phi^l, p = sigmoid(delta), phi = 1 - p sigmoid(alpha).

    delta, alpha, beta, gamma: float [E, N]. Returns float32 [E, length]: the impulse response of the damped EMA.
    """
    p = jax.nn.sigmoid(delta.astype(jnp.float32))
    phi = 1.0 - p * jax.nn.sigmoid(alpha.astype(jnp.float32))
    lags = jnp.arange(length, dtype=jnp.float32)
    powers = jnp.exp(lags[None, None, :] * jnp.log(phi)[..., None])  # [E, N, L]
    weights = gamma.astype(jnp.float32) * math.sqrt(1.0 / delta.shape[-1]) * p * beta.astype(jnp.float32)
    return jnp.einsum("enl,en->el", powers, weights)


def causal_convolution(x: Array, kernel: Array) -> Array:
    """y[:, t, e] = sum_{s <= t} kernel[e, t - s] x[:, s, e] by FFT (zero-padded to 2T: no wrap-around).

    x: [B, T, E]; kernel: [E, T]. Returns float32 [B, T, E]. O(B E T log T).
    """
    length = x.shape[1]
    size = 2 * length
    spectrum = jnp.fft.rfft(x.astype(jnp.float32), n=size, axis=1) * jnp.fft.rfft(kernel.T, n=size, axis=0)[None]
    return jnp.fft.irfft(spectrum, n=size, axis=1)[:, :length]


def damped_ema(x: Array, params: dict[str, Array], *, causal: bool = True) -> Array:
    """MEGA's multi-dimensional damped EMA (see the module docstring), x [B, T, E] -> float32 [B, T, E].

    params: "delta", "alpha", "beta", "gamma" float [E, N] or [2E, N] (the first E rows run left-to-right; the last E
    rows, needed when not causal, right-to-left), and "omega" float [E] (the x_t term).
    """
    width = x.shape[-1]
    rows = params["delta"].shape[0]
    if rows not in (width, 2 * width) or (not causal and rows != 2 * width):
        raise ValueError(
            f"damped_ema parameters have {rows} rows; expected E={width} or 2E={2 * width} (2E when causal=False)"
        )
    take = width if causal else 2 * width
    names = ("delta", "alpha", "beta", "gamma")
    kernel = ema_kernel(*(params[name][:take] for name in names), x.shape[1])
    out = causal_convolution(x, kernel[:width])
    if not causal:
        # The right-to-left recursion, lag 0 included (both directions see x_t, as in the official code).
        out = out + jnp.flip(causal_convolution(jnp.flip(x, 1), kernel[width:]), 1)
    return out + x.astype(jnp.float32) * params["omega"].astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------- compaction
def compress_tokens(x: Array, active: Array) -> tuple[Array, Array, Array]:
    """Stable compaction: the active tokens of each row first, in order, then zeros (static shape).

    x: [B, T, ...]; active: bool [B, T]. Returns (packed [B, T, ...] with packed[b, rank(t)] = x[b, t] for active t,
    rank int32 [B, T] (the slot of each active token; T for skipped ones), count int32 [B]).
    """
    batch, length = active.shape
    rank = jnp.cumsum(active, axis=1, dtype=jnp.int32) - 1
    rank = jnp.where(active, rank, length)  # slot T is dropped by the scatter
    rows = jnp.arange(batch)[:, None]
    packed = jnp.zeros_like(x).at[rows, rank].set(x, mode="drop")
    return packed, rank, jnp.sum(active, axis=1, dtype=jnp.int32)


def extract_tokens(packed: Array, rank: Array) -> Array:
    """Inverse of `compress_tokens`: y[b, t] = packed[b, rank[b, t]] for active t, 0 for skipped (rank == T)."""
    padded = jnp.concatenate([packed, jnp.zeros_like(packed[:, :1])], axis=1)
    index = rank.reshape(rank.shape + (1,) * (packed.ndim - 2))
    return jnp.take_along_axis(padded, index, axis=1)


# ---------------------------------------------------------------------------------------------------- attention
def local_window_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    window: int,
    causal: bool,
    lengths: Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Sliding-window softmax attention in blocks of w tokens, each attending to its own and the previous block
    (and the next one when bidirectional), through `attn.functional.softmax_attention`:

        o_i = sum_{j : i - w <= j <= i (causal) or |i - j| <= w, j < length} softmax_j(scale q_i . k_j) v_j

    q: [B, T, H, D]; k: [B, T, H, D]; v: [B, T, H, Dv]; lengths: int [B] valid tokens per row (rows at or beyond it
    output 0). Equal to softmax_attention(..., causal, window=(w, 0 or w)) with those lengths; O(T w) memory.
    """
    batch, length = q.shape[:2]
    size = min(window, length)  # one block covers the sequence when the window does
    blocks = -(-length // size)
    pad = blocks * size - length
    lengths = jnp.full((batch,), length, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)

    def tile(x: Array) -> Array:  # [B, T, ...] -> [B, n, s, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((batch, blocks, size) + x.shape[2:])

    def neighbours(
        x: Array,
    ) -> Array:  # [B, n, s, ...] -> [B, n, (2|3) s, ...]: previous, own (, next) block
        widths = [(0, 0), (1, 0 if causal else 1)] + [(0, 0)] * (x.ndim - 2)
        padded = jnp.pad(x, widths)
        parts = [padded[:, :blocks], padded[:, 1 : blocks + 1]]
        if not causal:
            parts.append(padded[:, 2:])
        return jnp.concatenate(parts, axis=2)

    qb, kb, vb = tile(q), neighbours(tile(k)), neighbours(tile(v))
    span = kb.shape[2]
    q_pos = (np.arange(blocks)[:, None] * size + np.arange(size)[None, :])[:, :, None]  # [n, s, 1]
    k_pos = ((np.arange(blocks)[:, None] - 1) * size + np.arange(span)[None, :])[:, None, :]  # [n, 1, span]
    near = (k_pos <= q_pos) & (q_pos - k_pos <= window) if causal else np.abs(q_pos - k_pos) <= window
    valid = lengths[:, None, None, None]
    allowed = near[None] & (k_pos[None] >= 0) & (k_pos[None] < valid) & (q_pos[None] < valid)  # [B, n, s, span]
    out = F.softmax_attention(
        qb.reshape((batch * blocks, size) + q.shape[2:]),
        kb.reshape((batch * blocks, span) + k.shape[2:]),
        vb.reshape((batch * blocks, span) + v.shape[2:]),
        mask=allowed.reshape(batch * blocks, 1, size, span),
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        implementation="xla",
    )
    return out.reshape((batch, blocks * size) + out.shape[2:])[:, :length]


# ---------------------------------------------------------------------------------------------------- layer
def _trunc_normal(std: float):
    return nn.initializers.truncated_normal(stddev=std)


def _ema_beta_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """N(0, 0.02) around the alternating signs [1, -1, 1, ...] over the EMA dimension (official init)."""
    signs = np.where(np.arange(shape[-1]) % 2 == 0, 1.0, -1.0)
    return (_trunc_normal(0.02)(key, shape, dtype) + signs).astype(dtype)


@register(
    "seqboat",
    family="linear",
    paper="Sparse Modular Activation for Efficient Sequence Modeling",
    catalog=3,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="SeqBoat: EMA states route tokens (SMA) to a local-window GAU over the compressed activated tokens",
    option_docs={
        "window": "local attention window w over the compressed (activated) tokens",
        "ema_dim": "EMA expansion N per channel (MEGA's ndim)",
        "hidden_dim": "GAU value/gate width (None = 2 * embed); divisible by num_heads",
        "router": "'argmax' (learned-temperature configurator), 'gumbel' (Gumbel noise in training) or 'always'",
        "init_temperature_scale": "router temperature at init = scale * sqrt(embed) (official LM: 1.0)",
        "capacity": "None or a fraction in (0, 1]: at most ceil(capacity * T) activated tokens per row (static)",
        "form": "'compressed' (gather/scatter of the activated tokens) or 'masked' (dense reference)",
        "position": "'rope' (rotary q/k at the original positions, the official LM) or 'none'",
        "rope_base": "RoPE base (theta) when position='rope'",
    },
    fidelity="official-code",
    reference="github.com/renll/SeqBoat: SeqBoatUnit, MultiHeadEMA, LatentConfigurator (the unit's own residual and "
    "post-silu are left to the block)",
    validators={
        "window": positive_int,
        "ema_dim": positive_int,
        "hidden_dim": optional(positive_int),
        "router": choice(*ROUTERS),
        "init_temperature_scale": positive,
        "capacity": optional(in_range(0, 1, low_inclusive=False)),
        "form": choice(*FORMS),
        "position": choice(*POSITIONS),
    },
    supports_gqa=False,
)
class SeqBoat(AttentionLayer):
    """SeqBoat layer (EMA + sparsely activated local GAU). x [B, T, E] -> [B, T, E]."""

    window: int = 128
    ema_dim: int = 16
    hidden_dim: int | None = None
    router: str = "argmax"
    init_temperature_scale: float = 1.0
    capacity: float | None = None
    form: str = "compressed"
    position: str = "rope"
    rope_base: float = 10000.0

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        self.hidden_width(call.x.shape[-1])
        if self.num_kv_heads not in (None, self.num_heads):
            raise ValueError(f"num_kv_heads={self.num_kv_heads!r} is not supported: the GAU shares z for q and k")
        if call.cross:
            raise ValueError(f"seqboat is self-attention; got a context {call.context.shape}")
        if call.decode:
            raise ValueError("decode=True is not supported by seqboat (no cache for the compressed GAU)")
        if call.mask is not None and not call.mask.replace(causal=False).is_empty():
            raise ValueError(f"seqboat supports only the mask part causal (attn.Mask(causal=True)); got {call.mask!r}")

    def hidden_width(self, features: int) -> int:
        """The GAU's value/gate width: hidden_dim, or 2 * features; divisible by num_heads."""
        hidden = 2 * features if self.hidden_dim is None else self.hidden_dim
        if not (isinstance(hidden, int) and hidden > 0 and hidden % self.num_heads == 0):
            raise ValueError(f"hidden_dim={hidden!r} must be a positive int divisible by num_heads={self.num_heads}")
        return hidden

    def dense(self, x: Array, features: int, axes: tuple[str | None, str | None], name: str) -> Array:
        kernel = self.param(
            f"{name}_kernel",
            nn.with_logical_partitioning(_trunc_normal(0.02), axes),
            (x.shape[-1], features),
            self.param_dtype,
        )
        bias = self.param(
            f"{name}_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
            (features,),
            self.param_dtype,
        )
        return jnp.einsum("...e,ef->...f", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)

    # The template's stage sequence does not fit SeqBoat: its queries and keys come from the EMA states of the
    # tokens the router activates (not from x), and its output is the EMA skip path plus the router-scaled GAU
    # output scattered back to the activated tokens, both added after the output projection (gau_out). So the call
    # is kept here, around the template's validate, attend and head_outputs stages.
    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        context: Array | None = None,
        mask: Mask | None = None,
        positions: Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> Array:
        """x [B, T, E] -> [B, T, E]."""
        call = AttentionCall(
            x=x, context=context, mask=mask, positions=positions, decode=decode, deterministic=deterministic
        )
        self.validate(call)
        batch, length, features = x.shape
        hidden = self.hidden_width(features)
        causal = mask is not None and mask.causal
        token_pos = self.query_positions(positions, batch, length, 0)

        # --- EMA over all tokens (the SSM every token goes through).
        # 2E rows whatever the mask (the right-to-left half is used only without causal), so one set of
        # parameters serves both directions.
        ema_shape = (2 * features, self.ema_dim)
        ema_axes = ("embed", None)
        ema = {
            "delta": self.param(
                "ema_delta",
                nn.with_logical_partitioning(_trunc_normal(0.2), ema_axes),
                ema_shape,
            ),
            "alpha": self.param(
                "ema_alpha",
                nn.with_logical_partitioning(_trunc_normal(0.2), ema_axes),
                ema_shape,
            ),
            "beta": self.param(
                "ema_beta",
                nn.with_logical_partitioning(_ema_beta_init, ema_axes),
                ema_shape,
            ),
            "gamma": self.param(
                "ema_gamma",
                nn.with_logical_partitioning(_trunc_normal(1.0), ema_axes),
                ema_shape,
            ),
            "omega": self.param(
                "ema_omega",
                nn.with_logical_partitioning(_trunc_normal(1.0), ("embed",)),
                (features,),
            ),
        }
        mx = nn.silu(damped_ema(x, ema, causal=causal)).astype(self.dtype)
        mx = nn.with_logical_constraint(mx, ("batch", "length", "embed"))
        skip = self.dense(mx, features, (None, "embed"), "skip")

        # --- Latent configurator: which tokens activate the GAU, and the probability that scales its output.
        if self.router == "always":
            active = jnp.ones((batch, length), jnp.bool_)
            chosen = jnp.ones((batch, length), jnp.float32)
        else:
            logits = self.dense(mx, 2, ("embed", None), "router").astype(jnp.float32)
            log_tau = self.param(
                "router_log_temperature",
                nn.with_logical_partitioning(
                    nn.initializers.constant(math.log(self.init_temperature_scale * math.sqrt(features))),
                    (None,),
                ),
                (1,),
                self.param_dtype,
            )
            tau = jnp.exp(log_tau.astype(jnp.float32))
            if self.router == "gumbel" and not deterministic:
                uniform = jax.random.uniform(
                    self.make_rng("dropout"),
                    logits.shape,
                    minval=jnp.finfo(jnp.float32).tiny,
                    maxval=1.0,
                )
                logits = logits - jnp.log(-jnp.log(uniform))
            probs = jax.nn.softmax(logits / tau, axis=-1)
            active = jnp.argmax(probs, axis=-1) == 1
            chosen = jnp.max(probs, axis=-1)
            if self.router == "gumbel" and deterministic:
                chosen = jnp.ones_like(chosen)  # hard one-hot in eval
        if self.capacity is not None:
            slots = max(1, math.ceil(self.capacity * length))
            active = active & (jnp.cumsum(active, axis=1) <= slots)
        else:
            slots = length
        self.sow("intermediates", "activation", active.astype(jnp.float32))
        scale = jnp.where(active, chosen, 0.0).astype(self.dtype)

        # --- GAU over the activated tokens.
        heads, dim, dv = self.num_heads, self.head_dim, hidden // self.num_heads
        if self.form == "compressed":
            packed, rank, count = compress_tokens(mx, active)
            gau_in, gau_pos = (
                packed[:, :slots],
                compress_tokens(token_pos, active)[0][:, :slots],
            )
        else:
            gau_in, gau_pos = mx, token_pos
        base = nn.silu(self.dense(gau_in, heads * dim + 2 * hidden, ("embed", "mlp"), "gau_in"))
        z = base[..., : heads * dim].reshape(base.shape[:2] + (heads, dim))
        gate = base[..., heads * dim : heads * dim + hidden]
        values = base[..., heads * dim + hidden :].reshape(base.shape[:2] + (heads, dv))
        offsets = self.param(
            "gau_gamma",
            nn.with_logical_partitioning(_trunc_normal(0.02), (None, "heads", "head_dim")),
            (2, heads, dim),
        )
        shifts = self.param(
            "gau_beta",
            nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads", "head_dim")),
            (2, heads, dim),
        )
        q = z * offsets[0].astype(self.dtype) + shifts[0].astype(self.dtype)
        k = z * offsets[1].astype(self.dtype) + shifts[1].astype(self.dtype)
        if self.position == "rope":
            inv_freq, _ = pos.rope_frequencies(dim, base=self.rope_base)
            q, k = (
                pos.apply_rope(q, gau_pos, inv_freq),
                pos.apply_rope(k, gau_pos, inv_freq),
            )
        if self.form == "compressed":
            attention_mask = Mask(causal=causal, kv_lengths=count)
        else:
            attention_mask = Mask(dense=self.rank_window_mask(active, causal))
        attended = self.attend(q, k, values, call.replace(mask=attention_mask, q_positions=gau_pos))
        attended = self.head_outputs(attended * gate.reshape(attended.shape), call)
        gau = self.dense(attended.reshape(attended.shape[:2] + (hidden,)), features, ("mlp", "embed"), "gau_out")
        if self.form == "compressed":
            if slots < length:
                gau = jnp.pad(gau, ((0, 0), (0, length - slots), (0, 0)))
            gau = extract_tokens(gau, jnp.where(rank < slots, rank, length))
        out = skip + scale[..., None] * gau
        return nn.with_logical_constraint(out.astype(self.dtype), ("batch", "length", "embed"))

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """The GAU's local softmax attention: q, k [B, T', H, D], v [B, T', H, dv] -> [B, T', H, dv] (T' = the
        compressed slots, or T for form='masked'). call.mask: Mask(causal, kv_lengths = activated tokens per row)
        for form='compressed' (the window counts positions of the compressed sequence), or the dense rank-window
        mask for form='masked'."""
        rate, rng = self.effective_dropout(call.deterministic), self.dropout_rng(call.deterministic)
        if self.form == "compressed":
            return local_window_attention(
                q,
                k,
                v,
                window=self.window,
                causal=call.mask.causal,
                lengths=call.mask.kv_lengths,
                dropout_rate=rate,
                dropout_rng=rng,
            )
        return F.softmax_attention(q, k, v, mask=call.mask, dropout_rate=rate, dropout_rng=rng, implementation="xla")

    def rank_window_mask(self, active: Array, causal: bool) -> Array:
        """bool [B, 1, T, T]: both tokens active and their ranks among the active tokens within the window."""
        rank = jnp.cumsum(active, axis=1) - 1
        gap = rank[:, :, None] - rank[:, None, :]
        near = ((gap >= 0) & (gap <= self.window)) if causal else (jnp.abs(gap) <= self.window)
        return (near & active[:, :, None] & active[:, None, :])[:, None]


__all__ = [
    "SeqBoat",
    "causal_convolution",
    "compress_tokens",
    "damped_ema",
    "ema_kernel",
    "extract_tokens",
    "local_window_attention",
]
