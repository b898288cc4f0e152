"""Attention-based multiple-instance learning: ABMIL's gated attention pooling (Ilse, Tomczak & Welling 2018,
"Attention-based Deep Multiple Instance Learning") with ACMIL's multiple attention branches and stochastic top-k
instance masking (Zhang et al. 2024, "Attention-Challenging Multiple Instance Learning for Whole Slide Image
Classification", catalog [142]).

    instances x [B, N, F] (+ lengths int [B], keep bool [B, N]) -> MILOutput(logits float32 [B, C],
                                                                         attention float32 [B, N])

    h_n     = ReLU(W_e x_n + b_e)                                 [B, N, L]   L = d_model (the official DimReduction)
    h       = transformer blocks over the instances (optional, num_layers > 0, any registered mechanism)
    s_{k,n} = w_k^T (tanh(V h_n) * sigmoid(U h_n)) + c_k         [B, K, N]   gated=True (ABMIL Eq. 9)
    s_{k,n} = w_k^T tanh(V h_n) + c_k                                         gated=False (ABMIL Eq. 8)
    a_k     = softmax_n(s_k)  over the valid instances            [B, K, N]   K = branches
    z_k     = sum_n a_{k,n} h_n,   branch logits_k = W_k z_k + b_k  [B, K, C] (only when K > 1)
    a       = mean_k a_k,   z = sum_n a_n h_n,   logits = W z + b  [B, C]

V, U: L -> D (D = attention_dim), w: D -> K. With K = 1 this is ABMIL exactly (a = a_1, one classifier); with K > 1
it is ACMIL's multiple-branch attention (MBA: the official ACMIL_GA, architecture/transformer.py), whose branch
logits and branch attention the `acmil` training technique turns into its branch and diversity losses.

Stochastic top-k instance masking (STKIM, ACMIL Sec. 3.3), training only (deterministic=False, key "dropout"): in
each branch, of the `mask_top_k` instances with the highest scores s_k, floor(mask_top_k * mask_drop) chosen
uniformly at random get s_{k,n} = -1e9 before the softmax (the official masked_fill value). mask_top_k = 0 or
mask_drop = 0 turns it off; evaluation never masks.

`keep` (bool [B, N], optional) removes instances from the bag (MHIM's masked hard instances): they get attention 0,
like padding beyond `lengths`.

Sown under "intermediates" (when that collection is mutable): "mil_scores" [B, K, N] (s after masking; padding at
the float32 minimum), "mil_attention" [B, K, N] (a_k), "bag_features" [B, L] (z), and "branch_logits" [B, K, C]
for K > 1. Time O(B N (F L + L D + K D)); memory O(B N L).

Also here: the localisation sums of a bag's attention against the instance ground truth (instance AUC within a
bag, top-1 hit, attention mass on the positives), which the "mil" training task reports.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.core.padding import masked_softmax, valid_tokens
from attn.core.validation import check_choice
from attn.models.encoder import classifier
from attn.models.fields import AttentionOptions, hash_fields
from attn.models.layers import MLPS, NORMS
from attn.models.trunk import block_stack

Dtype = Any
MASKED_SCORE = -1e9  # the official STKIM masked_fill value


class MILOutput(NamedTuple):
    """What an attention-MIL model returns: bag logits float32 [B, C] and the bag attention float32 [B, N] (the
    mean over branches of the per-branch attention, 0 on padded and removed instances)."""

    logits: jax.Array
    attention: jax.Array


def descending_rank(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """int32 rank of each entry along the last axis by decreasing `scores` (0 = highest), invalid entries after
    every valid one; scores and valid have the same shape [..., N]."""
    key = jnp.where(valid, -scores.astype(jnp.float32), jnp.inf)
    return jnp.argsort(jnp.argsort(key, axis=-1, stable=True), axis=-1, stable=True).astype(jnp.int32)


def random_subset(rng: jax.Array, candidates: jax.Array, counts: jax.Array) -> jax.Array:
    """bool [..., N]: `counts[...]` entries chosen uniformly at random among the True entries of `candidates`
    [..., N] (all of them when there are fewer); counts int [...]."""
    priority = jnp.where(candidates, jax.random.uniform(rng, candidates.shape), 2.0)
    rank = jnp.argsort(jnp.argsort(priority, axis=-1), axis=-1)
    return candidates & (rank < counts[..., None])


def top_k_instance_mask(rng: jax.Array, scores: jax.Array, valid: jax.Array, top_k: int, drop: float) -> jax.Array:
    """STKIM: bool [B, K, N], True for the instances masked — floor(top_k * drop) chosen at random among the top_k
    highest `scores` [B, K, N] of the `valid` [B, K, N] instances in each branch."""
    top = valid & (descending_rank(scores, valid) < top_k)
    count = jnp.full(scores.shape[:-1], int(top_k * drop), jnp.int32)
    return random_subset(rng, top, count)


class AttentionMIL(nn.Module):
    """ABMIL / ACMIL attention-MIL classifier (see the module docstring for the equations).

    Fields:
      num_classes: C, bag classes.
      d_model: L, instance embedding width.
      attention_dim: D, width of the attention network (V, U).
      gated: gated attention (tanh * sigmoid) or plain tanh attention.
      branches: K attention branches (1 = ABMIL; ACMIL's default is 5).
      mask_top_k, mask_drop: STKIM (ACMIL's n_masked_patch = 10, mask_drop = 0.6); 0 = off.
      num_layers: transformer blocks over the instances before pooling (0 = none, ABMIL); num_heads, head_dim,
        num_kv_heads, mlp_dim, attention, attention_options, norm, mlp, dropout_rate: those blocks, as in the
        other models (`attention`: any registered sequence mechanism, non-causal over the valid instances).
    """

    num_classes: int = 2
    d_model: int = 32
    attention_dim: int = 16
    gated: bool = True
    branches: int = 1
    mask_top_k: int = 0
    mask_drop: float = 0.0
    num_layers: int = 0
    num_heads: int = 2
    head_dim: int | None = None
    num_kv_heads: int | None = None
    mlp_dim: int = 64
    attention: str = "softmax"
    attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    norm: str = "layernorm"
    mlp: str = "gelu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __hash__(self) -> int:  # dict-valued fields
        return hash_fields(self)

    def check_fields(self) -> None:
        """ValueError naming the first field out of range."""
        for name in ("num_classes", "d_model", "attention_dim", "branches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if isinstance(self.mask_top_k, bool) or not isinstance(self.mask_top_k, int) or self.mask_top_k < 0:
            raise ValueError(f"mask_top_k={self.mask_top_k!r} must be an int >= 0 (0 = no top-k instance masking)")
        if not isinstance(self.mask_drop, int | float) or not 0.0 <= self.mask_drop <= 1.0:
            raise ValueError(f"mask_drop={self.mask_drop!r} must be a fraction in [0, 1]")
        check_choice("norm", self.norm, NORMS)
        check_choice("mlp", self.mlp, MLPS)

    def dense(self, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
        return nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        instances: jax.Array,
        *,
        lengths: jax.Array | None = None,
        keep: jax.Array | None = None,
        deterministic: bool = True,
    ) -> MILOutput:
        """instances float [B, N, F], lengths int [B] (valid instances; None = all), keep bool [B, N] (None = all)
        -> MILOutput(logits float32 [B, C], attention float32 [B, N])."""
        self.check_fields()
        if instances.ndim != 3:
            raise ValueError(f"instances must be [batch, instances, features]; got shape {instances.shape}")
        batch, count = instances.shape[:2]
        if lengths is not None and jnp.shape(lengths) != (batch,):
            raise ValueError(f"lengths must be int [batch={batch}]; got shape {jnp.shape(lengths)}")
        if keep is not None and jnp.shape(keep) != (batch, count):
            raise ValueError(f"keep must be bool [batch, instances]=({batch}, {count}); got shape {jnp.shape(keep)}")
        valid = valid_tokens(lengths, batch, count)
        h = nn.relu(self.dense(self.d_model, ("features", "embed"), "embed")(instances))
        if self.num_layers > 0:
            mask = None if lengths is None else attn.Mask(q_lengths=lengths, kv_lengths=lengths)
            h = block_stack(self, h, mask=mask, deterministic=deterministic)
        if keep is not None:
            valid = valid & keep
        gate = jnp.tanh(self.dense(self.attention_dim, ("embed", "mlp"), "attention_v")(h))
        if self.gated:
            gate = gate * nn.sigmoid(self.dense(self.attention_dim, ("embed", "mlp"), "attention_u")(h))
        scores = self.dense(self.branches, ("mlp", "heads"), "attention_w")(gate)
        scores = jnp.swapaxes(scores, 1, 2).astype(jnp.float32)  # [B, K, N]
        branch_valid = jnp.broadcast_to(valid[:, None, :], scores.shape)
        if not deterministic and self.mask_top_k > 0 and int(self.mask_top_k * self.mask_drop) > 0:
            masked = top_k_instance_mask(
                self.make_rng("dropout"), scores, branch_valid, self.mask_top_k, self.mask_drop
            )
            scores = jnp.where(masked, MASKED_SCORE, scores)
        weights = masked_softmax(scores, branch_valid)  # [B, K, N]
        self.sow("intermediates", "mil_scores", jnp.where(branch_valid, scores, jnp.finfo(jnp.float32).min))
        self.sow("intermediates", "mil_attention", weights)
        h32 = h.astype(jnp.float32)
        if self.branches > 1:
            branch_features = jnp.einsum("bkn,bnl->bkl", weights, h32)
            kernel = self.param(
                "branch_classifiers",
                nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("heads", "embed", "classes")),
                (self.branches, self.d_model, self.num_classes),
                self.param_dtype,
            )
            bias = self.param(
                "branch_biases",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "classes")),
                (self.branches, self.num_classes),
                self.param_dtype,
            )
            branch_logits = jnp.einsum("bkl,klc->bkc", branch_features, jnp.asarray(kernel, jnp.float32)) + bias
            self.sow("intermediates", "branch_logits", branch_logits.astype(jnp.float32))
        attention = jnp.mean(weights, axis=1)  # [B, N]
        pooled = jnp.einsum("bn,bnl->bl", attention, h32)
        self.sow("intermediates", "bag_features", pooled)
        head = classifier(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)
        return MILOutput(head(pooled.astype(self.dtype)).astype(jnp.float32), attention)


def intermediate(collections: Any, name: str) -> jax.Array:
    """The value the MIL model sowed as `name` in collections["intermediates"] (KeyError naming what is there)."""
    found = collections.get("intermediates", {})
    if name not in found:
        raise KeyError(f"the MIL forward sowed no {name!r} (found: {sorted(found)}); is 'intermediates' mutable?")
    return found[name][0]


def localization_sums(
    attention: jax.Array, instance_labels: jax.Array, labels: jax.Array, lengths: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Sums over the positive bags of how well the bag attention finds the positive instances.

    attention float [B, N], instance_labels int [B, N] (1 = positive instance), labels int [B], lengths int [B]
    (valid instances; None = all) -> float32 scalars:
      "instance_auc_sum"  sum over positive bags of the within-bag AUC: the fraction of (positive, negative) pairs
                          of valid instances with a_pos > a_neg, ties counted 1/2; a bag without negatives counts 1
      "top1_hit_sum"      sum over positive bags of [the most attended instance is positive]
      "positive_mass_sum" sum over positive bags of the attention mass on positive instances
      "positive_bags"     the number of positive bags
    Divide the first three by "positive_bags" for means.
    """
    attention = attention.astype(jnp.float32)
    positive_instance = instance_labels == 1
    bag = (labels == 1).astype(jnp.float32)
    negative_instance = (instance_labels == 0) & valid_tokens(lengths, *attention.shape)
    above = (attention[:, :, None] > attention[:, None, :]).astype(jnp.float32)
    ties = (attention[:, :, None] == attention[:, None, :]).astype(jnp.float32)
    pairs = (positive_instance[:, :, None] & negative_instance[:, None, :]).astype(jnp.float32)
    wins = jnp.sum(pairs * (above + 0.5 * ties), axis=(1, 2))
    total = jnp.sum(pairs, axis=(1, 2))
    auc = jnp.where(total > 0, wins / jnp.maximum(total, 1.0), 1.0)
    top = jnp.argmax(attention, axis=-1)
    hit = jnp.take_along_axis(positive_instance, top[:, None], axis=-1)[:, 0].astype(jnp.float32)
    mass = jnp.sum(jnp.where(positive_instance, attention, 0.0), axis=-1)
    return {
        "instance_auc_sum": jnp.sum(bag * auc),
        "top1_hit_sum": jnp.sum(bag * hit),
        "positive_mass_sum": jnp.sum(bag * mass),
        "positive_bags": jnp.sum(bag),
    }
