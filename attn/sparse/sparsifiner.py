"""`sparsifiner`: Sparsifiner, a learned low-rank connectivity predictor picks the top-k keys of every query
(instance-dependent unstructured sparse attention for vision transformers); then exact softmax over those keys on the
block-sparse core (token blocks: block_size 1).

Paper: "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers" (Wei, Duke,
Jiang, Aarabi, Taylor, Shkurti, CVPR 2023, arXiv 2303.13755; code github.com/lim142857/Sparsifiner
src/models/sparsifiner.py `MaskPredictor`, checked against a copy of that class in the public code index).
Per (batch row, query head h; kv head g), T tokens, head_dim D, c = max(D // reduce_c_factor, 1) channels,
n = max(T // reduce_n_factor, 1) basis rows, predictor scale s_p = num_heads^-1/2 (the official choice):

    q'_i    = q_i W_q + b_q,   k'_j = k_j W_k + b_k                          [c]     channel down-projection
    K_down  = sum_j P_jm k'_j                                                 [n, c]  token down-projection P [T, n]
    coef_i  = top_{basis_top_k}( softmax_m(s_p q'_i . K_down,m) )             [n]     (the others set to 0)
    basis   = threshold(|U^T|, 0.02)                                          [n, T]  U [T, n]; |u| <= 0.02 -> 0
    A~_i    = coef_i basis                                                    [T]     the approximate attention row
    keep_i  = the budget = ceil(keep_rate T) keys with the largest A~_ij (ties: the lower key id), among the visible
              ones (j <= i when causal); with cls_token, row 0 keeps every key (the official class-token row)
    o_i     = softmax_{j in keep_i}(s q_i . k_j) v_j                          the block-sparse core, block_size 1

W_q, W_k (shared by the heads, as the official Linear layers) and P, U are the predictor's parameters; P and U have
one row per token, so a layer is built for one sequence length (that of init), like the official num_tokens.
Training (distill=True): the predictor's reconstruction loss

    loss = mean_{b, h, i} sum_j (A~_ij - A_ij)^2,   A = softmax(s q k^T) (dense, held constant)

under "losses"/"sparsifiner_reconstruction" (the paper's attention reconstruction objective; the official training
code was not available here, so its exact weighting is not reproduced). The mask carries no gradient (the official
`attn_mask.detach_()`); the loss is what trains W_q, W_k, P, U.

Reduction: keep_rate = 1 keeps every visible key, so the layer equals `softmax` exactly (tests/sparse/
test_sparsifiner.py). Cost: the predictor is O(T n c + T n + T^2) for the top-k over A~ (as the official, which
materialises A~), the attention O(T budget D).

Deviations (fidelity "official-code"): the official coefficient top-k is fixed at 8 (basis_top_k here); the
official omits the class-token row from the predictor and keeps it dense (cls_token=True here; False, the default,
predicts every row); causal masking (restricting the top-k to visible keys) is an addition for sequence models.
Token pruning (the paper's combination with token sparsity) is not included. Decoding is not supported.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.validation import OptionValidator, check_qkv, choice, in_range, positive_int
from attn.registry import register
from attn.sparse.selector_layer import BlockSelectorLayer

Array = jax.Array

_KEEP_RATE = in_range(0.0, 1.0, low_inclusive=False)
BASIS_THRESHOLD = 2e-2  # the official nn.Threshold(2e-2, 0.) on |U|


def sparsifiner_approx_attention(
    q_low: Array, k_low: Array, token_down: Array, basis: Array, *, basis_top_k: int, scale: float
) -> Array:
    """The predictor's approximate attention A~, float [B, H, T, T].

    Args:
      q_low: [B, T, H, c], the channel-projected queries; k_low: [B, T, KVH, c], the channel-projected keys.
      token_down: P [T, n]; basis: [n, T] (already thresholded); basis_top_k: coefficients kept per row.
      scale: the predictor's logit scale.
    """
    heads, kv_heads = check_qkv(q_low, k_low, k_low)
    positive_int("basis_top_k", basis_top_k)
    k_down = jnp.einsum("bjgc,jm->bgmc", k_low, token_down)  # [B, KVH, n, c]
    k_down = jnp.repeat(k_down, heads // kv_heads, axis=1)
    coef = jax.nn.softmax(scale * jnp.einsum("bihc,bhmc->bhim", q_low, k_down), axis=-1)  # [B, H, T, n]
    kept = min(int(basis_top_k), coef.shape[-1])
    values, ids = jax.lax.top_k(coef, kept)
    sparse = jnp.sum(jax.nn.one_hot(ids, coef.shape[-1], dtype=coef.dtype) * values[..., None], axis=-2)
    return jnp.einsum("bhim,mj->bhij", sparse, basis.astype(coef.dtype))


def sparsifiner_indices(
    approx: Array, *, budget: int, causal: bool = False, q_offset: Any = 0, cls_token: bool = False
) -> Array:
    """approx A~ float [B, H, Tq, Tk] -> int32 [B, H, Tq, min(budget, Tk)] (or Tk wide with cls_token): the kept keys
    of each query, -1 padded where fewer are visible (ties: the lower key id)."""
    positive_int("budget", budget)
    q_len, kv_len = approx.shape[-2], approx.shape[-1]
    visible = jnp.ones((q_len, kv_len), bool)
    if causal:
        visible = jnp.arange(kv_len)[None, :] <= jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len)[:, None]
    scores = jnp.where(visible, approx, -jnp.inf)
    width = kv_len if cls_token else min(int(budget), kv_len)
    values, ids = jax.lax.top_k(scores, width)
    if cls_token:  # row 0 keeps every visible key; the others their top `budget`
        rank = jnp.arange(width)
        keep = (rank < budget) | (jnp.arange(q_len)[:, None] == 0)
        values = jnp.where(keep, values, -jnp.inf)
    return jnp.where(values > -jnp.inf, ids, -1).astype(jnp.int32)


def reconstruction_loss(approx: Array, q: Array, k: Array, *, scale: float, causal: bool) -> Array:
    """float32 scalar: mean over (b, h, i) of sum_j (A~_ij - A_ij)^2 against the dense softmax attention A of
    q [B, T, H, D] over k [B, T, KVH, D] (held constant)."""
    heads, kv_heads = check_qkv(q, k, k)
    k = jnp.repeat(k.astype(jnp.float32), heads // kv_heads, axis=2)
    logits = scale * jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k)
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, -jnp.inf)
    target = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
    return jnp.mean(jnp.sum((approx.astype(jnp.float32) - target) ** 2, axis=-1))


def _param(module: nn.Module, name: str, init: Any, shape: tuple[int, ...], axes: tuple[Any, ...]) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)


@register(
    "sparsifiner",
    family="sparse",
    paper="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
    catalog=181,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="learned low-rank connectivity predictor (channel and token down-projections, sparse basis) gives an "
    "approximate attention; each query keeps its top ceil(keep_rate T) keys; exact softmax over them",
    fidelity="official-code",
    reference="arXiv 2303.13755 (Sec. 3: connectivity predictor, top-k connectivity mask, attention reconstruction) "
    "and github.com/lim142857/Sparsifiner src/models/sparsifiner.py MaskPredictor (proj_c_q/k, proj_n, "
    "proj_back_n basis with Threshold(2e-2), softmax coefficients top-8, top attn_budget per row, class-token row "
    "dense, mask detached); loss weighting reconstructed",
    option_docs={
        "block_size": "must be 1: the core runs with single-token blocks (each query keeps single keys)",
        "keep_rate": "fraction of the keys each query keeps, in (0, 1] (official attn_keep_rate 0.25)",
        "reduce_n_factor": "basis rows n = T // reduce_n_factor (official 8)",
        "reduce_c_factor": "predictor channels c = head_dim // reduce_c_factor (official 2)",
        "basis_top_k": "softmax coefficients kept per row (official 8)",
        "cls_token": "token 0 is a class token: its row attends to every key (the official ViT setting)",
        "distill": "add the predictor's reconstruction loss under 'losses' (training the predictor)",
    },
    validators={
        "block_size": choice(1),
        "keep_rate": _KEEP_RATE,
        "reduce_n_factor": positive_int,
        "reduce_c_factor": positive_int,
        "basis_top_k": positive_int,
        "cls_token": OptionValidator(lambda v: isinstance(v, bool), "a bool", "bool"),
        "distill": OptionValidator(lambda v: isinstance(v, bool), "a bool", "bool"),
    },
    has_attention_weights=True,
)
class SparsifinerAttention(BlockSelectorLayer):
    """Sparsifiner: softmax over the keys a learned connectivity predictor keeps per query. x [B, T, E] -> [B, T, E]
    (T fixed at init: the predictor has one parameter row per token)."""

    block_size: int = 1
    keep_rate: float = 0.25
    reduce_n_factor: int = 8
    reduce_c_factor: int = 2
    basis_top_k: int = 8
    cls_token: bool = False
    distill: bool = False

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.cross:
            raise ValueError("sparsifiner is self-attention (its predictor has one row per token); got a context")

    def select(self, q: Array, k: Array, *, causal: bool, q_offset: Any) -> Array:
        length, dim = k.shape[1], self.head_dim
        if q.shape[1] != length:
            raise ValueError(f"sparsifiner needs as many queries as keys: q {q.shape}, k {k.shape}")
        low, rows = max(dim // self.reduce_c_factor, 1), max(length // self.reduce_n_factor, 1)
        dtype = jnp.promote_types(q.dtype, jnp.float32)
        dense_init, normal = nn.initializers.lecun_normal(), nn.initializers.truncated_normal(0.02)
        w_q = _param(self, "predictor_query", dense_init, (dim, low), ("head_dim", None))
        b_q = _param(self, "predictor_query_bias", nn.initializers.zeros, (low,), (None,))
        w_k = _param(self, "predictor_key", dense_init, (dim, low), ("head_dim", None))
        b_k = _param(self, "predictor_key_bias", nn.initializers.zeros, (low,), (None,))
        token_down = _param(self, "predictor_token_down", normal, (length, rows), ("length", None))
        token_up = _param(self, "predictor_basis", normal, (length, rows), ("length", None))
        q_in, k_in = jax.lax.stop_gradient(q).astype(dtype), jax.lax.stop_gradient(k).astype(dtype)
        q_low = q_in @ jnp.asarray(w_q, dtype) + jnp.asarray(b_q, dtype)
        k_low = k_in @ jnp.asarray(w_k, dtype) + jnp.asarray(b_k, dtype)
        magnitude = jnp.abs(jnp.asarray(token_up, dtype)).T
        basis = jnp.where(magnitude > BASIS_THRESHOLD, magnitude, 0.0)
        approx = sparsifiner_approx_attention(
            q_low,
            k_low,
            jnp.asarray(token_down, dtype),
            basis,
            basis_top_k=self.basis_top_k,
            scale=self.num_heads**-0.5,
        )
        if self.distill:
            scale = dim**-0.5 if self.scale is None else self.scale
            self.sow(
                "losses",
                "sparsifiner_reconstruction",
                reconstruction_loss(approx, q_in, k_in, scale=scale, causal=causal),
            )
        budget = math.ceil(self.keep_rate * length)
        return sparsifiner_indices(approx, budget=budget, causal=causal, q_offset=q_offset, cls_token=self.cls_token)
