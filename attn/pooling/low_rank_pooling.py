"""`low_rank_pooling`: LAMA ([65] "Low Rank Factorization for Compact Multi-Head Self-Attention").

Multi-head attentive pooling over a sequence of states h_t in R^E (GRU states in the paper) in which the heads
share low-rank factors instead of owning separate parameters, and every head scores the tokens against one global
context vector c (a learned vector, as the context vector of hierarchical attention networks) rather than against
every other token. Head k's affinity is the bilinear form c^T W_k h_t with W_k factorised through shared
U, V in R^(E x r) and a head mixing P in R^(r x H) (low-rank bilinear pooling, Hadamard form):

    s_{t,k} = sum_i P_{i,k} phi(U^T c)_i phi(V^T h_t)_i       i.e. W_k = U diag(P_{:,k}) V^T when phi = identity
    a_{t,k} = softmax_t(s_{t,k})                              over the valid tokens, per head
    out = concat_k sum_t a_{t,k} h_t                          [B, H E]

phi = tanh (activation="tanh", the nonlinearity of low-rank bilinear pooling) or the identity
(activation="none", the exact bilinear form). Parameters c (E), U, V (E r each), P (r H): 2 E r + r H + E, against
H E^2 for H unfactorised bilinear heads.

Provenance: the two optimisations (low-rank factorised affinity shared by the heads; scores from a global context
vector) and the concatenated per-head sentence vectors are the paper's (abstract); the exact parameterisation above
(Hadamard low-rank bilinear pooling with tanh, a learned context vector) is our reconstruction — the paper's full
text could not be checked here.

Shapes: x [B, T, E] -> [B, num_heads * E]; padding through an attn.Mask with kv_lengths (or q_lengths).
Time O(B T E r + B T r H + B T H E), memory O(B T (r + H)). Reductions: with activation="none" and rank >= E the
heads are arbitrary bilinear forms through shared bases (one head: any W, via its SVD); with c = 0 every head
pools to the masked mean. Not a sequence-to-sequence layer (input kind "sequence", non-causal, no decode).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.padding import masked_softmax, valid_tokens
from attn.core.pipeline import dropout_weights
from attn.core.pooling_layer import PoolingLayer
from attn.core.validation import check_choice, check_rank, choice, positive_int
from attn.registry import register

Array = jax.Array

ACTIVATIONS = ("tanh", "none")


def low_rank_pooling(
    x: Array,
    context: Array,
    u: Array,
    v: Array,
    p: Array,
    *,
    activation: str = "tanh",
    lengths: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> tuple[Array, Array]:
    """LAMA pooling (module docstring).

    Args:
      x: [B, T, E] token states. context: [E] global context vector c. u, v: [E, r] shared factors. p: [r, H]
        head mixing. activation: "tanh" or "none" (phi). lengths: int [B] valid tokens, or None.
      dropout_rate, dropout_rng: inverted dropout on the weights before pooling (`attn.core.pipeline.dropout_weights`).
    Returns:
      (pooled [B, H * E] in x.dtype, weights float32 [B, H, T] (before dropout)).
    """
    check_rank("x", x, 3, "[batch, length, embed]")
    check_choice("activation", activation, ACTIVATIONS)
    batch, length, features = x.shape
    if context.shape != (features,):
        raise ValueError(f"context has shape {context.shape}; expected [embed={features}]")
    if u.ndim != 2 or u.shape[0] != features or v.shape != u.shape:
        raise ValueError(f"u and v have shapes {u.shape}, {v.shape}; expected both [embed={features}, rank]")
    if p.ndim != 2 or p.shape[0] != u.shape[1]:
        raise ValueError(f"p has shape {p.shape}; expected [rank={u.shape[1]}, heads]")
    phi = jnp.tanh if activation == "tanh" else (lambda z: z)
    xf = x.astype(jnp.float32)
    query = phi(context.astype(jnp.float32) @ u.astype(jnp.float32))  # [r]
    keys = phi(xf @ v.astype(jnp.float32))  # [B, T, r]
    logits = jnp.einsum("btr,r,rh->bht", keys, query, p.astype(jnp.float32))
    weights = masked_softmax(logits, valid_tokens(lengths, batch, length)[:, None, :], axis=-1)
    dropped = dropout_weights(weights, dropout_rate, dropout_rng)
    pooled = jnp.einsum("bht,bte->bhe", dropped, xf).reshape(batch, -1)
    return pooled.astype(x.dtype), weights


@register(
    "low_rank_pooling",
    family="pooling",
    paper="Low Rank Factorization for Compact Multi-Head Self-Attention",
    catalog=65,
    op=low_rank_pooling,
    input_kind="pooling",
    supports_causal=False,
    supports_decode=False,
    summary="LAMA: heads score tokens against a global context vector through shared low-rank bilinear factors",
    option_docs={
        "rank": "rank r of the shared factors U, V [embed, r]",
        "activation": "'tanh' (low-rank bilinear pooling) or 'none' (the exact bilinear form c^T W_k h)",
        "num_heads": "number of attention distributions (heads), each pooling the tokens",
        "head_dim": "unused by the pooling (the pooled vectors are embed wide); kept for the uniform interface",
    },
    fidelity="reconstructed",
    reference="the abstract of [65] (low-rank affinity shared by the heads, scores against a global context vector, "
    "concatenated head vectors); the Hadamard low-rank bilinear form with tanh and the learned context vector are a "
    "reconstruction",
    validators={"rank": positive_int, "activation": choice(*ACTIVATIONS)},
)
class LowRankPooling(PoolingLayer):
    """LAMA pooling. `__call__(x [B, T, E], *, mask=None, ...)` -> [B, num_heads * E]."""

    rank: int = 16
    activation: str = "tanh"

    mechanism_name: ClassVar[str] = "low_rank_pooling"

    def pool(self, x: Array, lengths: Array | None, deterministic: bool) -> Array:
        features = x.shape[-1]
        lecun = nn.initializers.lecun_normal()

        def param(name, init, shape, axes):
            return jnp.asarray(
                self.param(
                    name,
                    nn.with_logical_partitioning(init, axes),
                    shape,
                    self.param_dtype,
                )
            )

        c = param("context", nn.initializers.normal(1.0), (features,), ("embed",))
        u = param("u", lecun, (features, self.rank), ("embed", None))
        v = param("v", lecun, (features, self.rank), ("embed", None))
        p = param("p", lecun, (self.rank, self.num_heads), (None, "heads"))
        pooled, weights = low_rank_pooling(
            x.astype(self.dtype),
            c,
            u,
            v,
            p,
            activation=self.activation,
            lengths=lengths,
            dropout_rate=self.effective_dropout(deterministic),
            dropout_rng=self.dropout_rng(deterministic),
        )
        if self.wants_weights():
            self.sow("intermediates", "attention_weights", weights[:, :, None])  # [B, H, 1, T]
        return pooled
