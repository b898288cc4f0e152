"""The layer template every attention layer builds on.

`AttentionLayer.__call__` owns the fixed sequence of a call; a mechanism overrides only the stage it changes:

    validate(call)                     shapes, options (the registry's validators), call arguments
    project_qkv(x, context)            q [B, Tq, H, D], k [B, Tk, KVH, D], v [B, Tk, KVH, Dv]
    prepare(q, k, v, call)             positions (RoPE, biases), the decode cache -> (q, k, v, call)
    attend(q, k, v, call)              per-head outputs [B, Tq, H, Dv]  (softmax layers: the attention pipeline)
    output_gate(x)                     optional [B, Tq, H, Dv|1] gate multiplied into the per-head outputs
    head_outputs(y)                    identity stage: where interventions and captures see the per-head outputs
    project_out(y, features)           [B, Tq, E]

`call` is an `AttentionCall`, the arguments of this call plus what the stages derived (positions, bias, offset).
The stages are methods with stable names, so `attn.interventions` can intercept them (`nn.intercept_methods`).
One helper applies attention dropout (`attention_dropout`, off when deterministic); options are validated from
the validators the registry attaches to the class (`option_validators`, set by `attn.registry.register`).

`SpatialAttentionLayer` is the base of layers over a token grid x [batch, *spatial, embed] (1 to 3 axes): the
same template, with projections applied to the flattened tokens so the logical axis names apply.

The uniform layer call is

    layer(x, *, context=None, mask=None, positions=None, decode=False, deterministic=True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import intervention_state, kv_cache, options, pipeline
from attn.core.masks import Mask
from attn.core.validation import check_gqa, check_rank

Array = jax.Array


class HeadProjection(nn.Module):
    """x [..., E] -> [..., heads, head_dim]. The kernel is created in its final 3-D shape so that its logical axis
    names apply under `nn.logical_axis_rules` (nn.DenseGeneral initialises a flat 2-D kernel)."""

    heads: int
    head_dim: int
    heads_axis: str = "heads"
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), ("embed", self.heads_axis, "head_dim")
            ),
            (x.shape[-1], self.heads, self.head_dim),
            self.param_dtype,
        )
        y = jnp.einsum("...e,ehd->...hd", x.astype(self.dtype), jnp.asarray(kernel, self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.heads_axis, "head_dim")),
                (self.heads, self.head_dim),
                self.param_dtype,
            )
            y = y + jnp.asarray(bias, self.dtype)
        return y


class OutputProjection(nn.Module):
    """y [..., H, Dv] -> [..., features] with kernel [H, Dv, features] named ("heads", "head_dim", "embed")."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: Array) -> Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), ("heads", "head_dim", "embed")
            ),
            (y.shape[-2], y.shape[-1], self.features),
            self.param_dtype,
        )
        out = jnp.einsum("...hd,hde->...e", y.astype(self.dtype), jnp.asarray(kernel, self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (self.features,),
                self.param_dtype,
            )
            out = out + jnp.asarray(bias, self.dtype)
        return out


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One call of a layer, as it passes from stage to stage.

    x [B, T, E] (or [B, *S, E]); context [B, Tc, Ec] or None (cross-attention); mask: an `attn.Mask` or None;
    positions: the caller's int [B, T] positions or None; decode, deterministic: the call's flags. The stages fill
    in q_positions int [B, Tq], kv_positions int [B|1, Tk], q_offset (absolute position of the first query: the
    cache index when decoding), bias (an additive logits bias, or a mechanism's own position terms) and state (what a
    mechanism's prepare read from its decoding cache for its attend, e.g. Combiner's cached summary queries).
    """

    x: Any
    context: Any = None
    mask: Mask | None = None
    positions: Any = None
    decode: bool = False
    deterministic: bool = True
    q_positions: Any = None
    kv_positions: Any = None
    q_offset: Any = 0
    bias: Any = None
    state: Any = None

    @property
    def cross(self) -> bool:
        return self.context is not None

    def replace(self, **changes: Any) -> AttentionCall:
        return dataclasses.replace(self, **changes)


class AttentionLayer(nn.Module):
    """The template of every sequence attention layer: x [B, T, E] -> [B, T, E] (see the module docstring).

    Fields are the options every layer shares (see attn.registry.COMMON_OPTION_DOCS).
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    dropout_rate: float = 0.0
    use_bias: bool = False
    out_bias: bool | None = None
    capture: bool = False
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # Set by attn.registry.register on registered classes (inherited by subclasses).
    registry_name: ClassVar[str | None] = None
    option_validators: ClassVar[dict[str, Any]] = {}
    # The stages `attn.interventions` may target on this layer; layers with a probability matrix add
    # "attention_logits" and "attention_weights" (and with them the "key_mass" and "lse" captures).
    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    # ------------------------------------------------------------------ the template
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
        """Attention over x, or from x to a context: `layer.apply(params, x, mask=attn.Mask(causal=True))`.

        Args:
          x: [batch, length, embed] for sequence layers (input kind "sequence"); [batch, *spatial, embed] (1 to 3
            spatial axes) for spatial layers. Channel-attention modules take [batch, *spatial, channels] and pooling
            heads [batch, length, embed] -> [batch, embed] (their own __call__; `attn.registry.INPUT_SHAPES`).
          context: [batch, context_length, context_embed] to attend to (cross-attention; keys and values are
            projected from it, and positions apply to self-attention only), or None for self-attention.
          mask: an `attn.Mask` (causal, padding lengths, segment ids, window, prefix-LM, block mask, mask_fn,
            dense), a boolean array [batch|1, heads|1, q_len, kv_len] (True = attend), or None for no mask; a
            Python bool is refused (mask=True would mask nothing). For cross-attention its kv side refers to the
            context.
          positions: int [batch, length] absolute positions of x (default: 0..T-1, or continuing from the cache
            index when decoding).
          decode: autoregressive decoding with the layer's cache (apply with mutable=["cache"]): the first call
            creates the cache at the length of its input, later calls append (see attn.models.generate).
          deterministic: False enables dropout (needs a "dropout" rng).
        Returns:
          the same shape as x, in `dtype`.
        """
        call = AttentionCall(
            x=x, context=context, mask=mask, positions=positions, decode=decode, deterministic=deterministic
        )
        self.validate(call)
        q, k, v = self.project_qkv(x, context)
        q, k, v, call = self.prepare(q, k, v, call)
        y = self.attend(q, k, v, call)
        gate = self.output_gate(x)
        if gate is not None:
            if self.wants_weights():
                self.sow("intermediates", "gate_scores", gate)
            y = y * gate.astype(y.dtype)
        y = self.head_outputs(y, call)
        self.sow_capture("head_outputs", y)  # after the stage's interventions
        return self.project_out(y, x.shape[-1])

    # ------------------------------------------------------------------ stage: validate
    def validate(self, call: AttentionCall) -> None:
        """Shapes, options and call arguments; raises ValueError naming the argument, its value and what was
        expected."""
        self.check_input(call.x, call.context)
        self.check_options()
        if call.decode and call.mask is not None and call.mask.q_segment_ids is not None:
            raise ValueError("segment ids are not supported with decode=True (decode one sequence per batch row)")
        unsupported = intervention_state.targeted_stages(self, captures=False) - set(self.supported_captures())
        if unsupported:
            raise ValueError(
                f"interventions target {sorted(unsupported)} of {'/'.join(self.path) or type(self).__name__} "
                f"(mechanism {self.registry_name or type(self).__name__!r}), which exposes only "
                f"{list(self.supported_captures())}: it has no attention probability matrix"
            )

    def check_options(self) -> None:
        """Runs the registry's validators over this layer's options (the common ones and the mechanism's)."""
        options.check_options(self)

    def supported_captures(self) -> tuple[str, ...]:
        stages = self.intervention_stages
        if "attention_weights" in stages:
            return stages + ("key_mass", "lse")
        return stages

    @property
    def output_bias(self) -> bool:
        """Whether the output projection has a bias: `out_bias`, or `use_bias` when it is None (Qwen2 has q/k/v
        biases and none on the output)."""
        return self.use_bias if self.out_bias is None else bool(self.out_bias)

    @property
    def kv_heads(self) -> int:
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        check_gqa(self.num_heads, kv)
        return kv

    def check_input(self, x: Array, context: Array | None) -> None:
        check_rank("x", x, 3, "[batch, length, embed]")
        if context is not None:
            check_rank("context", context, 3, "[batch, context_length, embed]")
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"context batch {context.shape[0]} != x batch {x.shape[0]}")
        if self.num_heads <= 0 or self.head_dim <= 0:
            raise ValueError(f"num_heads={self.num_heads} and head_dim={self.head_dim} must be positive")
        _ = self.kv_heads

    # ------------------------------------------------------------------ stage: projections
    def dense_heads(self, x: Array, heads: int, heads_axis: str, name: str) -> Array:
        """[B, T, E] -> [B, T, heads, head_dim]; kernel [E, heads, head_dim] named ("embed", heads_axis, "head_dim")."""
        y = HeadProjection(
            heads=heads,
            head_dim=self.head_dim,
            heads_axis=heads_axis,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)
        return nn.with_logical_constraint(y, ("batch", "length", heads_axis, "head_dim"))

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        source = x if context is None else context
        q = self.dense_heads(x, self.num_heads, "heads", "query")
        k = self.dense_heads(source, self.kv_heads, "kv_heads", "key")
        v = self.dense_heads(source, self.kv_heads, "kv_heads", "value")
        return q, k, v

    def project_out(self, y: Array, features: int) -> Array:
        """[B, T, H, Dv] -> [B, T, features] with kernel [H, Dv, features] named ("heads", "head_dim", "embed")."""
        out = OutputProjection(
            features=features, use_bias=self.output_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="out"
        )(y)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def head_norm(self, x: Array, name: str) -> Array:
        """RMS norm over head_dim with a learned scale ("head_dim",) (QK-norm)."""
        return nn.RMSNorm(
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("head_dim",)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)

    # ------------------------------------------------------------------ stage: positions and cache
    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """Positions and the decode cache. Default: `locate` (positions, the dense KV cache when decoding), no bias."""
        return self.locate(q, k, v, call)

    def locate(
        self, q: Array, k: Array, v: Array, call: AttentionCall, rotate: Any = None
    ) -> tuple[Array, Array, Array, AttentionCall]:
        """The position steps every prepare shares: query positions (the caller's, or continuing from the cache index
        when decoding), then `rotate(q, k, q_positions) -> (q, k)` on self-attention (RoPE: keys enter the cache
        rotated), then the decode cache (`update_cache`), then the key positions (the queries' for self-attention
        over the same tokens, else 0..Tk-1). Returns q, k, v and the call with q_positions and kv_positions set."""
        batch, length = q.shape[0], q.shape[1]
        offset = kv_cache.current_index(self) if call.decode and not call.cross else 0
        q_pos = self.query_positions(call.positions, batch, length, offset)
        if rotate is not None and not call.cross:
            q, k = rotate(q, k, q_pos)
        call = call.replace(q_positions=q_pos)
        if call.decode:
            k, v, call = self.update_cache(k, v, call)
        if call.kv_positions is None:
            kv_pos = q_pos if (not call.cross and k.shape[1] == length) else jnp.arange(k.shape[1], dtype=jnp.int32)
            call = call.replace(kv_positions=kv_pos)
        return q, k, v, call

    def update_cache(self, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, AttentionCall]:
        """Decode step. Self-attention: appends k, v to the KV cache and restricts the mask to the filled part.
        Cross-attention: the creating call stores the projected context keys/values, later calls reuse them (the
        projections of the context are then dead code under jit)."""
        if call.cross:
            created = self.has_variable("cache", "cross_key")
            cached_k = self.variable("cache", "cross_key", lambda: k)
            cached_v = self.variable("cache", "cross_value", lambda: v)
            # Decoded query positions, so query selections (interventions) see absolute positions while decoding.
            index = self.variable("cache", "cross_index", lambda: jnp.array(0, jnp.int32))
            if not created:  # the creating call: an ordinary forward
                return k, v, call
            if cached_k.value.shape != k.shape:
                raise ValueError(
                    f"context of shape {tuple(call.context.shape)} gives cross keys {k.shape}, but the cache was "
                    f"created for {cached_k.value.shape}; use the same context for every decode step"
                )
            start = index.value
            index.value = start + call.x.shape[1]
            changes: dict[str, Any] = {"q_offset": start}
            if call.positions is None:
                batch, length = call.x.shape[0], call.x.shape[1]
                changes["q_positions"] = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
            return cached_k.value, cached_v.value, call.replace(**changes)
        keys, values, mask, start = self.cache_write(k, v, call.mask)
        return keys, values, call.replace(mask=mask, q_offset=start)

    def query_positions(self, positions: Array | None, batch: int, length: int, offset: Any) -> Array:
        """int32 [B, T]: the given positions, or offset + arange(T)."""
        if positions is not None:
            positions = jnp.asarray(positions, jnp.int32)
            if positions.shape[-1] != length:
                raise ValueError(f"positions has shape {positions.shape}; expected [batch, {length}] to match x")
            return jnp.broadcast_to(positions if positions.ndim == 2 else positions[None], (batch, length))
        return jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (batch, length))

    # ------------------------------------------------------------------ stage: attend, gate, head outputs
    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q, k, v -> per-head outputs [B, Tq, H, Dv]. Every mechanism implements this (or inherits it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement attend(q, k, v, call)")

    def output_gate(self, x: Array) -> Array | None:
        """A gate [B, T, H, Dv|1] multiplied into the per-head outputs before the output projection, or None."""
        return None

    def head_outputs(self, y: Array, call: AttentionCall | None = None) -> Array:
        """Stage: the per-head outputs [B, T (or *S), H, Dv] that enter the output projection. An identity, where
        interventions (ablate, scale, patch heads) act; the caller records the `head_outputs` capture after it."""
        return y

    # ------------------------------------------------------------------ helpers
    def wants_weights(self) -> bool:
        return self.capture or self.is_mutable_collection("intermediates")

    def records(self, name: str) -> bool:
        """Whether this call records the standard capture `name`. While capture rules are active (e.g.
        `run_with_cache`), exactly what they ask for on this layer; otherwise, with capture=True or a mutable
        "intermediates" collection, every capture but attention_logits (as large as the weights: on request only)."""
        if intervention_state.capture_active():
            requested = intervention_state.capture_requested(self, name)
            if requested and not self.is_mutable_collection("intermediates"):
                raise ValueError(
                    f"a capture rule asks for {name!r} of {'/'.join(self.path)}, but 'intermediates' is not "
                    "mutable; apply with mutable=['intermediates'] (or use attn.interventions.run_with_cache)"
                )
            return requested
        return name != "attention_logits" and self.wants_weights()

    def sow_capture(self, name: str, value: Array) -> None:
        """Sows `value` under the standard capture `name` when `records(name)`."""
        if self.records(name):
            self.sow("intermediates", name, value)

    def dropout_rng(self, deterministic: bool) -> Array | None:
        if deterministic or self.dropout_rate == 0.0:
            return None
        return self.make_rng("dropout")

    def effective_dropout(self, deterministic: bool) -> float:
        """The dropout rate this call applies: 0 when deterministic."""
        return 0.0 if deterministic else self.dropout_rate

    def attention_dropout(self, weights: Array, deterministic: bool) -> Array:
        """Inverted dropout on attention weights (any layout), off when deterministic or dropout_rate == 0."""
        rate = self.effective_dropout(deterministic)
        return pipeline.dropout_weights(weights, rate, self.dropout_rng(deterministic))

    def cache_write(self, k: Array, v: Array, mask: Mask | None) -> tuple[Array, Array, Mask | None, Any]:
        """Decode step on the dense KV cache: returns (keys, values, mask, q_offset) to attend with."""
        keys, values, start = kv_cache.write(self, k, v)
        if start is None:  # the creating call: an ordinary forward
            return k, v, mask, 0
        return keys, values, kv_cache.decode_mask(mask, k.shape[0], start, k.shape[1]), start


class SpatialAttentionLayer(AttentionLayer):
    """Base of layers whose input is a token grid x [B, *spatial, E] (1 to 3 spatial axes) -> [B, *spatial, E].

    The template's projections act on the flattened tokens; `attend` receives q [B, *S, H, D], k and v
    [B, *S, KVH, D] and returns [B, *S, H, Dv]."""

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        self.check_call(call.mask, call.positions, call.decode)

    def check_input(self, x: Array, context: Array | None) -> None:
        check_rank("x", x, (3, 4, 5), "[batch, *spatial (1 to 3 axes), embed]")
        if context is not None:
            raise ValueError(
                f"context is not supported by the spatial layer {type(self).__name__} (self-attention over the "
                f"token grid only), got a context of shape {context.shape}"
            )
        if self.num_heads <= 0 or self.head_dim <= 0:
            raise ValueError(f"num_heads={self.num_heads} and head_dim={self.head_dim} must be positive")
        _ = self.kv_heads

    def check_call(self, mask: Mask | None, positions: Array | None, decode: bool) -> None:
        name = type(self).__name__
        if decode:
            raise ValueError(f"decode=True is not supported by the spatial layer {name} (it has no KV cache)")
        if mask is not None:
            raise ValueError(
                f"mask is not supported by the spatial layer {name}; its pattern comes from its options "
                "(e.g. causal=True)"
            )
        if positions is not None:
            raise ValueError(f"positions is not supported by the spatial layer {name}; got shape {positions.shape}")

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        return self.spatial_qkv(x)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        return q, k, v, call

    def project_out(self, y: Array, features: int) -> Array:
        return self.spatial_out(y, features)

    def spatial_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """x [B, *S, E] -> q [B, *S, H, D], k and v [B, *S, KVH, D] (projected on the flattened tokens)."""
        batch, *spatial, features = x.shape
        q, k, v = AttentionLayer.project_qkv(self, x.reshape(batch, math.prod(spatial), features), None)
        return (
            q.reshape(batch, *spatial, *q.shape[-2:]),
            k.reshape(batch, *spatial, *k.shape[-2:]),
            v.reshape(batch, *spatial, *v.shape[-2:]),
        )

    def spatial_out(self, y: Array, features: int) -> Array:
        """y [B, *S, H, Dv] -> [B, *S, features]."""
        batch, *spatial = y.shape[:-2]
        tokens = math.prod(spatial)
        out = AttentionLayer.project_out(self, y.reshape(batch, tokens, *y.shape[-2:]), features)
        return out.reshape(batch, *spatial, features)
