"""A²ATS [167] (He et al. 2025, "A²ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding and
Query-Aware Vector Quantization", ACL Findings 2025, arXiv 2502.12665): every key keeps a vector-quantization code,
and a decoded token attends exactly to its `local_window` latest tokens, the first `sinks` tokens and the `budget`
tokens whose approximate score (query against the key's codeword) is highest; the rest of the cache is not read.

Per kv head g with query heads h in its group, keys k_j before RoPE, codebook c_1..c_S and metric M_g:

    windowed RoPE       q~_h   = RoPE(q_h, w)                 the query rotated at a fixed relative position w
    query-aware metric  M_g    = Q~^T Q~ / rms(Q~^T Q~) + eps I     Q~: the group's rotated calibration queries
    codebook            c      = argmin sum_j min_s (k_j - c_s)^T M_g (k_j - c_s)       (k-means in the M_g metric)
    codes               id_j   = argmin_s (k_j - c_s)^T M_g (k_j - c_s)
    approximate score   s~_hj  = q~_h . c_{id_j}
    retrieval (L = 1)   R_h    = top_budget { s~_hj : j not a sink (p_j >= sinks), t - p_j >= local_window }
    visible             j <= t and (j in union_{h in g} R_h  or  t - p_j < local_window  or  p_j < sinks)

then exact softmax attention with true RoPE over the visible entries. The metric makes the quantization error
(k - c)^T M (k - c) = E_q[(q~ . (k - c))^2] (up to the normalisation) the error of the approximate score itself:
the paper's query-aware objective; under windowed RoPE a key's approximate score needs no position, so one codeword
score per query and codebook entry serves every key.

Official code (github.com/junhuihe-hjh/A2ATS, vqkey/models/llama_masked.py `llama_attention_forward` and
vqkey/notebooks/construct_codebooks.py): the metric is the Cholesky factor L of H = Q~^T Q~ / rms + eps I (eps 1e-6),
k-means++ runs on the keys mapped by L (||(k - c) L||^2 = (k - c)^T H (k - c), so its centroids are the keys' means,
as here), the approximate scores are q~ . (c L^-1); a decode step (q_len 1) masks the window and sinks out of the
scores, takes the top-k per query head, unites them over the kv group and adds the window and the sinks back; a
prefill (q_len > 1) is exact attention. Defaults as there: w = 2048, window 64, sinks 8.

Differences: (1) the official codebooks and metric are calibrated offline, once per model, on 64K tokens of a
corpus (4096 codewords per kv head); here they are calibrated per sequence, on the keys and queries of the first
decode call on the empty cache (the prompt), so a checkpoint needs no extra artefact; later keys are coded against
that fixed codebook, as the official code codes every key against its fixed one. (2) k-means starts from evenly
spaced prompt keys and runs `kmeans_iters` Lloyd steps instead of k-means++ seeding and convergence. (3) `budget` is
a count of retrieved tokens (the official `topk` is a fraction of the current length). (4) The full cache stays in
the layer's memory (the paper offloads it to host memory and moves only the retrieved entries): the cache bytes do
not shrink, the entries read per decoded token do (window + sinks + budget per query head instead of t).

Storage (the cache protocol, attn.core.cache): a dense KVCache of keys before RoPE [B, T, KVH, D] and values
[B, T, KVH, Dv] over the creating call's length T, with side state "a2ats_codes" int32 [B, T, KVH],
"a2ats_codebook" float32 [B, KVH, S, D] and "a2ats_metric" float32 [B, KVH, D, D]. budget >= T, or a window
covering every position, gives causal softmax attention. Time per decoded token: O(S H D) codeword scores,
O(T) gathers and a top-k, O((window + sinks + budget) H D) exact attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import non_negative_int, positive_int
from attn.kv.policy_layer import PolicyAttention
from attn.kv.score_eviction import top_k_mask
from attn.registry import register

Array = jax.Array

A2ATS_STATE = ("a2ats_codes", "a2ats_codebook", "a2ats_metric")
METRIC_EPS = 1e-6  # the official construct_codebooks.py's epsilon on the normalised query moment
A2ATS_POSITIONS = ("rope", "none")


def query_metric(rotated_queries: Array, kv_heads: int, eps: float = METRIC_EPS) -> Array:
    """The query-aware metric float32 [B, KVH, D, D] from the rotated queries [B, L, H, D]: per kv head, the second
    moment Q^T Q of its group's queries (all L tokens and group heads), divided by the root mean square of its
    entries, plus eps I."""
    batch, length, heads, dim = rotated_queries.shape
    q = rotated_queries.astype(jnp.float32).reshape(batch, length, kv_heads, heads // kv_heads, dim)
    moment = jnp.einsum("blgnd,blgne->bgde", q, q)
    rms = jnp.sqrt(jnp.mean(moment**2, axis=(-2, -1), keepdims=True))
    moment = moment / jnp.where(rms > 0, rms, 1.0)
    return moment + eps * jnp.eye(dim, dtype=jnp.float32)


def metric_distances(keys: Array, codebook: Array, metric: Array) -> Array:
    """float32 [B, KVH, N, S]: (k_n - c_s)^T M (k_n - c_s) for keys [B, N, KVH, D], codebook [B, KVH, S, D] and
    metric [B, KVH, D, D]. Expanded as k^T M k - 2 k^T M c + c^T M c (M symmetrised, which leaves every quadratic
    form unchanged), so no [B, KVH, N, S, D] difference is materialised: a 2K prompt with a thousand codewords would
    need tens of GB."""
    keys = keys.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, KVH, N, D]
    symmetric = 0.5 * (metric + jnp.swapaxes(metric, -1, -2))
    mapped_keys = jnp.einsum("bgnd,bgde->bgne", keys, symmetric)
    mapped_codes = jnp.einsum("bgsd,bgde->bgse", codebook, symmetric)
    key_norms = jnp.sum(mapped_keys * keys, axis=-1)  # [B, KVH, N]
    code_norms = jnp.sum(mapped_codes * codebook, axis=-1)  # [B, KVH, S]
    cross = jnp.einsum("bgne,bgse->bgns", mapped_keys, codebook)
    return key_norms[..., None] - 2.0 * cross + code_norms[:, :, None, :]


def assign_codes(keys: Array, codebook: Array, metric: Array) -> Array:
    """int32 [B, N, KVH]: the nearest codeword (in the metric) of every key [B, N, KVH, D]; ties: the lower one."""
    return jnp.argmin(metric_distances(keys, codebook, metric), axis=-1).astype(jnp.int32).transpose(0, 2, 1)


def fit_codebook(keys: Array, metric: Array, size: int, iters: int) -> Array:
    """k-means in the metric: codebook float32 [B, KVH, size, D] for keys [B, N, KVH, D] and metric [B, KVH, D, D],
    started from the keys at n = floor(s N / size) (evenly spaced), `iters` Lloyd steps (assign by the metric; every
    codeword becomes the mean of its keys, an empty one stays)."""
    keys = keys.astype(jnp.float32)
    start = (jnp.arange(size) * keys.shape[1]) // size
    codebook = keys[:, start].transpose(0, 2, 1, 3)  # [B, KVH, S, D]

    def lloyd(_: int, codebook: Array) -> Array:
        codes = jnp.argmin(metric_distances(keys, codebook, metric), axis=-1)  # [B, KVH, N]
        onehot = jax.nn.one_hot(codes, size, dtype=jnp.float32)  # [B, KVH, N, S]
        counts = jnp.sum(onehot, axis=2)  # [B, KVH, S]
        sums = jnp.einsum("bgns,bngd->bgsd", onehot, keys)
        means = sums / jnp.maximum(counts, 1.0)[..., None]
        return jnp.where(counts[..., None] > 0, means, codebook)

    return jax.lax.fori_loop(0, iters, lloyd, codebook)


def retrieval_visible(
    approx: Array, positions: Array, valid: Array, q_positions: Array, *, budget: int, local_window: int, sinks: int
) -> Array:
    """(chosen bool [B, H, Tq, N], local bool [B, Tq, N]) for approximate scores approx float32 [B, H, Tq, N] per
    query head, entries at positions int32 [N] (valid bool [N]) and queries at q_positions int32 [B, Tq]: per query
    head the `budget` highest-scoring valid entries not after the query and outside the window and the sinks; local:
    the window (t - p < local_window) and the sinks (p < sinks), not after the query."""
    batch, heads, length, entries = approx.shape
    distance = q_positions[:, :, None] - positions[None, None, :]  # [B, Tq, N]
    causal = valid[None, None, :] & (distance >= 0)
    local = causal & ((distance < local_window) | (positions[None, None, :] < sinks))
    eligible = jnp.broadcast_to((causal & ~local)[:, None], approx.shape)
    flat = (batch, heads * length, entries)  # top_k_mask ranks along the last axis of [B, rows, N]
    chosen = top_k_mask(approx.reshape(flat), eligible.reshape(flat), min(budget, entries))
    return chosen.reshape(approx.shape), local


@register(
    "a2ats",
    family="kv",
    paper=(
        "A²ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding and Query-Aware Vector "
        "Quantization"
    ),
    catalog=167,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary=(
        "decode reads the top-budget keys by query-aware VQ score (windowed RoPE, codebook in the query metric) "
        "+ a local window + sinks"
    ),
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "position": "rope (windowed RoPE for the approximate scores) or none",
        "window": "must be None (the retrieval decides what is seen)",
        "cache_bits": "must be None (the cache stores exact keys and values; the codes serve the scores)",
        "budget": "tokens retrieved per query head and decoded token by approximate score (the official topk)",
        "local_window": "latest tokens always read exactly (wrope_local_window)",
        "sinks": "first tokens always read (attention_sink)",
        "relative_position": "w: the fixed position the query is rotated at for the approximate scores",
        "codebook_size": "codewords per (sequence, kv head), fitted on the prompt",
        "kmeans_iters": "Lloyd steps of the codebook fit",
    },
    validators={
        **SOFTMAX_VALIDATORS,
        "budget": positive_int,
        "local_window": positive_int,
        "sinks": non_negative_int,
        "relative_position": non_negative_int,
        "codebook_size": positive_int,
        "kmeans_iters": positive_int,
    },
    fidelity="official-code",
    reference=(
        "arXiv 2502.12665 (abstract and Sec. 1: windowed RoPE, query-aware VQ of keys, top-K retrieval); "
        "github.com/junhuihe-hjh/A2ATS vqkey/models/llama_masked.py (llama_attention_forward, VQCache) and "
        "vqkey/notebooks/construct_codebooks.py (Cholesky metric of rotated queries, k-means on transformed keys)"
    ),
    has_attention_weights=True,
)
class A2ATSAttention(PolicyAttention):
    """A²ATS: softmax attention whose decode steps read the local window, the sinks and the top-`budget` keys by
    query-aware vector-quantized score (see the module docstring). x [B, T, E] -> [B, T, E]; cache [B, T, KVH, D]
    plus codes [B, T, KVH], codebook [B, KVH, S, D] and metric [B, KVH, D, D]."""

    budget: int = 256
    local_window: int = 64
    sinks: int = 8
    relative_position: int = 2048
    codebook_size: int = 64
    kmeans_iters: int = 8

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if self.cache_bits is not None:
            raise ValueError(f"cache_bits={self.cache_bits!r} must be None for a2ats (its keys are vector-quantized)")
        if self.position not in A2ATS_POSITIONS:
            raise ValueError(
                f"position={self.position!r} must be one of {A2ATS_POSITIONS} for a2ats (the approximate scores "
                "use windowed RoPE, which a bias position has no form of)"
            )

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The creating decode call allocates a dense cache of this call's length and zero codes, codebook and
        metric, then runs the causal forward (Flax convention); later decode calls take positions from the index."""
        if call.decode and cache_lib.load(self) is None:
            batch, length, kv_heads, dim = k.shape
            cache_lib.store(self, cache_lib.empty_kv(k, v, length))
            state = {
                "a2ats_codes": jnp.zeros((batch, length, kv_heads), jnp.int32),
                "a2ats_codebook": jnp.zeros((batch, kv_heads, self.codebook_size, dim), jnp.float32),
                "a2ats_metric": jnp.zeros((batch, kv_heads, dim, dim), jnp.float32),
            }
            cache_lib.store_state(self, cache_lib.RecurrentState(state=state, index=None))
            return super().prepare(q, k, v, call.replace(decode=False))
        return super().prepare(q, k, v, call)

    def rotated_queries(self, q: Array) -> Array:
        """q [B, L, H, D] rotated at the fixed position `relative_position` (windowed RoPE; unchanged without
        RoPE)."""
        if self.position != "rope":
            return q
        fixed = jnp.full(q.shape[:2], self.relative_position, jnp.int32)
        return self.rotate(q, q[:, :, : self.kv_heads], fixed)[0]

    def policy_attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """A decode call: q [B, L, H, D], this chunk's k, v [B, L, KVH, D] (before RoPE) -> [B, L, H, Dv]. Writes the
        chunk and its codes (the first call on the empty cache fits the codebook and metric on it first), then
        attends: exactly over every earlier entry for a chunk (L > 1, a prefill), through retrieval for one token."""
        cache = cache_lib.load(self)
        side = cache_lib.load_state(self, A2ATS_STATE, shared_index=True).state
        batch, length = q.shape[:2]
        capacity = cache.capacity
        index = cache.index
        rotated = self.rotated_queries(q)

        def calibrate(_: None) -> tuple[Array, Array]:
            metric = query_metric(rotated, self.kv_heads)
            return fit_codebook(k, metric, self.codebook_size, self.kmeans_iters), metric

        codebook, metric = jax.lax.cond(
            index == 0, calibrate, lambda _: (side["a2ats_codebook"], side["a2ats_metric"]), None
        )
        start = (0, index, 0, 0)
        keys = jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), start)
        values = jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), start)
        codes = jax.lax.dynamic_update_slice(side["a2ats_codes"], assign_codes(k, codebook, metric), (0, index, 0))
        cache_lib.store(self, cache.replace(keys=keys, values=values, index=index + length))
        state = {"a2ats_codes": codes, "a2ats_codebook": codebook, "a2ats_metric": metric}
        cache_lib.store_state(self, cache_lib.RecurrentState(state=state, index=None))

        q_pos = call.q_positions
        slots = jnp.arange(capacity, dtype=jnp.int32)
        valid = slots < index + length
        visible = valid[None, None, :] & (slots[None, None, :] <= q_pos[:, :, None])  # [B, L, N]
        visible = jnp.broadcast_to(visible[:, None], (batch, self.num_heads, length, capacity))
        if length == 1:  # a decode step retrieves; a chunk (prefill) attends exactly, as the official code
            approx = self.approximate_scores(rotated, codebook, codes)
            chosen, local = retrieval_visible(
                approx,
                slots,
                valid,
                q_pos,
                budget=self.budget,
                local_window=self.local_window,
                sinks=self.sinks,
            )
            group = self.num_heads // self.kv_heads
            united = jnp.any(chosen.reshape(batch, self.kv_heads, group, length, capacity), axis=2)
            visible = cache_lib.head_mask(united, self.num_heads) | local[:, None]
        positions = jnp.broadcast_to(slots, (batch, capacity))
        if self.position == "rope":
            q, keys = self.rotate(q, keys, q_pos, positions)
        call = call.replace(mask=Mask(dense=visible), bias=None, kv_positions=positions, q_offset=index)
        return SoftmaxAttentionLayer.attend(self, q, keys, values.astype(v.dtype), call)

    def approximate_scores(self, rotated: Array, codebook: Array, codes: Array) -> Array:
        """float32 [B, H, L, N]: rotated queries [B, L, H, D] against the codeword of every entry (codebook
        [B, KVH, S, D], codes int32 [B, N, KVH]); query head h reads kv head h // (H / KVH)."""
        group = self.num_heads // self.kv_heads
        per_code = jnp.einsum("blhd,bhsd->bhls", rotated.astype(jnp.float32), jnp.repeat(codebook, group, axis=1))
        entry_codes = jnp.repeat(codes.transpose(0, 2, 1), group, axis=1)  # [B, H, N]
        return jnp.take_along_axis(per_code, entry_codes[:, :, None, :], axis=-1)
