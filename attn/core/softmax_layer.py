"""The softmax-family layer: multi-head attention whose attention runs through the pipeline's named stages.

    q = x W_q, k = c W_k, v = c W_v              (c = x for self-attention, the context for cross-attention)
    q, k <- RoPE(q), RoPE(k)                      (position="rope"; or an ALiBi / T5 / Shaw logits bias)
    logits  = attention_logits(q, k)             scores -> score_mod (bias) -> mask          [B, H, Tq, Tk]
    weights = attention_weights(logits)          normalize (softmax) -> prob_mod             [B, H, Tq, Tk]
    heads   = mix(dropout(weights), v)           per-head outputs                             [B, Tq, H, Dv]

A variant supplies a stage instead of a copy of the pipeline: `scores` (its own logits), `score_mod` (terms added
to the logits), `normalize` (softplus, sigmoid, ...: return (weights, lse or None)), `prob_mod` (e.g. clipped
softmax), `mix`. A subclass that overrides any of them always runs the explicit stages; plain softmax attention
takes the fused path (`attn.core.softmax.softmax_attention`: the Pallas flash kernel on GPU/TPU, else XLA) unless
an intervention or a capture needs the logits or weights, which moves that call to the explicit stages (logged
once). Both paths compute the same functions of `attn.core.pipeline`, so on the XLA path they are bit-identical.

`attention_logits` and `attention_weights` are the stages `attn.interventions` targets; the standard captures are
`attention_logits` (only on request), `attention_weights`, `key_mass` [B, H, Tk], `lse` [B, H, Tq] and
`head_outputs`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attn.core import intervention_state, kv_cache, pipeline
from attn.core import positions as pos
from attn.core.context_parallel import context_axis_size, ring_attention, ulysses_attention
from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.masks import Mask
from attn.core.softmax import softmax_attention
from attn.core.validation import check_choice, choice, clip_window, normalize_window, optional, positive, positive_int

Array = jax.Array

POSITIONS = ("none", "rope", "alibi", "t5", "shaw")
# Validators of the options every softmax-family layer shares (mechanisms add their own: `{**SOFTMAX_VALIDATORS, ...}`).
SOFTMAX_VALIDATORS = {
    "position": choice(*POSITIONS),
    "rope_scaling": optional(choice("linear", "ntk", "yarn", "llama3")),
    "rope_scaling_factor": positive,
    "rope_original_max_len": positive_int,
    "rope_yarn_ramp": choice("code", "paper"),
    "rope_low_freq_factor": positive,
    "rope_high_freq_factor": positive,
    "relative_num_buckets": positive_int,
    "relative_max_distance": positive_int,
    "shaw_max_distance": positive_int,
    "softcap": optional(positive),
    "scale": optional(positive),
    "context_parallel": optional(choice("ring", "ulysses")),
}

# The stages a variant may override; overriding any of them makes every call take the explicit stages.
CUSTOM_STAGES = ("scores", "score_mod", "normalize", "prob_mod", "mix")

SOFTMAX_OPTION_DOCS = {
    "position": "positional encoding: 'none', 'rope', 'alibi', 't5' (bucketed bias) or 'shaw' (relative keys)",
    "rope_base": "RoPE base (theta)",
    "rope_scaling": "RoPE context extension: None, 'linear', 'ntk', 'yarn' or 'llama3'",
    "rope_scaling_factor": "context extension factor for rope_scaling",
    "rope_original_max_len": "training context length that YaRN's ramp and llama3's bands refer to",
    "rope_yarn_ramp": "YaRN frequency ramp: 'code' (YaRN's code, transformers, vLLM; default) or 'paper' (gamma(r))",
    "rope_low_freq_factor": "llama3 scaling: wavelengths above original_max_len / this are interpolated",
    "rope_high_freq_factor": "llama3 scaling: wavelengths below original_max_len / this are kept",
    "relative_num_buckets": "T5 bias: number of buckets",
    "relative_max_distance": "T5 bias: distance beyond which buckets saturate",
    "shaw_max_distance": "Shaw: relative distances are clipped to [-k, k]",
    "window": "sliding window: None, int w (= (w, w)) or (left, right)",
    "softcap": "logit soft-capping value (None = off)",
    "qk_norm": "RMS-normalise q and k per head before the dot product",
    "scale": "logit scale (None = 1/sqrt(head_dim))",
    "context_parallel": "split the sequence over the mesh's 'context' axis: None, 'ring' or 'ulysses'",
}


class SoftmaxAttentionLayer(AttentionLayer):
    """Multi-head softmax attention with GQA/MQA, positions, masks, a KV cache and the pipeline's stages.
    x [B, T, E] -> [B, T, E]."""

    position: str = "rope"
    rope_base: float = 10000.0
    rope_scaling: str | None = None
    rope_scaling_factor: float = 1.0
    rope_original_max_len: int = 2048
    rope_yarn_ramp: str = "code"
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    shaw_max_distance: int = 16
    window: int | tuple[int, int] | None = None
    softcap: float | None = None
    qk_norm: bool = False
    scale: float | None = None
    context_parallel: str | None = None

    intervention_stages: ClassVar[tuple[str, ...]] = ("attention_logits", "attention_weights", "head_outputs")

    # ------------------------------------------------------------------ validate, project, prepare
    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        check_choice("position", self.position, POSITIONS)
        normalize_window(self.window)

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        q, k, v = super().project_qkv(x, context)
        if self.qk_norm:
            q, k = self.head_norm(q, "query_norm"), self.head_norm(k, "key_norm")
        return q, k, v

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """RoPE on self-attention q/k, the decode cache, and the relative-position bias of the position option."""
        q, k, v, call = self.locate(q, k, v, call, rotate=self.rotate if self.position == "rope" else None)
        bias = None if call.cross else self.position_bias(q, call.q_positions, call.kv_positions, call.mask)
        return q, k, v, call.replace(bias=bias)

    def rotate(self, q: Array, k: Array, q_pos: Array, kv_pos: Array | None = None) -> tuple[Array, Array]:
        """RoPE with this layer's base and scaling: q [B, Tq, H, D] at q_pos int [B, Tq]; k [B, Tk, KVH, D] at kv_pos,
        int [B, Tk] or per kv head [B, KVH, Tk] (a cache whose heads keep different entries); default q_pos."""
        inv_freq, multiplier = pos.rope_frequencies(
            self.head_dim,
            base=self.rope_base,
            scaling=self.rope_scaling,
            factor=self.rope_scaling_factor,
            original_max_len=self.rope_original_max_len,
            yarn_ramp=self.rope_yarn_ramp,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
        )
        kv_pos = q_pos if kv_pos is None else jnp.asarray(kv_pos)
        if kv_pos.ndim == 3:  # per kv head: rotate each head's keys at its own positions
            rope_head = lambda x, p: pos.apply_rope(x[:, :, None], p, inv_freq, multiplier)[:, :, 0]  # noqa: E731
            return pos.apply_rope(q, q_pos, inv_freq, multiplier), jax.vmap(rope_head, (2, 1), 2)(k, kv_pos)
        return pos.apply_rope(q, q_pos, inv_freq, multiplier), pos.apply_rope(k, kv_pos, inv_freq, multiplier)

    def position_bias(self, q: Array, q_pos: Array, kv_pos: Array, mask: Mask | None) -> Array | None:
        """Additive logits bias of the relative-position options, float32 [B|1, H, Tq, Tk], or None."""
        if self.position == "alibi":
            return pos.alibi_bias(self.num_heads, q_pos, kv_pos)
        if self.position == "t5":
            causal = mask is not None and mask.causal
            return pos.T5RelativeBias(
                self.num_heads,
                num_buckets=self.relative_num_buckets,
                max_distance=self.relative_max_distance,
                param_dtype=self.param_dtype,
                name="relative_bias",
            )(q_pos, kv_pos, bidirectional=not causal)
        if self.position == "shaw":
            scale = self.head_dim**-0.5 if self.scale is None else self.scale
            shaw = pos.ShawRelativeLogits(
                self.head_dim, max_distance=self.shaw_max_distance, param_dtype=self.param_dtype, name="shaw"
            )
            return scale * shaw(q, q_pos, kv_pos)
        return None

    # ------------------------------------------------------------------ attend: fused or explicit stages
    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """q [B, Tq, H, D], k/v [B, Tk, KVH, D] -> [B, Tq, H, Dv] in q.dtype."""
        reason = self.explicit_reason(call)
        window = clip_window(self.window, q_len=q.shape[1], kv_len=k.shape[1])
        if reason is None and ((call.decode and not call.cross) or self.implementation == "split_kv"):
            # decode steps against the KV cache: split-KV or dense (attn.core.kv_cache); other calls there go dense
            return kv_cache.decode_attention(
                q,
                k,
                v,
                mask=call.mask,
                bias=call.bias,
                window=window,
                scale=self.scale,
                softcap=self.softcap,
                q_offset=call.q_offset,
                implementation=self.implementation,
            )
        if self.context_parallel is not None and not call.decode and context_axis_size() > 1:
            if reason is None:
                return self.context_parallel_attention(q, k, v, call, window)
            # captured weights, dropout or interventions need the [Tq, Tk] matrix: computed unsplit, said once
            intervention_state.log_once(
                self.registry_name or type(self).__name__,
                f"context_parallel={self.context_parallel!r} does not serve calls that take the explicit stages "
                f"({reason or 'by design of this mechanism'}); they run unsplit",
            )
        if reason is None:
            return softmax_attention(
                q,
                k,
                v,
                mask=call.mask,
                bias=call.bias,
                window=window,
                scale=self.scale,
                softcap=self.softcap,
                q_offset=call.q_offset,
                implementation=self.implementation,
            )
        if reason:
            intervention_state.log_once(self.registry_name or type(self).__name__, reason)
        # The stages are intercepted (attn.interventions); captures record what the rules left.
        logits = self.attention_logits(q, k, call)
        self.sow_capture("attention_logits", logits)
        weights = self.attention_weights(logits, call)
        self.sow_capture("attention_weights", weights)
        self.sow_capture("key_mass", pipeline.key_mass(weights))
        weights = self.attention_dropout(weights, call.deterministic)
        return self.mix(weights, v).astype(q.dtype)

    def context_parallel_attention(self, q: Array, k: Array, v: Array, call: AttentionCall, window: Any) -> Array:
        """Self-attention with the sequence split over the current mesh's "context" axis (`jax.set_mesh`), by ring or
        Ulysses attention (attn.core.context_parallel); the batch stays split over the mesh's "data"/"fsdp" axes.
        Serves causal and segment-id masks; anything else is an error that names it. Without such a mesh (no mesh, no
        "context" axis, or one of size 1: e.g. shape checks, single-device evaluation) the layer runs plain
        attention, which is the same function."""
        name = f"context_parallel={self.context_parallel!r}"
        mesh = jax.sharding.get_abstract_mesh()
        mask, unsupported = call.mask, []
        if call.cross:
            unsupported.append("cross-attention")
        if window is not None or call.bias is not None or self.softcap is not None:
            unsupported.append("a window, a position bias or softcap")
        if mask is not None and (
            mask.q_lengths is not None
            or mask.kv_lengths is not None
            or mask.prefix_lengths is not None
            or mask.block_mask is not None
            or mask.dense is not None
            or mask.mask_fn is not None
            or mask.window is not None
            or mask.q_segment_ids is not mask.kv_segment_ids
        ):
            unsupported.append(f"mask parts other than causal and shared segment ids ({mask})")
        if unsupported:
            raise ValueError(f"{name} serves causal / segment-id self-attention only; this call has {unsupported}")
        batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1) or None
        parallel = ring_attention if self.context_parallel == "ring" else ulysses_attention
        return parallel(
            q,
            k,
            v,
            mesh=mesh,
            axis="context",
            causal=bool(mask is not None and mask.causal),
            segment_ids=None if mask is None else mask.q_segment_ids,
            scale=self.scale,
            batch_axes=batch_axes,
            implementation=self.implementation,
        )

    def explicit_reason(self, call: AttentionCall) -> str | None:
        """None when the fused path serves this call; else why the explicit stages run ('' = by design)."""
        if self.overrides_stages():
            return ""
        targeted = intervention_state.targeted_stages(self) & set(intervention_state.MATRIX_STAGES)
        if targeted:
            return f"interventions on {sorted(targeted)} move this call to the reference path (explicit stages)"
        if self.records("attention_weights") or self.effective_dropout(call.deterministic) > 0.0:
            return ""
        return None

    @classmethod
    def overrides_stages(cls) -> bool:
        return any(getattr(cls, name) is not getattr(SoftmaxAttentionLayer, name) for name in CUSTOM_STAGES)

    def full_mask(self, call: AttentionCall) -> Mask | None:
        """The call's mask merged with this layer's sliding window."""
        return Mask.from_args(mask=call.mask, window=self.window)

    # ------------------------------------------------------------------ the named stages
    def attention_logits(self, q: Array, k: Array, call: AttentionCall) -> Array:
        """Stage: masked logits float32 [B, H, Tq, Tk] = mask(score_mod(scores(q, k))), -inf where masked."""
        logits = self.score_mod(self.scores(q, k), call)
        return pipeline.mask_logits(logits, self.full_mask(call), q_offset=call.q_offset)

    def attention_weights(self, logits: Array, call: AttentionCall) -> Array:
        """Stage: weights float32 [B, H, Tq, Tk] = prob_mod(normalize(logits)); records the normalizer's lse."""
        weights, lse = self.normalize(logits)
        if lse is not None:
            self.sow_capture("lse", lse)
        return self.prob_mod(weights, call)

    # ------------------------------------------------------------------ what variants override
    def scores(self, q: Array, k: Array) -> Array:
        """float32 [B, H, Tq, Tk]: scale * q k^T, soft-capped when softcap is set."""
        return pipeline.scores(q, k, scale=self.scale, softcap=self.softcap)

    def score_mod(self, logits: Array, call: AttentionCall) -> Array:
        """Terms added to the logits before masking; default: the position bias of `prepare`."""
        return pipeline.add_bias(logits, call.bias)

    def normalize(self, logits: Array) -> tuple[Array, Array | None]:
        """Masked logits -> (weights, lse or None); default: softmax over keys."""
        return pipeline.softmax_weights(logits)

    def prob_mod(self, weights: Array, call: AttentionCall) -> Array:
        """Changes to the normalized weights (default none)."""
        return weights

    def mix(self, weights: Array, v: Array) -> Array:
        """weights [B, H, Tq, Tk] x v [B, Tk, KVH, Dv] -> float32 [B, Tq, H, Dv]."""
        return pipeline.mix(weights, v)
