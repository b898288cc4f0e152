"""`titans`: Titans ([8] "Titans: Learning to Memorize at Test Time", Behrouz, Zhong, Mirrokni): a neural long-term
memory trained at test time, next to attention as a short-term memory, in the paper's three architectures.

The memory (attn.linear.titans_memory; per head h, memory MLP M with L = memory_depth layers, L = 1 a matrix):

    k_t = l2norm(SiLU(conv(x W_K)_t)),  v_t = SiLU(conv(x W_V)_t),  q_t = l2norm(SiLU(conv(x W_Q)_t))   (section 4.4)
    alpha_t = sigmoid(x_t w_alpha - 4), eta_t = sigmoid(x_t w_eta + 2), theta_t = theta_max sigmoid(x_t w_theta)
    S_t = eta_t S_{t-1} - theta_t grad ||M_{t'}(k_t) - v_t||^2,   M_t = (1 - alpha_t) M_{t-1} + S_t,   m_t = M_t(q_t)

with conv a causal depthwise convolution of width `conv_width` over the tokens (section 4.4: "a 1D depthwise-
separable convolution layer after each of the query, key, and value projections"; its ablation shows it helps),
M_0 a learned parameter (the outer loop) and t' the start of t's chunk of `chunk_size` tokens: gradients
inside a chunk are taken at the chunk-start memory (the paper's parallel training, eq. 16-18); chunk_size=1 is the
token-level rule of eqs. 13-14 exactly. Given the chunk-start gradients, the momentum, the forgetting and the
per-token memory M_t used for retrieval are exact (titans_memory's docstring has the closed form).

Variants (`variant`), with persistent memory P = [p_1 .. p_Np] (learned tokens in embedding space, eq. 19):
  "mac"  memory as context (eq. 21-25): the sequence is cut into segments of `segment_size`; for segment S,
         h = M_{start}(q) with the memory at the segment start, attention over [P || h || S] (token j of the
         segment sees P, h_1..h_j and S_1..S_j: causal), y = Attn(...), the memory then learns from y
         (keys/values/queries are per-head maps of y) and o_t = y_t * sigmoid(RMSNorm(M_t(q'_t))).
  "mag"  memory as gate (eq. 26-28): o = RMSNorm(SWA*(P || x)) * sigmoid(RMSNorm(M(P || x))), SWA* sliding-window
         attention (`window` keys back) that always sees the persistent prefix.
  "mal"  memory as layer (eq. 29-31): y = M(P || x) projected back to the embedding, o = SWA*(y).
  "lmm"  the memory alone, o = M(P || x) (the paper's Titans (LMM)).
Outputs of the persistent positions are dropped; the output projection maps [B, T, H, D] to [B, T, E].

Interpretive choices (the paper leaves them open): the gate parameterisation and its offsets (forgetting starts
near 0.02, momentum near 0.88), theta_max, a bias-free SiLU MLP memory with hidden width memory_expansion * D, the
gating "⊗" as product with a sigmoid of the RMS-normalised memory output, MAC's per-token causal masking of the
retrieved tokens, and the convolutions' identity initialisation (a fresh layer starts as the convolution-free
memory) with no bias. The convolutions act on the memory's projections (in MAC on the query that reads the memory
and on the per-head maps of y that it learns from, their histories crossing segments); the attention's own q/k/v
are not convolved.

Shapes: x [B, T, E] -> [B, T, E]; heads H, head_dim D; memory state per head O(P_M) (P_M = memory parameters:
D^2 for L = 1, 2 e D^2 for L = 2 with expansion e). Time: memory O(B H T (b (D + e D) + P_M)) with chunk b; SWA
O(B H T window D) (the XLA reference builds the T x T mask); MAC attention O(B H T (Np + 2 C) D) and a sequential
scan over segments. Only causal masks (plus q_lengths) are supported.

Decoding (decode=True, flax convention: the first call without a cache creates a zero cache sized by its input and
runs an ordinary forward; later calls take the next tokens x [B, L, E], L >= 1) for 'lmm', 'mag' and 'mal', on the
cache protocol (attn.core.cache): a RecurrentState holds the memory weights M, its momentum S and the chunk-start
snapshot (per MLP layer, [B, H, in, out], "memory_{weights,momentum,snapshot}_<l>") and the convolutions' last
conv_width - 1 projected rows ("conv_memory_{query,key,value}"); for the sliding-window attention a dense KVCache
holds the keys and values of [P || x] ([B, Np + T_max, KVH, D]). Both count the positions of [P || x] seen in one
"cache_index" (0 until the first decode step, Np + tokens after it). The first decode step (index 0) runs the
persistent tokens through the memory from M_0 and stores their keys and values; every step then continues the
memory and the convolutions token by token (titans_memory.continue_memory) with the same chunk boundaries as the
full forward (positions counted over P || x), so decoding in pieces of any sizes equals the full forward on the
concatenated tokens (up to float rounding).
Cost per token O(H P_M) for the memory and O(H (Np + T_max) D) for the attention (the reference masks the whole
cache; the window bounds what is seen). 'mac' does not decode (decode=True raises a ValueError naming it): its
attention and memory restart per segment (h read at the segment start), which this cache does not model.

Nothing reduces it to plain softmax attention (the memory branch is always present); theta = 0 keeps the
memory at its learned initial weights M_0 (up to forgetting), the reductions of the memory itself are in
titans_memory (linear memory, eta = alpha = 0: linear attention for one chunk, the delta rule for chunk 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core import cache as cache_lib
from attn.core import kv_cache
from attn.core.conv import causal_depthwise_conv, identity_filter
from attn.core.layer import AttentionCall, AttentionLayer, HeadProjection, OutputProjection
from attn.core.linear_scan import linear_mask_parts, repeat_kv
from attn.core.masks import Mask
from attn.core.padding import length_mask
from attn.core.validation import choice, non_negative_int, positive, positive_int
from attn.linear.titans_memory import continue_memory, memory_apply, neural_memory
from attn.registry import register

Array = jax.Array

VARIANTS = ("mac", "mag", "mal", "lmm")
# Gate offsets added to the projected logits, so that a fresh layer forgets little and keeps most momentum.
ALPHA_OFFSET = -4.0
ETA_OFFSET = 2.0
MEMORY_INPUTS = ("memory_query", "memory_key", "memory_value")
MEMORY_PARTS = ("weights", "momentum", "snapshot")


@dataclasses.dataclass(frozen=True)
class PrefixWindow:
    """mask_fn (with causal=True): the first `prefix` keys are always visible, others at most `window` back."""

    prefix: int
    window: int

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        return (kv_idx < self.prefix) | (q_idx - kv_idx <= self.window)


@dataclasses.dataclass(frozen=True)
class SegmentContext:
    """mask_fn of MAC: keys [persistent (prefix) | retrieved h (segment) | segment tokens (segment)], queries the
    segment tokens; query j sees the persistent keys and the h and tokens at positions <= j."""

    prefix: int
    segment: int

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        pos = kv_idx - self.prefix
        pos = jnp.where(pos >= self.segment, pos - self.segment, pos)
        return (kv_idx < self.prefix) | (pos <= q_idx)


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def rms_normalize(x: Array, scale: Array, eps: float = 1e-6) -> Array:
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * scale


def memory_features(q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
    """The memory's inputs from its (convolved) projections: l2norm(SiLU(q)), l2norm(SiLU(k)), SiLU(v)."""
    return l2_normalize(jax.nn.silu(q)), l2_normalize(jax.nn.silu(k)), jax.nn.silu(v)


def _identity_heads(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    del key
    return jnp.broadcast_to(jnp.eye(shape[-2], shape[-1], dtype=dtype), shape)


@register(
    "titans",
    family="linear",
    paper="Titans: Learning to Memorize at Test Time",
    catalog=8,
    op=neural_memory,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="neural long-term memory (MLP) learned at test time: momentum surprise + forgetting; MAC/MAG/MAL "
    "(decode: all but 'mac')",
    option_docs={
        "variant": "'mac' (memory as context), 'mag' (memory as gate with SWA), 'mal' (memory then SWA) or 'lmm'; "
        "decode=True works for all but 'mac' (which raises)",
        "memory_depth": "layers L_M >= 1 of the memory MLP (1 = a linear, matrix-valued memory)",
        "memory_expansion": "hidden width of the memory MLP as a multiple of head_dim (memory_depth >= 2)",
        "chunk_size": "tokens whose memory gradients are taken at the chunk-start memory (1 = exact online rule)",
        "window": "sliding-window attention of 'mag' / 'mal': keys at most this many positions back",
        "segment_size": "segment length C of 'mac' (attention within a segment, memory read at its start)",
        "num_persistent": "learned persistent memory tokens prepended (0 = none)",
        "theta_max": "largest memory step size: theta_t = theta_max * sigmoid(x_t w_theta)",
        "conv_width": "causal depthwise convolution of this width after the memory's query/key/value projections "
        "(section 4.4; identity-initialised), 0 or 1 = none",
    },
    fidelity="paper",
    reference="the paper's memory update (eqs. 13-14, chunk-parallel 16-18), persistent memory (eq. 19), "
    "MAC/MAG/MAL (eqs. 21-31) and section 4.4 (SiLU, l2-norm, depthwise convolutions); tested per variant against "
    "a numpy implementation of those equations; no official code was released; the gate parameterisation, "
    "theta_max and the memory MLP width are interpretive choices",
    validators={
        "variant": choice(*VARIANTS),
        "memory_depth": positive_int,
        "memory_expansion": positive_int,
        "chunk_size": positive_int,
        "window": positive_int,
        "segment_size": positive_int,
        "num_persistent": non_negative_int,
        "theta_max": positive,
        "conv_width": non_negative_int,
    },
)
class TitansAttention(AttentionLayer):
    """Titans (MAC / MAG / MAL / LMM) with a neural long-term memory. x [B, T, E] -> [B, T, E]."""

    variant: str = "mag"
    memory_depth: int = 2
    memory_expansion: int = 2
    chunk_size: int = 16
    window: int = 64
    segment_size: int = 32
    num_persistent: int = 4
    theta_max: float = 0.2
    conv_width: int = 4

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.cross:
            raise ValueError(f"titans is self-attention only (a causal recurrence); got a context {call.context.shape}")
        if call.decode and self.variant == "mac":
            raise ValueError(
                "decode=True is not supported by titans variant='mac' (memory as context restarts its attention "
                "and memory read per segment, which the decode cache does not model); use variant 'mag', 'mal' or "
                "'lmm', or run the full forward"
            )
        causal, q_lengths, _ = linear_mask_parts(call.mask, "titans")
        if not causal:
            raise ValueError(
                "titans is causal only (a memory trained token by token); pass attn.Mask(causal=True), "
                f"got mask={call.mask!r}"
            )
        if call.decode and q_lengths is not None:
            raise ValueError("q_lengths is not supported by titans with decode=True (decode one row per sequence)")

    # The template's fixed stage sequence (project_qkv -> prepare -> attend -> output_gate) does not fit Titans:
    # the memory branch feeds the attention's inputs ('mal', attention over the memory's output) and gates its
    # outputs ('mag'), 'mac' interleaves attention and memory updates segment by segment inside one scan, and
    # padded rows are zeroed after the output projection. So the call is kept here, around the template's
    # validate, head_outputs and project_out stages.
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
        """x [B, T, E] -> [B, T, E]. `positions` is unused: order comes from the causal recurrence and mask."""
        call = AttentionCall(
            x=x, context=context, mask=mask, positions=positions, decode=decode, deterministic=deterministic
        )
        self.validate(call)
        _, q_lengths, _ = linear_mask_parts(mask, "titans")
        persistent = None
        if self.num_persistent:
            persistent = self.param(
                "persistent",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (self.num_persistent, x.shape[-1]),
                self.param_dtype,
            )
            persistent = jnp.broadcast_to(jnp.asarray(persistent, x.dtype)[None], (x.shape[0],) + persistent.shape)
        if self.variant == "mac":
            y = self.memory_as_context(x, persistent, deterministic)
        else:
            y = self.memory_variants(x, persistent, deterministic, decode)
        y = self.head_outputs(y.astype(self.dtype), call)
        out = self.project_out(y, x.shape[-1])
        if q_lengths is not None:
            out = out * length_mask(q_lengths, x.shape[0], x.shape[1], "q_lengths")[:, :, None].astype(out.dtype)
        return out

    # ------------------------------------------------------------------ memory pieces
    def memory_shapes(self) -> list[tuple[int, int, int]]:
        """[H, in, out] of each memory MLP layer."""
        dim, hidden = self.head_dim, self.memory_expansion * self.head_dim
        dims = [dim] + [hidden] * (self.memory_depth - 1) + [dim]
        return [(self.num_heads, dims[layer], dims[layer + 1]) for layer in range(self.memory_depth)]

    def memory_weights(self) -> tuple[Array, ...]:
        """The learned initial memory M_0: one [H, in, out] array per MLP layer."""
        weights = []
        for layer, shape in enumerate(self.memory_shapes()):
            w = self.param(
                f"memory_{layer}",
                nn.with_logical_partitioning(
                    nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2),
                    ("heads", None, None),
                ),
                shape,
                self.param_dtype,
            )
            weights.append(jnp.asarray(w, self.memory_dtype))
        return tuple(weights)

    def gates(self, x: Array) -> tuple[Array, Array, Array]:
        """alpha, eta, theta [B, T, H] from x [B, T, E]."""
        z = HeadProjection(
            heads=self.num_heads,
            head_dim=3,
            use_bias=True,
            dtype=self.memory_dtype,
            param_dtype=self.param_dtype,
            name="gates",
        )(x.astype(self.memory_dtype))
        alpha = jax.nn.sigmoid(z[..., 0] + ALPHA_OFFSET)
        eta = jax.nn.sigmoid(z[..., 1] + ETA_OFFSET)
        theta = self.theta_max * jax.nn.sigmoid(z[..., 2])
        return alpha, eta, theta

    @property
    def memory_dtype(self) -> Any:
        """The memory's compute dtype: float32, or float64 for a float64 layer (weights, gates, updates)."""
        return jnp.promote_types(self.dtype, jnp.float32)

    def memory_projections(self, x: Array) -> tuple[Array, Array, Array]:
        """The memory's query/key/value projections of x [B, T, E], before convolution: [B, T, H, D] each."""
        return tuple(
            self.dense_heads(x, self.num_heads, "heads", name).astype(self.memory_dtype) for name in MEMORY_INPUTS
        )

    def conv_kernel(self, name: str) -> Array | None:
        """The [w, H, D] causal depthwise filter after projection `name` (identity-initialised), or None (off)."""
        if self.conv_width <= 1:
            return None
        kernel = self.param(
            f"{name}_conv",
            nn.with_logical_partitioning(identity_filter, (None, "heads", "head_dim")),
            (self.conv_width, self.num_heads, self.head_dim),
            self.param_dtype,
        )
        return jnp.asarray(kernel, self.memory_dtype)

    def memory_inputs(self, x: Array) -> tuple[Array, Array, Array]:
        """Memory queries, keys (convolved, SiLU, l2-normalised) and values (convolved, SiLU): [B, T, H, D]."""
        convolved = []
        for name, y in zip(MEMORY_INPUTS, self.memory_projections(x), strict=True):
            kernel = self.conv_kernel(name)
            convolved.append(y if kernel is None else causal_depthwise_conv(y, kernel))
        return memory_features(*convolved)

    def run_memory(self, x: Array) -> Array:
        """The memory branch over x [B, T, E]: m_t = M_t(q_t), [B, T, H, D] (float32, or float64)."""
        q, k, v = self.memory_inputs(x)
        alpha, eta, theta = self.gates(x)
        return neural_memory(
            q, k, v, alpha, eta, theta, initial_weights=self.memory_weights(), chunk_size=self.chunk_size
        )

    def scale_param(self, name: str) -> Array:
        scale = self.param(
            name,
            nn.with_logical_partitioning(nn.initializers.ones, ("heads", "head_dim")),
            (self.num_heads, self.head_dim),
            self.param_dtype,
        )
        return jnp.asarray(scale, self.memory_dtype)

    def sliding_attention(
        self, q: Array, k: Array, v: Array, deterministic: bool, q_offset: Array | None = None
    ) -> Array:
        """Causal sliding-window attention over [persistent || tokens] that always sees the persistent prefix.

        q [B, Tq, H, D], k, v [B, Tk, KVH, D]. Decoding passes q_offset (int32 scalar), the key position of the
        first query: keys are then the cache, filled up to q_offset + Tq."""
        if self.num_persistent:
            mask = Mask(causal=True, mask_fn=PrefixWindow(self.num_persistent, self.window))
        else:
            mask = Mask(causal=True, window=(self.window, 0))
        if q_offset is not None:
            mask = kv_cache.decode_mask(mask, q.shape[0], q_offset, q.shape[1])
        return F.softmax_attention(
            q,
            k,
            v,
            mask=mask,
            q_offset=0 if q_offset is None else q_offset,
            dropout_rate=self.effective_dropout(deterministic),
            dropout_rng=self.dropout_rng(deterministic),
            implementation=self.implementation,
        )

    # ------------------------------------------------------------------ variants
    def memory_variants(self, x: Array, persistent: Array | None, deterministic: bool, decode: bool = False) -> Array:
        """'mag', 'mal' and 'lmm' over x~ = P || x; returns [B, T, H, D] (persistent positions dropped).

        With decode=True and a cache, x is the next tokens and the memory and the attention continue from the
        cache; without a cache, the cache is created (zeros, sized by x) and the call is an ordinary forward."""
        prefix = self.num_persistent
        xt = x if persistent is None else jnp.concatenate([persistent, x], axis=1)
        start = None
        recurrent = cache_lib.load_state(self, self.state_keys()) if decode else None
        if recurrent is not None:
            memory, start = self.decode_memory(xt, recurrent)
        else:
            memory = self.run_memory(xt)
            if decode:
                self.create_cache(x)
        if self.variant == "lmm":
            return memory[:, prefix:]
        if self.variant == "mal":
            layer_out = OutputProjection(
                features=x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="memory_out"
            )(memory)
            q, k, v = self.project_qkv(layer_out, None)
        else:
            q, k, v = self.project_qkv(xt, None)
        if start is None:
            y = self.sliding_attention(q, k, v, deterministic)[:, prefix:]
        else:
            k, v = self.cached_keys_values(k, v, start)
            y = self.sliding_attention(q[:, prefix:], k, v, deterministic, q_offset=start)
        if self.variant == "mal":
            return y
        y = rms_normalize(y.astype(self.memory_dtype), self.scale_param("attention_norm"))
        gate = jax.nn.sigmoid(rms_normalize(memory[:, prefix:], self.scale_param("memory_norm")))
        return y * gate

    # ------------------------------------------------------------------ decoding ('mag', 'mal', 'lmm')
    def state_keys(self) -> tuple[str, ...]:
        """Variables of the memory's RecurrentState: weights, momentum, chunk-start snapshot per MLP layer, and the
        convolution histories."""
        keys = tuple(f"memory_{part}_{layer}" for part in MEMORY_PARTS for layer in range(self.memory_depth))
        return keys + (tuple(f"conv_{name}" for name in MEMORY_INPUTS) if self.conv_width > 1 else ())

    def state_names(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        memory = tuple((key, ("batch", "heads", None, None)) for key in self.state_keys() if key.startswith("memory"))
        conv = tuple((key, ("batch", None, "heads", "head_dim")) for key in self.state_keys() if key.startswith("conv"))
        return memory + conv

    def create_cache(self, x: Array) -> None:
        """Zero caches for x [B, T, E] (T = the longest sequence to decode): the memory's RecurrentState and, for
        the sliding-window attention, a dense KVCache of [P || x] (capacity Np + T). Both count the positions of
        [P || x] seen in one shared "cache_index" (0 until the first decode step)."""
        batch, dtype = x.shape[0], self.memory_dtype
        state = {}
        for layer, shape in enumerate(self.memory_shapes()):
            for part in MEMORY_PARTS:
                state[f"memory_{part}_{layer}"] = jnp.zeros((batch,) + shape, dtype)
        if self.conv_width > 1:
            for name in MEMORY_INPUTS:
                state[f"conv_{name}"] = jnp.zeros((batch, self.conv_width - 1, self.num_heads, self.head_dim), dtype)
        index = jnp.array(0, jnp.int32)
        cache_lib.store_state(self, cache_lib.RecurrentState(state, index, self.state_names()))
        if self.variant != "lmm":
            shape = (batch, self.num_persistent + x.shape[1], self.kv_heads, self.head_dim)
            keys = jnp.zeros(shape, self.dtype)
            cache_lib.store(self, cache_lib.empty_kv(keys, keys, shape[1]))

    def decode_convolutions(self, xt: Array, recurrent: cache_lib.RecurrentState) -> tuple[tuple[Array, ...], dict]:
        """The convolved memory projections of xt = [P || x] [B, Np + L, E] and the updated histories.

        On the first step (index 0) the persistent tokens are convolved from zeros and x continues after them;
        later, x continues from the cached history (the persistent rows of xt are then unused)."""
        prefix, first = self.num_persistent, recurrent.index == 0
        outs, histories = [], {}
        for name, y in zip(MEMORY_INPUTS, self.memory_projections(xt), strict=True):
            kernel = self.conv_kernel(name)
            if kernel is None:
                outs.append(y)
                continue
            zeros = jnp.zeros((y.shape[0], self.conv_width - 1) + y.shape[2:], y.dtype)
            after_prefix = jnp.concatenate([zeros, y[:, :prefix]], axis=1)[:, prefix:]
            history = jnp.where(first, after_prefix, recurrent.state[f"conv_{name}"].astype(y.dtype))
            head = causal_depthwise_conv(y[:, :prefix], kernel, zeros)
            outs.append(jnp.concatenate([head, causal_depthwise_conv(y[:, prefix:], kernel, history)], axis=1))
            histories[f"conv_{name}"] = jnp.concatenate([history, y[:, prefix:]], axis=1)[:, -(self.conv_width - 1) :]
        return tuple(outs), histories

    def decode_memory(self, xt: Array, recurrent: cache_lib.RecurrentState) -> tuple[Array, Array]:
        """Continues the cached memory over the next tokens x, given xt = [P || x] [B, Np + L, E].

        Returns (m [B, Np + L, H, D], start): the memory outputs of the persistent tokens (computed from M_0 on
        the first step; zeros and unused afterwards) followed by those of x, and start, the position of x's first
        token in [P || x] (int32 scalar). Advances the cache's RecurrentState."""
        batch, prefix, depth = xt.shape[0], self.num_persistent, self.memory_depth
        first = recurrent.index == 0
        start = jnp.where(first, prefix, recurrent.index)
        convolved, histories = self.decode_convolutions(xt, recurrent)
        inputs = memory_features(*convolved) + self.gates(xt)  # one call: the projections are named submodules
        prefix_inputs, inputs = tuple(a[:, :prefix] for a in inputs), tuple(a[:, prefix:] for a in inputs)
        initial = tuple(jnp.broadcast_to(w[None], (batch,) + w.shape) for w in self.memory_weights())
        cached = tuple(
            tuple(recurrent.state[f"memory_{part}_{layer}"] for layer in range(depth)) for part in MEMORY_PARTS
        )
        # The state before the first persistent token: (M_0, S_0 = 0, chunk-start snapshot M_0).
        fresh = (initial, tuple(jnp.zeros_like(w) for w in initial), initial)
        zeros = jnp.zeros((batch, prefix, self.num_heads, self.head_dim), self.memory_dtype)
        if not prefix:
            prefix_memory, state = zeros, jax.tree.map(lambda new, old: jnp.where(first, new, old), fresh, cached)
        else:
            prefix_memory, state = jax.lax.cond(
                first,
                lambda: continue_memory(*prefix_inputs, state=fresh, start=0, chunk_size=self.chunk_size),
                lambda: (zeros, cached),
            )
        memory, state = continue_memory(*inputs, state=state, start=start, chunk_size=self.chunk_size)
        values = {
            f"memory_{part}_{layer}": w
            for part, ws in zip(MEMORY_PARTS, state, strict=True)
            for layer, w in enumerate(ws)
        }
        index = start + xt.shape[1] - prefix
        cache_lib.store_state(self, cache_lib.RecurrentState({**values, **histories}, index, self.state_names()))
        return jnp.concatenate([prefix_memory, memory], axis=1), start

    def cached_keys_values(self, k: Array, v: Array, start: Array) -> tuple[Array, Array]:
        """Writes k, v [B, Np + L, KVH, D] of [P || x] into the dense KVCache (the persistent part only on the first
        step, start = Np on it; x's at `start`) and returns the whole cache [B, Np + T_max, KVH, D]."""
        prefix, cache = self.num_persistent, cache_lib.load(self)
        first = start == prefix  # later steps start after the first token of x (the shared index has advanced)
        outs = []
        for stored, new in ((cache.keys, k), (cache.values, v)):
            new = new.astype(stored.dtype)
            if prefix:
                stored = stored.at[:, :prefix].set(jnp.where(first, new[:, :prefix], stored[:, :prefix]))
            outs.append(jax.lax.dynamic_update_slice_in_dim(stored, new[:, prefix:], start, 1))
        cache_lib.store(self, cache.replace(keys=outs[0], values=outs[1], index=start + k.shape[1] - prefix))
        return outs[0], outs[1]

    def memory_as_context(self, x: Array, persistent: Array | None, deterministic: bool) -> Array:
        """'mac': a scan over segments; returns [B, T, H, D]."""
        batch, length, _ = x.shape
        heads, dim, prefix = self.num_heads, self.head_dim, self.num_persistent
        size = min(self.segment_size, length)
        segments = -(-length // size)
        pad = segments * size - length

        q = self.dense_heads(x, heads, "heads", "query")
        xt = x if persistent is None else jnp.concatenate([persistent, x], axis=1)
        k = repeat_kv(self.dense_heads(xt, self.kv_heads, "kv_heads", "key"), heads)
        v = repeat_kv(self.dense_heads(xt, self.kv_heads, "kv_heads", "value"), heads)
        persistent_k, persistent_v, k, v = k[:, :prefix], v[:, :prefix], k[:, prefix:], v[:, prefix:]
        retrieve_q = self.dense_heads(x, heads, "heads", "memory_query").astype(self.memory_dtype)
        retrieve_kernel = self.conv_kernel("memory_query")
        if retrieve_kernel is not None:
            retrieve_q = causal_depthwise_conv(retrieve_q, retrieve_kernel)
        retrieve_q = l2_normalize(jax.nn.silu(retrieve_q))
        alpha, eta, theta = self.gates(x)

        def head_map(name: str) -> Array:
            w = self.param(
                name,
                nn.with_logical_partitioning(_identity_heads, ("heads", "head_dim", None)),
                (heads, dim, dim),
                self.param_dtype,
            )
            return jnp.asarray(w, self.memory_dtype)

        context_k, context_v = head_map("context_key"), head_map("context_value")
        update_q, update_k, update_v = head_map("update_query"), head_map("update_key"), head_map("update_value")
        memory_scale = self.scale_param("memory_norm")
        update_kernels = tuple(self.conv_kernel(name) for name in ("update_query", "update_key", "update_value"))
        initial = tuple(jnp.broadcast_to(w[None], (batch,) + w.shape) for w in self.memory_weights())
        momentum = tuple(jnp.zeros_like(w) for w in initial)
        # The convolutions after the update maps run over the whole sequence of y: their histories cross segments.
        width = max(self.conv_width - 1, 0)
        histories = tuple(jnp.zeros((batch, width, heads, dim), self.memory_dtype) for _ in update_kernels)
        mask = Mask(mask_fn=SegmentContext(prefix, size))
        rate, rng = self.effective_dropout(deterministic), self.dropout_rng(deterministic)
        dtype = q.dtype

        def blocks(a: Array) -> Array:  # [B, T, ..] -> [N, B, C, ..], zero-padded at the end (causal: harmless)
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
            return jnp.moveaxis(a.reshape((batch, segments, size) + a.shape[2:]), 1, 0)

        def per_head(a: Array, w: Array) -> Array:
            return jnp.einsum("bchd,hde->bche", a, w)

        def convolve(y: Array, kernel: Array | None, history: Array) -> tuple[Array, Array]:
            if kernel is None:
                return y, history
            return causal_depthwise_conv(y, kernel, history), jnp.concatenate([history, y], axis=1)[:, -width:]

        def segment(carry, inputs):
            weights, state, conv_histories = carry
            index, q_s, k_s, v_s, rq_s, alpha_s, eta_s, theta_s = inputs
            # h = M*_{start}(q): the memory before this segment, read with the segment's queries (eq. 21).
            h = jnp.swapaxes(memory_apply(weights, jnp.swapaxes(rq_s, 1, 2)), 1, 2)
            keys = jnp.concatenate([persistent_k, per_head(h, context_k).astype(dtype), k_s], axis=1)
            values = jnp.concatenate([persistent_v, per_head(h, context_v).astype(dtype), v_s], axis=1)
            y = F.softmax_attention(
                q_s,
                keys,
                values,
                mask=mask,
                dropout_rate=rate,
                dropout_rng=None if rng is None else jax.random.fold_in(rng, index),
                implementation=self.implementation,
            ).astype(self.memory_dtype)
            projected = (per_head(y, update_q), per_head(y, update_k), per_head(y, update_v))
            convolved = tuple(
                convolve(p, kernel, history)
                for p, kernel, history in zip(projected, update_kernels, conv_histories, strict=True)
            )
            conv_histories = tuple(history for _, history in convolved)
            mq, mk, mv = memory_features(*(out for out, _ in convolved))
            m, (weights, state) = neural_memory(
                mq,
                mk,
                mv,
                alpha_s,
                eta_s,
                theta_s,
                initial_weights=weights,
                initial_momentum=state,
                chunk_size=self.chunk_size,
                return_state=True,
            )
            return (weights, state, conv_histories), y * jax.nn.sigmoid(rms_normalize(m, memory_scale))

        xs = (jnp.arange(segments),) + tuple(blocks(a) for a in (q, k, v, retrieve_q, alpha, eta, theta))
        _, out = jax.lax.scan(segment, (initial, momentum, histories), xs)
        out = jnp.moveaxis(out, 0, 1).reshape(batch, segments * size, heads, dim)
        return out[:, :length]
