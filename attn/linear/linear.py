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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core.feature_maps import FEATURE_MAPS, elu_plus_one
from attn.core.layer import AttentionLayer
from attn.core.linear_scan import linear_mask_parts
from attn.core.masks import Mask
from attn.core.validation import check_choice, check_positive
from attn.registry import register

Array = jax.Array

OUTPUT_NORMS = ("none", "srms", "rmsnorm", "layernorm")

# Docs of the fields LinearAttentionBase adds; subclasses pass them to `register` with their own.
BASE_OPTION_DOCS = {
    "chunk_size": "tokens per chunk of the chunked (Lightning Attention-2) scan",
    "eps": "epsilon of the denominator / output normalisation",
}


def identity_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """[groups, d, f] stacked identity matrices (rectangular when d != f)."""
    del key
    return jnp.broadcast_to(jnp.eye(shape[-2], shape[-1], dtype=dtype), shape)


class HeadwiseLinear(nn.Module):
    """x [B, T, heads, D] -> [B, T, heads, features]: one [D, features] map and bias per group of heads.

    `groups` divides `heads`; head h uses map h // (heads / groups) (so kv-head maps also serve their queries).
    The kernel [groups, D, features] is identity-initialised and named (heads_axis, "head_dim", None).
    """

    groups: int
    features: int
    heads_axis: str = "heads"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, length, heads, dim = x.shape
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(identity_init, (self.heads_axis, "head_dim", None)),
            (self.groups, dim, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (self.heads_axis, None)),
            (self.groups, self.features),
            self.param_dtype,
        )
        grouped = x.astype(self.dtype).reshape(batch, length, self.groups, heads // self.groups, dim)
        y = jnp.einsum("btgjd,gdf->btgjf", grouped, jnp.asarray(kernel, self.dtype))
        y = y + jnp.asarray(bias, self.dtype)[:, None, :]
        return y.reshape(batch, length, heads, self.features)


class LinearAttentionBase(AttentionLayer):
    """A sequence layer around `attn.functional.linear_attention` with the uniform call and a decode state.

    Subclasses override the hooks: `map_features` (q, k -> phi(q), phi(k)), `decay_rates` (None or float [H]),
    `uses_denominator`, `finish` (output norm / gate on [B, T, H, Dv]) or the whole `mix`.
    decode=True keeps the state [B, H, Dk, Dv (+1)] ("state") and the next position ("cache_index") in "cache".
    """

    chunk_size: int = 64
    eps: float = 1e-6

    mechanism_name = "linear attention"

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
        self.check_input(x, context)
        self.check_options()
        causal, q_lengths, kv_lengths = linear_mask_parts(mask, self.mechanism_name)
        if context is not None and (causal or decode):
            raise ValueError(
                f"{self.mechanism_name} with a context (cross-attention) is non-causal and has no decode state; "
                f"got causal={causal}, decode={decode}"
            )
        if decode and not causal:
            raise ValueError(
                f"decode=True needs a causal mask (attn.Mask(causal=True)); {self.mechanism_name} got mask={mask!r}"
            )
        if decode and (q_lengths is not None or kv_lengths is not None):
            raise ValueError("q_lengths / kv_lengths are not supported with decode=True (decode one row per sequence)")
        q, k, v = self.project_qkv(x, context)
        y = self.mix(
            q,
            k,
            v,
            x=x,
            causal=causal,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            positions=positions,
            decode=decode,
            deterministic=deterministic,
        )
        return self.project_out(y, x.shape[-1])

    # ------------------------------------------------------------------ hooks
    def check_options(self) -> None:
        if not (isinstance(self.chunk_size, int) and self.chunk_size > 0):
            raise ValueError(f"chunk_size={self.chunk_size!r} must be a positive int")
        check_positive("eps", self.eps)

    def map_features(self, q: Array, k: Array, q_pos: Array, k_pos: Array) -> tuple[Array, Array]:
        return q, k

    def decay_rates(self) -> Array | None:
        return None

    def uses_denominator(self) -> bool:
        return False

    def finish(self, y: Array, x: Array) -> Array:
        return y

    def mix(
        self,
        q: Array,
        k: Array,
        v: Array,
        *,
        x: Array,
        causal: bool,
        q_lengths: Array | None,
        kv_lengths: Array | None,
        positions: Array | None,
        decode: bool,
        deterministic: bool,
    ) -> Array:
        """q [B, T, H, D], k/v [B, S, KVH, D] -> [B, T, H, Dv] (before the output projection)."""
        batch, length = q.shape[:2]
        offset = self.advance_decode_index(decode, length)
        q_pos = self.query_positions(positions, batch, length, offset)
        k_pos = q_pos if k.shape[1] == length else jnp.arange(k.shape[1], dtype=jnp.int32)[None]
        q, k = self.map_features(q, k, q_pos, k_pos)
        y = self.linear_core(
            q, k, v, causal=causal, decay=self.decay_rates(), q_lengths=q_lengths, kv_lengths=kv_lengths, decode=decode
        )
        return self.finish(y, x)

    # ------------------------------------------------------------------ shared pieces
    def advance_decode_index(self, decode: bool, length: int) -> Array | int:
        """Position of the first token of this call: 0, or the decode index (which then advances by `length`)."""
        if not decode:
            return 0
        initialized = self.has_variable("cache", "cache_index")
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:  # the cache-creating call is an ordinary forward from position 0
            return 0
        start = index.value
        index.value = start + length
        return start

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
        initialized = self.has_variable("cache", "state")
        shape = (q.shape[0], q.shape[2], q.shape[3], v.shape[3] + int(self.uses_denominator()))
        state = self.variable("cache", "state", jnp.zeros, shape, jnp.float32)
        if not initialized:
            return F.linear_attention(q, k, v, **options)
        y, state.value = F.linear_attention(q, k, v, initial_state=state.value, return_state=True, **options)
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
)
class LinearAttention(LinearAttentionBase):
    """Kernelised linear attention. x [B, T, E] -> [B, T, E]."""

    feature_map: str = "elu_plus_one"
    normalize: bool = True

    mechanism_name = "linear"

    def check_options(self) -> None:
        super().check_options()
        check_choice("feature_map", self.feature_map, LINEAR_FEATURE_MAPS)

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
