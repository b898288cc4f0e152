"""`linear`: kernelised linear attention (Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", 2020 — a baseline, not a seed paper), and `LinearAttentionBase`, the layer
every mechanism of attn/linear builds on.

    q = phi(x W_q),  k = phi(c W_k),  v = c W_v                  (c = x, or the context for cross-attention)
    o_t = sum_{s<=t} (q_t . k_s) v_s / (sum_{s<=t} q_t . k_s + eps)                     (causal, normalize=True)
        = q_t S_t / (q_t z_t + eps),   S_t = S_{t-1} + k_t v_t^T,  z_t = z_{t-1} + k_t   (the same as a recurrence)
    y = concat_h(o_h) W_o

normalize=False drops the denominator (o_t = q_t S_t). Feature maps phi:
  elu_plus_one   elu(x) + 1 (the paper's choice)
  relu           max(x, 0)
  identity       x
  learnable      elu(x W_g + b_g) + 1 with one [head_dim, head_dim] map per kv head g (identity-initialised),
                 shared by the key of the group and its queries so that phi(q) . phi(k) stays a kernel.

Shapes: x [B, T, E] -> [B, T, E]; heads H, kv heads KVH (GQA/MQA), head_dim D. Time O(B H T (C D + D^2)) and
memory O(B H T (C + D)) with the chunked core (chunk C); decoding keeps the state [B, H, D, D (+1)] in the "cache"
collection, O(H D^2) per token whatever the length. No setting reduces it to softmax attention (no finite
feature map gives exp(q . k)). Masks: causal, q_lengths, kv_lengths (others raise). There are no attention
probabilities, so dropout_rate has no effect and nothing is sown as attention weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core import cache as cache_lib
from attn.core.feature_maps import FEATURE_MAPS, elu_plus_one
from attn.core.headwise_linear import HeadwiseLinear
from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.linear_scan import linear_mask_parts
from attn.core.validation import check_choice, choice, positive, positive_int
from attn.registry import register

Array = jax.Array

OUTPUT_NORMS = ("none", "srms", "rmsnorm", "layernorm")

# Docs of the fields LinearAttentionBase adds; subclasses pass them to `register` with their own.
BASE_OPTION_DOCS = {
    "chunk_size": "tokens per chunk of the chunked (Lightning Attention-2) scan",
    "eps": "epsilon of the denominator / output normalisation",
}


class LinearAttentionBase(AttentionLayer):
    """A sequence layer around `attn.functional.linear_attention` on the layer template, with a decode state.

    Stages: validate (the mask parts a linear state honours: causal, q_lengths, kv_lengths), prepare (positions;
    with decode=True the decode index), attend (map_features -> the chunked core -> finish). Subclasses override
    the hooks: `map_features` (q, k -> phi(q), phi(k)), `decay_rates` (None or float [H]), `uses_denominator`,
    `finish` (a norm of the per-head outputs [B, T, H, Dv]), the template's `output_gate`, or the whole `attend`.
    decode=True keeps the state [B, H, Dk, Dv (+1)] ("state") and the next position ("cache_index") in "cache", as an
    `attn.core.cache.RecurrentState`.
    """

    chunk_size: int = 64
    eps: float = 1e-6

    mechanism_name = "linear attention"

    # ------------------------------------------------------------------ template stages
    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        causal, q_lengths, kv_lengths = self.mask_parts(call)
        if call.cross and (causal or call.decode):
            raise ValueError(
                f"{self.mechanism_name} with a context (cross-attention) is non-causal and has no decode state; "
                f"got causal={causal}, decode={call.decode}"
            )
        if call.decode and not causal:
            raise ValueError(
                f"decode=True needs a causal mask (attn.Mask(causal=True)); {self.mechanism_name} got "
                f"mask={call.mask!r}"
            )
        if call.decode and (q_lengths is not None or kv_lengths is not None):
            raise ValueError("q_lengths / kv_lengths are not supported with decode=True (decode one row per sequence)")

    def mask_parts(self, call: AttentionCall) -> tuple[bool, Array | None, Array | None]:
        """(causal, q_lengths int [B] or None, kv_lengths int [B] or None) of the call's mask; other parts raise."""
        return linear_mask_parts(call.mask, self.mechanism_name)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """q_positions int [B, T] (from the decode index when decoding, which then advances by T), kv_positions
        (q_positions for self-attention, else int [1, S]) and q_offset (the first query's position)."""
        batch, length = q.shape[:2]
        offset = self.advance_decode_index(call.decode, length)
        q_pos = self.query_positions(call.positions, batch, length, offset)
        k_pos = q_pos if k.shape[1] == length else jnp.arange(k.shape[1], dtype=jnp.int32)[None]
        return q, k, v, call.replace(q_positions=q_pos, kv_positions=k_pos, q_offset=offset)

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, T, H, D], k/v [B, S, KVH, D] -> [B, T, H, Dv]: finish(core(phi(q), phi(k), v))."""
        causal, q_lengths, kv_lengths = self.mask_parts(call)
        q, k = self.map_features(q, k, call.q_positions, call.kv_positions)
        y = self.linear_core(
            q,
            k,
            v,
            causal=causal,
            decay=self.decay_rates(),
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            decode=call.decode,
        )
        return self.finish(y)

    # ------------------------------------------------------------------ hooks
    def map_features(self, q: Array, k: Array, q_pos: Array, k_pos: Array) -> tuple[Array, Array]:
        return q, k

    def decay_rates(self) -> Array | None:
        return None

    def uses_denominator(self) -> bool:
        return False

    def finish(self, y: Array) -> Array:
        """The per-head outputs [B, T, H, Dv] after the core, before the output gate (default unchanged)."""
        return y

    # ------------------------------------------------------------------ shared pieces
    def advance_decode_index(self, decode: bool, length: int) -> Array | int:
        """Position of the first token of this call: 0, or the decode index (which then advances by `length`)."""
        if not decode:
            return 0
        recurrent = cache_lib.load_state(self, ())
        if recurrent is None:  # the cache-creating call is an ordinary forward from position 0
            cache_lib.store_state(self, cache_lib.RecurrentState(state={}, index=jnp.array(0, jnp.int32)))
            return 0
        cache_lib.store_state(self, recurrent.replace(index=recurrent.index + length))
        return recurrent.index

    def linear_core(
        self,
        q: Array,
        k: Array,
        v: Array,
        *,
        causal: bool,
        decay: Array | None,
        q_lengths: Array | None,
        kv_lengths: Array | None,
        decode: bool,
    ) -> Array:
        """Runs the chunked core; with decode=True continues from (and updates) the cached state."""
        options = dict(
            causal=causal,
            decay=decay,
            normalize=self.uses_denominator(),
            eps=self.eps,
            chunk_size=self.chunk_size,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            implementation=self.implementation,
        )
        if not decode:
            return F.linear_attention(q, k, v, **options)
        # the recurrent state on the cache protocol: [B, H, Dk, Dv (+1)], index advanced by prepare
        names = (("state", ("batch", "heads", "head_dim", None)),)
        index = self.get_variable("cache", cache_lib.RECURRENT_INDEX)
        if not self.has_variable("cache", "state"):
            shape = (q.shape[0], q.shape[2], q.shape[3], v.shape[3] + int(self.uses_denominator()))
            empty = cache_lib.RecurrentState({"state": jnp.zeros(shape, jnp.float32)}, index, names)
            cache_lib.store_state(self, empty)
            return F.linear_attention(q, k, v, **options)
        recurrent = cache_lib.load_state(self, ("state",))
        y, state = F.linear_attention(q, k, v, initial_state=recurrent.state["state"], return_state=True, **options)
        cache_lib.store_state(self, cache_lib.RecurrentState({"state": state}, index, names))
        return y

    def norm_heads(self, y: Array, kind: str, name: str = "output_norm") -> Array:
        """Normalises each token's concatenated head outputs y [B, T, H, Dv] over (H, Dv).

        "srms": y / rms(y) (TransNormerLLM's SimpleRMSNorm, no parameters); "rmsnorm" / "layernorm": with a
        learned scale (and bias) [H, Dv] named ("heads", "head_dim"); "none": unchanged.
        """
        check_choice("output_norm", kind, OUTPUT_NORMS)
        if kind == "none":
            return y
        if kind == "srms":
            y32 = y.astype(jnp.float32)
            rms = jax.lax.rsqrt(jnp.mean(jnp.square(y32), axis=(-2, -1), keepdims=True) + self.eps)
            return (y32 * rms).astype(y.dtype)
        axes = ("heads", "head_dim")
        common = dict(
            epsilon=self.eps,
            reduction_axes=(-2, -1),
            feature_axes=(-2, -1),
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, axes),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        if kind == "rmsnorm":
            return nn.RMSNorm(**common)(y)
        return nn.LayerNorm(bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes), **common)(y)


LINEAR_FEATURE_MAPS = ("elu_plus_one", "relu", "identity", "learnable")


@register(
    "linear",
    family="linear",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention (baseline; not a seed paper)",
    catalog=None,
    op=F.linear_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="kernelised linear attention phi(q) (phi(k)^T v) / phi(q) sum phi(k); elu+1, relu, identity, learnable",
    option_docs={
        "feature_map": "phi: 'elu_plus_one', 'relu', 'identity' or 'learnable' (per kv-head linear map, then elu+1)",
        "normalize": "divide by phi(q_t) . sum_{s<=t} phi(k_s) (Katharopoulos et al.); False: no denominator",
        **BASE_OPTION_DOCS,
    },
    fidelity="paper",
    reference="Katharopoulos et al. 2020, Sec. 3.2 (linearized attention, elu + 1 feature map) and Secs. 3.3-3.4 "
    "(causal masking, RNN form)",
    validators={"chunk_size": positive_int, "eps": positive, "feature_map": choice(*LINEAR_FEATURE_MAPS)},
)
class LinearAttention(LinearAttentionBase):
    """Kernelised linear attention. x [B, T, E] -> [B, T, E]."""

    feature_map: str = "elu_plus_one"
    normalize: bool = True

    mechanism_name = "linear"

    def uses_denominator(self) -> bool:
        return self.normalize

    def map_features(self, q: Array, k: Array, q_pos: Array, k_pos: Array) -> tuple[Array, Array]:
        if self.feature_map != "learnable":
            phi = FEATURE_MAPS[self.feature_map]
            return phi(q), phi(k)
        shared = HeadwiseLinear(
            groups=self.kv_heads,
            features=self.head_dim,
            heads_axis="kv_heads",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="feature_map",
        )
        return elu_plus_one(shared(q)), elu_plus_one(shared(k))
