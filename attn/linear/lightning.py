"""`lightning`: TransNormerLLM's gated linear attention with Lightning Attention ([19] "Various Lengths, Constant
Speed: Efficient Language Modeling with Lightning Attention"), tiled as in Lightning Attention-2 ([117]).

TNL's token mixer (Gated Linear Attention, GLA), per head h of layer l:

    q = phi(x W_q), k = phi(x W_k), phi = swish;  v = x W_v;  u = x W_u
    q_s <- [q_s cos(theta s), q_s sin(theta s)], k_t likewise       (LRPE; with the decay below, TNL's LRPE-d:
                                                                     q_s . k_t = sum_i q_i k_i cos(theta_i (s - t)))
    o_s = sum_{t<=s} lambda_h^(s-t) (q_s . k_t) v_t                 (Lightning Attention; no softmax, no denominator)
    y   = (SRMSNorm(concat_h o_h) ⊙ u) W_o,   SRMSNorm(z) = z / sqrt(mean(z^2) + eps)

The decay is fixed (not learned: the paper found learnable lambda unstable), per head h and layer l. Two forms:

    "tnl" (default; the authors' released code, OpenNLPLab/TransnormerLLM modeling_transnormer.py):
        lambda_{h,l} = exp(-s_h (1 - l / (L - 1) + 1e-5)),  s_h = 2^(-8 h / H), h = 1..H,  l = 0..L-1
        (s_h are ALiBi's slopes, with ALiBi's rule for H not a power of two)
    "tnl_paper" (Eq. 10 of the paper, as printed): lambda_{h,l} = exp(-(8 h / H) (1 - l / L)), h = 1..H, l = 1..L
        (ordinals: "the h-th head in the l-th layer"; the last layer is undecayed)

The two differ in the head rate (8h/H in (0, 8] vs 2^(-8h/H) in [2^-8, 1/2)): read literally, Eq. 10 gives every
head of the first layer lambda <= e^-1 (a receptive field of a few tokens), which contradicts the paper's aim of
"retaining full attention at the lower layers"; the released models were trained with "tnl", so it is the default.
In both, lower layers forget fastest.

Per layer: the spec declares `layer_fields=("layer_index", "num_layers")`, so every model that builds attention by
name (DecoderLM, Encoder, ViT, the encoder-decoder and VLM stacks) fills them for each of its layers from one
options dict, unless the user sets them in attention_options. LRPE: the paper applies it to the first layer only
(later layers keep only the decay; OpenNLPLab's model cards say the same of the released models), and the
released code takes a per-layer list (`linear_use_lrpe_list`). lrpe=None (default) follows the paper, LRPE iff
layer_index == 0; True / False force it on / off in this layer. A layer built alone (layer_index=0, num_layers=1)
therefore has LRPE.

Checked against the paper (Eqs. 9-14: LRPE-d a_st = q_s^T k_t lambda^(s-t) exp(i theta (s-t)) with learned theta;
GLA O = Norm(Q K^T V) ⊙ U with U = X W_u, no activation on U or V; phi = swish;
SRMSNorm(x) = x / (||x||_2 / sqrt(d)) over the concatenated heads) and the released code (theta initialised to
10000^(-2 i / (H D)) over the flattened (head, dim) index; q, k <- [x cos(theta t), x sin(theta t)]).
The sum is computed by the chunked core (Lightning Attention-2):
masked attention with the decay matrix inside each chunk, the decayed [D, D] state carried across chunks — no
cumsum over the sequence, no T x T array. TNL is a causal LM; without a causal mask (encoders, ViT) this layer
weighs key t by lambda_h^|s - t| (a causal pass plus a reversed one), still without a T x T array.

Shapes: x [B, T, E] -> [B, T, E]; LRPE doubles the key dimension (state [B, H, 2D, D]). Time O(B H T (C D + D^2)),
memory O(B H T (C + D)); decoding is O(H D^2) per token with the state in "cache". Setting decay="none",
lrpe=False, output_norm="none", gate=False, feature_map="identity" gives exactly `linear` with
feature_map="identity", normalize=False (the same parameters). Nothing reduces it to softmax attention.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.core.feature_maps import FEATURE_MAPS
from attn.core.layer import AttentionCall
from attn.core.positions import alibi_slopes
from attn.core.validation import check_choice, choice, non_negative_int, optional, positive, positive_int
from attn.linear.linear import BASE_OPTION_DOCS, LinearAttentionBase
from attn.registry import register

Array = jax.Array

DECAYS = ("tnl", "tnl_paper", "none")


def tnl_decay(num_heads: int, layer_index: int, num_layers: int, form: str = "tnl") -> np.ndarray:
    """TransNormerLLM's per-head decay lambda_h of layer `layer_index` (0-based) of `num_layers`: float32 [H].

    form="tnl": the released code's schedule; form="tnl_paper": the paper's Eq. 10 (see the module docstring).
    """
    if num_layers < 1 or not 0 <= layer_index < num_layers:
        raise ValueError(f"layer_index={layer_index} must lie in [0, num_layers) with num_layers={num_layers} >= 1")
    check_choice("decay", form, DECAYS[:2])
    if form == "tnl_paper":
        heads = np.arange(1, num_heads + 1, dtype=np.float64)
        rate = 8.0 * heads / num_heads * (1.0 - (layer_index + 1) / num_layers)
        return np.exp(-rate).astype(np.float32)
    depth = 1.0 - layer_index / (num_layers - 1) if num_layers > 1 else 1.0
    rate = alibi_slopes(num_heads).astype(np.float64) * (depth + 1e-5)
    return np.exp(-rate).astype(np.float32)


class Lrpe(nn.Module):
    """LRPE (linearized relative positional encoding) of TransNormerLLM: x [B, T, heads, D] -> [B, T, heads, 2D].

    theta [KVH, D] is learned, initialised to 10000^(-2 i / (KVH D)) over the flattened (head, dim) index; query
    head h uses the theta of its kv head, so q_s . k_t depends on s - t only.
    """

    kv_heads: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, positions: Array) -> Array:
        dim = x.shape[-1]

        def init(key, shape, dtype):
            del key
            return (
                (10000.0 ** (-2.0 / (shape[0] * shape[1]) * jnp.arange(shape[0] * shape[1])))
                .reshape(shape)
                .astype(dtype)
            )

        theta = self.param(
            "theta",
            nn.with_logical_partitioning(init, ("kv_heads", "head_dim")),
            (self.kv_heads, dim),
            self.param_dtype,
        )
        theta = jnp.repeat(jnp.asarray(theta, jnp.float32), x.shape[2] // self.kv_heads, axis=0)
        angle = jnp.asarray(positions, jnp.float32)[:, :, None, None] * theta
        x = x.astype(jnp.float32)
        return jnp.concatenate([x * jnp.cos(angle), x * jnp.sin(angle)], axis=-1)


@register(
    "lightning",
    family="linear",
    paper="Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
    catalog=19,
    op=F.linear_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="TransNormerLLM gated linear attention: per-head decay, LRPE, SRMSNorm; Lightning-2 chunked scan [117]",
    option_docs={
        "feature_map": "phi on q and k: 'silu' (TNL's swish), 'elu_plus_one', 'relu' or 'identity'",
        "decay": "'tnl' (released code: lambda_h = exp(-2^(-8h/H) (1 - l/(L-1) + 1e-5))), 'tnl_paper' (Eq. 10 as "
        "printed: exp(-(8h/H)(1 - l/L)), h, l 1-based) or 'none' (lambda = 1)",
        "layer_index": "this layer's index l (0-based), for the TNL decay schedule",
        "num_layers": "number of layers L of the model, for the TNL decay schedule",
        "lrpe": "LRPE (learned relative cos/sin encoding of q and k; doubles the key dimension): None = the paper's "
        "placement (first layer only: layer_index == 0), True / False = on / off in this layer",
        "output_norm": "norm of the concatenated head outputs: 'srms' (TNL), 'rmsnorm', 'layernorm' or 'none'",
        "gate": "multiply the normalised output by the gate u = x W_u (TNL's GLA)",
        **BASE_OPTION_DOCS,
    },
    fidelity="official-code",
    reference="OpenNLPLab's released modeling_transnormer.py (TransnormerModel: slope_rate * (1 - idx / (L - 1) + "
    "1e-5) per layer, linear_use_lrpe_list; Lrpe init), the paper's Eqs. 9-14 (decay='tnl_paper' is Eq. 10 as "
    "printed) and its and the model cards' LRPE in the first layer only",
    layer_fields=("layer_index", "num_layers"),
    validators={
        "chunk_size": positive_int,
        "eps": positive,
        "feature_map": choice(*FEATURE_MAPS),
        "decay": choice(*DECAYS),
        "layer_index": non_negative_int,
        "num_layers": positive_int,
        "output_norm": choice("none", "srms", "rmsnorm", "layernorm"),
        "lrpe": optional(choice(True, False)),
    },
)
class LightningAttention(LinearAttentionBase):
    """TransNormerLLM gated linear attention on the Lightning chunked scan. x [B, T, E] -> [B, T, E]."""

    feature_map: str = "silu"
    decay: str = "tnl"
    layer_index: int = 0
    num_layers: int = 1
    lrpe: bool | None = None
    output_norm: str = "srms"
    gate: bool = True

    mechanism_name = "lightning"

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        tnl_decay(1, self.layer_index, self.num_layers)  # layer_index must lie in [0, num_layers)

    @property
    def uses_lrpe(self) -> bool:
        """Whether this layer applies LRPE: `lrpe`, or with lrpe=None the paper's rule (the first layer only)."""
        return self.layer_index == 0 if self.lrpe is None else self.lrpe

    def map_features(self, q: Array, k: Array, q_pos: Array, k_pos: Array) -> tuple[Array, Array]:
        phi = FEATURE_MAPS[self.feature_map]
        q, k = phi(q), phi(k)
        if self.uses_lrpe:
            lrpe = Lrpe(kv_heads=self.kv_heads, param_dtype=self.param_dtype, name="lrpe")
            q, k = lrpe(q, q_pos), lrpe(k, k_pos)
        return q, k

    def decay_rates(self) -> Array | None:
        if self.decay == "none":
            return None
        return jnp.asarray(tnl_decay(self.num_heads, self.layer_index, self.num_layers, self.decay))

    def finish(self, y: Array) -> Array:
        return self.norm_heads(y, self.output_norm)

    def output_gate(self, x: Array) -> Array | None:
        """TNL's GLA gate u = x W_u [B, T, H, D] (no activation), multiplied into the normalised outputs."""
        return self.dense_heads(x, self.num_heads, "heads", "gate") if self.gate else None
