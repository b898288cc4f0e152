"""Click-through-rate model: a target item attends over a user's behaviour sequence, then an MLP gives the logit
(the DIN / DARE layout: Zhou et al. 2018, "Deep Interest Network for Click-Through Rate Prediction"; Feng et al.
2024, "Long-Sequence Recommendation Models Need Decoupled Embeddings", catalog [209]).

    behaviours int [B, L], target int [B] -> logits float32 [B, 2] = [0, z]   (softmax over [0, z] = sigmoid(z))

    e_j   = Emb(behaviour_j), e_t = Emb(target)                          [B, L, E], [B, E]
    o     = TargetAttention(query e_t, behaviours e)                     [B, E]
    z     = w_2^T ReLU(W_1 [t ; o ; t * o] + b_1) + b_2                   (the DIN-style interest MLP)

with t = e_t for a shared table; for DARE's decoupled tables t = E_rep(target) and o is mapped to width R by one more
linear map, so that the attention table is trained by the attention scores alone (as in the paper, whose MLP sees
E_rep(target), o and their product).

Embedding (`embedding`):
  "shared"     one table, E = d_model: the same vectors serve the attention scores and the aggregated values.
  "decoupled"  DARE's two tables (attn.cross.dare.DecoupledEmbedding): each item is [E_att(id) | E_rep(id)],
               E = attention_dim + representation_dim (attention_dim = num_heads * head_dim for `dare`).

Target attention (`query`), with any registered mechanism `attention` (+ `attention_options`):
  "cross"  the target is the query, the behaviours the context: layer(e_t [B, 1, E], context=e) (softmax, dare).
  "last"   the target is appended to the behaviours and the sequence [e_0 .. e_{L-1}, e_t] goes through causal
           self-attention; o is the output at the target's position (mqsa: its long query averages the target with
           the last behaviours, its short query is the target alone).

Sown under "intermediates": "interest" [B, E] (o; [B, R] for decoupled tables). Time O(B L E (H D)) for the
attention plus O(B E mlp_dim).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.core.validation import check_choice
from attn.cross.dare import DecoupledEmbedding
from attn.models.fields import hash_fields

Dtype = Any
EMBEDDINGS = ("shared", "decoupled")
QUERIES = ("cross", "last")


class CTRModel(nn.Module):
    """Target attention over behaviours + interest MLP -> click logits [B, 2] (see the module docstring).

    Fields:
      num_items: item vocabulary (ids in [0, num_items)).
      embedding: "shared" (one table of width d_model) or "decoupled" (attention_dim + representation_dim).
      d_model: width of the shared table.
      attention_dim, representation_dim: widths of the decoupled tables.
      attention, attention_options: the target-attention mechanism (a registry name) and its options.
      query: "cross" (target -> behaviours) or "last" (causal self-attention, read at the appended target).
      num_heads, head_dim: the attention's heads (head_dim None = d_model / num_heads for "shared", attention_dim /
        num_heads for "decoupled", so that dare's scores use exactly the attention table).
      mlp_dim: hidden width of the interest MLP.
    """

    num_items: int = 64
    embedding: str = "shared"
    d_model: int = 32
    attention_dim: int = 16
    representation_dim: int = 16
    attention: str = "softmax"
    attention_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    query: str = "cross"
    num_heads: int = 2
    head_dim: int | None = None
    mlp_dim: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __hash__(self) -> int:  # dict-valued fields
        return hash_fields(self)

    @property
    def width(self) -> int:
        """E: the width of an item's embedding."""
        return self.d_model if self.embedding == "shared" else self.attention_dim + self.representation_dim

    @property
    def num_layers(self) -> int:
        """Attention layers (one target attention), for the trainer's FLOP estimate."""
        return 1

    @property
    def score_width(self) -> int:
        """Width that head_dim=None splits into heads: d_model (shared) or attention_dim (decoupled)."""
        return self.d_model if self.embedding == "shared" else self.attention_dim

    def check_fields(self) -> None:
        """ValueError naming the first field out of range."""
        for name in ("num_items", "d_model", "attention_dim", "representation_dim", "num_heads", "mlp_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        check_choice("embedding", self.embedding, EMBEDDINGS)
        check_choice("query", self.query, QUERIES)
        if self.head_dim is None and self.score_width % self.num_heads:
            raise ValueError(
                f"head_dim=None needs num_heads={self.num_heads} to divide {self.score_width} (d_model for a shared "
                "embedding, attention_dim for a decoupled one); give head_dim"
            )

    def dense(self, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
        """A Dense layer whose kernel and bias carry the logical axes `axes` ([in, out]) and `axes[1:]`."""
        return nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
            name=name,
        )

    @nn.compact
    def __call__(self, behaviours: jax.Array, target: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """behaviours int [B, L], target int [B] -> logits float32 [B, 2] ([0, z]: class 1 = click)."""
        self.check_fields()
        if behaviours.ndim != 2:
            raise ValueError(f"behaviours must be int [batch, length]; got shape {behaviours.shape}")
        if jnp.shape(target) != behaviours.shape[:1]:
            raise ValueError(f"target must be int [batch={behaviours.shape[0]}]; got shape {jnp.shape(target)}")
        if self.embedding == "shared":
            init = nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed"))
            embed = nn.Embed(self.num_items, self.d_model, embedding_init=init, param_dtype=self.param_dtype)
        else:
            embed = DecoupledEmbedding(
                self.num_items, self.attention_dim, self.representation_dim, param_dtype=self.param_dtype
            )
        e = embed(behaviours).astype(self.dtype)  # [B, L, E]
        e_t = embed(target).astype(self.dtype)  # [B, E]
        head_dim = self.head_dim or self.score_width // self.num_heads
        layer = attn.build(
            self.attention,
            num_heads=self.num_heads,
            head_dim=head_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **dict(self.attention_options),
        )
        if self.query == "cross":
            o = layer(e_t[:, None, :], context=e, deterministic=deterministic)[:, 0]
        else:
            sequence = jnp.concatenate([e, e_t[:, None, :]], axis=1)
            o = layer(sequence, mask=attn.Mask(causal=True), deterministic=deterministic)[:, -1]
        if self.embedding == "decoupled":  # the MLP sees E_rep(target) only; E_att is trained by the scores alone
            e_t = e_t[:, self.attention_dim :]
            o = self.dense(self.representation_dim, ("mlp", "embed"), "interest")(o)
        self.sow("intermediates", "interest", o)
        features = jnp.concatenate([e_t, o, e_t * o], axis=-1)
        hidden = nn.relu(self.dense(self.mlp_dim, ("embed", "mlp"), "mlp")(features))
        z = self.dense(1, ("mlp", "classes"), "logit")(hidden)[:, 0].astype(jnp.float32)
        return jnp.stack([jnp.zeros_like(z), z], axis=-1)
