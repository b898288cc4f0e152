"""`landmark`: Landmark Attention, a landmark token closes every block of the sequence; a query attends to the tokens
of its own block directly and to each earlier block through that block's landmark (grouped softmax), and at
inference reads only the top_k blocks whose landmarks it attends to most.

Paper: "Landmark Attention: Random-Access Infinite Context Length for Transformers" (Mohtashami & Jaggi, NeurIPS 2023,
arXiv 2305.16300; code github.com/epfml/landmark-attention, models/landmark.py `landmark_grouped_softmax` and
models/caches/mem_cache.py `retrieve_for_query`).

Layout: blocks of `block_size` positions; the last position of every block, l_c = c block_size + block_size - 1, is
its landmark (the data inserts a landmark token there: `insert_landmarks`); the other block_size - 1 positions are
regular tokens. Per (batch row, query head h; kv head g), s_ij = scale q_i . k_j, query i in block r:

    top level    S_i  = { j in block r : j <= i, j regular }  U  { l_c : c in kept_r }    (kept_r subset of c < r)
                 p_ij = exp(s_ij) / sum_{j' in S_i} exp(s_ij')                              for j in S_i
    in a block   o_ic = sum_{j in block c, regular} softmax_j(s_ij) v_j                     the block's own softmax
    output       o_i  = sum_{j in block r} p_ij v_j  +  sum_{c in kept_r} p_{i,l_c} o_ic

so token j of an earlier block c gets weight p_{i,l_c} softmax_{j in c}(s_ij): the landmark's top-level probability
gates its block, and the landmark's own value is never read (the official grouped softmax; the landmark of the
query's own block is ignored, even by the landmark itself). Rows sum to 1.

kept_r: every earlier block (top_k=None, the training form, O(T^2) like dense attention), or the top_k earlier
blocks of query block r by the official "max_over_tokens" retrieval score

    score_rc = max_{i in block r} softmax_{c' < r}(s_{i, l_c'})[c]                   (ties: the lower block id)

which costs O(T (T / block_size) D) for the scores plus O(T top_k block_size D) for the attention.

Computation: the top-level probabilities are explicit ([.., block_size, block_size] for the own block and
[.., block_size, top_k] for the landmarks); the in-block softmaxes of the kept blocks run in a `lax.scan` over the
kept slots, gathering one key/value block per query block per step (memory O(T D)). The block-sparse core
(`attn.core.block_sparse`) is not used for them: it applies causal masking only, and the in-block softmax must leave
out the block's landmark key.

Decoding (decode=True, the dense KV cache of the layer template; `landmark_decode_attention`): the paper's inference
mode. Every decode call writes its tokens to the cache; query i at cache slot p_i reads its own block (the local
context, up to p_i) directly and retrieves, per token and per head, the top_k complete earlier blocks by its
softmax over their cached landmark keys, then applies the same grouped softmax:

    kept_i = top_k_c softmax_{c' < r_i}(s_{i, l_c'})[c]      (the official non-offloaded cache path: per token)

so decoding token by token equals the forward wherever the forward's query block holds one token, and with top_k
None (or >= the number of blocks) it equals the training form exactly (tests/sparse/test_landmark_decode.py, and
the registry's decode claim). A prompt given as one decode chunk is retrieved per token too; the creating call
(which sizes the cache) is an ordinary forward.

Reduction: block_size > the sequence length (one block, no landmark reached) is causal `softmax` exactly
(tests/sparse/test_landmark.py); top_k >= the number of blocks equals the training form.

Deviations (fidelity "official-code"): the forward's retrieval is per query block (the official offloaded inference
scores chunks of query tokens the same way with "max_over_tokens"; its default cache path, like the decoding here,
retrieves per token); the official positional scheme for retrieved blocks (llama_mem.py re-rotates the cached
position-free keys: the retrieved blocks are placed just before the local context, and the landmark keys for the
retrieval scores at compressed positions) is not reproduced: keys enter the cache rotated at their true positions
(RoPE by default), so the scores and the attention see the true distances. Official decoding keeps the local
context to the incomplete block and asserts a chunk does not cross a block boundary; here a decode chunk may cross
blocks (each query reads its own block from the cache). Attention dropout drops the own-block entries of
p and the landmark probabilities p_{i,l_c} (the official `group_dropout` on group probabilities) rather than single
entries of earlier blocks (decoding has no dropout). Self-attention with a causal mask only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from attn.core.block_pooling import real_token_mask, split_blocks
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.validation import check_qkv, int_at_least, optional, positive_int
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention
from attn.sparse.selector_layer import non_causal_mask_fields

Array = jax.Array

_BLOCK_SIZE = int_at_least(2)  # a block needs a regular token besides its landmark


def insert_landmarks(tokens: Array, *, block_size: int, landmark_id: int) -> Array:
    """int tokens [B, T] -> [B, T + T // (block_size - 1)]: landmark_id after every block_size - 1 tokens, so that
    position c block_size + block_size - 1 holds the landmark of block c (the layout `landmark` expects)."""
    _BLOCK_SIZE("block_size", block_size)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens of shape {tokens.shape} must be [batch, length]")
    batch, length = tokens.shape
    regular = block_size - 1
    full = length // regular
    head = tokens[:, : full * regular].reshape(batch, full, regular)
    marks = jnp.full((batch, full, 1), landmark_id, tokens.dtype)
    return jnp.concatenate([jnp.concatenate([head, marks], axis=2).reshape(batch, -1), tokens[:, full * regular :]], 1)


def _blocks(x: Array, block_size: int, kv_heads: int) -> Array:
    """x [B, T, H, D] -> [B, KVH, G, n, bs, D] (queries) with G = H / KVH."""
    batch, _, heads, dim = x.shape
    xb, n = split_blocks(x, block_size, axis=1)
    return xb.reshape(batch, n, block_size, kv_heads, heads // kv_heads, dim).transpose(0, 3, 4, 1, 2, 5)


def _landmark_logits(q: Array, k: Array, block_size: int, scale: float) -> Array:
    """s_{i, l_c}: float [B, KVH, G, n, bs, n] (q blocks against every block's landmark key)."""
    kv_heads = k.shape[2]
    qb = _blocks(q, block_size, kv_heads)
    kl = split_blocks(k, block_size, axis=1)[0][:, :, block_size - 1].transpose(0, 2, 1, 3)  # [B, KVH, n, D]
    return scale * jnp.einsum("bhgnqd,bhcd->bhgnqc", qb, kl)


def landmark_block_scores(q: Array, k: Array, *, block_size: int, scale: float | None = None) -> Array:
    """The retrieval score float32 [B, H, n, n] of key block c for query block r (see the module docstring; -inf
    where c >= r). q [B, T, H, D], k [B, T, KVH, D], n = ceil(T / block_size)."""
    heads, kv_heads = check_qkv(q, k, k)
    _BLOCK_SIZE("block_size", block_size)
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = _landmark_logits(q.astype(dtype), k.astype(dtype), block_size, scale)
    n = logits.shape[3]
    earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]  # [r, c]: c < r
    visible = earlier[:, None, :]  # [n, 1(bs), n]
    safe = jnp.where(visible, logits, -jnp.inf)
    probs = jnp.where(visible, jax.nn.softmax(jnp.where(earlier.any(-1)[:, None, None], safe, 0.0), axis=-1), 0.0)
    probs = jnp.where(real_token_mask(q.shape[1], block_size)[..., None], probs, 0.0)  # padded queries never win
    scores = jnp.where(earlier, jnp.max(probs, axis=-2), -jnp.inf)  # [B, KVH, G, n, n]
    return scores.reshape(q.shape[0], heads, n, n)


def landmark_block_indices(scores: Array, *, top_k: int | None) -> Array:
    """scores float [B, H, n, n] (-inf where not a candidate) -> int32 [B, H, n, S], the kept earlier blocks, -1
    padded: every c < r (top_k None, S = max(n - 1, 1)) or the top_k by score (S = min(top_k, n), ties: lower id;
    any leading axes [..., n] for a given top_k)."""
    n = scores.shape[-1]
    if top_k is None:
        width = max(n - 1, 1)
        ids = jnp.where(jnp.arange(width)[None, :] < jnp.arange(n)[:, None], jnp.arange(width)[None, :], -1)
        return jnp.broadcast_to(ids, (*scores.shape[:2], n, width)).astype(jnp.int32)
    positive_int("top_k", top_k)
    values, ids = jax.lax.top_k(scores, min(int(top_k), n))
    return jnp.where(values > -jnp.inf, ids, -1).astype(jnp.int32)


def _check_indices(block_indices: Any, n: int) -> None:
    if isinstance(block_indices, jax.core.Tracer):
        return
    ids = np.asarray(block_indices)
    rows = np.arange(n).reshape(1, 1, n, 1)
    bad = (ids < -1) | ((ids >= 0) & (ids >= rows))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"block_indices{list(where)} = {int(ids[where])}: query block {where[2]} may keep only earlier blocks, "
            f"ids in [0, {where[2]}), or -1"
        )


def landmark_decode_attention(
    q: Array,
    keys: Array,
    values: Array,
    *,
    q_offset: Any,
    block_size: int,
    top_k: int | None = None,
    scale: float | None = None,
) -> Array:
    """Landmark Attention's retrieval decoding against a KV cache (the paper's inference, Sec. 3.2; the official
    llama/llama_mem.py with a cache and no CPU offload: retrieval per token and per head).

    Query i sits at cache slot p_i = q_offset + i, in block r_i = p_i // block_size; its own block is its local
    context and every complete earlier block c < r_i is memory:

        a_ic   = softmax_{c' < r_i}(s_{i, l_c'})[c]                       retrieval score (landmark attention)
        kept_i = the top_k blocks by a_ic (ties: the lower id); every c < r_i when top_k is None
        S_i    = { j in block r_i : j <= p_i, j regular }  U  { l_c : c in kept_i }
        o_i    = sum_{j in block r_i} p_ij v_j + sum_{c in kept_i} p_{i,l_c} softmax_{j in c, regular}(s_ij) v_j

    with p the softmax over S_i (the grouped softmax of the module docstring). With top_k None (or >= the number of
    blocks) this is the training form `landmark_attention(q, k, v)` at every query; a one-token query block makes
    the forward's block retrieval the same per-token choice.

    Args:
      q: [B, Tq, H, D], the queries at slots q_offset .. q_offset + Tq - 1 (RoPE already applied, like the keys).
      keys: [B, L, KVH, D], values: [B, L, KVH, Dv]: the cache, filled at least up to slot q_offset + Tq - 1 (later
        slots are never read); slot c block_size + block_size - 1 holds block c's landmark.
      q_offset: int or traced int scalar. block_size: int >= 2. top_k: positive int or None (every earlier block).
      scale: logit scale, default 1/sqrt(D).
    Returns:
      [B, Tq, H, Dv] in q.dtype. Cost O(Tq H (L / block_size + block_size (1 + top_k)) D), memory
      O(B H Tq (L / block_size + block_size D)) (the kept blocks are read one slot at a time in a `lax.scan`).
    """
    heads, kv_heads = check_qkv(q, keys, values)
    _BLOCK_SIZE("block_size", block_size)
    if top_k is not None:
        positive_int("top_k", top_k)
    batch, q_len, _, dim = q.shape
    bs, group = int(block_size), heads // kv_heads
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    scale = dim**-0.5 if scale is None else scale
    kb = split_blocks(keys.astype(dtype), bs, axis=1)[0].transpose(0, 3, 1, 2, 4)  # [B, KVH, nL, bs, D]
    vb = split_blocks(values.astype(dtype), bs, axis=1)[0].transpose(0, 3, 1, 2, 4)  # [B, KVH, nL, bs, Dv]
    n_cache = kb.shape[2]
    qg = q.astype(dtype).reshape(batch, q_len, kv_heads, group, dim).transpose(0, 2, 3, 1, 4)  # [B, KVH, G, Tq, D]
    slots = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)  # p_i
    own_block = slots // bs  # r_i

    # retrieval: landmark attention over the complete earlier blocks, top_k of it per (query, head)
    land = scale * jnp.einsum("bhgtd,bhcd->bhgtc", qg, kb[:, :, :, bs - 1])  # [B, KVH, G, Tq, nL]
    earlier = jnp.arange(n_cache)[None, :] < own_block[:, None]  # [Tq, nL]
    safe = jnp.where(earlier, land, -jnp.inf)
    probs = jax.nn.softmax(jnp.where(earlier.any(-1)[:, None], safe, 0.0), axis=-1)
    scores = jnp.where(earlier, probs, -jnp.inf)
    ids = landmark_block_indices(scores, top_k=n_cache if top_k is None else int(top_k))  # [B, KVH, G, Tq, S]
    valid = ids >= 0
    ids = jnp.where(valid, ids, 0)

    # top level: the own block's regular tokens up to the query, then the kept blocks' landmarks
    k_own, v_own = jnp.take(kb, own_block, axis=2), jnp.take(vb, own_block, axis=2)  # [B, KVH, Tq, bs, D]
    own = scale * jnp.einsum("bhgtd,bhtkd->bhgtk", qg, k_own)
    own_slots = own_block[:, None] * bs + jnp.arange(bs)  # [Tq, bs]
    own = jnp.where((own_slots <= slots[:, None]) & (jnp.arange(bs) < bs - 1), own, -jnp.inf)
    kept = jnp.where(valid, jnp.take_along_axis(land, ids, axis=-1), -jnp.inf)  # [B, KVH, G, Tq, S]
    top = jax.nn.softmax(jnp.concatenate([own, kept], axis=-1), axis=-1)  # the own block's first token: never empty
    out = jnp.einsum("bhgtk,bhtkd->bhgtd", top[..., :bs], v_own)

    regular = jnp.arange(bs) < bs - 1

    def step(acc, slot):
        slot_ids, slot_probs = slot  # [B, KVH, G, Tq], [B, KVH, G, Tq]
        where = slot_ids[..., None, None, None]
        k_c = jnp.take_along_axis(kb[:, :, None, None], where, axis=4)[:, :, :, :, 0]  # [B, KVH, G, Tq, bs, D]
        v_c = jnp.take_along_axis(vb[:, :, None, None], where, axis=4)[:, :, :, :, 0]
        inner = jnp.where(regular, scale * jnp.einsum("bhgtd,bhgtkd->bhgtk", qg, k_c), -jnp.inf)
        o_c = jnp.einsum("bhgtk,bhgtkd->bhgtd", jax.nn.softmax(inner, axis=-1), v_c)
        return acc + slot_probs[..., None] * o_c, None

    out, _ = jax.lax.scan(step, out, (jnp.moveaxis(ids, -1, 0), jnp.moveaxis(top[..., bs:], -1, 0)))
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, values.shape[-1]).astype(q.dtype)


def landmark_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    block_size: int,
    block_indices: Array | None = None,
    scale: float | None = None,
    dropout: Any = None,
) -> Array:
    """Causal landmark attention (the grouped softmax of the module docstring) over the kept blocks.

    Args:
      q: [B, T, H, D]; k: [B, T, KVH, D]; v: [B, T, KVH, Dv] (self-attention, H a multiple of KVH). Position
        c block_size + block_size - 1 is block c's landmark.
      block_size: int >= 2, positions per block including its landmark.
      block_indices: int [B|1, H|1, ceil(T / block_size), S], the earlier blocks each query block keeps (-1 padding),
        or None: every earlier block (the training form).
      scale: logit scale, default 1/sqrt(D).
      dropout: None, or a function applied to the top-level probabilities [B, KVH, G, n, bs, bs + S] (own-block
        entries, then the landmarks of the kept blocks).
    Returns:
      [B, T, H, Dv] in q.dtype.
    """
    heads, kv_heads = check_qkv(q, k, v)
    _BLOCK_SIZE("block_size", block_size)
    batch, length = q.shape[0], q.shape[1]
    if k.shape[1] != length:
        raise ValueError(f"landmark attention is self-attention: q {q.shape} and k {k.shape} need the same length")
    bs, group = int(block_size), heads // kv_heads
    n = -(-length // bs)
    if block_indices is None:
        block_indices = landmark_block_indices(jnp.zeros((1, 1, n, n)), top_k=None)
    block_indices = jnp.asarray(block_indices)
    if block_indices.ndim != 4 or block_indices.shape[2] != n or block_indices.shape[0] not in (1, batch):
        raise ValueError(f"block_indices of shape {block_indices.shape} must be [1 or {batch}, 1 or {heads}, {n}, S]")
    if block_indices.shape[1] not in (1, heads):
        raise ValueError(f"block_indices of shape {block_indices.shape} must be [1 or {batch}, 1 or {heads}, {n}, S]")
    _check_indices(block_indices, n)
    slots = block_indices.shape[-1]
    ids = jnp.broadcast_to(block_indices, (batch, heads, n, slots)).reshape(batch, kv_heads, group, n, slots)
    valid = ids >= 0
    ids = jnp.where(valid, ids, 0).astype(jnp.int32)

    dtype = jnp.promote_types(q.dtype, jnp.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qb = _blocks(q.astype(dtype), bs, kv_heads)  # [B, KVH, G, n, bs, D]
    kb = split_blocks(k.astype(dtype), bs, axis=1)[0].transpose(0, 3, 1, 2, 4)  # [B, KVH, n, bs, D]
    vb = split_blocks(v.astype(dtype), bs, axis=1)[0].transpose(0, 3, 1, 2, 4)  # [B, KVH, n, bs, Dv]

    # top level: own-block regular tokens up to the query, and the landmarks of the kept blocks
    own = scale * jnp.einsum("bhgnqd,bhnkd->bhgnqk", qb, kb)
    tri = jnp.arange(bs)[None, :] <= jnp.arange(bs)[:, None]
    own_allowed = tri & (jnp.arange(bs) < bs - 1)[None, :]  # the own landmark is ignored
    own = jnp.where(own_allowed, own, -jnp.inf)
    land = _landmark_logits(q.astype(dtype), k.astype(dtype), bs, scale)  # [B, KVH, G, n, bs, n]
    land = jnp.take_along_axis(land, ids[..., None, :], axis=-1)
    land = jnp.where(valid[..., None, :], land, -jnp.inf)  # [B, KVH, G, n, bs, S]
    top = jnp.concatenate([own, land], axis=-1)
    probs = jax.nn.softmax(top, axis=-1)  # every row keeps its own first token: never empty
    if dropout is not None:
        probs = dropout(probs)
    out = jnp.einsum("bhgnqk,bhnkd->bhgnqd", probs[..., :bs], vb)

    regular = jnp.arange(bs) < bs - 1

    def step(acc, slot):
        slot_ids, slot_probs = slot  # [B, KVH, G, n], [B, KVH, G, n, bs]
        k_c = jnp.take_along_axis(kb[:, :, None], slot_ids[..., None, None], axis=3)  # [B, KVH, G, n, bs, D]
        v_c = jnp.take_along_axis(vb[:, :, None], slot_ids[..., None, None], axis=3)
        inner = jnp.where(regular, scale * jnp.einsum("bhgnqd,bhgnkd->bhgnqk", qb, k_c), -jnp.inf)
        o_c = jnp.einsum("bhgnqk,bhgnkd->bhgnqd", jax.nn.softmax(inner, axis=-1), v_c)
        return acc + slot_probs[..., None] * o_c, None

    slot_probs = jnp.moveaxis(probs[..., bs:], -1, 0)
    out, _ = jax.lax.scan(step, out, (jnp.moveaxis(ids, -1, 0), slot_probs))
    out = out.transpose(0, 3, 4, 1, 2, 5).reshape(batch, n * bs, heads, v.shape[-1])[:, :length]
    return out.astype(q.dtype)


@register(
    "landmark",
    family="sparse",
    paper="Landmark Attention: Random-Access Infinite Context Length for Transformers",
    catalog=73,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="a landmark token closes each block; grouped softmax: own-block tokens and earlier landmarks in one "
    "softmax, each landmark's probability spread over its block by the block's own softmax; top_k retrieval of "
    "blocks by landmark attention (per query block in the forward, per token while decoding with the KV cache)",
    fidelity="official-code",
    reference="arXiv 2305.16300 (Sec. 3: landmark tokens, grouped softmax, retrieval) and github.com/epfml/"
    "landmark-attention models/landmark.py (landmark_grouped_softmax: groups from the landmark cumsum, own landmark "
    "ignored, landmark probability times in-block softmax, landmark value unused) and models/caches/mem_cache.py "
    "(retrieval: softmax over cached landmarks, max_over_tokens, top-k) and llama/llama_mem.py (decoding with the "
    "cache: per-token, per-head top-k of the complete cached blocks, grouped softmax with the own incomplete block); "
    "retrieval per query block in the forward, per token while decoding",
    option_docs={
        "block_size": "positions per block including its landmark (the last one), >= 2 (official mem_freq + 1 = 51)",
        "top_k": "earlier blocks each query block reads, by landmark retrieval (None: all, the training form)",
    },
    validators={"block_size": _BLOCK_SIZE, "top_k": optional(positive_int)},
)
class LandmarkAttention(MultiHeadAttention):
    """Landmark Attention: grouped softmax over the own block and (the top_k) earlier blocks. x [B, T, E] -> [B, T, E]
    with a landmark token at every position c block_size + block_size - 1 (`insert_landmarks`)."""

    block_size: int = 51
    top_k: int | None = None

    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        name = self.registry_name or type(self).__name__
        if call.cross:
            raise ValueError(f"{name} is self-attention over a sequence with landmark tokens; got a context")
        mask = call.mask if call.mask is not None else Mask()
        given = non_causal_mask_fields(mask)
        if not mask.causal or given or self.window is not None or self.softcap is not None:
            raise ValueError(
                f"{name} needs mask=attn.Mask(causal=True) and nothing else (a causal language model); got causal="
                f"{mask.causal}, mask fields {given}, window={self.window!r}, softcap={self.softcap!r}"
            )
        if self.position in ("alibi", "t5", "shaw"):
            raise ValueError(f"position={self.position!r} is not supported by {name}; expected 'rope' or 'none'")

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, Dv]; on a decode call k/v are the whole dense KV cache
        [B, L, KVH, D] and the queries sit at slots call.q_offset + i (retrieval decoding, per token)."""
        if call.decode and call.mask is not None and call.mask.kv_lengths is not None:
            # a decode call against an existing cache (the template restricted the mask to the filled slots; the
            # creating call, an ordinary forward, leaves kv_lengths unset and validate forbids a caller's)
            return landmark_decode_attention(
                q, k, v, q_offset=call.q_offset, block_size=self.block_size, top_k=self.top_k, scale=self.scale
            )
        indices = None
        if self.top_k is not None:
            scores = landmark_block_scores(q, k, block_size=self.block_size, scale=self.scale)
            indices = jax.lax.stop_gradient(landmark_block_indices(scores, top_k=self.top_k))
        return landmark_attention(
            q,
            k,
            v,
            block_size=self.block_size,
            block_indices=indices,
            scale=self.scale,
            dropout=lambda p: self.attention_dropout(p, call.deterministic),
        )
