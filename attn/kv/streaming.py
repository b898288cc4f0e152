"""StreamingLLM [160] (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"): the cache
keeps the first `sinks` tokens (attention sinks) and the most recent `budget - sinks` tokens; memory stays at
`budget` entries whatever the generated length.

    cache after token t       sinks {0..S-1}  and  window {t-R+1..t}              S = sinks, R = budget - S
    query t attends           the same entries (itself included): at most `budget` keys
    positions (shift)         inside the cache: sinks at 0..S-1, the window right after them, the query last
                              (in-cache position min(t, budget - 1)); off: the original positions

This is the official code's generation loop (mit-han-lab/streaming-llm: `StartRecentKVCache.evict_for_space` makes
room for the incoming token, so a query sees sinks + the last R - 1 cached tokens + itself) with its position
shift (`pos_shift/modify_llama.py`: keys are cached before RoPE and rotated at their index in the cache, the query
at the cache length). Relative positions make the shift exact without re-rotating at large angles per query: a
window key keeps its distance t - j to query t, a sink key j sits at distance min(t, budget - 1) - j. With RoPE,
one call computes both through a doubled head dimension, q' = [R(min(t, B-1)) q, R(t - base) q] and
k' = [sink * R(j) k, (1 - sink) * R(j - base) k] (base shifts every angle into the cache's range), so
q'.k' is the sink logit for sink keys and the window logit for the others; bias positions (ALiBi, T5, Shaw) take
the same two query positions and pick per key.

A chunk of several tokens gives every query the view it would have if it were decoded alone, so the result does not
depend on how the sequence is split into decode calls (the official code instead lets a prompt attend to all of
itself). With shift_positions=False, decoding equals the forward of this layer (decode=False): causal attention
under the sink-plus-window mask at original positions.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS
from attn.core.validation import choice, non_negative_int, optional, positive_int
from attn.kv.policy_layer import POLICY_OPTION_DOCS, PolicyAttention
from attn.registry import register

Array = jax.Array


def sink_window_visible(q_pos: Array, kv_pos: Array, sinks: int, recent: int) -> Array:
    """bool [..., Tq, Tk]: key at kv_pos [..., 1, Tk] is visible to the query at q_pos [..., Tq, 1] when it is not
    in the future and is a sink (kv_pos < sinks) or one of the `recent` latest tokens (q_pos - kv_pos < recent)."""
    return (kv_pos <= q_pos) & ((kv_pos < sinks) | (q_pos - kv_pos < recent))


@dataclasses.dataclass(frozen=True)
class StreamingPolicy(cache_lib.CachePolicy):
    """Keep `sinks` first tokens and the latest `budget - sinks` tokens (the same in every head)."""

    sinks: int
    budget: int

    def __post_init__(self):
        if not 0 <= self.sinks < self.budget:
            raise ValueError(f"sinks={self.sinks} must be in [0, budget={self.budget}) (at least one recent slot)")

    @property
    def capacity(self) -> int:
        return self.budget

    @property
    def recent(self) -> int:
        return self.budget - self.sinks

    def visible(self, cands: cache_lib.Candidates, q_positions: Array) -> Array:
        pos = cands.positions[:, :, None, :]  # [B, KVH, 1, E]
        t = q_positions[:, None, :, None]  # [B, 1, Tq, 1]
        return cands.valid[:, :, None, :] & sink_window_visible(t, pos, self.sinks, self.recent)

    def keep(self, cands: cache_lib.Candidates) -> tuple[Array, Array]:
        last = cands.index - 1
        keep = cands.valid & sink_window_visible(last, cands.positions, self.sinks, self.recent)
        return cache_lib.ordered_keep(keep, self.capacity)


@register(
    "streaming",
    family="kv",
    paper="Efficient Streaming Language Models with Attention Sinks (StreamingLLM)",
    catalog=160,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="KV cache of sinks + recent window at a fixed budget, positions re-assigned inside the cache",
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        **POLICY_OPTION_DOCS,
        "window": "must be None (the recent window is budget - sinks)",
        "sinks": "number of initial tokens kept as attention sinks",
        "budget": "cache entries per (batch, kv head): sinks + recent window",
        "shift_positions": "positions inside the cache (StreamingLLM) instead of the original positions",
    },
    validators={
        **SOFTMAX_VALIDATORS,
        "sinks": non_negative_int,
        "budget": positive_int,
        "shift_positions": choice(True, False),
        "cache_bits": optional(choice(4, 8)),
    },
    fidelity="official-code",
    reference=(
        "arXiv 2309.17453 Sec. 3.2; github.com/mit-han-lab/streaming-llm streaming_llm/kv_cache.py "
        "(StartRecentKVCache.evict_for_space) and streaming_llm/pos_shift/modify_llama.py"
    ),
    has_attention_weights=True,
)
class StreamingAttention(PolicyAttention):
    """StreamingLLM: softmax attention whose decode cache holds `sinks` + `budget - sinks` recent entries.
    x [B, T, E] -> [B, T, E]."""

    sinks: int = 4
    budget: int = 256
    shift_positions: bool = True

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        self.cache_policy()  # sinks < budget

    def cache_policy(self) -> StreamingPolicy:
        return StreamingPolicy(sinks=self.sinks, budget=self.budget)

    def forward_visible(self, q_pos: Array, kv_pos: Array) -> Array:
        """bool [B, 1, Tq, Tk]: the sink-plus-window mask at original positions."""
        kv_pos = jnp.broadcast_to(kv_pos, (q_pos.shape[0], kv_pos.shape[-1]))
        visible = sink_window_visible(q_pos[:, :, None], kv_pos[:, None, :], self.sinks, self.budget - self.sinks)
        return visible[:, None]

    def cache_positions(self, q: Array, cands: cache_lib.Candidates, q_pos: Array) -> tuple[Array, Array, Array | None]:
        """Positions inside the cache (see the module docstring); original positions with shift_positions=False."""
        if not self.shift_positions or self.position == "none":
            return super().cache_positions(q, cands, q_pos)
        length = q.shape[1]
        # every angle relative to `base` (the window's offset for the chunk's first query), as in the cache
        base = jnp.maximum(cands.index - length - (self.budget - 1), 0)
        sink = cands.positions < self.sinks  # [B, KVH, E]
        key_pos = jnp.where(sink, cands.positions, cands.positions - base)
        sink_q_pos = jnp.minimum(q_pos, self.budget - 1)  # the query's position in its cache view
        both_q_pos = jnp.concatenate([sink_q_pos, q_pos - base], axis=1)  # [B, 2L]
        if self.position == "rope":
            both_q, keys = self.rotate(jnp.concatenate([q, q], axis=1), cands.keys, both_q_pos, key_pos)
            q_sink, q_window = both_q[:, :length], both_q[:, length:]
            on_sink = jnp.swapaxes(sink, 1, 2)[..., None].astype(keys.dtype)  # [B, E, KVH, 1]
            # the pipeline's default scale is 1/sqrt(head dim): keep 1/sqrt(D) for the doubled dimension
            factor = math.sqrt(2.0) if self.scale is None else 1.0
            q2 = jnp.concatenate([q_sink, q_window], axis=-1) * jnp.asarray(factor, q.dtype)
            k2 = jnp.concatenate([keys * on_sink, keys * (1 - on_sink)], axis=-1)
            return q2, k2, None
        both = self.position_bias(jnp.concatenate([q, q], axis=1), both_q_pos, key_pos[:, 0], Mask(causal=True))
        on_sink = cache_lib.head_mask(sink[:, :, None, :], self.num_heads)  # [B, H, 1, E]
        return q, cands.keys, jnp.where(on_sink, both[:, :, :length], both[:, :, length:])
