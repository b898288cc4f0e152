"""`hilo`: HiLo attention, from "Fast Vision Transformers with HiLo Attention" (Pan et al., LITv2, catalog [149]).

The heads of one layer are split in two groups over a 2-D token grid [H, W] with window size s:

    Lo-Fi heads   the last  l = floor(alpha * num_heads) heads: every query attends globally to the keys/values
                  of the s x s average-pooled grid (one pooled token per window) -> low frequencies
    Hi-Fi heads   the first num_heads - l heads: self-attention inside each non-overlapping s x s window
                  -> high frequencies

    Hi-Fi:  o_i = sum_{j in win(i)} softmax_j(q_i k_j^T / sqrt(D)) v_j
    Lo-Fi:  o_i = sum_m softmax_m(q_i kbar_m^T / sqrt(D)) vbar_m,   kbar_m, vbar_m = (AvgPool_s(x))_m W_k, W_v
    y = concat(o_Hi-Fi heads, o_Lo-Fi heads) W_o

as in the official code (int(num_heads * alpha) Lo-Fi heads, Hi-Fi output first in the concatenation; s = 1
makes every head Lo-Fi, i.e. full attention). LITv2 uses alpha = 0.9 and s = 2 (the defaults). Differences from
the official code: one output projection W_o over all heads instead of one per group (the paper's two projections
are its block-diagonal special case), and the query projection of both groups is one [E, heads, D] kernel (its head
slices are the paper's separate projections). Pooling x before the key/value projection equals pooling the
projected keys/values (both linear), and is cheaper.

Implementation: Hi-Fi is `attn.functional.neighborhood_attention` with kernel_size = stride = s (blocked windows);
Lo-Fi pools with `attn.core.windows.partition_windows` and attends with `attn.functional.softmax_attention`. H and
W must be multiples of s (as in the paper).

Shapes: x [B, H, W, E] -> [B, H, W, E]. Time O(B N (s^2 h_hi + N / s^2 h_lo) D), memory O(B N (s^2 h_hi +
N h_lo / s^2)) for N = H W tokens. s = 1 (any alpha) is plain softmax attention over the tokens; alpha = 0 with
s > 1 is non-overlapping s x s window attention. Captured weights are float32 [B, heads, N, N] over tokens (a Lo-Fi
head's weight on a pooled key is spread evenly over the s^2 tokens it averages). No causal masking, no decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.core.layer import AttentionCall, SpatialAttentionLayer
from attn.core.neighborhood import window_probs_to_dense
from attn.core.validation import check_rank, in_range, optional, positive, positive_int
from attn.core.windows import partition_windows, unpartition_windows
from attn.registry import register

Array = jax.Array


def hilo_heads(num_heads: int, alpha: float, window_size: int) -> tuple[int, int]:
    """(Hi-Fi heads, Lo-Fi heads): the first and last groups of the heads, as in the official code."""
    lofi = num_heads if window_size == 1 else int(num_heads * alpha)
    return num_heads - lofi, lofi


@register(
    "hilo",
    family="local",
    paper="Fast Vision Transformers with HiLo Attention",
    catalog=149,
    input_kind="spatial",
    supports_causal=False,
    supports_decode=False,
    summary="HiLo: local s x s window heads (Hi-Fi) and global heads over s x s average-pooled keys (Lo-Fi)",
    option_docs={
        "alpha": "fraction of Lo-Fi heads: the last int(alpha * num_heads) heads attend to the pooled grid",
        "window_size": "s: Hi-Fi window and Lo-Fi pooling size (H and W must be multiples; 1 = all heads global)",
        "scale": "logit scale (None = 1/sqrt(head_dim))",
    },
    fidelity="official-code",
    reference="the official LITv2 HiLo code: int(alpha * heads) Lo-Fi heads, Hi-Fi output first; deviation: one "
    "output projection over all heads",
    validators={"alpha": in_range(0, 1), "window_size": positive_int, "scale": optional(positive)},
    supports_gqa=False,
)
class HiLoAttention(SpatialAttentionLayer):
    """HiLo attention: x [B, H, W, E] -> [B, H, W, E]."""

    alpha: float = 0.9
    window_size: int = 2
    scale: float | None = None

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        check_rank("x", call.x, 4, "[batch, height, width, embed] (HiLo attention is 2-D)")
        if self.num_kv_heads not in (None, self.num_heads):
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} is not supported by hilo (its two head groups have separate "
                f"keys/values); use None or num_heads={self.num_heads}"
            )
        s = self.window_size
        height, width = call.x.shape[1:3]
        if height % s or width % s:
            raise ValueError(
                f"window_size={s!r} must be a positive int dividing the grid {height} x {width} (Hi-Fi windows and "
                "Lo-Fi pooling cover the grid exactly)"
            )

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array | None, Array | None]:
        """x [B, H, W, E] -> q [B, H, W, heads, D] and the Hi-Fi heads' keys/values [B, H, W, hifi, D] (None when
        every head is Lo-Fi). The Lo-Fi keys/values come from the pooled grid, in `attend`."""
        batch, height, width, features = x.shape
        hifi, _ = hilo_heads(self.num_heads, self.alpha, self.window_size)
        flat = x.reshape(batch, height * width, features)
        grid = lambda t: t.reshape(batch, height, width, *t.shape[-2:])
        q = grid(self.dense_heads(flat, self.num_heads, "heads", "query"))
        if not hifi:
            return q, None, None
        k = grid(self.dense_heads(flat, hifi, "kv_heads", "hifi_key"))
        v = grid(self.dense_heads(flat, hifi, "kv_heads", "hifi_value"))
        return q, k, v

    def attend(self, q: Array, k: Array | None, v: Array | None, call: AttentionCall) -> Array:
        """q [B, H, W, heads, D], Hi-Fi k/v [B, H, W, hifi, D] or None -> [B, H, W, heads, D] (Hi-Fi heads first);
        sows the dense weights float32 [B, heads, N, N] when captured (a Lo-Fi head spreads the weight of a pooled
        key evenly over the s x s tokens it averages)."""
        x = call.x
        batch, height, width, features = x.shape
        s, tokens = self.window_size, height * width
        hifi, lofi = hilo_heads(self.num_heads, self.alpha, s)
        rng = self.dropout_rng(call.deterministic)
        rngs = [None, None] if rng is None else list(jax.random.split(rng))
        dropout = dict(dropout_rate=self.effective_dropout(call.deterministic), implementation=self.implementation)
        capture = self.wants_weights()
        outputs, weights = [], []

        if hifi:
            result = F.neighborhood_attention(
                q[..., :hifi, :],
                k,
                v,
                kernel_size=s,
                stride=s,
                scale=self.scale,
                dropout_rng=rngs[0],
                return_probs=capture,
                **dropout,
            )
            if capture:
                result, aux = result
                weights.append(window_probs_to_dense(aux["probs"], aux["key_indices"], tokens))
            outputs.append(result.reshape(batch, tokens, hifi, -1))

        if lofi:
            # One pooled token per s x s window (row-major windows): the mean of its tokens.
            pooled = partition_windows(x, (s, s))[0].reshape(batch, -1, s * s, features).mean(axis=2)  # [B, M, E]
            k = self.dense_heads(pooled, lofi, "kv_heads", "lofi_key")
            v = self.dense_heads(pooled, lofi, "kv_heads", "lofi_value")
            result = F.softmax_attention(
                q[..., hifi:, :].reshape(batch, tokens, lofi, -1),
                k,
                v,
                scale=self.scale,
                dropout_rng=rngs[1],
                return_probs=capture,
                **dropout,
            )
            if capture:
                result, aux = result
                # Token j is averaged into pooled key m(j) (its window) with weight 1/s^2.
                windows = np.broadcast_to(np.arange(pooled.shape[1])[:, None], (pooled.shape[1], s * s))
                window_of = unpartition_windows(windows, (height, width), (s, s))
                weights.append(jnp.take(aux["probs"], jnp.asarray(window_of.reshape(-1)), axis=-1) / (s * s))
            outputs.append(result)

        if capture:
            self.sow_capture("attention_weights", jnp.concatenate(weights, axis=1).astype(jnp.float32))
        return jnp.concatenate(outputs, axis=2).reshape(batch, height, width, self.num_heads, -1)
