"""`tensor_attention`: triple-wise (Kronecker / "tensor") softmax attention over pairs of keys.

Paper: "How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to Kronecker Computation"
(Alman and Song, ICLR 2024).

The paper's definition (from its abstract, which states it in full): given five n x d matrices Q, K1, K2, V1, V2,

    out = D^-1 exp(Q (K1 ⊘ K2)^T) (V1 ⊘ V2),      D = diag(exp(Q (K1 ⊘ K2)^T) 1_{n^2})

where K1 ⊘ K2 in R^{n^2 x d} is the column-wise Kronecker product: its row (j, l) (index j n + l) is the
elementwise product k1_j ⊙ k2_l, and likewise V1 ⊘ V2. Written per query, this is a softmax over key PAIRS:

    s_ijl = scale * <q_i, k1_j ⊙ k2_l> = scale * sum_d q_id k1_jd k2_ld
    p_ijl = exp(s_ijl) / sum_{(j', l') allowed} exp(s_ij'l')
    o_i   = sum_{(j, l) allowed} p_ijl (v1_j ⊙ v2_l)

The paper has no scale (scale=1.0 gives its exact form); the default 1/sqrt(head_dim) keeps the logits of a
trained layer in the usual range. A pair (j, l) is allowed for query i when BOTH keys are allowed by the mask
(causal: j <= i and l <= i; kv_lengths: both are real tokens), so causal masking, padding and sliding windows come
from the shared `attn.Mask`.

Layer: q = x W_q, k1 = c W_k, k2 = c W_k2, v1 = c W_v, v2 = c W_v2 (parameters "query", "key", "key2", "value",
"value2", "out"; "key"/"value" are k1/v1, so the tree extends the `softmax` layer's), heads/GQA as in `softmax`.
position="rope" rotates q and k1 only (our choice: the paper has no positions, and a rotation does not distribute
over ⊙; rotating k1 keeps the reduction below exact with RoPE). The KV cache stores [k1 | k2] and [v1 | v2]
concatenated on the feature axis, so decoding reuses `attn.core.kv_cache`. The sown "attention_weights" are the
marginal over the second key, sum_l p_ijl, [B, H, Tq, Tk].

Shapes: x [B, T, E] -> [B, T, E]; logits [B, H, Tq, Tk, Tk]. Time O(B H Tq Tk^2 D), memory O(B H Tq Tk^2): cubic
in the length (the paper's near-linear algorithm for bounded entries is not implemented). Keep T to a few hundred.
The layer overrides the template's `attend` (pair probabilities are not the pipeline's [Tq, Tk] matrix), so
interventions may target its `head_outputs` only; the marginal weights are still captured.

Exact reduction to softmax attention (verified in tests): with k2 = 1 (all ones) and v2 = 1, s_ijl = scale q_i.k1_j
does not depend on l and every allowed j has the same set of allowed l (both are "l allowed for query i"), so
p_ijl = softmax_j(scale q_i.k1_j) / n_i and o_i = sum_j softmax_j(.) v1_j: plain softmax attention with (q, k1, v1).
In the layer: use_bias=True, zero "key2"/"value2" kernels and unit biases reproduce `softmax` with the shared
q/k/v/o parameters. (k2 = 0 instead gives uniform weights over all pairs, NOT softmax.)
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.pipeline import dropout_weights
from attn.core.validation import check_qkv, choice
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

POSITIONS = ("rope", "none")


def tensor_attention(
    q: Array,
    k1: Array,
    k2: Array,
    v1: Array,
    v2: Array,
    *,
    causal: bool = False,
    mask: Mask | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    q_offset: Any = 0,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
) -> Array | tuple[Array, dict[str, Array]]:
    """Triple-wise softmax attention over key pairs (see the module doc), computed densely in float32.

    Args:
      q: [B, Tq, H, D]. k1, k2: [B, Tk, KVH, D]. v1, v2: [B, Tk, KVH, Dv]. H a multiple of KVH (GQA/MQA).
      causal / mask: which keys each query may see (an `attn.Mask`); a pair needs both of its keys visible.
      scale: logit scale (None = 1/sqrt(D); 1.0 = the paper). softcap: logits -> softcap * tanh(logits / softcap).
      q_offset: absolute position of the first query (decoding).
      dropout_rate / dropout_rng: dropout on the pair probabilities.
      return_probs: also return {"probs": float32 [B, H, Tq, Tk, Tk]} (p_ijl).
    Returns:
      out [B, Tq, H, Dv] in q.dtype (rows with no allowed pair are 0), or (out, aux).
    """
    heads, kv_heads = check_qkv(q, k1, v1)
    check_qkv(q, k2, v2)
    if k1.shape != k2.shape or v1.shape != v2.shape:
        raise ValueError(
            f"k1/k2 and v1/v2 must have equal shapes, got k1 {k1.shape}, k2 {k2.shape}, v1 {v1.shape}, v2 {v2.shape}"
        )
    batch, q_len, _, head_dim = q.shape
    kv_len, groups = k1.shape[1], heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale

    qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum("btkgd,bjkd,blkd->bkgtjl", qg, k1, k2, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = Mask.from_args(causal=causal, mask=mask)
    if mask is not None:
        allowed = mask.materialize(q_len, kv_len, q_offset=q_offset)  # [B|1, H|1, Tq, Tk]
        pair = allowed[..., :, None] & allowed[..., None, :]
        if pair.shape[1] != 1:
            pair = pair.reshape(pair.shape[0], kv_heads, groups, q_len, kv_len, kv_len)
        else:
            pair = pair[:, :, None]
        logits = jnp.where(pair, logits, -jnp.inf)

    flat = logits.reshape(*logits.shape[:4], kv_len * kv_len)
    row_max = jnp.max(flat, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalized = jnp.exp(flat - row_max)
    denom = jnp.sum(unnormalized, axis=-1, keepdims=True)
    probs = (unnormalized / jnp.where(denom == 0.0, 1.0, denom)).reshape(logits.shape)

    attended = dropout_weights(probs, dropout_rate, dropout_rng)
    out = jnp.einsum("bkgtjl,bjkd,blkd->btkgd", attended, v1.astype(jnp.float32), v2.astype(jnp.float32)).reshape(
        batch, q_len, heads, v1.shape[-1]
    )
    out = out.astype(q.dtype)
    if not return_probs:
        return out
    return out, {"probs": probs.reshape(batch, heads, q_len, kv_len, kv_len)}


@register(
    "tensor_attention",
    family="softmax",
    paper="How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to Kronecker Computation",
    catalog=137,
    op=tensor_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="triple-wise attention: softmax over key pairs of <q, k1 ⊙ k2>, values v1 ⊙ v2; O(T^3) reference",
    option_docs={
        "position": "'rope' (rotates q and k1 only) or 'none' (the paper)",
        "scale": "logit scale (None = 1/sqrt(head_dim); 1.0 = the paper's exp(Q (K1 ⊘ K2)^T))",
    },
    fidelity="paper",
    reference="the definition stated in full in the paper's abstract, D^-1 exp(Q (K1 ⊘ K2)^T) (V1 ⊘ V2) (scale=1.0 is "
    "its exact form)",
    validators={"position": choice(*POSITIONS)},
)
class TensorAttention(MultiHeadAttention):
    """Tensor (triple-wise) attention. x [B, T, E] -> [B, T, E]; cubic in T (short sequences only)."""

    # The probabilities are over key pairs [B, H, Tq, Tk, Tk], not the pipeline's [B, H, Tq, Tk] matrix, so its
    # matrix stages do not apply; the marginal over the second key is captured as "attention_weights".
    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.decode and call.cross:
            raise ValueError("decode=True is for self-attention; got a context (cross-attention has no KV cache)")

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        """q [B, T, H, D]; k = [k1 | k2] [B, Tc, KVH, 2D] and v = [v1 | v2] [B, Tc, KVH, 2D], concatenated on the
        feature axis so that RoPE, the KV cache and GQA treat each pair as one key and one value."""
        source = x if context is None else context
        q = self.dense_heads(x, self.num_heads, "heads", "query")
        k1 = self.dense_heads(source, self.kv_heads, "kv_heads", "key")
        k2 = self.dense_heads(source, self.kv_heads, "kv_heads", "key2")
        v1 = self.dense_heads(source, self.kv_heads, "kv_heads", "value")
        v2 = self.dense_heads(source, self.kv_heads, "kv_heads", "value2")
        if self.qk_norm:
            q, k1, k2 = self.head_norm(q, "query_norm"), self.head_norm(k1, "key_norm"), self.head_norm(k2, "key2_norm")
        return q, jnp.concatenate([k1, k2], -1), jnp.concatenate([v1, v2], -1)

    def rotate(self, q: Array, k: Array, q_pos: Array) -> tuple[Array, Array]:
        """RoPE on q and k1 only (a rotation does not distribute over k1 ⊙ k2)."""
        k1, k2 = jnp.split(k, 2, axis=-1)
        q, k1 = super().rotate(q, k1, q_pos)
        return q, jnp.concatenate([k1, k2], -1)

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, Tq, H, D], k = [k1 | k2], v = [v1 | v2] [B, Tk, KVH, 2D] -> [B, Tq, H, D]."""
        k1, k2 = jnp.split(k, 2, axis=-1)
        v1, v2 = jnp.split(v, 2, axis=-1)
        capture = self.wants_weights()
        result = tensor_attention(
            q,
            k1,
            k2,
            v1,
            v2,
            mask=self.full_mask(call),
            scale=self.scale,
            softcap=self.softcap,
            q_offset=call.q_offset,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
            return_probs=capture,
        )
        if capture:
            result, aux = result
            self.sow_capture("attention_weights", aux["probs"].sum(-1))
        return result
