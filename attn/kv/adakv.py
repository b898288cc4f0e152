"""Ada-KV (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference", arXiv 2407.11550) on SnapKV's scores (attn/kv/snapkv.py): the layer's budget of n b prompt keys (n kv
heads, b = budget - w) is shared among its heads by a top-k over every head's scores jointly, so a head whose
attention is concentrated gives slots to one whose attention is spread.

    s_{g, j}   SnapKV's pooled votes of the last w queries for key j in kv head g                  (j < P - w)
    m_g        = |{ j : s_{g, j} among the n b largest of all s }|                          (sum_g m_g = n b)
    b_g        = round(m_g (1 - alpha) + floor(alpha b))                 (the official code's floor_alpha safeguard)
    kept_g     = top_{b_g}(s_g) + the last w prompt tokens            if P >= budget (else every prompt token)

This is the official code's Ada-SnapKV (`AdaptiveSnapKVCluster.update_kv`; GQA as its gqa_support with
gqa_func="mean", scores averaged over the query heads of a kv head before pooling), without its optional
`normalize` reweighting, layer `skip` and pyramid mode. Ties of the joint top-k go to the lower head, then the
earlier key; rounding is half to even as torch.round.

Memory (layout="packed", the default): the kept entries of all kv heads of a layer lie back to back in one flat
buffer (`attn.core.cache.PackedKV`), head g in a segment of

    cap_g = kept_g + decode_budget + share_g      kept_g = b_g + w (compressed) or P (every prompt token)
    N     = n (budget + decode_budget) + n // 2   flat slots per batch row (sum_g cap_g = N)

where share_g splits the slots left over (N - sum_g (kept_g + decode_budget)) evenly, the remainder to the first
heads. sum_g b_g <= n b + n // 2 (each b_g rounds m_g (1 - alpha) + floor(alpha b) up by at most 1/2, and
sum_g m_g = n b), so N holds every selection: the cache is n (budget + decode_budget) slots plus at most n // 2,
whatever the split between heads. A prompt within the budget gives every head budget + decode_budget slots (the
first n // 2 heads one more), as SnapKV. Decoding appends to each head's own segment and, once it is full, keeps its
first cap_g - w - decode_budget entries and slides the latest w + decode_budget tokens through the rest (SnapKV's
rule, per head). Attention reads the segments split by split (`packed_split_kv_attention`) and the incoming chunk,
merged by log-sum-exp; the prefill (the first decode call, on an empty cache) is SnapKV's protocol step on the prompt
alone, its selection packed into the segments (the decode calls after it capture no attention weights: no explicit
weights are formed, and Ada-KV's only statistics are the prefill's votes). A layer with a checkpoint's causal
sliding window (an imported Mistral / Qwen2 layer) keeps the padded store whatever `layout` says (`packed`). The
official code also stores the heads back to back (varlen flash attention over per-head lengths); its decode
appends without eviction.

layout="padded" keeps the earlier store: one [B, C, KVH, D] array with per-head lengths, C the largest head the rule
allows (C = round(n b (1 - alpha)) + floor(alpha b) + w + decode_budget), every head sliding at C.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall
from attn.core.lse_merge import merge_partials
from attn.core.masks import Mask
from attn.core.split_kv_decode import packed_split_kv_attention, split_kv_attention
from attn.core.validation import choice, in_range, normalize_window
from attn.kv.snapkv import SNAPKV_OPTION_DOCS, SNAPKV_VALIDATORS, SnapKVAttention, SnapKVPolicy, descending_rank
from attn.registry import register

Array = jax.Array

LAYOUTS = ("packed", "padded")


@dataclasses.dataclass(frozen=True)
class AdaKVPolicy(SnapKVPolicy):
    """SnapKV's selection with head-wise budgets from a joint top-k (see the module docstring)."""

    kv_heads: int = 1
    floor_alpha: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.floor_alpha <= 1.0:
            raise ValueError(f"floor_alpha={self.floor_alpha} must lie in [0, 1]")

    @property
    def floor_capacity(self) -> int:
        return int((self.budget - self.window) * self.floor_alpha)

    def compresses(self, prompt_length: Array) -> Array:
        return prompt_length >= self.budget  # the official code compresses once b <= P - w

    def prefix_budget(self, prompt_length: Array, scores: Array, prefix: Array) -> Array:
        """int32 [B, KVH]: b_g from the joint top-k of scores [B, KVH, E] (-inf outside the prefix)."""
        batch, kv_heads, entries = scores.shape
        layer_budget = kv_heads * (self.budget - self.window)
        joint = descending_rank(scores.reshape(batch, kv_heads * entries)) < layer_budget
        selected = jnp.sum(joint.reshape(batch, kv_heads, entries), axis=-1, dtype=jnp.int32)
        mixed = selected.astype(jnp.float32) * (1.0 - self.floor_alpha) + self.floor_capacity
        return jnp.round(mixed).astype(jnp.int32)

    @property
    def prefix_capacity(self) -> int:
        layer_budget = self.kv_heads * (self.budget - self.window)
        return int(round(layer_budget * (1.0 - self.floor_alpha) + self.floor_capacity))

    # ------------------------------------------------------------------ the packed layout
    @property
    def packed_size(self) -> int:
        """N = n (budget + decode_budget) + n // 2 flat slots per batch row (see the module docstring)."""
        return self.kv_heads * (self.budget + self.decode_budget) + self.kv_heads // 2

    def segment_capacities(self, counts: Array) -> Array:
        """int32 [B, KVH]: each head's segment for the prefill's kept counts [B, KVH]: counts + decode_budget and an
        even share of the rest of the N slots (the remainder to the first heads)."""
        counts = jnp.asarray(counts, jnp.int32)
        base = counts + self.decode_budget
        spare = self.packed_size - jnp.sum(base, axis=-1, keepdims=True)
        heads = counts.shape[-1]
        share = spare // heads + (jnp.arange(heads, dtype=jnp.int32) < spare % heads)
        return base + share

    def packed_source(self, packed: cache_lib.PackedKV, chunk_length: int) -> tuple[Array, Array]:
        """(source int32 [B, N], lengths int32 [B, KVH]) of a decode call's `packed_select`: each head's entries
        followed by the chunk's chunk_length; a head whose segment overflows keeps its first cap_g - w -
        decode_budget entries and the latest w + decode_budget of that sequence."""
        head, local, _ = packed.slot_heads()
        take = lambda a: jnp.take_along_axis(a, head, axis=1)  # noqa: E731 - [B, KVH] -> [B, N]
        length, cap = take(packed.lengths), take(packed.capacities)
        recent = self.window + self.decode_budget
        overflow = jnp.maximum(length + chunk_length - cap, 0)
        sequence = jnp.where((overflow > 0) & (local >= cap - recent), local + overflow, local)
        in_segment = (local >= 0) & (local < jnp.minimum(length + chunk_length, cap))
        old = take(packed.offsets) + sequence
        new = packed.size + head * chunk_length + (sequence - length)
        slot = jnp.arange(packed.size, dtype=jnp.int32)
        source = jnp.where(in_segment, jnp.where(sequence < length, old, new), slot)
        lengths = jnp.minimum(packed.lengths + chunk_length, packed.capacities)
        return source.astype(jnp.int32), lengths


@register(
    "adakv",
    family="kv",
    paper="Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference",
    catalog=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="SnapKV's prompt selection with head-wise budgets from a joint top-k over the layer's heads (ragged)",
    option_docs={
        **SNAPKV_OPTION_DOCS,
        "budget": "average prompt entries kept per (batch, kv head), window included (base_capacity)",
        "floor_alpha": "share of the average budget every head keeps at least (the official floor_alpha)",
        "layout": "packed (heads back to back in one flat buffer: memory = the sum of the head budgets) or padded",
    },
    validators={**SNAPKV_VALIDATORS, "floor_alpha": in_range(0.0, 1.0), "layout": choice(*LAYOUTS)},
    fidelity="official-code",
    reference=(
        "arXiv 2407.11550 (adaptive budget allocation by a joint top-k); "
        "github.com/FFY0/AdaKV adaptive_snapkv/monkeypatch/snapkv_utils.py "
        "(AdaptiveSnapKVCluster.update_kv_gqa, calcul_attn_sore)"
    ),
    has_attention_weights=True,
)
class AdaKVAttention(SnapKVAttention):
    """Ada-KV: SnapKV with head-wise adaptive budgets. x [B, T, E] -> [B, T, E]; cache: packed [B, N, D] with
    per-head segments (layout="packed") or [B, C, KVH, D] with ragged per-head lengths (layout="padded"); N and C
    from the module docstring."""

    floor_alpha: float = 0.2
    layout: str = "packed"

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} must be one of {LAYOUTS}")

    @property
    def packed(self) -> bool:
        """Whether the cache is packed: layout="packed" and no sliding window (the packed decode reads every kept
        entry of a head; a checkpoint's causal window keeps the padded store, which applies it)."""
        return self.layout == "packed" and self.window is None

    def keeps_causal_window(self) -> bool:
        """A checkpoint's causal window (left, 0) is kept (on the padded store, see `packed`)."""
        window = self.window
        return isinstance(window, (tuple, list)) and normalize_window(window)[1] == 0

    def cache_policy(self) -> AdaKVPolicy:
        return AdaKVPolicy(
            budget=self.budget,
            window=self.observation_window,
            kernel_size=self.kernel_size,
            pooling=self.pooling,
            decode_budget=self.decode_budget,
            kv_heads=self.kv_heads,
            floor_alpha=self.floor_alpha,
        )

    # ------------------------------------------------------------------ the packed layout
    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """As PolicyAttention's, with the packed cache: the creating call allocates N flat slots (the policy's
        `packed_size`) and computes the forward; later decode calls take their query positions from its index."""
        if not self.packed:
            return super().prepare(q, k, v, call)
        packed = cache_lib.load_packed(self) if call.decode else None
        if packed is not None:
            q_pos = self.query_positions(None, q.shape[0], q.shape[1], packed.index)
            return q, k, v, call.replace(q_positions=q_pos, q_offset=packed.index)
        if call.decode:
            policy = self.cache_policy()
            cache_lib.store_packed(
                self, cache_lib.empty_packed(k, v, policy.packed_size, stats=policy.stats, bits=self.cache_bits)
            )
        return super().prepare(q, k, v, call.replace(decode=False))

    def policy_attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """A decode call on the packed cache: q [B, L, H, D], this chunk's k, v [B, L, KVH, D] (before RoPE) ->
        [B, L, H, Dv]. Both branches are computed and the call's own picked by the cache index: the prefill (index
        0) runs SnapKV's protocol step on the chunk alone and packs its selection; a later call attends to the
        packed segments and the chunk, then appends (see the module docstring)."""
        if not self.packed:
            return super().policy_attend(q, k, v, call)
        policy = self.decode_policy(call)
        packed = cache_lib.load_packed(self)
        empty = cache_lib.empty_kv(k, v, 0, ragged=True, stats=policy.stats, bits=self.cache_bits)
        chunk = cache_lib.candidates(empty.replace(index=packed.index), k, v, self.cache_bits)
        y_prefill, prefilled = self._prefill(q, chunk, policy, packed, call)
        y_decode, decoded = self._decode(q, chunk, policy, packed, call)
        at_prefill = packed.index == 0
        cache_lib.store_packed(self, jax.tree.map(lambda a, b: jnp.where(at_prefill, a, b), prefilled, decoded))
        return jnp.where(at_prefill, y_prefill, y_decode)

    def _prefill(self, q, chunk, policy, packed, call) -> tuple[Array, cache_lib.PackedKV]:
        """SnapKV's protocol step on the prompt alone (explicit weights, votes, the head-wise selection), packed."""
        visible = policy.visible(chunk, call.q_positions)
        q, keys, bias = self.cache_positions(q, chunk, call.q_positions)
        step = call.replace(
            mask=Mask(dense=cache_lib.head_mask(visible, self.num_heads)), bias=bias, kv_positions=chunk.positions
        )
        weights = self.attention_weights(self.attention_logits(q, keys, step), step)
        chunk = policy.observe(chunk, weights)
        y = self.mix(self.attention_dropout(weights, step.deterministic), chunk.values).astype(q.dtype)
        indices, counts = policy.keep(chunk)
        return y, cache_lib.pack_counts(packed, chunk, indices, counts, policy.segment_capacities(counts))

    def _decode(self, q, chunk, policy, packed, call) -> tuple[Array, cache_lib.PackedKV]:
        """Attention over the packed segments (every entry is older than the chunk) merged with causal attention
        inside the chunk, then the append (`AdaKVPolicy.packed_source`)."""
        keys, chunk_keys = cache_lib.read(packed.keys), chunk.keys
        q_rot = q
        if self.position == "rope":
            q_rot, keys = self.rotate(q, keys[:, :, None], call.q_positions, packed.positions[:, None, :])
            keys = keys[:, :, 0]
            _, chunk_keys = self.rotate(q, chunk_keys, call.q_positions, chunk.positions)
        cached, cached_lse = packed_split_kv_attention(
            q_rot, keys, packed.values, packed.offsets, packed.lengths, scale=self.scale, softcap=self.softcap,
            return_lse=True,
        )  # fmt: skip
        own, own_lse = split_kv_attention(
            q_rot, chunk_keys, chunk.values, mask=Mask(causal=True), scale=self.scale, softcap=self.softcap,
            num_splits=1, return_lse=True,
        )  # fmt: skip
        lse = jnp.swapaxes(jnp.stack([cached_lse, own_lse]), 2, 3)  # [2, B, L, H]
        y, _ = merge_partials(jnp.stack([cached, own]).astype(jnp.float32), lse, axis=0)
        source, lengths = policy.packed_source(packed, chunk.positions.shape[-1])
        return y.astype(q.dtype), cache_lib.packed_select(packed, chunk, source, lengths)
