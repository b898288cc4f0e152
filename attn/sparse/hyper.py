"""`hyper`: HyperAttention, near-linear approximate attention: sortLSH finds the large entries (exact attention on the
diagonal blocks of the hash-sorted matrix, run on the block-sparse core), uniformly sampled key columns estimate the
rest, and causal masking recurses on halves.

Paper: "HyperAttention: Long-context Attention in Near-Linear Time" (Han, Jayaram, Karbasi, Mirrokni, Woodruff,
Zandieh, ICLR 2024, arXiv 2310.05869; code github.com/insu-han/hyper-attention, hyper_attn/hyper_attn.py and
hyper_attn/utils.py, checked against the copy of those files in the public code index). Training-free; no
parameters beyond the softmax layer's. Per (batch row, head), n queries and n keys, scale s:

    hash(x)     = gray( sum_i [x . p_i > 0] 2^i ),  gray(c) = c XOR (c >> 1)    angular LSH, p_1..p_r ~ N(0, I_D)
    pi_q, pi_k  = stable argsort of hash(q_t), hash(k_j)                     sortLSH: near pairs land in one block
    block part  = softmax attention of sorted query block b over sorted key block b     (blocks of block_size)
                  -> (o_blk, lse_blk); `block_sparse_attention` on the sorted q, k, v with the diagonal as indices
    sample part = m = sample_size key positions u_1..u_m ~ U{0..n-1} (in sorted order, with replacement), each
                  masked for the queries whose sorted block holds it; o_res = softmax over the samples,
                  lse_res = logsumexp_l(s q . k_{u_l}) + log(n / m)                  (unbiased column estimate)
    unmasked    = merge(o_blk, lse_blk; o_res, lse_res)  (lse merge), rows put back in query order

    causal(q, k, v) = exact causal softmax                              when n <= min_seq_len
                    = [ causal(upper half) ;  merge(causal(lower half), unmasked(lower q, upper k, v)) ]  otherwise
    (odd n: one zero query/key/value row appended, then dropped, as in the official code)

`unmasked` (a non-causal call, or the lower-left block of a level) is exact softmax when its n < min_seq_len (the
official thresholds: < for unmasked, <= for causal).
Cost: O(n block_size D + n m D + n r D) per level; the causal recursion adds a log(n / min_seq_len) factor.

Exact reductions: min_seq_len >= n, or block_size >= the length a level works on (one block, and the official code
then skips sampling), give softmax exactly (causal or not): tests/sparse/test_hyper.py checks both against `softmax`.

Randomness: the LSH directions and the samples come from the "hyper" rng stream when the caller passes one
(`layer.apply(..., rngs={"hyper": key})`: fresh samples per call, as the official torch.randint), else from the
fixed `seed` option (deterministic, jit-stable). Directions are drawn once per call from the key and shared by every
level of the recursion (the official module draws them once at construction).

Deviations (fidelity "official-code"): padding of a partial last block gets no weight (the core masks it; the
official code attends zero-padded keys with logit 0); GQA repeats each kv head for its query heads (the official
code is multi-head); the diagonal halves of the recursion are stacked on the batch axis instead of the heads axis
(the same computation, different random draws). No attention dropout (the official has none: dropout_rate has no
effect); no captures of attention weights; decoding is not supported (a prefill / forward method).
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from attn.core.block_sparse import block_sparse_attention
from attn.core.layer import AttentionCall
from attn.core.lse_merge import merge
from attn.core.validation import check_qkv, int_at_least, positive_int
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention
from attn.sparse.selector_layer import check_causal_rope_only

Array = jax.Array

_NON_NEGATIVE_INT = int_at_least(0)


def angular_lsh_hash(x: Array, projections: Array) -> Array:
    """x [B, T, H, D], projections [D, r] -> int32 [B, H, T]: the Gray code of the sign pattern of x . p_i (adjacent
    buckets differ in one hyperplane)."""
    bits = jnp.einsum("bthd,dr->bhtr", x, projections.astype(x.dtype)) > 0
    code = jnp.sum(bits.astype(jnp.int32) << jnp.arange(projections.shape[-1], dtype=jnp.int32), axis=-1)
    return code ^ (code >> 1)


def _take_rows(x: Array, order: Array) -> Array:
    """x [B, T, H, D] at order int [B, H, S] (per head) -> [B, S, H, D]."""
    return jnp.take_along_axis(x, jnp.swapaxes(order, 1, 2)[..., None], axis=1)


def hyper_unmasked(
    q: Array,
    k: Array,
    v: Array,
    *,
    q_order: Array,
    k_order: Array,
    samples: Array | None,
    block_size: int,
    scale: float,
) -> tuple[Array, Array]:
    """One unmasked HyperAttention pass with given sort orders and samples (see the module docstring).

    Args:
      q: [B, n, H, D]; k: [B, n, H, D]; v: [B, n, H, Dv] (heads already matched).
      q_order, k_order: int [B, H, n], the permutations sorting queries and keys by hash.
      samples: int [B, H, m] positions in the sorted key order, or None (no sample part).
      block_size: positive int; scale: the logit scale.
    Returns:
      (out [B, n, H, Dv] float32, lse float32 [B, H, n]) in the original query order.
    """
    n = q.shape[1]
    q_sorted, k_sorted, v_sorted = _take_rows(q, q_order), _take_rows(k, k_order), _take_rows(v, k_order)
    n_blocks = -(-n // block_size)
    diagonal = jnp.arange(n_blocks, dtype=jnp.int32).reshape(1, 1, n_blocks, 1)
    out, aux = block_sparse_attention(
        q_sorted, k_sorted, v_sorted, block_indices=diagonal, block_size=block_size, scale=scale, return_lse=True
    )
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    out, lse = jnp.swapaxes(out.astype(dtype), 1, 2), aux["lse"].astype(dtype)  # [B, H, n, Dv], [B, H, n]
    if samples is not None and n > block_size:
        m = samples.shape[-1]
        k_sub = _take_rows(k_sorted, samples).astype(dtype)  # [B, m, H, D]
        v_sub = _take_rows(v_sorted, samples).astype(dtype)
        logits = scale * jnp.einsum("bihd,blhd->bhil", q_sorted.astype(dtype), k_sub)
        same_block = (jnp.arange(n)[:, None] // block_size) == (samples[:, :, None, :] // block_size)
        logits = jnp.where(same_block, -jnp.inf, logits)
        top = jnp.max(logits, axis=-1, keepdims=True)
        shift = jnp.where(jnp.isfinite(top), top, 0.0)
        weights = jnp.exp(logits - shift)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        safe = jnp.where(total > 0, total, 1.0)
        out_res = jnp.einsum("bhil,blhd->bhid", weights / safe, v_sub)
        lse_res = jnp.where(total[..., 0] > 0, shift[..., 0] + jnp.log(safe[..., 0]), -jnp.inf) + math.log(n / m)
        out, lse = merge(out, lse, out_res, lse_res)
    inverse = jnp.argsort(q_order, axis=-1)
    out = jnp.take_along_axis(out, inverse[..., None], axis=2)
    return jnp.swapaxes(out, 1, 2), jnp.take_along_axis(lse, inverse, axis=-1)


def hyper_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    key: Array,
    block_size: int = 256,
    sample_size: int = 256,
    num_projs: int = 7,
    min_seq_len: int = 4096,
    causal: bool = False,
    scale: float | None = None,
) -> Array:
    """HyperAttention (see the module docstring).

    Args:
      q: [B, n, H, D]; k: [B, n, KVH, D]; v: [B, n, KVH, Dv] (self-attention lengths; H a multiple of KVH).
      key: a jax PRNG key for the LSH directions and the samples.
      block_size: positive int, the sortLSH block length. sample_size: int >= 0, sampled key columns per level.
      num_projs: positive int, LSH hyperplanes. min_seq_len: int >= 0, lengths at or below it run exactly.
      causal: key j visible to query i only if j <= i. scale: logit scale, default 1/sqrt(D).
    Returns:
      [B, n, H, Dv] in q.dtype.
    """
    heads, kv_heads = check_qkv(q, k, v)
    positive_int("block_size", block_size)
    positive_int("num_projs", num_projs)
    _NON_NEGATIVE_INT("sample_size", sample_size)
    _NON_NEGATIVE_INT("min_seq_len", min_seq_len)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"hyper attention needs as many queries as keys: q {q.shape}, k {k.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
    projections = jax.random.normal(jax.random.fold_in(key, 0), (q.shape[-1], num_projs), jnp.float32)
    settings = dict(
        projections=projections, block_size=block_size, sample_size=sample_size, scale=scale, min_seq_len=min_seq_len
    )
    run = _causal if causal else _unmasked
    out, _ = run(q, k, v, jax.random.fold_in(key, 1), **settings)
    return out.astype(q.dtype)


def _exact(q: Array, k: Array, v: Array, *, causal: bool, scale: float) -> tuple[Array, Array]:
    """Exact softmax attention with its lse: the block-sparse core with one block covering everything."""
    one = jnp.zeros((1, 1, 1, 1), jnp.int32)
    out, aux = block_sparse_attention(
        q, k, v, block_indices=one, block_size=q.shape[1], causal=causal, scale=scale, return_lse=True
    )
    return out.astype(jnp.promote_types(q.dtype, jnp.float32)), aux["lse"]


def _unmasked(q, k, v, key, *, projections, block_size, sample_size, scale, min_seq_len):
    """(out float [B, n, H, Dv], lse [B, H, n]) without a mask: exact below min_seq_len (the official check)."""
    if q.shape[1] < min_seq_len:
        return _exact(q, k, v, causal=False, scale=scale)
    q_order = jnp.argsort(angular_lsh_hash(q, projections), axis=-1, stable=True)
    k_order = jnp.argsort(angular_lsh_hash(k, projections), axis=-1, stable=True)
    samples = None
    if sample_size > 0:
        samples = jax.random.randint(key, (q.shape[0], q.shape[2], sample_size), 0, k.shape[1], dtype=jnp.int32)
    return hyper_unmasked(
        q, k, v, q_order=q_order, k_order=k_order, samples=samples, block_size=block_size, scale=scale
    )


def _causal(q, k, v, key, *, min_seq_len, projections, block_size, sample_size, scale):
    """(out float [B, n, H, Dv], lse [B, H, n]) of the causal recursion."""
    batch, n = q.shape[0], q.shape[1]
    if n <= min_seq_len:
        return _exact(q, k, v, causal=True, scale=scale)
    if n % 2:
        pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))  # noqa: E731
        q, k, v = pad(q), pad(k), pad(v)
    half = q.shape[1] // 2
    stack = lambda x: jnp.concatenate([x[:, :half], x[:, half:]], axis=0)  # noqa: E731  halves on the batch axis
    settings = dict(
        projections=projections, block_size=block_size, sample_size=sample_size, scale=scale, min_seq_len=min_seq_len
    )
    out_bd, lse_bd = _causal(stack(q), stack(k), stack(v), jax.random.fold_in(key, 0), **settings)
    out_low, lse_low = _unmasked(q[:, half:], k[:, :half], v[:, :half], jax.random.fold_in(key, 1), **settings)
    down, lse_down = merge(jnp.swapaxes(out_bd[batch:], 1, 2), lse_bd[batch:], jnp.swapaxes(out_low, 1, 2), lse_low)
    out = jnp.concatenate([out_bd[:batch], jnp.swapaxes(down, 1, 2).astype(out_bd.dtype)], axis=1)[:, :n]
    lse = jnp.concatenate([lse_bd[:batch], lse_down.astype(lse_bd.dtype)], axis=-1)[..., :n]
    return out, lse


@register(
    "hyper",
    family="sparse",
    paper="HyperAttention: Long-context Attention in Near-Linear Time",
    catalog=119,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="approximate attention: angular-LSH sort, exact attention on the sorted diagonal blocks (block-sparse "
    "core) plus uniformly sampled key columns, lse-merged; causal masking by recursion on halves",
    fidelity="official-code",
    reference="arXiv 2310.05869 (Alg. 1-4: sortLSH, sampled residual, causal recursion) and github.com/insu-han/"
    "hyper-attention hyper_attn/hyper_attn.py (forward: min_seq_len exact case, halves recursion, "
    "forward_no_causal_mask: stable sort by hash, diagonal blocks, uniform samples masked in their block, "
    "lse + log(n/m), add_self_attentions) and utils.py (AngularLSH with Gray-code buckets)",
    option_docs={
        "block_size": "sortLSH block length (official 256)",
        "sample_size": "uniformly sampled key columns per level, 0 = none (official 256)",
        "num_projs": "angular LSH hyperplanes (official 7)",
        "min_seq_len": "lengths at or below it are computed exactly (official 4096)",
        "seed": "PRNG seed of the LSH directions and samples when no 'hyper' rng is passed",
    },
    validators={
        "block_size": positive_int,
        "sample_size": _NON_NEGATIVE_INT,
        "num_projs": positive_int,
        "min_seq_len": _NON_NEGATIVE_INT,
        "seed": _NON_NEGATIVE_INT,
    },
)
class HyperAttentionLayer(MultiHeadAttention):
    """HyperAttention: approximate softmax attention in near-linear time. x [B, T, E] -> [B, T, E]."""

    block_size: int = 256
    sample_size: int = 256
    num_projs: int = 7
    min_seq_len: int = 4096
    seed: int = 0

    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        name = self.registry_name or type(self).__name__
        if call.decode:
            raise ValueError(f"decode=True is not supported by {name}: it approximates a forward (prefill) pass")
        if call.cross:
            raise ValueError(f"{name} is self-attention (as many queries as keys); got a context")
        check_causal_rope_only(self, call, name)

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, Dv]."""
        key = self.make_rng("hyper") if self.has_rng("hyper") else jax.random.key(self.seed)
        return hyper_attention(
            q,
            k,
            v,
            key=key,
            block_size=self.block_size,
            sample_size=self.sample_size,
            num_projs=self.num_projs,
            min_seq_len=self.min_seq_len,
            causal=call.mask is not None and call.mask.causal,
            scale=self.scale,
        )
