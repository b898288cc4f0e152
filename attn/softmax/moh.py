"""`moh`: Mixture-of-Head attention — heads as experts, per-token top-k head routing, weighted head summation.

Paper: "MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin, Zhu, Yuan, Yan, 2024; code
github.com/SkyworkAI/MoH, whose MoH-ViT / MoH-DiT attention fixed the constants below).

Multi-head attention is a sum over heads, MHA(x) = sum_i o_i W_O^i (o_i the output of head i, W_O^i its slice
of the output projection). MoH turns the plain sum into a routed, weighted sum with the same parameters plus a
small router:

    o_i     = softmax(q_i k_g^T / sqrt(d) + bias + mask) v_g              (the `softmax` layer's heads)
    y_t     = sum_i g_i(x_t) o_i,t W_O^i                                  (weighted summation)

The first h_s heads are shared (always active), the other H - h_s are routed; each token activates the top K
routed heads. With E = H - h_s routed heads and router kernels W_s [E_x, h_s], W_r [E_x, E], W_h [E_x, 2]:

    p      = softmax(x_t W_r)                                   routing scores over the routed heads [E]
    m      = 1 for the K largest entries of p, else 0          (per token)
    g_r    = K * (p * m) / sum(p * m)                            routed gates (renormalised over the chosen K)
    g_s    = h_s * softmax(x_t W_s)                              shared gates (1 when h_s == 1: W_s is omitted)
    [a1, a2] = 2 * softmax(x_t W_h)                              two-stage mixing of shared vs routed heads
    g      = [a1 * g_s, a2 * g_r]                                 (a1 = a2 = 1 and W_h omitted when h_s == 0 or K == 0)

The paper writes g_i = a1 softmax(W_s x)_i and a2 softmax(W_r x)_i on the top-K; the factors K, h_s and 2 and the
renormalisation over the chosen K are those of the official code: they make every gate 1 when the router is
uniform (zero router kernels). The router kernels have no bias and start like PyTorch's default Linear init, as
in the official code.

Load balance (routed heads only; sown as self.sow("losses", "moh_load_balance", L)):

    f_i = mean_t m_t,i   (fraction of tokens that chose head i)     P_i = mean_t p_t,i
    L   = E * sum_i f_i P_i        (the official code's E^2 * mean_i(f_i P_i); equals K under uniform routing)

The mean runs over all B * T tokens of the call (as in the official code, padding included).

Shapes: x [B, T, E_x] -> [B, T, E_x]; gates float32 [B, T, H] (sown as "gate_scores" [B, T, H, 1] when
intermediates are captured). Cost: the `softmax` layer's O(B H T^2 D) — every head is computed densely and then
weighted, so there is no speed-up here (a gather-based sparse variant would skip unchosen heads) — plus the router
O(B T E_x H). The gates depend on token t only, so causality, GQA/MQA, positions and the KV cache are those of
`softmax`.

Reduction to softmax: with K = H - h_s (every head active) and zero router kernels (a uniform router), every gate is
exactly 1 and the layer equals the `softmax` layer with the same q/k/v/o parameters (to float32 rounding of the
gate normalisation, ~1 ulp).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.validation import non_negative_int, optional
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array


def moh_gates(
    x: Array,
    routed_kernel: Array | None,
    shared_kernel: Array | None,
    mixing_kernel: Array | None,
    *,
    num_heads: int,
    shared_heads: int,
    top_k: int,
) -> tuple[Array, Array | None]:
    """The MoH head gates and the load-balance loss.

    Args:
      x: [B, T, E] router input (the layer input). Kernels: routed [E, H - h_s], shared [E, h_s] (None when
        h_s <= 1), mixing [E, 2] (None when h_s == 0 or top_k == 0).
    Returns:
      (gates float32 [B, T, H] with h_s + top_k non-zero entries per token, load-balance loss float32 scalar or
      None when no head is routed).
    """
    x = x.astype(jnp.float32)
    routed = num_heads - shared_heads
    parts = []
    if shared_heads:
        if shared_kernel is None:
            shared = jnp.ones((*x.shape[:-1], shared_heads), jnp.float32)
        else:
            shared = shared_heads * jax.nn.softmax(x @ jnp.asarray(shared_kernel, jnp.float32), axis=-1)
        parts.append(shared)
    loss = None
    if top_k:
        scores = jax.nn.softmax(x @ jnp.asarray(routed_kernel, jnp.float32), axis=-1)  # [B, T, E]
        _, chosen = jax.lax.top_k(scores, top_k)
        selected = jnp.sum(jax.nn.one_hot(chosen, routed, dtype=jnp.float32), axis=-2)  # [B, T, E] in {0, 1}
        kept = scores * selected
        denom = jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)
        routed_gates = top_k * kept / denom
        fraction = jnp.mean(selected.reshape(-1, routed), axis=0)
        probability = jnp.mean(scores.reshape(-1, routed), axis=0)
        loss = routed * jnp.sum(fraction * probability)
        if shared_heads:
            mixing = 2.0 * jax.nn.softmax(x @ jnp.asarray(mixing_kernel, jnp.float32), axis=-1)  # [B, T, 2]
            parts = [parts[0] * mixing[..., :1]]
            routed_gates = routed_gates * mixing[..., 1:]
        parts.append(routed_gates)
    elif routed:
        parts.append(jnp.zeros((*x.shape[:-1], routed), jnp.float32))
    return jnp.concatenate(parts, axis=-1), loss


@register(
    "moh",
    family="softmax",
    paper="MoH: Multi-Head Attention as Mixture-of-Head Attention",
    catalog=20,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="heads as experts: shared heads + per-token top-k routed heads, weighted head sum, load-balance loss",
    has_attention_weights=True,
    option_docs={
        "shared_heads": "h_s heads that every token uses (the first h_s heads); None = num_heads // 2",
        "top_k": "routed heads each token activates among the num_heads - h_s others; None = half of them",
    },
    fidelity="official-code",
    reference="github.com/SkyworkAI/MoH (MoH-ViT / MoH-DiT attention): gate factors K, h_s and 2, renormalisation "
    "over the top-K, load-balance loss",
    validators={"shared_heads": optional(non_negative_int), "top_k": optional(non_negative_int)},
)
class MixtureOfHeadAttention(MultiHeadAttention):
    """Softmax attention whose heads are summed with per-token router weights (top-k routed + shared heads).
    x [B, T, E] -> [B, T, E]; sows the load-balance loss under "losses"/"moh_load_balance"."""

    shared_heads: int | None = None
    top_k: int | None = None

    def head_counts(self) -> tuple[int, int]:
        """(h_s, K) after defaults and validation."""
        heads = self.num_heads
        shared = heads // 2 if self.shared_heads is None else self.shared_heads
        if not (isinstance(shared, int) and 0 <= shared <= heads):
            raise ValueError(f"shared_heads={self.shared_heads!r} must be an int in [0, num_heads={heads}]")
        routed = heads - shared
        top_k = routed // 2 if self.top_k is None else self.top_k
        if not (isinstance(top_k, int) and 0 <= top_k <= routed):
            raise ValueError(
                f"top_k={self.top_k!r} must be an int in [0, num_heads - shared_heads = {routed}] (the routed heads)"
            )
        if shared + top_k == 0:
            raise ValueError(f"shared_heads={shared} and top_k={top_k} activate no head; at least one must be > 0")
        return shared, top_k

    def output_gate(self, x: Array) -> Array:
        shared, top_k = self.head_counts()
        routed = self.num_heads - shared

        def router(name: str, outputs: int) -> Array:
            # U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Linear init, which the official code keeps.
            init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
            kernel = self.param(
                name,
                nn.with_logical_partitioning(init, ("embed", None)),
                (x.shape[-1], outputs),
                self.param_dtype,
            )
            return jnp.asarray(kernel, jnp.float32)

        routed_kernel = router("routed_router", routed) if top_k else None
        shared_kernel = router("shared_router", shared) if shared > 1 else None
        mixing_kernel = router("mixing_router", 2) if shared and top_k else None
        gates, loss = moh_gates(
            x,
            routed_kernel,
            shared_kernel,
            mixing_kernel,
            num_heads=self.num_heads,
            shared_heads=shared,
            top_k=top_k,
        )
        if loss is not None:
            self.sow("losses", "moh_load_balance", loss)
        gates = nn.with_logical_constraint(gates, ("batch", "length", "heads"))
        return gates[..., None]
