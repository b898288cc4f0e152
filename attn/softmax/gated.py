"""`gated`: head-specific, query-dependent output gating of softmax attention.

Paper: "Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free"
(Qiu et al., 2025; code github.com/qiuzh20/gated_attention).

The paper's best variant (position "G1") multiplies the per-head SDPA output by a sigmoid gate computed from the
layer input x (the hidden state after the pre-norm) of the *same* token, before the output projection:

    o_h   = softmax(q_h k_g^T / sqrt(d) + bias + mask) v_g              (the `softmax` layer's SDPA)
    g_h   = act(x W_theta^h)          elementwise: W_theta^h [E, D] (one gate per channel of head h)
                                      headwise:    W_theta^h [E, 1] (one scalar per head)
    y     = concat_h(o_h * g_h) W_o                                     gate_position="sdpa" (G1)

The paper's "G2" variant gates the value projection instead (the gate of key token j is computed from x_j):

    v_g   = (c W_v^g) * act(c W_theta^g)                               gate_position="value" (G2)

act is sigmoid (the paper's choice; "silu" is its ablation). In the official code the gate logits are extra
output columns of the query projection, i.e. a separate [E, H, D] (or [E, H, 1]) kernel with the q/k/v bias
setting; here that kernel is the "gate" parameter (bias when use_bias).

Shapes: x [B, T, E] -> [B, T, E]; gate [B, T, H, D] (elementwise) or [B, T, H, 1] (headwise); with
gate_position="value" the gate has the kv heads. Cost: the softmax layer's O(B H T^2 D) plus one projection
O(B T E H D) (elementwise) or O(B T E H) (headwise). The gate depends only on token t, so causality, GQA/MQA,
positions and the KV cache are unchanged (for "value" the cached values are the gated ones).

Reduction to softmax: gate="none" is exactly the `softmax` layer with the same parameters. With a gate bias of
+30 and a zero gate kernel, sigmoid(30) == 1 in float32 and the output equals `softmax` exactly; with a zero
kernel and no bias the gate is 1/2, i.e. `softmax` with W_o halved.

The output gate is the layer template's `output_gate` stage (attn/core/layer.py), which every output-gated
mechanism (e.g. `clipped_softmax`'s gated attention, `moh`) overrides; the per-head outputs are gated before the
`head_outputs` stage, so interventions on heads see the gated outputs that enter the output projection.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from attn.core.layer import HeadProjection
from attn.core.validation import check_choice, choice
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

GATES = ("elementwise", "headwise", "none")
GATE_POSITIONS = ("sdpa", "value")
GATE_ACTIVATIONS = ("sigmoid", "silu")


def gate_activation(name: str, logits: Array) -> Array:
    check_choice("gate_activation", name, GATE_ACTIVATIONS)
    return jax.nn.sigmoid(logits) if name == "sigmoid" else jax.nn.silu(logits)


@register(
    "gated",
    family="softmax",
    paper="Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free",
    catalog=55,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="softmax attention with a query-dependent sigmoid gate per head (elementwise/headwise) after SDPA",
    fidelity="official-code",
    reference="github.com/qiuzh20/gated_attention (gate from the pre-norm hidden state, G1 after SDPA, G2 on values)",
    has_attention_weights=True,
    validators={
        "gate": choice(*GATES),
        "gate_position": choice(*GATE_POSITIONS),
        "gate_activation": choice(*GATE_ACTIVATIONS),
    },
    option_docs={
        "gate": "'elementwise' (one gate per head channel), 'headwise' (one scalar per head) or 'none' (= softmax)",
        "gate_position": "'sdpa': gate the SDPA output (paper's G1, best); 'value': gate the value projection (G2)",
        "gate_activation": "'sigmoid' (paper) or 'silu' (the paper's ablation)",
    },
)
class GatedAttention(MultiHeadAttention):
    """Softmax attention with a head-specific gate act(x W_theta) on the SDPA output or the values.
    x [B, T, E] -> [B, T, E]."""

    gate: str = "elementwise"
    gate_position: str = "sdpa"
    gate_activation: str = "sigmoid"

    def _gate(self, source: Array, heads: int, heads_axis: str) -> Array:
        """act(source W_theta): [B, T, heads, D] (elementwise) or [B, T, heads, 1] (headwise)."""
        logits = HeadProjection(
            heads=heads,
            head_dim=self.head_dim if self.gate == "elementwise" else 1,
            heads_axis=heads_axis,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="gate",
        )(source)
        logits = nn.with_logical_constraint(logits, ("batch", "length", heads_axis, "head_dim"))
        return gate_activation(self.gate_activation, logits)

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        q, k, v = super().project_qkv(x, context)
        if self.gate != "none" and self.gate_position == "value":
            gate = self._gate(x if context is None else context, self.kv_heads, "kv_heads")
            if self.wants_weights():
                self.sow("intermediates", "gate_scores", gate)
            v = v * gate.astype(v.dtype)
        return q, k, v

    def output_gate(self, x: Array) -> Array | None:
        if self.gate == "none" or self.gate_position != "sdpa":
            return None
        return self._gate(x, self.num_heads, "heads")
