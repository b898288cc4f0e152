"""`criss_cross`: recurrent criss-cross attention, from "CCNet: Criss-Cross Attention for Semantic Segmentation"
(Huang et al., catalog [180]).

Every pixel u of the 2-D grid [H, W] attends to the H + W - 1 pixels of its criss-cross path (its row and its
column, u itself counted once), with one joint softmax over the path, and the module adds its output to its input
through a learned gate gamma (initialised to 0, as in the paper):

    q, k = h W_q, h W_k   (reduced channels: head_dim // qk_reduction per head; the paper's C/8)
    v = h W_v
    A_u = softmax_{j in row(u) or column(u)}(scale * q_u . k_j)
    CCA(h)_u = concat_heads(sum_j A_uj v_j) W_o
    h_{r+1} = h_r + gamma * CCA(h_r),   h_0 = x,   output h_R

The module is applied R = `recurrence` times with shared weights (the paper's RCCA, R = 2): after one step a pixel
has seen its row and column; after two, every pixel of the image (a pixel reaches any (i, j) through the pixels
(i, col(u)) and (row(u), j)). The paper's module has one head, no logit scale (scale = 1) and a single value
convolution C -> C; here the value projection and the output projection W_o factor that convolution (with
num_heads=1 and head_dim = C they span the same maps), and heads / GQA are allowed. Note that the output contains
the input (h_R = x + ...): inside a pre-norm transformer block that adds its own residual, the block computes
x + norm(x) + ..., which is how the paper's module composes with a backbone.

Implementation: row and column logits with einsums ([B, H, W, heads, W] and [.., H]), the column branch masks u
itself, one float32 softmax over the concatenation. Time O(R B N (H + W) heads (D_qk + D)) and memory
O(B N (H + W) heads) for N = H W tokens (never N x N). No setting reduces it exactly to plain softmax attention
(the output always carries the gated residual); on a 1 x W grid one step is x + gamma * (softmax attention over the
row) W_o. No causal masking, no decoding.

Attention weights (when captured) are sown once per recurrence step, each float32 [B, heads, N, N]; so are the
per-head outputs (`head_outputs` [B, H, W, heads, D], where head interventions act on every step).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.core.layer import AttentionCall, HeadProjection, OutputProjection, SpatialAttentionLayer
from attn.core.masks import Mask
from attn.core.neighborhood import window_probs_to_dense
from attn.core.validation import check_rank, optional, positive, positive_int
from attn.registry import register

Array = jax.Array


def criss_cross_keys(height: int, width: int) -> np.ndarray:
    """int32 [N, H + W]: for pixel u = (i, j) (row-major), the flat keys of its column (l, j), l < H, then of its
    row (i, l), l < W, in the order of the joint softmax (u appears twice; the column copy is masked)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    column = np.arange(height)[None, None, :] * width + cols[..., None]
    row = rows[..., None] * width + np.arange(width)[None, None, :]
    return np.concatenate([column, row], axis=-1).reshape(height * width, height + width).astype(np.int32)


@register(
    "criss_cross",
    family="local",
    paper="CCNet: Criss-Cross Attention for Semantic Segmentation",
    catalog=180,
    input_kind="spatial",
    supports_causal=False,
    supports_decode=False,
    summary="CCNet criss-cross attention: each pixel attends to its row and column, recurrent (R=2 sees the image)",
    option_docs={
        "recurrence": "number of criss-cross steps with shared weights, h <- h + gamma * CCA(h) (the paper's R = 2)",
        "qk_reduction": "query/key channels are head_dim // qk_reduction per head (the paper's C/8 with 8)",
        "scale": "logit scale; 1.0 is the paper's unscaled dot product, None = 1/sqrt(query/key channels)",
        "gamma_init": "initial gate gamma; 0 is the paper's (inside a transformer trained from scratch with Adam it "
        "can stay stuck near 0, see benchmarks/results/vit_spatial_cpu.json; 1 opens the gate from the start)",
    },
    fidelity="paper",
    reference="CCNet paper: criss-cross attention and its recurrent form RCCA (R = 2), gamma initialised to 0",
    validators={"recurrence": positive_int, "qk_reduction": positive_int, "scale": optional(positive)},
)
class CrissCrossAttention(SpatialAttentionLayer):
    """Recurrent criss-cross attention: x [B, H, W, E] -> [B, H, W, E] (including the gated residual)."""

    recurrence: int = 2
    qk_reduction: int = 8
    scale: float | None = 1.0
    gamma_init: float = 0.0

    @property
    def qk_dim(self) -> int:
        return self.head_dim // self.qk_reduction

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        check_rank("x", call.x, 4, "[batch, height, width, embed] (criss-cross attention is 2-D)")
        if self.qk_reduction > self.head_dim:
            raise ValueError(
                f"qk_reduction={self.qk_reduction!r} must be an int between 1 and head_dim={self.head_dim} "
                "(query/key channels per head are head_dim // qk_reduction >= 1)"
            )

    # The recurrence h <- h + gamma * W_o(CCA(h)) projects q, k, v from every step's output and needs the output
    # projection between steps, so the template's single pass (project, attend, project out) cannot express it:
    # this override runs the template's stages (validate, attend, head_outputs) once per step.
    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        context: Array | None = None,
        mask: Mask | None = None,
        positions: Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> Array:
        """x [B, H, W, E] -> h_R [B, H, W, E] (the gated residual included)."""
        call = AttentionCall(
            x=x, context=context, mask=mask, positions=positions, decode=decode, deterministic=deterministic
        )
        self.validate(call)
        common = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        # Created once and called every step: the recurrence shares its weights.
        query = HeadProjection(self.num_heads, self.qk_dim, "heads", name="query", **common)
        key = HeadProjection(self.kv_heads, self.qk_dim, "kv_heads", name="key", **common)
        value = HeadProjection(self.kv_heads, self.head_dim, "kv_heads", name="value", **common)
        out = OutputProjection(x.shape[-1], name="out", **{**common, "use_bias": self.output_bias})
        gamma_init = nn.initializers.constant(self.gamma_init)
        gamma = self.param("gamma", nn.with_logical_partitioning(gamma_init, ()), (), self.param_dtype)

        h = x
        for _ in range(self.recurrence):
            y = self.head_outputs(self.attend(query(h), key(h), value(h), call), call)
            h = h + jnp.asarray(gamma, self.dtype) * out(y).astype(h.dtype)
        return h

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """One criss-cross step: q [B, H, W, heads, Dqk], k [B, H, W, KVH, Dqk], v [B, H, W, KVH, D] ->
        [B, H, W, heads, D]; sows the step's dense weights float32 [B, heads, N, N] when captured."""
        batch, height, width, heads, _ = q.shape
        kv_heads = k.shape[-2]
        scale = self.qk_dim**-0.5 if self.scale is None else self.scale
        q = q.reshape(*q.shape[:3], kv_heads, heads // kv_heads, q.shape[-1])
        column = jnp.einsum("bijkgd,bljkd->bijkgl", q, k, preferred_element_type=jnp.float32) * scale
        row = jnp.einsum("bijkgd,bilkd->bijkgl", q, k, preferred_element_type=jnp.float32) * scale
        # u sits on both its row and its column: the column copy is masked so the path has H + W - 1 pixels.
        itself = jnp.asarray(np.eye(height, dtype=bool))[None, :, None, None, None, :]
        column = jnp.where(itself, -jnp.inf, column)
        probs = jax.nn.softmax(jnp.concatenate([column, row], axis=-1), axis=-1)
        if self.wants_weights():
            dense = window_probs_to_dense(
                probs.reshape(batch, height * width, heads, height + width).transpose(0, 2, 1, 3),
                criss_cross_keys(height, width),
                height * width,
            )
            self.sow_capture("attention_weights", dense)
        probs = self.attention_dropout(probs, call.deterministic).astype(v.dtype)
        out = jnp.einsum("bijkgl,bljkd->bijkgd", probs[..., :height], v, preferred_element_type=jnp.float32)
        out = out + jnp.einsum("bijkgl,bilkd->bijkgd", probs[..., height:], v, preferred_element_type=jnp.float32)
        return out.reshape(batch, height, width, heads, v.shape[-1]).astype(q.dtype)
