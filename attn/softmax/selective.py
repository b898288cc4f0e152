"""`selective`: Selective Self-Attention (SSA), query- and position-dependent temperature plus value temperature.

Paper: "Selective Attention: Enhancing Transformer through Principled Context Control" (Zhang, Chang, Li,
Roy-Chowdhury, Chen, Oymak, NeurIPS 2024; code github.com/umich-sota/selective_attention).

SSA replaces softmax(K q) by softmax(tau(q, n) K q): an inverse temperature per query, from its token and its
position, controls how spiky each row is; a value temperature scales each value token to suppress noise:

    tau_tok(x_i)   = 1 + tanh(x_i w_h)              w_h in R^E per head, zero-initialised   (token-aware)
    tau_pos(n_i)   = 1 + exp(-exp(beta_h)) log n_i   beta_h initialised to 2                 (position-aware)
    q_i           <- tau_tok(x_i) * tau_pos(n_i) * q_i        (equivalently, row i of the logits is scaled)
    v_j           <- (1 + tanh(x_j u_g)) * v_j       u_g in R^E per kv head, zero-initialised  (value temperature)
    o_i            = softmax(scale q_i K^T + bias + mask) V

Verified against the official code (github.com/umich-sota/selective_attention, lit_gpt/model_finetune_att.py,
lit_gpt/gpt_2_PTS.py): the position term multiplies the logits of row i by 1 + exp(-exp(beta)) log(row_length_i),
row_length_i = i + 1 (causal), beta a learned scalar initialised to 2.0 (1.5 in the GPT-2 script). That repository
holds only this position-aware part: it has no token-aware query temperature and no value temperature, and the
paper text was not reachable here. Secondary descriptions of the paper's Section 3 (its ablation columns
"tau_pos + tau_tok"; a public re-implementation writing tau_tok = tanh(f(x)), tau_pos = 1 + sigmoid(a) log n)
suggest the paper ADDS the two query terms, tau = tau_tok + tau_pos, where this layer multiplies them; the two
agree at initialisation (w = 0) and whenever either term is off, and differ once both are trained. Unresolved.

Choices of ours: n_i is the number of keys row i attends to (covers padding and windows; = the official
row_length for causal self-attention); beta is one per head (official: one per layer) initialised to 2; the
token terms are a bounded 1 + tanh(.) of one zero-initialised projection per head (the paper's weight sharing
with W_q could not be checked); E * (H + KVH) + H added parameters, about 0.4% of a GPT-2 layer's attention
parameters, within the paper's < 0.5% budget.

Because the temperatures scale q (before RoPE, which commutes with scaling, and after it for tau_pos) and v,
any softmax kernel computes SSA unchanged. Shapes: x [B, T, E] -> [B, T, E]. Time and memory as `softmax`,
plus O(B T E (H + KVH)) for the temperatures. The value temperature is applied before the KV cache, so decoding
stores the scaled values.

Reduction to softmax: query_temperature=False, position_temperature=False, value_temperature=False is exactly
`softmax` with the same parameters; so are zero w, u with beta = +50 (exp(-exp(50)) == 0).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array


def visible_keys(mask: Mask | None, window, q_len: int, kv_len: int, q_offset) -> Array:
    """Number of keys each query attends to, float32 [B|1, H|1, Tq] (kv_len everywhere when nothing masks)."""
    full = Mask.from_args(mask=mask, window=window)
    if full is None:
        return jnp.full((1, 1, q_len), float(kv_len), jnp.float32)
    return jnp.sum(full.materialize(q_len, kv_len, q_offset=q_offset), axis=-1, dtype=jnp.float32)


@register(
    "selective",
    family="softmax",
    paper="Selective Attention: Enhancing Transformer through Principled Context Control",
    catalog=111,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="SSA: per-query token- and position-aware inverse temperature on q, and a value temperature",
    option_docs={
        "query_temperature": "token-aware query temperature 1 + tanh(x w_h)",
        "position_temperature": "position-aware query temperature 1 + exp(-exp(beta_h)) log(n_i)",
        "value_temperature": "value temperature 1 + tanh(x u_g) per kv head",
        "position_beta_init": "initial beta_h of the position temperature (2 in the official code: almost 1)",
    },
    fidelity="reconstructed",
    reference="position temperature verified against github.com/umich-sota/selective_attention "
    "(lit_gpt/model_finetune_att.py, lit_gpt/gpt_2_PTS.py); token and value temperatures and their product with it "
    "are reconstructed from secondary descriptions (the paper may add tau_tok + tau_pos)",
    has_attention_weights=True,
)
class SelectiveAttention(MultiHeadAttention):
    """Softmax attention with SSA query and value temperatures. x [B, T, E] -> [B, T, E]."""

    query_temperature: bool = True
    position_temperature: bool = True
    value_temperature: bool = True
    position_beta_init: float = 2.0

    def _temperature(self, source: Array, heads: int, heads_axis: str, name: str) -> Array:
        """1 + tanh(source w): float32 [B, T, heads, 1] with w [E, heads] zero-initialised."""
        w = self.param(
            name,
            nn.with_logical_partitioning(nn.initializers.zeros, ("embed", heads_axis)),
            (source.shape[-1], heads),
            self.param_dtype,
        )
        logits = jnp.einsum("bte,eh->bth", source.astype(jnp.float32), jnp.asarray(w, jnp.float32))
        return (1.0 + jnp.tanh(logits))[..., None]

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if self.qk_norm and self.query_temperature:
            raise ValueError(
                "qk_norm=True would normalise away the query temperature; use query_temperature=False with it"
            )

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        q, k, v = super().project_qkv(x, context)
        if self.query_temperature:
            q = (q * self._temperature(x, self.num_heads, "heads", "query_temperature")).astype(q.dtype)
        if self.value_temperature:
            source = x if context is None else context
            v = (v * self._temperature(source, self.kv_heads, "kv_heads", "value_temperature")).astype(v.dtype)
        return q, k, v

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The `softmax` layer's positions and cache, then the position temperature tau_pos(n_i) on q (n_i: the keys
        row i attends to, hence after the cache), so any softmax kernel computes SSA."""
        q, k, v, call = super().prepare(q, k, v, call)
        if self.position_temperature:
            beta = self.param(
                "position_beta",
                nn.with_logical_partitioning(nn.initializers.constant(self.position_beta_init), ("heads",)),
                (self.num_heads,),
                self.param_dtype,
            )
            n = visible_keys(call.mask, self.window, q.shape[1], k.shape[1], call.q_offset)  # [B|1, H|1, Tq]
            strength = jnp.exp(-jnp.exp(jnp.asarray(beta, jnp.float32)))[None, :, None]
            tau = 1.0 + strength * jnp.log(jnp.maximum(n, 1.0))  # [B|1, H, Tq]
            q = (q * jnp.moveaxis(tau, 1, 2)[..., None]).astype(q.dtype)
        return q, k, v, call
