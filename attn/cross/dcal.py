"""`dcal`: dual cross-attention learning — global-local cross-attention (GLCA) on the tokens of highest accumulated
attention and pair-wise cross-attention (PWCA) with a distractor image, trained jointly with self-attention (SA).

Paper: "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification" (Zhu et
al., CVPR 2022, arXiv 2205.02151), sections 3.2-3.3 and 4.1 (implementation details), appendix A (inference).

Self-attention of block i (heads averaged for the rollout):  S_i = softmax(Q_i K_i^T / sqrt(d)),  f_SA = S_i V_i.

Attention rollout (Abnar & Zuidema), residual-renormalised:
    S̄_i = 0.5 S_i + 0.5 E,      Ŝ_i = S̄_i S̄_{i-1} ... S̄_1                                        [B, T, T]
GLCA (M = 1 block, its own weights, parallel to the last SA block L): the queries of the R patch tokens with the
highest CLS-row response Ŝ_L[0, 1:] of the rollout (plus the CLS query, see deviations), attending every key/value:
    f_GLCA(Q^l, K^g, V^g) = softmax(Q^l K^g^T / sqrt(d)) V^g,   Q^l [B, R + 1, ...], K^g, V^g [B, T, ...]
PWCA (all L blocks, weights shared with SA, training only): image I1's queries against the keys/values of I1 and a
distractor I2 concatenated:
    f_PWCA(Q_1, K_c, V_c) = softmax(Q_1 K_c^T / sqrt(d)) V_c,   K_c = [K_1; K_2], V_c = [V_1; V_2]   [B, 2T, ...]
Loss (dynamic weights of FairMOT, learned w_1..w_3 initialised at 0; every branch has I1's label):
    L = 1/2 (e^{-w_1} L_SA + e^{-w_2} L_GLCA + e^{-w_3} L_PWCA + w_1 + w_2 + w_3)
Inference: PWCA removed; the class probabilities of the SA and GLCA classifiers are added.

The registered layer is the softmax layer these three branches run: `layer(x)` is SA, `layer(x, context=c)` the
cross-attention of x's queries over c's keys/values (GLCA: c = all tokens, x = the selected ones; PWCA: c = [x; x2]).
The model-level assembly is `classify`, reached by a ViT with attention="dcal" (attn.models.vit, pool="cls"): the
SA stack and the PWCA stack run block by block through the same TransformerBlocks (shared weights); the SA calls
leave their normed inputs and attention weights in the stack's layer carry (attn.core.layer_carry), from which the
PWCA call of the same block takes its distractor's keys/values and the GLCA its rollout.

Shapes: the layer maps x [B, T, E] (context [B, Tc, E]) -> [B, T, E]; `classify` maps images [B, H, W, C] -> logits
float32 [B, num_classes] (training: the combined log-probabilities below; inference: log(½(p_SA + p_GLCA))).
Cost: training ~ 2x the ViT (the PWCA stack attends over 2T keys) plus one block over R + 1 queries and the
O(L B T^2) rollout; inference: the ViT plus that one GLCA block (the rollout needs the SA weights materialised).

Exact reductions (tests/cross/test_dcal.py): the layer without context is `softmax` (position="none") with the same
parameters; PWCA with an empty distractor (context = x, no second image) is that SA; GLCA with R = all patches and
the same weights is SA of those weights; one layer's rollout is 0.5 (mean_h S) + 0.5 E.

How the trainer gets the uncertainty-weighted loss without labels inside the model: in training `classify` returns
z = Σ_i a_i log_softmax(z_i) with a_i = ½ e^{-w_i}, and sows into "losses" ½ Σ w_i - mean_b logsumexp_c(z). The
trainer's cross-entropy of z is Σ_i a_i CE_i + mean_b logsumexp_c(z), so its total is exactly the loss L above
(with config.loss_weights.losses = 1, the default). The reported training "loss" is that cross-entropy alone.

Deviations (what the paper leaves open or this codebase does differently):
  - PWCA shares all of SA's weights, its final norm and classifier included (the paper: "the PWCA branch shares
    weights with the SA branch").
  - The distractor I2 is the next image of the same shuffled batch (a random training image, as the paper samples
    it), its keys/values those of its own SA branch at the same block; gradients flow into I2's branch as well.
  - GLCA's query set always includes the CLS query (the paper's R selected queries need a class token for the GLCA
    classifier and for Re-ID's "final class tokens of SA and GLCA"); R = max(1, round(local_ratio * patches)).
  - The GLCA block has its own norms, attention, MLP, final norm and classifier ("does not share weights with SA");
    its input is the input of SA block L (the queries Q_L of the block whose rollout Ŝ_L selects them).
  - Rollout averages heads (Abnar & Zuidema; the paper does not say). Token selection is a hard top-R (no gradient).
  - Uncertainty weights start at w = 0 (the paper does not give FairMOT's initial values for DCAL).
  - No stochastic depth, no pretrained backbone (trained from scratch on the procedural task).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.layer_carry import current_carry, layer_carry
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import choice, in_range
from attn.registry import register

Array = jax.Array

# The key of DCAL's state in the block stack's layer carry.
CARRY_KEY = "dcal"


def attention_rollout(weights: Sequence[Array]) -> Array:
    """Ŝ_L = S̄_L ... S̄_1 with S̄_i = 0.5 mean_h(S_i) + 0.5 E: weights, per layer in order 1..L, [B, H, T, T] (or
    head-averaged [B, T, T]) -> float32 [B, T, T]. Rows of the result sum to 1 when the rows of every S_i do."""
    if not weights:
        raise ValueError("weights must hold at least one layer's attention weights; got none")
    rollout = None
    for i, w in enumerate(weights):
        if w.ndim not in (3, 4) or w.shape[-1] != w.shape[-2]:
            raise ValueError(f"weights[{i}] must be [B, H, T, T] or [B, T, T] self-attention weights; got {w.shape}")
        w = jnp.mean(w.astype(jnp.float32), axis=1) if w.ndim == 4 else w.astype(jnp.float32)
        bar = 0.5 * w + 0.5 * jnp.eye(w.shape[-1], dtype=jnp.float32)
        if rollout is not None and rollout.shape != bar.shape:
            raise ValueError(f"weights[{i}] has shape {w.shape}; earlier layers had {rollout.shape}")
        rollout = bar if rollout is None else jnp.einsum("bij,bjk->bik", bar, rollout)
    return rollout


def local_query_count(num_patches: int, local_ratio: float) -> int:
    """R = max(1, round(local_ratio * num_patches)) patch queries for GLCA (the paper's R = 10% for FGVC)."""
    if not 0.0 < local_ratio <= 1.0:
        raise ValueError(f"local_ratio={local_ratio} must be in (0, 1]")
    return max(1, min(num_patches, round(local_ratio * num_patches)))


def select_local_queries(rollout: Array, count: int) -> Array:
    """Indices int32 [B, 1 + count] into the T tokens: 0 (the CLS token), then the `count` patch tokens (1..T-1)
    with the highest CLS-row response rollout[:, 0, 1:], highest first. rollout [B, T, T]."""
    patches = rollout.shape[-1] - 1
    if not 1 <= count <= patches:
        raise ValueError(f"count={count} must be in [1, {patches}] (the patch tokens of the rollout)")
    _, top = jax.lax.top_k(jax.lax.stop_gradient(rollout[:, 0, 1:]), count)
    cls = jnp.zeros((rollout.shape[0], 1), jnp.int32)
    return jnp.concatenate([cls, top.astype(jnp.int32) + 1], axis=1)


@register(
    "dcal",
    family="cross",
    paper="Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification",
    catalog=46,
    op=attention_rollout,
    input_kind="sequence",
    supports_causal=False,
    supports_decode=False,
    has_attention_weights=True,
    summary="ViT trained with global-local cross-attention on top-rollout tokens and pair-wise cross-attention "
    "with a distractor image (training only); SA + GLCA at inference (model: ViT with attention='dcal')",
    fidelity="paper",
    reference="arXiv 2205.02151 sec. 3.2 (rollout, GLCA), 3.3 (PWCA), 4.1 (M=1, T=L, shared SA/PWCA weights, "
    "FairMOT dynamic loss weights), appendix A (SA + GLCA probabilities at inference); no official code found "
    "(searched; only unofficial reimplementations, e.g. mossbee/dual_cross_attention_learning_re, whose rollout "
    "also averages heads)",
    validators={
        **SOFTMAX_VALIDATORS,
        "position": choice("none"),
        "local_ratio": in_range(0.0, 1.0, low_inclusive=False),
        "pair": choice(True, False),
    },
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "position": "'none' only (the ViT adds learned positions to the tokens)",
        "local_ratio": "GLCA: share of the patch tokens selected as local queries (paper: 0.1 FGVC, 0.3 Re-ID); "
        "read by the ViT's DCAL assembly",
        "pair": "PWCA: add the pair-wise branch with a distractor image in training (read by the ViT's DCAL assembly)",
    },
)
class DualCrossAttention(SoftmaxAttentionLayer):
    """Softmax attention of x [B, T, E] over itself (SA) or over `context` [B, Tc, E] (GLCA, PWCA) -> [B, T, E].

    Inside `classify`'s block stack, an SA call leaves its normed input and weights in the layer carry, and a call
    made while the carry's "pair" flag is set is PWCA: its keys/values are [x; the stored input of the next image
    of the batch]."""

    position: str = "none"
    local_ratio: float = 0.1
    pair: bool = True

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.decode:
            raise ValueError("dcal does not decode (decode=True): it is an image encoder layer")
        if call.context is not None and call.context.shape[-1] != call.x.shape[-1]:
            raise ValueError(
                f"context width {call.context.shape[-1]} differs from x width {call.x.shape[-1]}: GLCA and PWCA "
                "project both with the same key/value weights"
            )
        if call.context is not None and call.context.shape[0] != call.x.shape[0]:
            raise ValueError(f"context batch {call.context.shape[0]} differs from x batch {call.x.shape[0]}")

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        state = _stack_state()
        if state is not None and context is None:
            if state["pair"]:  # PWCA: this image's tokens and its distractor's, through the same projections
                context = jnp.concatenate([x, jnp.roll(state["input"], 1, axis=0)], axis=1)
            else:  # SA inside the DCAL stack: the next PWCA call of this block reads it
                state["input"] = x
        return super().project_qkv(x, context)

    def prob_mod(self, weights: Array, call: AttentionCall) -> Array:
        state = _stack_state()
        if state is not None and not state["pair"] and call.context is None:
            state["weights"].append(weights)
        return weights


def _stack_state() -> dict[str, Any] | None:
    carry = current_carry()
    return None if carry is None else carry.get(CARRY_KEY)


def combined_log_probs(logits: Sequence[Array], loss_weights: Array) -> Array:
    """Σ_i ½ e^{-w_i} log_softmax(logits_i): logits, one float [B, C] per branch; loss_weights w float [n]."""
    scale = 0.5 * jnp.exp(-loss_weights.astype(jnp.float32))
    return sum(scale[i] * jax.nn.log_softmax(z.astype(jnp.float32), axis=-1) for i, z in enumerate(logits))


def classify(model: Any, images: Array, grid: tuple[int, int], *, deterministic: bool) -> Array:
    """DCAL's SA, GLCA and (training) PWCA branches of a ViT `model` (pool="cls", attention="dcal"), inside its
    compact __call__: images [B, H, W, C] -> float32 [B, num_classes] (see the module docstring).

    Parameters: the ViT's own (`patch_embedding`, `position_embedding`, `cls_token`, `layers_<i>`, `final_norm`,
    `classifier`), plus `glca` (a block), `glca_norm`, `glca_classifier` and `dcal_loss_weights` [3] (w_SA, w_GLCA,
    w_PWCA; only the entries of the branches in use enter the loss). Sown intermediates: `dcal_local_indices` int
    [B, 1 + R] (the GLCA query tokens) and `dcal_branch_logits` float32 [n, B, C] (SA, GLCA[, PWCA in training]).
    """
    # The models import attn; importing them here keeps `import attn` free of cycles.
    from attn.models.block import TransformerBlock
    from attn.models.encoder import classifier
    from attn.models.layers import make_norm
    from attn.models.trunk import block_fields, resolve_layers
    from attn.models.vit import embed_patches

    if model.pool != "cls":
        raise ValueError(
            f"attention='dcal' needs pool='cls' (its rollout starts from the class token); got {model.pool!r}"
        )
    if model.head != "classification" or model.token_pooling is not None:
        raise ValueError("attention='dcal' supports head='classification' without token_pooling only")
    if model.num_layers < 1:
        raise ValueError(f"attention='dcal' needs num_layers >= 1; got {model.num_layers}")
    layers = resolve_layers(model)
    options = layers[0][1]
    if any(layer != layers[0] for layer in layers):
        raise ValueError("attention='dcal' needs the same mechanism and options in every layer")
    local_ratio, pair = options.get("local_ratio", 0.1), options.get("pair", True)
    fields = block_fields(model)
    norm_eps = fields["norm_eps"]

    def block(name: str) -> nn.Module:
        return TransformerBlock(mechanism="dcal", attention_options=options, name=name, **fields)

    def norm(name: str) -> nn.Module:
        return make_norm(model.norm, dtype=model.dtype, param_dtype=model.param_dtype, name=name, epsilon=norm_eps)

    x = embed_patches(model, images, grid, cls_token=True, deterministic=deterministic)
    use_pair = pair and not deterministic
    x_pair = x
    with layer_carry() as carry:
        state = carry[CARRY_KEY] = {"pair": False, "input": None, "weights": []}
        for i in range(model.num_layers):
            sa_block = block(f"layers_{i}")
            last_input = x
            x = sa_block(x, deterministic=deterministic)
            if use_pair:  # the same block (shared weights) with the distractor's keys/values of this block
                state["pair"] = True
                x_pair = sa_block(x_pair, deterministic=deterministic)
                state["pair"] = False
        rollout = attention_rollout(state["weights"])
    final_norm = norm("final_norm")
    head = classifier(model.num_classes, dtype=model.dtype, param_dtype=model.param_dtype)
    sa_logits = head(final_norm(x)[:, 0])

    # GLCA: the selected queries of block L's input attend all of its tokens, in a block of its own.
    index = select_local_queries(rollout, local_query_count(x.shape[1] - 1, local_ratio))
    local = jnp.take_along_axis(last_input, index[..., None], axis=1)
    g = GlobalLocalBlock(attention_options=options, name="glca", **fields)(
        local, last_input, deterministic=deterministic
    )
    glca_logits = classifier(
        model.num_classes, dtype=model.dtype, param_dtype=model.param_dtype, name="glca_classifier"
    )(norm("glca_norm")(g)[:, 0])
    model.sow("intermediates", "dcal_local_indices", index)

    loss_weights = model.param(
        "dcal_loss_weights", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)), (3,)
    )
    loss_weights = jnp.asarray(loss_weights, jnp.float32)
    if deterministic:  # inference: SA + GLCA class probabilities (appendix A), as log-probabilities
        model.sow("intermediates", "dcal_branch_logits", jnp.stack([sa_logits, glca_logits]).astype(jnp.float32))
        sa, gl = (jax.nn.log_softmax(z.astype(jnp.float32), axis=-1) for z in (sa_logits, glca_logits))
        return jnp.logaddexp(sa, gl) - jnp.log(2.0)  # log(½(p_SA + p_GLCA)), finite where a probability underflows
    branches, used = [sa_logits, glca_logits], [0, 1]
    if use_pair:
        branches.append(head(final_norm(x_pair)[:, 0]))
        used.append(2)
    model.sow("intermediates", "dcal_branch_logits", jnp.stack(branches).astype(jnp.float32))  # [n, B, C]
    w = loss_weights[jnp.array(used)]
    z = combined_log_probs(branches, w)
    model.sow("losses", "dcal_uncertainty", 0.5 * jnp.sum(w) - jnp.mean(jax.nn.logsumexp(z, axis=-1)))
    return z


class GlobalLocalBlock(nn.Module):
    """The GLCA block: a pre-norm block whose attention takes the queries of the selected tokens and the keys/values
    of all tokens (one norm for both, as SA's queries and keys come from one normed input).

        h = local + dcal(LN(local), context=LN(tokens)),   out = h + MLP(LN(h))      local [B, R, E] -> [B, R, E]

    Submodules named as a TransformerBlock's (attention_norm, attention, mlp_norm, feed_forward)."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    norm: str
    mlp: str
    attention_options: Any = None
    num_kv_heads: int | None = None
    norm_eps: float = 1e-6
    mlp_bias: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, local: Array, tokens: Array, *, deterministic: bool) -> Array:
        import attn
        from attn.models.layers import Mlp, make_norm

        def norm(name: str) -> nn.Module:
            return make_norm(
                self.norm, dtype=self.dtype, param_dtype=self.param_dtype, name=name, epsilon=self.norm_eps
            )

        attention = attn.build(
            "dcal",
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **dict(self.attention_options or {}),
        ).clone(parent=self, name="attention")
        dropout = nn.Dropout(self.dropout_rate)
        attention_norm = norm("attention_norm")
        h = attention(attention_norm(local), context=attention_norm(tokens), deterministic=deterministic)
        x = local + dropout(h, deterministic=deterministic)
        mlp = Mlp(
            self.mlp_dim,
            self.mlp,
            use_bias=self.mlp_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="feed_forward",
        )
        return x + dropout(mlp(norm("mlp_norm")(x)), deterministic=deterministic)
