"""The base of softmax layers whose decode cache is managed by a `CachePolicy` (attn.core.cache).

    decode=True, first call      allocate the cache at the policy's capacity (never the generated length) and
                                 compute the ordinary forward (Flax convention), under `forward_visible`
    decode=True, later calls     candidates = cached entries + this chunk -> visible (the policy) -> positions
                                 (`cache_positions`) -> the softmax pipeline -> statistics -> keep/merge (the
                                 policy) -> the cache at capacity again
    decode=False                 the forward, causal, restricted by `forward_visible` (the attention a policy
                                 amounts to, where it has a mask form)

The cache holds keys before RoPE (so a policy may assign positions inside the cache) with per (batch, kv head)
lengths and original positions. A decode call's attention takes one of two routes:

    split-KV    (implementation="split_kv") when every query sees every filled cache entry, decided at run time
                from the policy's visibility (true for the budget policies H2O, A2SF, TOVA, Scissorhands, EMS, D2O,
                SnapKV and Attention-Gate): the C cached entries by split-KV over their per-(batch, kv head) lengths
                (`kv_cache.cached_attention`: the Pallas decode kernel on a GPU, `split_kv_attention` elsewhere;
                values, and keys without RoPE, read in their stored form, codes dequantised split by split), the L
                chunk entries with the policy's visibility [B, KVH, Tq, L], the two merged by log-sum-exp;
                statistics from the merged lse, p_ij = exp(s_ij - lse_i) per entry (0 where not visible): no
                softmax over a materialised matrix, an elementwise function a kernel can fold into the statistics
                (on XLA here, `entry_weights` forms p [B, H, Tq, C + L] and the policy's `observe` reduces it)
    explicit    the pipeline's stages over every candidate with a dense per-head mask [B, H, Tq, C + L]: when the
                policy hides a filled cache entry from a query (StreamingLLM's window once its oldest recent entry
                leaves the query's window, Recycled Attention between full steps, a checkpoint's sliding window
                over the cache), and always for a position bias (ALiBi, T5, Shaw: read per entry), a chunk of more
                than MAX_DECODE_QUERIES queries (a prefill), captured weights, attention dropout, interventions,
                and implementation None or "xla" (any value outside SPLIT_IMPLEMENTATIONS)

implementation=None keeps the explicit stages, as the dense cache keeps its dense decode on CPU for caches under
SPLIT_MIN_CAPACITY and on a GPU (where the decode kernel is interpret-verified only). A policy's cache is always full
(it holds its budget), where split-KV does not pay on CPU, and a policy with statistics scores every entry twice on
the split route (once inside the splits, once for p): `python -m eval.bench --suite decode_policy`
(benchmarks/results/decode_policy_cpu.json, one token through the whole layer, budgets 256-4096, 2 shared cores)
measured the split route at 0.23-1.54x the explicit route's speed (best of 5), mostly slower (H2O 0.23x / 0.53x /
0.83x at 256 / 1K / 4K entries); StreamingLLM, whose full cache runs the explicit stages inside the switch, read
0.68-3.8x: the spread is this machine's noise. Statistics: when the policy lists any (`cache.STATS`), its `observe`
folds the weights into them before `keep` (default: the attention each entry receives, summed over the queries and
the query heads of its kv head, added to its mass). Layers that replace `policy_attend` (KIVI, ZipCache, A2ATS,
packed Ada-KV) choose their own attention.
Quantized storage: `cache_bits` (8 or 4) stores per-token codes and attention reads their dequantized values.
A causal sliding `window` (left, 0) (an imported Mistral / Qwen2 checkpoint's) is kept: the forward applies it as the
softmax layer does, and a decode call intersects the policy's visibility with it at the entries' original positions
(layers that replace `policy_attend`, KIVI and ZipCache, refuse it, as every layer refuses other windows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core import kv_cache
from attn.core.layer import AttentionCall
from attn.core.lse_merge import merge_partials
from attn.core.masks import Mask
from attn.core.softmax_layer import SoftmaxAttentionLayer
from attn.core.split_kv_decode import split_kv_attention
from attn.core.validation import normalize_window

Array = jax.Array

# implementation values that let a decode call take split-KV (`PolicyAttention.split_decode_reason`); any other
# ("xla", ...) keeps the explicit stages.
SPLIT_IMPLEMENTATIONS = (None, "split_kv")

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
        original positions per kv head [B, KVH, C + L]. Split-KV (`split_decode`) serves the call when
        `split_decode_reason` finds nothing against it and, at run time, the policy hides no filled cache entry from
        any query; otherwise the explicit stages (`explicit_decode`)."""
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
        reason = self.split_decode_reason(q, policy, call)
        if reason is not None:
            y, cands = self.explicit_decode(q, keys, cands, policy, call)
        else:
            filled = cands.valid[:, :, None, : cache.capacity]  # [B, KVH, 1, C]
            hidden = jnp.any(filled & ~visible[..., : cache.capacity])  # a cached entry some query must not see
            y, cands = jax.lax.cond(
                hidden,
                lambda: self.explicit_decode(q, keys, cands, policy, call),
                lambda: self.split_decode(q, keys, cands, cache, visible, policy),
            )
        cache_lib.store(self, policy.step(cands))
        return y

    def split_decode_reason(self, q: Array, policy: cache_lib.CachePolicy, call: AttentionCall) -> str | None:
        """Why this decode call (q [B, L, H, D] after positions, call.bias set) takes the explicit stages whatever
        the policy shows, or None when split-KV may serve it (see the module docstring)."""
        if self.implementation not in SPLIT_IMPLEMENTATIONS:
            return f"implementation={self.implementation!r} keeps the explicit stages"
        if call.bias is not None:
            return f"position={self.position!r} adds a per-entry logits bias, which split-KV does not read"
        if q.shape[1] > kv_cache.MAX_DECODE_QUERIES:
            most = kv_cache.MAX_DECODE_QUERIES
            return f"a chunk of {q.shape[1]} queries is a prefill (split-KV serves at most {most})"
        explicit = self.explicit_reason(call)
        if explicit is not None:
            return explicit or "captured weights, attention dropout or overridden stages need the explicit weights"
        if self.implementation is None:
            return "implementation=None keeps the explicit stages (split-KV on request: implementation='split_kv')"
        return None

    def explicit_decode(
        self, q: Array, keys: Array, cands: cache_lib.Candidates, policy: cache_lib.CachePolicy, call: AttentionCall
    ) -> tuple[Array, cache_lib.Candidates]:
        """The decode attention through the pipeline's stages over every candidate with the dense per-head mask
        call.mask [B, H, Tq, C + L]: (y [B, L, H, Dv], the candidates with the policy's statistics of this call)."""
        if policy.stats or self.window is not None:  # statistics come from the explicit weights
            logits = self.attention_logits(q, keys, call)
            weights = self.attention_weights(logits, call)
            cands = policy.observe(cands, weights)
            y = self.mix(self.attention_dropout(weights, call.deterministic), cands.values).astype(q.dtype)
        else:
            y = super().attend(q, keys, cands.values, call)
        return y, cands

    def split_decode(
        self,
        q: Array,
        keys: Array,
        cands: cache_lib.Candidates,
        cache: cache_lib.KVCache,
        visible: Array,
        policy: cache_lib.CachePolicy,
    ) -> tuple[Array, cache_lib.Candidates]:
        """Split-KV decode attention when every query sees every filled cache entry: the C cached entries by split-KV
        over their per-head lengths (`kv_cache.cached_attention`: the Pallas decode kernel on a GPU, else
        `split_kv_attention`; values read in their stored form split by split), the
        L chunk entries with the policy's visibility visible[..., C:] [B, KVH, Tq, L], the two merged by log-sum-exp.
        Statistics: each entry's weight p = exp(s - lse) [B, H, Tq, C + L] (0 where not visible) from the merged lse
        (`observe`). Returns (y [B, L, H, Dv], the candidates with the policy's statistics)."""
        capacity = cache.capacity
        cached_keys = cache.keys if keys is cands.keys else keys[:, :capacity]  # unrotated: read the stored codes
        cached, cached_lse = kv_cache.cached_attention(
            q, cached_keys, cache.values, cache.filled(), scale=self.scale, softcap=self.softcap
        )
        chunk_mask = Mask(dense=cache_lib.head_mask(visible[..., capacity:], self.num_heads))
        own, own_lse = split_kv_attention(
            q, keys[:, capacity:], cands.values[:, capacity:], mask=chunk_mask, scale=self.scale,
            softcap=self.softcap, num_splits=1, return_lse=True,
        )  # fmt: skip
        parts_lse = jnp.swapaxes(jnp.stack([cached_lse, own_lse]), 2, 3)  # [2, B, Tq, H]
        y, lse = merge_partials(jnp.stack([cached, own]).astype(jnp.float32), parts_lse, axis=0)
        if policy.stats:
            cands = policy.observe(cands, self.entry_weights(q, keys, jnp.swapaxes(lse, 1, 2), visible))
        return y.astype(q.dtype), cands

    def entry_weights(self, q: Array, keys: Array, lse: Array, visible: Array) -> Array:
        """float32 [B, H, Tq, E]: the softmax weight of every entry, p = exp(s - lse) where visible (bool [B, KVH, Tq,
        E]), else 0, from the scores s of q [B, Tq, H, D] and keys [B, E, KVH, D] and the call's lse [B, H, Tq]
        (-inf for a query that sees nothing: all its weights are 0)."""
        scores = self.scores(q, keys)
        seen = cache_lib.head_mask(visible, self.num_heads)
        return jnp.where(seen, jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
