"""`combiner`: Combiner-Fixed and Combiner-Axial ([135] "Combiner: Full Attention Transformer with Sparse
Computation Cost").

Attention is a conditional expectation E_{p(j|i)}[v_j]; Combiner keeps full support (every query reaches every
visible key) but factorises p(j | i) through regions. The sequence is cut into blocks Omega_r of `block_size` s
tokens (Combiner-Fixed, the sqrt(n) instantiation of the authors' code `_SelfAttSqrtn`). Query i in block g(i):

  * attends directly to the keys of its own block (causal: j <= i),
  * reaches every other visible block r (causal: r < g(i); bidirectional: r != g(i)) through an abstraction:
        k_r = pool_{j in Omega_r} k_j                     summary key (max pooling in the official code)
        qbar_r = pool_{j in Omega_r} q_j                  summary query
        p(j | Omega_r) = softmax_{j in Omega_r}(s qbar_r . k_j),   v_r = sum_{j in Omega_r} p(j | Omega_r) v_j

and one softmax normalises direct and region logits jointly (s = 1 / sqrt(d)):

        Z_i = sum_{j in Omega_g(i), j visible} exp(s q_i . k_j) + sum_{r visible} exp(s q_i . k_r)
        p(j | i) = exp(s q_i . k_j) / Z_i                                      for j in the own block
        p(j | i) = p(Omega_r | i) p(j | Omega_r),  p(Omega_r | i) = exp(s q_i . k_r) / Z_i   otherwise
        o_i = sum_j p(j | i) v_j = sum_{j local} p(j | i) v_j + sum_r p(Omega_r | i) v_r

so every row of p(j | i) is a distribution over all visible keys (`return_probs` materialises it). Cost: local
O(T s), regions O(T T/s) and O(T D) for the summaries: O(T sqrt(T)) with s = sqrt(T); no T x T array.

factorization="axial" (Combiner-Axial, the authors' `_SelfAttAxialRowmajor` / `axial_rowmajor`): the sequence is
a matrix of rows of s = block_size tokens, position i = (row g(i), column c(i)). Query i attends directly to its own
row (causal: j <= i), and reaches every other visible row r (causal r < g(i), bidirectional r != g(i)) through
the token (r, c(i)) in its column, whose own attention over the whole row r is the abstraction:

        p(j | Omega_r, i) = softmax_{j in row r}(s q_(r,c(i)) . k_j),   v_(r,c(i)) = sum_j p(j | Omega_r, i) v_j
        logits: s q_i . k_j (own row), s q_i . k_(r,c(i)) (row r); one joint softmax as above

so again every row of p(j | i) is a distribution over all visible keys (the query/key at (r, c) play the roles of
qbar_r / k_r, now per column). Cost O(T s) for rows and O(T T/s) for the column logits; with s ~ sqrt(T),
O(T sqrt(T)). (The official JAX layer passes the row outputs through a learned projection + LayerNorm to form the
column key; the TF code's `row_summary='none'`, used here, keys a row by the column token's own key.) In the
bidirectional case the own row is only attended directly (the TF code would also add it as an abstraction).

The paper also gives Combiner-Logsparse and -Mixture (not implemented); -Fixed uses summary = "max" as in the
official code, or "mean". position="rope" rotates q and k first (the paper's models carry their own position
embeddings; "none" is the paper's layer). Decoding keeps keys, values and queries (for the summary queries) in the
"cache": a decoded token attends to its block's cached keys and to the summaries of the completed blocks, so decode
equals the full forward (a decode chunk gathers its queries' blocks: O(L s D) memory for L decoded tokens).
With block_size >= T every key is local and Combiner is exactly softmax attention.

Shapes: x [B, T, E] -> [B, T, E]; q [B, T, H, D], k/v [B, T, KVH, D] (repeated to H: the summaries are per query
head because the summary query is). Masks: causal, q_lengths, kv_lengths.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.core import cache as cache_lib
from attn.core import kv_cache
from attn.core import positions as pos
from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.linear_scan import repeat_kv
from attn.core.padding import masked_softmax
from attn.core.validation import check_choice, check_qkv, choice, optional, positive, positive_int, shape_of
from attn.registry import register

Array = jax.Array

SUMMARIES = ("max", "mean")
FACTORIZATIONS = ("fixed", "axial")
POSITIONS = ("rope", "none")
QUERY_AXES = (("cached_query", ("batch", "cache_length", "heads", "head_dim")),)


def combiner_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    block_size: int,
    causal: bool = False,
    summary: str = "max",
    factorization: str = "fixed",
    scale: float | None = None,
    summary_queries: Array | None = None,
    q_offset: Any = 0,
    q_lengths: Array | None = None,
    kv_lengths: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
) -> Array | tuple[Array, Array]:
    """Combiner-Fixed or Combiner-Axial attention (see the module docstring for the factorisations).

    Args:
      q: [B, Tq, H, D]. k: [B, S, KVH, D]. v: [B, S, KVH, Dv]. H % KVH == 0.
      block_size: s, tokens per region.
      causal: queries see keys at or before their position; False: every key (then Tq == S, q_offset == 0).
      summary: "max" or "mean" pooling of the keys and queries of a region (factorization="fixed" only).
      factorization: "fixed" (regions are blocks summarised by pooling) or "axial" (rows of `block_size` tokens;
        a previous row is reached through its token in the query's column).
      scale: logit scale (default 1/sqrt(D)).
      summary_queries: [B, S, H, D], the queries at the key positions, for the summary queries; default q (needs
        Tq == S). Decoding passes the cached queries.
      q_offset: absolute position of q's first row (the decode index); keys are at positions 0 .. S-1.
      q_lengths, kv_lengths: int [B] padding lengths (padded keys are in no region; padded rows output 0).
      dropout_rate, dropout_rng: dropout on the joint (direct + region) probabilities.
      return_probs: also return p(j | i) as a dense float32 [B, H, Tq, S] (O(Tq S): for tests and capture).
    Returns:
      out [B, Tq, H, Dv] in q.dtype, or (out, probs).
    """
    heads, _ = check_qkv(q, k, v)
    batch, q_len, _, dim = q.shape
    kv_len = k.shape[1]
    if not (isinstance(block_size, (int, np.integer)) and block_size > 0):
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    check_choice("summary", summary, SUMMARIES)
    check_choice("factorization", factorization, FACTORIZATIONS)
    if summary_queries is None:
        if q_len != kv_len:
            raise ValueError(f"summary_queries are needed when q_len={q_len} != kv_len={kv_len}")
        summary_queries = q
    elif shape_of(summary_queries) != (batch, kv_len, heads, dim):
        raise ValueError(
            f"summary_queries has shape {shape_of(summary_queries)}; expected [B, S, H, D] = "
            f"{(batch, kv_len, heads, dim)}"
        )
    full = q_len == kv_len and isinstance(q_offset, (int, np.integer)) and q_offset == 0
    if not causal and not full:
        raise ValueError("non-causal combiner attention needs q_len == kv_len and q_offset == 0 (self-attention)")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r} must be in [0, 1)")
    scale = dim**-0.5 if scale is None else scale
    size = int(block_size)
    num_blocks = -(-kv_len // size)
    pad = num_blocks * size - kv_len

    def blocks(x: Array) -> Array:  # [B, S, ...] -> [B, n, s, ...], padded along S
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((batch, num_blocks, size) + x.shape[2:])

    kv_valid = jnp.ones((batch, kv_len), jnp.bool_)
    if kv_lengths is not None:
        kv_valid = jnp.arange(kv_len)[None] < jnp.asarray(kv_lengths)[:, None]
    f32 = jnp.float32
    qf = q.astype(f32)
    kb, vb = blocks(repeat_kv(k, heads).astype(f32)), blocks(repeat_kv(v, heads).astype(f32))  # [B, n, s, H, D]
    valid = blocks(kv_valid)  # [B, n, s]
    sqb = blocks(summary_queries.astype(f32))
    positions = q_offset + jnp.arange(q_len)
    own = positions // size  # [Tq] block of each query
    column = positions % size  # [Tq] slot of each query inside its block (its column for axial)
    regions = jnp.arange(num_blocks)
    region_ok = (regions[None, :] < own[:, None]) if causal else (regions[None, :] != own[:, None])
    if factorization == "fixed":
        summary_k, summary_v, has_keys = _region_summaries(sqb, kb, vb, valid, summary, scale)
        region_logits = scale * jnp.einsum("bthd,bnhd->bthn", qf, summary_k)
        region_ok = region_ok[None, :, None, :] & has_keys[:, None, None, :]  # [B, Tq, 1, n]
    else:
        # Row r is reached through its token (r, c) in the query's column c: key k_(r,c), value the attention of
        # q_(r,c) over the whole row r (complete, so causal for every later row).
        row_p = _row_probs(sqb, kb, valid, scale)  # [B, n, s (query slot c), H, s (key slot)]
        row_out = jnp.einsum("bncht,bnthd->bnchd", row_p, vb)  # [B, n, s, H, D]
        if full:  # queries in rows: no gather, [B, n (query row), s, H, n (region row)]
            region_logits = scale * jnp.einsum("bqchd,brchd->bqchr", blocks(qf), kb)
            region_logits = region_logits.reshape((batch, num_blocks * size) + region_logits.shape[3:])[:, :q_len]
        else:
            region_logits = scale * jnp.einsum("bthd,brthd->bthr", qf, kb[:, :, column])
        column_ok = jnp.moveaxis(valid[:, :, column], 1, 2)  # [B, Tq, n]: the column token of row r is a real key
        region_ok = region_ok[None, :, None, :] & column_ok[:, :, None, :]

    if full:  # blocked: each block's queries against its own keys, [B, n, H, s, s]
        local_logits = scale * jnp.einsum("bnthd,bnshd->bnths", blocks(qf), kb)
        local_ok = valid[:, :, None, None, :]
        if causal:
            local_ok = local_ok & jnp.tril(jnp.ones((size, size), jnp.bool_))[None, None, :, None, :]
        flatten = lambda x: x.reshape((batch, num_blocks * size) + x.shape[3:])[:, :q_len]  # noqa: E731
        local_logits, local_ok = flatten(local_logits), flatten(jnp.broadcast_to(local_ok, local_logits.shape))
    else:  # decode: gather each query's own block of the cache, [B, Tq, s, H, D]
        local_k, local_v = kb[:, own], vb[:, own]
        local_logits = scale * jnp.einsum("bthd,btshd->bths", qf, local_k)
        key_positions = own[:, None] * size + jnp.arange(size)[None, :]  # [Tq, s]
        local_ok = valid[:, own][:, :, None, :] & (key_positions <= positions[:, None])[None, :, None, :]

    logits = jnp.concatenate([local_logits, region_logits], axis=-1)  # [B, Tq, H, s + n]
    allowed = jnp.concatenate(
        [jnp.broadcast_to(local_ok, local_logits.shape), jnp.broadcast_to(region_ok, region_logits.shape)], axis=-1
    )
    probs = masked_softmax(logits, allowed)
    if q_lengths is not None:
        probs = probs * (jnp.arange(q_len)[None] < jnp.asarray(q_lengths)[:, None])[:, :, None, None]
    attended = probs
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        attended = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    local_p, region_p = attended[..., :size], attended[..., size:]

    if full:
        padded = jnp.pad(local_p, ((0, 0), (0, num_blocks * size - q_len), (0, 0), (0, 0)))
        local_out = jnp.einsum("bnths,bnshd->bnthd", padded.reshape(batch, num_blocks, size, heads, size), vb)
        local_out = local_out.reshape(batch, num_blocks * size, heads, -1)[:, :q_len]
    else:
        local_out = jnp.einsum("bths,btshd->bthd", local_p, local_v)
    if factorization == "fixed":
        region_out = jnp.einsum("bthn,bnhd->bthd", region_p, summary_v)
    elif full:
        padded = jnp.pad(region_p, ((0, 0), (0, num_blocks * size - q_len), (0, 0), (0, 0)))
        padded = padded.reshape(batch, num_blocks, size, heads, num_blocks)
        region_out = jnp.einsum("bqchr,brchd->bqchd", padded, row_out)
        region_out = region_out.reshape(batch, num_blocks * size, heads, -1)[:, :q_len]
    else:
        region_out = jnp.einsum("bthr,brthd->bthd", region_p, row_out[:, :, column])
    out = (local_out + region_out).astype(q.dtype)
    if not return_probs:
        return out
    if factorization == "fixed":  # p(j | Omega_r), the same for every query: [B, H, 1, S']
        within = _within_probs(sqb, kb, valid, summary, scale)  # [B, n, H, s]
        within = jnp.moveaxis(within, 2, 1).reshape(batch, heads, 1, num_blocks * size)
    else:  # p(j | Omega_r, column of i): [B, H, Tq, S']
        keys = jnp.arange(num_blocks * size)
        within = jnp.moveaxis(row_p, 3, 1)[:, :, keys[None, :] // size, column[:, None], keys[None, :] % size]
    return out, _dense_probs(probs[..., :size], probs[..., size:], own, within, size, kv_len)


def _pool(x: Array, valid: Array, summary: str) -> Array:
    """Max or mean of x [B, n, s, H, D] over the valid tokens of each block -> [B, n, H, D] (0 for empty blocks)."""
    mask = valid[..., None, None]
    if summary == "max":
        has_keys = jnp.any(valid, axis=2)[..., None, None]
        return jnp.where(has_keys, jnp.max(jnp.where(mask, x, -jnp.inf), axis=2), 0.0)
    count = jnp.maximum(jnp.sum(valid, axis=2), 1)[..., None, None]
    return jnp.sum(jnp.where(mask, x, 0.0), axis=2) / count


def _within_probs(sqb: Array, kb: Array, valid: Array, summary: str, scale: float) -> Array:
    """p(j | Omega_r) = softmax over the valid keys j of block r of s qbar_r . k_j, [B, n, H, s]."""
    logits = scale * jnp.einsum("bnhd,bnshd->bnhs", _pool(sqb, valid, summary), kb)
    return masked_softmax(logits, valid[:, :, None, :])


def _row_probs(sqb: Array, kb: Array, valid: Array, scale: float) -> Array:
    """Axial: the attention of every query slot c of row r over the valid keys of row r, [B, n, s, H, s]."""
    logits = scale * jnp.einsum("bnchd,bnthd->bncht", sqb, kb)
    return masked_softmax(logits, valid[:, :, None, None, :])


def _region_summaries(sqb: Array, kb: Array, vb: Array, valid: Array, summary: str, scale: float):
    """Per block r: summary key k_r, value v_r = sum_j p(j | Omega_r) v_j, and whether r has any valid key."""
    within = _within_probs(sqb, kb, valid, summary, scale)
    return _pool(kb, valid, summary), jnp.einsum("bnhs,bnshd->bnhd", within, vb), jnp.any(valid, axis=2)


def _dense_probs(local_p, region_p, own, within, size, kv_len) -> Array:
    """p(j | i) over all S keys, float32 [B, H, Tq, S]: the direct probabilities in the own block,
    p(Omega_r | i) p(j | Omega_r) in the other blocks. within: p(j | Omega_r) as [B, H, Tq|1, S'] (S' = n s)."""
    keys = jnp.arange(within.shape[-1])
    key_block, key_slot = keys // size, keys % size
    region = jnp.moveaxis(region_p[..., key_block], 2, 1) * within  # [B, H, Tq, S']
    same = (key_block[None, :] == own[:, None])[None, None]  # [1, 1, Tq, S']
    local = jnp.moveaxis(local_p[..., key_slot], 2, 1)
    return jnp.where(same, local, region)[..., :kv_len]


@register(
    "combiner",
    family="linear",
    paper="Combiner: Full Attention Transformer with Sparse Computation Cost",
    catalog=135,
    op=combiner_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="Combiner-Fixed / -Axial: direct attention in the own block, p(region) p(token | region) elsewhere",
    option_docs={
        "block_size": "tokens per region s (the paper's O(T sqrt T) choice is s ~ sqrt(T))",
        "factorization": "'fixed' (block regions with pooled summaries) or 'axial' (rows reached via the column)",
        "summary": "fixed only: pooling of a region's keys and queries into its summary: 'max' (official) or 'mean'",
        "position": "'rope' (rotary q and k before the factorisation) or 'none' (the paper's layer)",
        "rope_base": "RoPE base (theta) when position='rope'",
        "scale": "logit scale (None = 1/sqrt(head_dim))",
    },
    fidelity="official-code",
    reference="the authors' code: _SelfAttSqrtn (Combiner-Fixed, max-pooled summaries) and _SelfAttAxialRowmajor with "
    "row_summary='none' (Combiner-Axial)",
    validators={
        "block_size": positive_int,
        "factorization": choice(*FACTORIZATIONS),
        "summary": choice(*SUMMARIES),
        "position": choice(*POSITIONS),
        "scale": optional(positive),
    },
)
class CombinerAttention(AttentionLayer):
    """Combiner-Fixed or -Axial attention, causal or bidirectional, with a KV (and query) cache. x [B, T, E] ->
    [B, T, E]."""

    block_size: int = 64
    factorization: str = "fixed"
    summary: str = "max"
    position: str = "rope"
    rope_base: float = 10000.0
    scale: float | None = None

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.cross:
            raise ValueError(
                f"combiner is self-attention (regions are blocks of x); got a context {call.context.shape}"
            )
        mask = call.mask
        if mask is not None and not mask.replace(causal=False, q_lengths=None, kv_lengths=None).is_empty():
            raise ValueError(f"combiner supports only the mask parts causal, q_lengths and kv_lengths; got {mask!r}")
        causal = mask is not None and mask.causal
        if call.decode and (not causal or mask.q_lengths is not None or mask.kv_lengths is not None):
            raise ValueError(f"decode=True needs a causal mask without lengths (attn.Mask(causal=True)); got {mask!r}")

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """RoPE on q and k (position='rope'); decoding writes q, k, v to the cache and returns the cached keys and
        values, with the cached queries (the summary queries) in call.state, q_offset = the cache index and the
        mask's kv_lengths = the filled length."""
        batch, length = q.shape[:2]
        offset = kv_cache.current_index(self) if call.decode else 0
        if self.position == "rope":
            q_pos = self.query_positions(call.positions, batch, length, offset)
            inv_freq, _ = pos.rope_frequencies(self.head_dim, base=self.rope_base)
            q, k = pos.apply_rope(q, q_pos, inv_freq), pos.apply_rope(k, q_pos, inv_freq)
        if call.decode:
            # The queries of the cached tokens (the summaries' queries): side state of the KV cache.
            cached = cache_lib.load_state(self, ("cached_query",), shared_index=True)
            keys, values, start = kv_cache.write(self, k, v)
            if start is None:  # the creating call: an ordinary forward, then zero queries of the cache's length
                zeros = cache_lib.RecurrentState({"cached_query": jnp.zeros(q.shape, q.dtype)}, None, QUERY_AXES)
                cache_lib.store_state(self, zeros)
            else:  # later calls: attend over the filled cache
                stored = cached.state["cached_query"]
                queries = jax.lax.dynamic_update_slice_in_dim(stored, q.astype(stored.dtype), start, 1)
                cache_lib.store_state(self, cache_lib.RecurrentState({"cached_query": queries}, None, QUERY_AXES))
                filled = jnp.full((batch,), start + length, jnp.int32)
                mask = call.mask.replace(kv_lengths=filled)
                return q, keys, values, call.replace(mask=mask, q_offset=start, state=queries)
        return q, k, v, call

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, T, H, D], k/v [B, S, KVH, D] -> [B, T, H, Dv] (the joint probabilities sown on request)."""
        mask = call.mask
        capture = self.wants_weights()
        result = combiner_attention(
            q,
            k,
            v,
            block_size=self.block_size,
            causal=mask is not None and mask.causal,
            summary=self.summary,
            factorization=self.factorization,
            scale=self.scale,
            summary_queries=call.state,
            q_offset=call.q_offset,
            q_lengths=None if mask is None else mask.q_lengths,
            kv_lengths=None if mask is None else mask.kv_lengths,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
            return_probs=capture,
        )
        if capture:
            result, probs = result
            self.sow("intermediates", "attention_weights", probs)
        return result
