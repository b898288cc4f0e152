"""`arflow`: the hybrid linear attention of ARFlow ([184] "ARFlow: Autoregressive Flow with Hybrid Linear
Attention", Hui, Zhu, Yang et al. 2025): softmax attention inside a chunk, a gated linear-attention state across
chunks. In ARFlow a chunk is one image (its latent patches) of a sequence of images ordered from noisier to cleaner,
so every image attends fully to itself and, through the state, causally to the images before it.

Per head h (the authors' code, github.com/TheFllood/ARFlow, linearattention/gated_retnet_train.py and
linearattention/kernel/gate_recurrent_train.py), with chunks of C tokens, n(t) the chunk of token t:

    q, k, v = rms(x W_q), rms(x W_k), rms(x W_v)          (qkv_norm: RMS over all heads of the token, no scale)
    k <- k / sqrt(D)
    g_t = logsigmoid(x_t W_f) / gate_normalizer             [B, T, H]  log forget gate of each head
    c_t = sum_{s in n(t), s <= t} g_s                        the log gate accumulated inside the chunk
    S_0 = 0,   S_{n+1} = exp(mean_{s in chunk n} g_s) S_n + K_n^T V_n           state [B, H, D, Dv]
    o_t = sum_{s in n(t), s visible} softmax_s(q_t . k_s) v_s  +  exp(c_t) q_t S_{n(t)}
    y_t = concat_h(rms(o_t) ⊙ silu(x_t W_g)) W_o             (output_norm per head, no scale; gated_output)

"visible" is the whole chunk without a mask (chunk-causal: the paper's setting) and s <= t with a causal mask, which
makes the layer token-causal: it then decodes token by token, keeping in "cache" the state S of the chunks before
the current one, the keys/values of the current chunk [B, C, H, D] and its accumulated gate (O(C D + D^2) per head,
whatever the length). The two terms are added, not normalised together: the code's `inner + cross`. In ARFlow the
gate also sees the image's conditioning embedding (W_f applied to x + c); this layer has no conditioning input, so
W_f sees x (the authors' inference code does the same when c is None).

inter_chunk="softmax" replaces the linear state by exact softmax attention over the earlier chunks, taken jointly
with the intra-chunk keys: o_t = sum_{s visible} softmax_s(q_t . k_s) v_s over every key of an earlier chunk and the
visible keys of t's own chunk, i.e. block-causal softmax attention (the hybrid's full-attention counterpart,
O(T^2)). With inter_chunk="softmax", qkv_norm=False, output_norm=False, gated_output=False the layer is exactly
`softmax` attention under a block-causal mask (scale 1/sqrt(D)); with a causal mask, exactly causal softmax.

Shapes: x [B, T, E] -> [B, T, E]; heads H, kv heads KVH (GQA: k, v are repeated to H heads, since the gate is per
query head), head_dim D. T need not be a multiple of C (the last chunk is shorter). Time O(B H T (C D + D^2)),
memory O(B H T (C + D) + B H (T / C) D^2) for the linear form. Masks: causal, q_lengths (padded query rows give 0),
kv_lengths (padded keys are left out of both paths). Attention dropout acts on the intra-chunk softmax weights.

As a causal LM layer (chunks of text instead of images):
    python -m train --config configs/lm_tiny.py --workdir runs/lm_arflow --config.model.attention=arflow \
        --config.model.attention_options='{"chunk_size": 16}'
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core import pipeline
from attn.core.layer import AttentionCall, HeadProjection
from attn.core.padding import length_mask
from attn.core.validation import choice, positive, positive_int
from attn.linear.linear import LinearAttentionBase
from attn.registry import register

Array = jax.Array

INTER_CHUNK = ("linear", "softmax")
# The decode state's variables and their logical axes.
CACHE_NAMES = (
    ("state", ("batch", "heads", "head_dim", None)),
    ("chunk_key", ("batch", None, "heads", "head_dim")),
    ("chunk_value", ("batch", None, "heads", "head_dim")),
    ("chunk_gate", ("batch", "heads")),
)


def _rms(x: Array, axes: tuple[int, ...], eps: float) -> Array:
    """x / sqrt(mean(x^2 over axes) + eps), no learned scale (the code's RMSNorm(elementwise_affine=False))."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + eps)


def chunk_ids(length: int, chunk_size: int) -> Array:
    """int32 [length]: the chunk of each position."""
    return jnp.arange(length, dtype=jnp.int32) // chunk_size


def gate_cumsum_in_chunks(g: Array, chunk_size: int) -> Array:
    """g [B, T, H] -> c [B, T, H] with c_t = sum of g_s over s <= t in t's chunk."""
    batch, length, heads = g.shape
    chunks = -(-length // chunk_size)
    padded = jnp.pad(g, ((0, 0), (0, chunks * chunk_size - length), (0, 0)))
    c = jnp.cumsum(padded.reshape(batch, chunks, chunk_size, heads), axis=2)
    return c.reshape(batch, chunks * chunk_size, heads)[:, :length]


def chunk_states(k: Array, v: Array, g: Array, chunk_size: int) -> Array:
    """The state each chunk reads: S [B, N, H, D, Dv] with S_0 = 0, S_{n+1} = exp(mean_n g) S_n + K_n^T V_n.

    k [B, T, H, D], v [B, T, H, Dv], g [B, T, H] (log gates); N = ceil(T / C). A last chunk shorter than C is padded
    with zero keys (its own state is never read)."""
    batch, length, heads, dk = k.shape
    chunks = -(-length // chunk_size)
    pad = ((0, 0), (0, chunks * chunk_size - length), (0, 0), (0, 0))
    kc = jnp.pad(k, pad).reshape(batch, chunks, chunk_size, heads, dk)
    vc = jnp.pad(v, pad).reshape(batch, chunks, chunk_size, heads, v.shape[-1])
    gc = jnp.pad(g, pad[:3]).reshape(batch, chunks, chunk_size, heads)
    kv = jnp.einsum("bnchd,bnche->nbhde", kc, vc)
    decay = jnp.exp(jnp.mean(gc, axis=2)).transpose(1, 0, 2)  # [N, B, H]

    def step(state, inputs):
        kv_n, decay_n = inputs
        return decay_n[..., None, None] * state + kv_n, state

    _, states = jax.lax.scan(step, jnp.zeros(kv.shape[1:], kv.dtype), (kv, decay))
    return states.transpose(1, 0, 2, 3, 4)


@register(
    "arflow",
    family="linear",
    paper="ARFlow: Autoregressive Flow with Hybrid Linear Attention",
    catalog=184,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="softmax attention inside each chunk (image) + gated linear-attention state across chunks; chunk-causal "
    "without a mask, token-causal (decodes) with one",
    option_docs={
        "chunk_size": "tokens per chunk (in ARFlow one image: (image_size / patch_size)^2 latent patches)",
        "eps": "epsilon of the RMS norms",
        "inter_chunk": "'linear' (the paper: gated linear state) or 'softmax' (exact attention over earlier chunks "
        "joint with the chunk's own keys: block-causal softmax, O(T^2))",
        "gate_normalizer": "the forget gate is logsigmoid(x W_f) / gate_normalizer (the code's gate_logit_normalizer)",
        "qkv_norm": "RMS-normalise q, k, v over all heads of a token (no learned scale), as the code",
        "output_norm": "RMS-normalise each head's output (no learned scale), as the code's subln",
        "gated_output": "multiply the per-head outputs by silu(x W_g) (the code's swiglu(g, o))",
    },
    fidelity="official-code",
    reference="github.com/TheFllood/ARFlow: linearattention/gated_retnet_train.py (GateRetention) and "
    "kernel/gate_recurrent_train.py (chunk_gate_retention: inner softmax + cross_chunk gated state); paper arXiv "
    "2501.16085 (abstract, Sec. on hybrid linear attention: full attention within an image, linear across images)",
    validators={
        "chunk_size": positive_int,
        "eps": positive,
        "inter_chunk": choice(*INTER_CHUNK),
        "gate_normalizer": positive,
    },
)
class ARFlowAttention(LinearAttentionBase):
    """ARFlow hybrid attention. x [B, T, E] -> [B, T, E] (see the module docstring)."""

    chunk_size: int = 256
    eps: float = 1e-6
    inter_chunk: str = "linear"
    gate_normalizer: float = 16.0
    qkv_norm: bool = True
    output_norm: bool = True
    gated_output: bool = True

    mechanism_name = "arflow"

    # ------------------------------------------------------------------ template stages
    def check_input(self, x: Array, context: Array | None) -> None:
        super().check_input(x, None)
        if context is not None:
            raise ValueError(
                f"arflow is self-attention over chunks of x; context must be None, got shape {context.shape}"
            )

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.decode and self.inter_chunk != "linear":
            raise ValueError(
                f"decode=True needs inter_chunk='linear' (the recurrent state); inter_chunk={self.inter_chunk!r} "
                "attends to every earlier key"
            )

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        q, k, v = super().project_qkv(x, context)
        if self.qkv_norm:
            q, k, v = (_rms(t, (-2, -1), self.eps) for t in (q, k, v))
        return q, k, v

    def output_gate(self, x: Array) -> Array | None:
        if not self.gated_output:
            return None
        return nn.silu(self.dense_heads(x, self.num_heads, "heads", "gate"))

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, Dv]."""
        causal, q_lengths, kv_lengths = self.mask_parts(call)
        batch, length, heads, dk = q.shape
        dtype = jnp.promote_types(q.dtype, jnp.float32)
        groups = heads // k.shape[2]
        q = q.astype(dtype)
        k = jnp.repeat(k, groups, axis=2).astype(dtype) * dk**-0.5
        v = jnp.repeat(v, groups, axis=2).astype(dtype)
        g = self.log_gates(call.x).astype(dtype)
        if kv_lengths is not None:  # padded keys enter neither path
            valid = length_mask(kv_lengths, batch, length, "kv_lengths").astype(dtype)[:, :, None, None]
            k, v = k * valid, v * valid
        rng = self.dropout_rng(call.deterministic)
        rate = self.effective_dropout(call.deterministic)
        if call.decode and self.has_variable("cache", "state"):
            y = self.decode_steps(q, k, v, g, call.q_offset, rate, rng)
        else:
            if call.decode:
                self.create_cache(batch, heads, dk, v.shape[-1], dtype)
            y = self.parallel(q, k, v, g, causal, kv_lengths, rate, rng)
        if q_lengths is not None:
            y = y * length_mask(q_lengths, batch, length, "q_lengths").astype(dtype)[:, :, None, None]
        if self.output_norm:
            y = _rms(y, (-1,), self.eps)
        return y.astype(self.dtype)

    # ------------------------------------------------------------------ pieces
    def log_gates(self, x: Array) -> Array:
        """x [B, T, E] -> g [B, T, H] = logsigmoid(x W_f) / gate_normalizer."""
        logits = HeadProjection(
            heads=self.num_heads, head_dim=1, dtype=self.dtype, param_dtype=self.param_dtype, name="forget_gate"
        )(x)[..., 0]
        return jax.nn.log_sigmoid(logits.astype(jnp.promote_types(logits.dtype, jnp.float32))) / self.gate_normalizer

    def parallel(
        self,
        q: Array,
        k: Array,
        v: Array,
        g: Array,
        causal: bool,
        kv_lengths: Array | None,
        rate: float,
        rng: Array | None,
    ) -> Array:
        """The whole sequence at once: [B, T, H, D] -> [B, T, H, Dv]."""
        batch, length = q.shape[:2]
        keep = length_mask(kv_lengths, batch, length, "kv_lengths") > 0 if kv_lengths is not None else None
        if self.inter_chunk == "softmax":
            return self.block_causal_softmax(q, k, v, causal, keep, rate, rng)
        size = self.chunk_size
        chunks = -(-length // size)
        pad = ((0, 0), (0, chunks * size - length), (0, 0), (0, 0))
        qc, kc, vc = (jnp.pad(t, pad).reshape(batch, chunks, size, *t.shape[2:]) for t in (q, k, v))
        valid = jnp.arange(chunks * size) < length
        valid = valid[None] if keep is None else valid[None] & jnp.pad(keep, ((0, 0), (0, chunks * size - length)))
        allowed = valid.reshape(batch if keep is not None else 1, chunks, 1, 1, size)
        if causal:
            allowed = allowed & jnp.tril(jnp.ones((size, size), bool))
        logits = jnp.einsum("bnthd,bnshd->bnhts", qc, kc)
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1) * allowed  # a row with no allowed key (padding) gives 0
        weights = pipeline.dropout_weights(weights, rate, rng)
        y = jnp.einsum("bnhts,bnshe->bnthe", weights, vc).reshape(batch, chunks * size, *v.shape[2:])[:, :length]
        states = chunk_states(k, v, g, size)  # [B, N, H, D, Dv]
        c = gate_cumsum_in_chunks(g, size)
        cross = jnp.einsum("bthd,bthde->bthe", q * jnp.exp(c)[..., None], states[:, chunk_ids(length, size)])
        return y + cross

    def block_causal_softmax(
        self, q: Array, k: Array, v: Array, causal: bool, keep: Array | None, rate: float, rng: Array | None
    ) -> Array:
        """inter_chunk="softmax": one softmax over the keys of earlier chunks and the visible keys of the query's
        chunk (O(T^2)). [B, T, H, D] -> [B, T, H, Dv]."""
        length = q.shape[1]
        ids = chunk_ids(length, self.chunk_size)
        allowed = ids[:, None] >= ids[None, :]
        if causal:
            allowed = allowed & jnp.tril(jnp.ones((length, length), bool))
        allowed = allowed[None, None] if keep is None else allowed[None, None] & keep[:, None, None, :]
        logits = jnp.einsum("bthd,bshd->bhts", q, k)
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1) * allowed
        weights = pipeline.dropout_weights(weights, rate, rng)
        return jnp.einsum("bhts,bshe->bthe", weights, v)

    def create_cache(self, batch: int, heads: int, dk: int, dv: int, dtype: jnp.dtype) -> None:
        """The empty decode state (zeros): state [B, H, D, Dv], the chunk's keys/values [B, C, H, D|Dv], its
        accumulated gate [B, H]."""
        state = {
            "state": jnp.zeros((batch, heads, dk, dv), dtype),
            "chunk_key": jnp.zeros((batch, self.chunk_size, heads, dk), dtype),
            "chunk_value": jnp.zeros((batch, self.chunk_size, heads, dv), dtype),
            "chunk_gate": jnp.zeros((batch, heads), dtype),
        }
        index = self.get_variable("cache", cache_lib.RECURRENT_INDEX)
        cache_lib.store_state(self, cache_lib.RecurrentState(state, index, CACHE_NAMES))

    def decode_steps(
        self, q: Array, k: Array, v: Array, g: Array, offset: Array, rate: float, rng: Array | None
    ) -> Array:
        """Token by token from the cached state (causal): [B, L, H, D] -> [B, L, H, Dv]; updates the cache.

        At the first token of a chunk the finished chunk is folded into the state, S <- exp(c_C / C) S + K^T V
        (c_C / C is the mean log gate of the finished chunk), and the chunk buffers restart."""
        recurrent = cache_lib.load_state(self, tuple(name for name, _ in CACHE_NAMES))
        size = self.chunk_size
        length = q.shape[1]
        rngs = jax.random.split(rng, length) if rng is not None else None

        def step(carry, inputs):
            state, keys, values, gate = carry
            i, q_t, k_t, v_t, g_t = inputs[:5]
            slot = (offset + i) % size
            start = slot == 0
            folded = jnp.exp(gate / size)[..., None, None] * state + jnp.einsum("bchd,bche->bhde", keys, values)
            state = jnp.where(start, folded, state)
            keys = jnp.where(start, 0.0, keys).at[:, slot].set(k_t)
            values = jnp.where(start, 0.0, values).at[:, slot].set(v_t)
            gate = jnp.where(start, 0.0, gate) + g_t
            seen = jnp.arange(size) <= slot
            logits = jnp.einsum("bhd,bchd->bhc", q_t, keys)
            logits = jnp.where(seen, logits, jnp.finfo(logits.dtype).min)
            weights = jax.nn.softmax(logits, axis=-1) * seen
            weights = pipeline.dropout_weights(weights, rate, inputs[5] if rngs is not None else None)
            y = jnp.einsum("bhc,bche->bhe", weights, values)
            y = y + jnp.einsum("bhd,bhde->bhe", q_t * jnp.exp(gate)[..., None], state)
            return (state, keys, values, gate), y

        steps = (jnp.arange(length), *(t.swapaxes(0, 1) for t in (q, k, v, g)))
        if rngs is not None:
            steps = (*steps, rngs)
        carry = tuple(recurrent.state[name] for name in ("state", "chunk_key", "chunk_value", "chunk_gate"))
        (state, keys, values, gate), y = jax.lax.scan(step, carry, steps)
        cache_lib.store_state(
            self,
            recurrent.replace(
                state={"state": state, "chunk_key": keys, "chunk_value": values, "chunk_gate": gate}, names=CACHE_NAMES
            ),
        )
        return y.swapaxes(0, 1)
