"""The base of softmax layers whose decode cache is managed by a `CachePolicy` (attn.core.cache).

    decode=True, first call      allocate the cache at the policy's capacity (never the generated length) and
                                 compute the ordinary forward (Flax convention), under `forward_visible`
    decode=True, later calls     candidates = cached entries + this chunk -> visible (the policy) -> positions
                                 (`cache_positions`) -> the softmax pipeline -> statistics -> keep/merge (the
                                 policy) -> the cache at capacity again
    decode=False                 the forward, causal, restricted by `forward_visible` (the attention a policy
                                 amounts to, where it has a mask form)

The cache holds keys before RoPE (so a policy may assign positions inside the cache) with per (batch, kv head)
lengths and original positions; queries see the entries the policy makes visible through a dense per-head mask
[B, H, Tq, C + L] (Tq is small while decoding). Statistics: when the policy lists any (`cache.STATS`), the decode
call runs the explicit stages and the policy's `observe` folds the weights into the statistics before `keep`
(default: the attention each entry receives, summed over the queries and the query heads of its kv head, added to
its mass).
Quantized storage: `cache_bits` (8 or 4) stores per-token codes and attention reads their dequantized values.
A causal sliding `window` (left, 0) (an imported Mistral / Qwen2 checkpoint's) is kept: the forward applies it as the
softmax layer does, and a decode call intersects the policy's visibility with it at the entries' original positions
(layers that replace `policy_attend`, KIVI and ZipCache, refuse it, as every layer refuses other windows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.softmax_layer import SoftmaxAttentionLayer
from attn.core.validation import normalize_window

Array = jax.Array

POLICY_OPTION_DOCS = {
    "cache_bits": "quantized cache storage: None (the layer's dtype), 8 or 4 bits per value (per-token codes)",
}


class PolicyAttention(SoftmaxAttentionLayer):
    """Softmax attention whose decode cache a policy manages. x [B, T, E] -> [B, T, E]. Subclasses implement
    `cache_policy()` and may override `forward_visible` and `cache_positions`."""

    cache_bits: int | None = None

    # ------------------------------------------------------------------ what a policy layer supplies
    def cache_policy(self) -> cache_lib.CachePolicy:
        raise NotImplementedError(f"{type(self).__name__} must implement cache_policy()")

    def decode_policy(self, call: AttentionCall) -> cache_lib.CachePolicy:
        """The policy of a decode call on an existing cache: `cache_policy()` unless the policy depends on the call
        (a learned gate's flags for the chunk call.x [B, L, E])."""
        return self.cache_policy()

    def forward_visible(self, q_pos: Array, kv_pos: Array) -> Array | None:
        """bool [B, 1, Tq, Tk] restricting the forward (decode=False and the creating call), or None (causal)."""
        return None

    def cache_positions(self, q: Array, cands: cache_lib.Candidates, q_pos: Array) -> tuple[Array, Array, Array | None]:
        """Positions while decoding: (q, keys [B, E, KVH, D'], bias or None) for attention over the candidates.
        Default: original positions (RoPE on q at q_pos and on each entry at its original position; a bias reads
        each kv head's own positions, `per_head_bias`)."""
        if self.position == "rope":
            q, keys = self.rotate(q, cands.keys, q_pos, cands.positions)
            return q, keys, None
        return q, cands.keys, self.per_head_bias(q, q_pos, cands.positions)

    def per_head_bias(self, q: Array, q_pos: Array, kv_pos: Array) -> Array | None:
        """The position bias [B, H, Tq, E] when every kv head keeps its own entries: kv_pos int [B, KVH, E]. Query
        head h reads the bias at the positions of its kv head h // (H / KVH) (the bias is computed once per kv head,
        batched along the batch axis, so a learned bias module is called once)."""
        batch, kv_heads, entries = kv_pos.shape
        heads, length = self.num_heads, q.shape[1]
        bias = self.position_bias(
            jnp.repeat(q, kv_heads, axis=0),
            jnp.repeat(q_pos, kv_heads, axis=0),
            kv_pos.reshape(batch * kv_heads, entries),
            Mask(causal=True),
        )
        if bias is None:
            return None
        bias = jnp.broadcast_to(bias, (batch * kv_heads, heads, length, entries))
        bias = bias.reshape(batch, kv_heads, heads, length, entries)
        head = jnp.arange(heads)
        return bias[:, head // (heads // kv_heads), head]

    def keeps_causal_window(self) -> bool:
        """Whether a policy keeps this layer's `window`: a pair (left, 0) on a layer that uses the base decode step."""
        window = self.window
        causal = isinstance(window, (tuple, list)) and normalize_window(window)[1] == 0
        return causal and type(self).policy_attend is PolicyAttention.policy_attend

    def full_mask(self, call: AttentionCall) -> Mask | None:
        """A decode call on the cache: the policy's per-head visibility (the window already applied to the entries'
        original positions); the forward: the call's mask with the layer's window."""
        return call.mask if call.decode else super().full_mask(call)

    # ------------------------------------------------------------------ the template's stages
    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        name = self.registry_name or type(self).__name__
        if call.cross:
            raise ValueError(f"context is not supported by {name} (a cache policy for causal self-attention)")
        if self.window is not None and not self.keeps_causal_window():
            raise ValueError(
                f"window={self.window!r} must be None for {name}: the cache policy decides what is seen (a causal "
                "window (left, 0), as imported checkpoints set, is kept by policies that use the base decode step)"
            )
        if call.decode and call.positions is not None:
            raise ValueError(
                f"positions with decode=True are not supported by {name}: positions come from the cache index"
            )
        if call.decode and call.mask is not None:
            fields = ("q_lengths", "kv_lengths", "prefix_lengths", "block_mask", "dense", "mask_fn", "window")
            given = [f for f in fields if getattr(call.mask, f) is not None]
            if given:
                raise ValueError(
                    f"mask with {given} is not supported by {name} with decode=True (the cache policy decides which "
                    "keys are visible); pass mask=None or attn.Mask(causal=True)"
                )

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The forward (and the creating decode call): causal positions and masks of the softmax layer, restricted
        by `forward_visible`. Later decode calls: query positions from the cache index; `attend` does the rest."""
        batch, length = q.shape[0], q.shape[1]
        cache = cache_lib.load(self) if call.decode else None
        if cache is not None:
            q_pos = self.query_positions(None, batch, length, cache.index)
            return q, k, v, call.replace(q_positions=q_pos, q_offset=cache.index)
        if call.decode:
            policy = self.cache_policy()
            empty = cache_lib.empty_kv(k, v, policy.capacity, ragged=True, stats=policy.stats, bits=self.cache_bits)
            cache_lib.store(self, empty)
        mask = (call.mask if call.mask is not None else Mask()).replace(causal=True)
        q, k, v, call = super().prepare(q, k, v, call.replace(decode=False, mask=mask))
        visible = self.forward_visible(call.q_positions, call.kv_positions)
        if visible is not None:
            mask = mask.replace(dense=visible if mask.dense is None else mask.dense & visible)
        return q, k, v, call.replace(mask=mask)

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """The softmax pipeline; a decode call on an existing cache goes through the policy (`policy_attend`). (The
        creating call leaves `prepare` with decode=False: it is an ordinary forward.)"""
        if call.decode:
            return self.policy_attend(q, k, v, call)
        return super().attend(q, k, v, call)

    def policy_attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """A decode call on an existing cache: q [B, L, H, D] and this chunk's k, v [B, L, KVH, D] (before RoPE)
        -> [B, L, H, Dv]; writes the policy's next cache. The stages see call.kv_positions = the candidates'
        original positions per kv head [B, KVH, C + L]. (The flash kernel serves no decode call: dense per-head
        masks and query offsets are outside it, so statistics come from the explicit weights stage.)"""
        policy = self.decode_policy(call)
        cache = cache_lib.load(self)
        cands = cache_lib.candidates(cache, k, v, self.cache_bits)
        visible = policy.visible(cands, call.q_positions)
        if self.window is not None:  # a checkpoint's sliding window, at original positions (left side: causal)
            left = normalize_window(self.window)[0]
            visible &= call.q_positions[:, None, :, None] - cands.positions[:, :, None, :] <= left
        q, keys, bias = self.cache_positions(q, cands, call.q_positions)
        mask = Mask(dense=cache_lib.head_mask(visible, self.num_heads))
        call = call.replace(mask=mask, bias=bias, kv_positions=cands.positions)
        if policy.stats or self.window is not None:  # statistics come from the explicit weights
            logits = self.attention_logits(q, keys, call)
            weights = self.attention_weights(logits, call)
            cands = policy.observe(cands, weights)
            y = self.mix(self.attention_dropout(weights, call.deterministic), cands.values).astype(q.dtype)
        else:
            y = super().attend(q, keys, cands.values, call)
        cache_lib.store(self, policy.step(cands))
        return y
