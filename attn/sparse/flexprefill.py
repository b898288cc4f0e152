"""`flexprefill`: FlexPrefill, a per-head choice between a query-aware and a vertical-slash block pattern, each cut to
the fewest blocks whose attention mass reaches gamma; then exact block-sparse causal softmax.

Paper: "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference" (Lai et al.,
ICLR 2025; code github.com/bytedance/FlexPrefill, flex_prefill/ops/flex_prefill_attention.py `get_active_blocks`).
Training-free: no parameters beyond the softmax layer's. Causal prefill only (the paper's setting).

Per (batch row, query head), with n = min(block_size, Tq) last queries q^_i at positions p_i (the last query block),
scale s = 1/sqrt(D) and key blocks c of block_size keys:

    A_ij      = softmax_j(s q^_i . k_j, j <= p_i)                          true attention of the last query block
    a_v[j]    = mean_i A_ij                                                vertical (per key)
    a_s[d]    = mean_i A_{i, p_i - d}                                      slash (per distance d = p_i - j >= 0)
    a~[c]     = sum_{j in c} a_v[j]                                        true block distribution
    a^[c]     = softmax_c(s mean_i(q^_i) . mean_{j in c}(k_j))             estimated block distribution (pooled q, k)
    d_JS      = sqrt(JSD(a^ || a~)),  JSD(p || q) = (KL(p || m) + KL(q || m)) / 2,  m = (p + q) / 2   (natural log)

  vertical-slash pattern (every head):
    n_v = clip(N_gamma(a_v) // block_size + 1, min_budget, max_budget),  n_s likewise from a_s, where N_gamma(x) =
          the fewest largest entries of x whose sum reaches gamma (the official code's token count -> block count)
    keep the n_v key blocks with the largest a~ (block 0 always) for every query block, and the n_s block diagonals
    with the largest slash mass sum_{d in [t bs, (t+1) bs)} a_s[d] (diagonal t = 0 always): query block r gets key
    block R_r - t, R_r the block of its first query position
  query-aware pattern (heads with d_JS < tau; their n_v = n_s = min_budget):
    P_rc = softmax_c(s qbar_r . kbar_c, c visible from r)    (qbar, kbar: block means of q and k)
    additionally keep the fewest entries (r, c) of P, largest first, whose sum reaches gamma * num_q_blocks

The union is intersected with block-level causal visibility (key block c visible to query block r when c *
block_size <= last position of r) and returned as bool [B, H, num_q_blocks, num_k_blocks]
(`flexprefill_block_mask`) or as indices (`flexprefill_block_indices`, via `block_mask_to_indices`).
`block_sparse_attention` then applies the token-level causal mask inside diagonal blocks.

Deviations from the official code, all at ties or the budget edge: N_gamma counts the entries up to the one that
reaches gamma (the official counts cumsum <= gamma, plus one: equal unless a partial sum equals gamma exactly); the
query-aware set keeps the fewest entries reaching gamma * num_q_blocks (the official keeps those with cumsum <=
gamma * num_blocks, one fewer, plus block (0, 0)); slash blocks are block diagonals t (the official pools distances
counted from the sequence end, the same when block_size divides Tq); budgets are in blocks.

Reductions: gamma = 1 keeps every visible block in query-aware heads; min_budget >= num_k_blocks keeps every visible
block in every head, so the layer equals causal `softmax` exactly (tests/sparse/test_flexprefill.py).

Causality: the pattern of every query block is chosen from the last query block, so an earlier query's kept blocks
depend on later tokens (by design: a prefill method). The attention itself is causal at token level. The
selection is discrete: no gradient through it; o is differentiable in q, k, v through the kept blocks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from attn.core.block_pooling import pool_blocks
from attn.core.block_sparse import block_mask_to_indices
from attn.core.validation import check_qkv, in_range, non_negative, optional, positive_int
from attn.registry import register
from attn.sparse.selector_layer import BlockSelectorLayer

Array = jax.Array

_GAMMA = in_range(0, 1, low_inclusive=False)
_OPTIONAL_POSITIVE_INT = optional(positive_int)


def _fewest_reaching(values: Array, target: Array | float) -> Array:
    """int [...]: how many of the largest entries of values [..., N] it takes for their sum to reach target."""
    ordered = -jnp.sort(-values, axis=-1)
    before = jnp.cumsum(ordered, axis=-1) - ordered
    return jnp.sum(before < target, axis=-1)


def _top_ranked(scores: Array, count: Array) -> Array:
    """bool [..., N]: the `count` [...] largest entries of scores (ties: the lower index)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return rank < count[..., None]


def flexprefill_selection(
    q: Array,
    k: Array,
    *,
    block_size: int,
    gamma: float = 0.9,
    tau: float = 0.1,
    min_budget: int = 1,
    max_budget: int | None = None,
    q_offset: Any = 0,
    scale: float | None = None,
) -> tuple[Array, Array]:
    """FlexPrefill's causal block selection (see the module docstring).

    Args:
      q: [B, Tq, H, D] at positions q_offset..q_offset+Tq-1; k: [B, Tk, KVH, D] (H a multiple of KVH).
      block_size: positive int, the query and key block length.
      gamma: cumulative attention to reach, in (0, 1].
      tau: threshold on sqrt(JSD) below which a head takes the query-aware pattern, >= 0 (0: never).
      min_budget / max_budget: bounds of the vertical and slash counts, in blocks (max_budget None: num_k_blocks).
      scale: logit scale, default 1/sqrt(D).
    Returns:
      (block_mask bool [B, H, ceil(Tq / block_size), ceil(Tk / block_size)], query_aware bool [B, H]).
    """
    heads, kv_heads = check_qkv(q, k, k)
    positive_int("block_size", block_size)
    _GAMMA("gamma", gamma)
    non_negative("tau", tau)
    positive_int("min_budget", min_budget)
    _OPTIONAL_POSITIVE_INT("max_budget", max_budget)
    if max_budget is not None and max_budget < min_budget:
        raise ValueError(f"max_budget={max_budget!r} must be None or >= min_budget={min_budget!r}")
    batch, q_len, _, head_dim = q.shape
    kv_len, bs = k.shape[1], int(block_size)
    n_q, n_k = -(-q_len // bs), -(-kv_len // bs)
    dtype = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), jnp.float32)
    scale = head_dim**-0.5 if scale is None else scale
    offset = jnp.asarray(q_offset, jnp.int32)
    q = q.astype(dtype)
    k = jnp.repeat(k.astype(dtype), heads // kv_heads, axis=2)  # [B, Tk, H, D]: each query head's kv head

    # true attention of the last query block: A [B, H, n, Tk]
    n = min(bs, q_len)
    last_q = q[:, q_len - n :]
    positions = offset + q_len - n + jnp.arange(n)
    keys = jnp.arange(kv_len)
    logits = scale * jnp.einsum("bihd,bjhd->bhij", last_q, k)
    attention = jax.nn.softmax(jnp.where(keys <= positions[:, None], logits, -jnp.inf), axis=-1)
    vertical = jnp.mean(attention, axis=-2)  # [B, H, Tk]
    source = positions[:, None] - keys  # key of distance d for query i: p_i - d
    on_diagonal = (source >= 0) & (source < kv_len)
    slash = jnp.take_along_axis(attention, jnp.clip(source, 0, kv_len - 1)[None, None], axis=-1)
    slash = jnp.mean(jnp.where(on_diagonal, slash, 0.0), axis=-2)  # [B, H, Tk] by distance
    true_blocks = pool_blocks(vertical, bs, "sum", axis=-1)  # [B, H, nk]

    # pattern: sqrt(JSD) between the pooled estimate and the true block distribution
    mean_k = pool_blocks(k, bs, "mean", axis=1).transpose(0, 2, 1, 3)  # [B, H, nk, D]
    estimate = jax.nn.softmax(scale * jnp.einsum("bhd,bhcd->bhc", jnp.mean(last_q, axis=1), mean_k), axis=-1)
    middle = (estimate + true_blocks) / 2
    kl = lambda p: jnp.sum(xlogy(p, p) - xlogy(p, middle), axis=-1)  # noqa: E731
    distance = jnp.sqrt(jnp.maximum((kl(estimate) + kl(true_blocks)) / 2, 0.0))
    query_aware = distance < tau  # [B, H]

    # vertical-slash budgets and blocks
    low, high = min(min_budget, n_k), n_k if max_budget is None else min(max_budget, n_k)
    n_vertical = jnp.where(query_aware, low, jnp.clip(_fewest_reaching(vertical, gamma) // bs + 1, low, high))
    n_slash = jnp.where(query_aware, low, jnp.clip(_fewest_reaching(slash, gamma) // bs + 1, low, high))
    keep_vertical = _top_ranked(true_blocks.at[..., 0].set(jnp.inf), n_vertical)  # [B, H, nk]
    slash_blocks = pool_blocks(slash, bs, "sum", axis=-1)  # [B, H, nk] by block diagonal
    keep_slash = _top_ranked(slash_blocks.at[..., 0].set(jnp.inf), n_slash)  # [B, H, nk]

    rows, cols = jnp.arange(n_q)[:, None], jnp.arange(n_k)[None, :]
    visible = cols * bs <= offset + (rows + 1) * bs - 1  # [nq, nk]
    diagonal = (offset + rows * bs) // bs - cols  # block diagonal of (r, c)
    on_slash = jnp.take_along_axis(keep_slash[:, :, None, :], jnp.clip(diagonal, 0, n_k - 1)[None, None], axis=-1) & (
        (diagonal >= 0) & (diagonal < n_k)
    )
    pattern = keep_vertical[:, :, None, :] | on_slash

    # query-aware blocks: the fewest entries of the pooled block attention reaching gamma * num_q_blocks
    mean_q = pool_blocks(q, bs, "mean", axis=1).transpose(0, 2, 1, 3)  # [B, H, nq, D]
    pooled = scale * jnp.einsum("bhrd,bhcd->bhrc", mean_q, mean_k)
    pooled = jax.nn.softmax(jnp.where(visible, pooled, -jnp.inf), axis=-1).reshape(batch, heads, n_q * n_k)
    if gamma >= 1:
        aware = jnp.broadcast_to(visible, (batch, heads, n_q, n_k))
    else:
        order = jnp.argsort(-pooled, axis=-1, stable=True)
        ordered = jnp.take_along_axis(pooled, order, axis=-1)
        before = jnp.cumsum(ordered, axis=-1) - ordered
        aware = jnp.take_along_axis(before, jnp.argsort(order, axis=-1), axis=-1) < gamma * n_q
        aware = aware.reshape(batch, heads, n_q, n_k)
    mask = visible & (pattern | (query_aware[..., None, None] & aware))
    return mask, query_aware


def flexprefill_block_mask(q: Array, k: Array, **options: Any) -> Array:
    """bool [B, H, ceil(Tq / block_size), ceil(Tk / block_size)]: `flexprefill_selection`'s block mask."""
    return flexprefill_selection(q, k, **options)[0]


def flexprefill_block_indices(q: Array, k: Array, **options: Any) -> Array:
    """int32 [B, H, ceil(Tq / block_size), max_selected]: the block mask as index lists (-1 padded; max_selected is
    the largest row count when the inputs are concrete, num_k_blocks under tracing)."""
    return block_mask_to_indices(flexprefill_block_mask(q, k, **options))


@register(
    "flexprefill",
    family="sparse",
    paper="FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference",
    catalog=100,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="causal prefill over per-head key blocks: query-aware or vertical-slash pattern by a JSD test on the "
    "last query block, cut to the fewest blocks reaching cumulative attention gamma",
    fidelity="official-code",
    reference="arXiv 2502.20766 (Sec. 3: query-aware pattern determination, cumulative-attention index selection) and "
    "github.com/bytedance/FlexPrefill "
    "flex_prefill/ops/flex_prefill_attention.py (get_active_blocks: pooled estimate, sqrt JSD < tau, score_cover_topk)",
    option_docs={
        "block_size": "tokens per query/key block (official default 128)",
        "gamma": "cumulative attention the kept blocks must reach, in (0, 1]",
        "tau": "sqrt(JSD) threshold: heads below it take the query-aware pattern (0 = always vertical-slash)",
        "min_budget": "fewest vertical and slash blocks per head (and their count in query-aware heads)",
        "max_budget": "most vertical and slash blocks per head (None = all)",
    },
    validators={
        "block_size": positive_int,
        "gamma": _GAMMA,
        "tau": non_negative,
        "min_budget": positive_int,
        "max_budget": _OPTIONAL_POSITIVE_INT,
    },
    has_attention_weights=True,
)
class FlexPrefillAttention(BlockSelectorLayer):
    """FlexPrefill: causal softmax over the key blocks of each head's context-adaptive pattern.
    x [B, T, E] -> [B, T, E] (causal self-attention: call with mask=attn.Mask(causal=True))."""

    block_size: int = 128
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1
    max_budget: int | None = None

    def select(self, q: Array, k: Array, *, causal: bool, q_offset: Any) -> Array:
        if not causal:
            raise ValueError(
                "flexprefill selects blocks for causal prefill (the paper's setting), got a mask without causal=True; "
                "call the layer with mask=attn.Mask(causal=True)"
            )
        return flexprefill_block_indices(
            q,
            k,
            block_size=self.block_size,
            gamma=self.gamma,
            tau=self.tau,
            min_budget=self.min_budget,
            max_budget=self.max_budget,
            q_offset=q_offset,
            scale=self.scale,
        )
