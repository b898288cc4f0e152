"""A DiT-style text-to-image denoiser (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), trained
by flow matching (rectified flow), whose self- and cross-attention are registered mechanisms chosen by name.

    images x_t float [B, H, W, C] -> Conv(kernel = stride = patch_size) + learned positions -> [B, N, d_model]
    times t float [B] in [0, 1] -> sinusoidal(1000 t) -> MLP ---------------------------------+
    captions int [B, L] -> caption encoder (embedding + learned positions + caption_layers blocks) -> context [B, L, E]
                                          mean over caption tokens -> Dense ----------------- + -> conditioning c [B, E]
    num_layers DiT blocks (adaLN-zero, see `DiTBlock`), each with cross-attention to the context
    -> final adaLN (shift, scale from c) -> Dense(patch_size^2 C), zero-initialised -> unpatchify
    -> velocity float32 [B, H, W, C]

Flow matching: x_t = (1 - t) x0 + t eps (x0 the image scaled to [-1, 1], eps ~ N(0, I)), and the model predicts the
velocity dx_t/dt = eps - x0 (`flow_interpolate`, `flow_velocity`). Sampling integrates dx/dt = v from t = 1 (noise)
to t = 0 with Euler steps (`euler_sample`), optionally with classifier-free guidance (`guided_velocity`; the null
caption is all padding, which the shape_captions data drops captions to).

Parameters: `patch_embedding`, `position_embedding`, `time_embedding_0`, `time_embedding_1`, `caption_encoder/...`,
`caption_pool`, `layers_<i>/{modulation, attention_norm, attention, cross_attention_norm, cross_attention, mlp_norm,
feed_forward}`, `final_modulation`, `final_norm`, `output`. As in the other models, the sown attention weights of
block i are at `intermediates/layers_<i>/attention` and `.../layers_<i>/cross_attention`, and intervention selectors
name them by these paths ("*/cross_attention" selects every cross-attention of the denoiser, not the caption
encoder's self-attention, which lives under `caption_encoder/layers_<i>/attention`).

With cross_attention=None the caption enters only through the pooled conditioning (adaLN), as in class-conditional
DiT; the diffusion steering systems need the cross-attention and refuse such a model (`check_cross_attention`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attn
from attn.models.block import TransformerBlock, _check_options, check_mechanism
from attn.models.encoder_decoder import SourceEncoder
from attn.models.fields import AttentionOptions, hash_fields
from attn.models.layers import ACTIVATION_AXES, Mlp
from attn.models.trunk import block_fields, resolve_cross_layers, resolve_head_dim, resolve_layers
from attn.models.vit import embed_patches, patch_grid

Dtype = Any
Velocity = Callable[[jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------------- flow matching
def flow_interpolate(x0: jax.Array, noise: jax.Array, times: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t eps for x0, noise [B, ...] and times [B]; returns [B, ...]."""
    t = times.reshape(times.shape + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1.0 - t) * x0 + t * noise


def flow_velocity(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The flow-matching regression target d x_t / dt = eps - x0, [B, ...]."""
    return noise - x0


def to_model_range(images: jax.Array) -> jax.Array:
    """Images in [0, 1] -> [-1, 1] (the x0 of flow matching)."""
    return 2.0 * images - 1.0


def from_model_range(x: jax.Array) -> jax.Array:
    """Samples in [-1, 1] -> images in [0, 1], clipped."""
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def timestep_embedding(times: jax.Array, dim: int, *, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding float32 [B, dim] of times [B] in [0, 1], at 1000 t as DiT's integer timesteps:
    [cos(1000 t f_k), sin(1000 t f_k)] with f_k = max_period^(-k / (dim / 2)), zero-padded for odd dim."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * times.astype(jnp.float32)[:, None] * freqs[None]
    out = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(out, ((0, 0), (0, dim - 2 * half)))


def _zero_dense(features: int, axes: tuple[str, str], name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
    """Dense with zero kernel and bias: adaLN-zero's modulation and output layers start as the identity block."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x [B, N, E] * (1 + scale [B, E]) + shift [B, E]."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


# ---------------------------------------------------------------------------------------------------- the block
class DiTBlock(TransformerBlock):
    """A DiT block with adaLN-zero conditioning and a cross-attention sublayer (PixArt-alpha's arrangement):

        shift1, scale1, gate1, shift2, scale2, gate2 = Dense(silu(c))          (zero-initialised)
        x = x + gate1 * attention(modulate(norm(x), shift1, scale1))
        x = x + cross_attention(norm(x), context)                              (only with cross_attention set)
        x = x + gate2 * mlp(modulate(norm(x), shift2, scale2))

    Fields as in `TransformerBlock` (whose attention, norm and cross-attention pieces it reuses). At initialisation
    the gates are 0, so the block is the identity apart from the cross-attention sublayer.
    """

    @nn.compact
    def __call__(  # type: ignore[override]
        self,
        x: jax.Array,
        conditioning: jax.Array,
        *,
        context: jax.Array | None = None,
        context_mask: attn.Mask | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """x [B, N, E]; conditioning [B, E]; context [B, L, Ec] for the cross-attention. Returns [B, N, E]."""
        input_kind = check_mechanism(self.mechanism, grid=self.grid)
        if self.cross_attention is None and context is not None:
            raise ValueError("context was given but this block has no cross_attention sublayer")
        batch, length, features = x.shape
        dropout = nn.Dropout(self.dropout_rate)
        modulation = _zero_dense(6 * features, ("embed", "mlp"), "modulation", self.dtype, self.param_dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(modulation(nn.silu(conditioning)), 6, axis=-1)

        options = _check_options("attention_options", self.mechanism, self.attention_options)
        attention = self._attention_layer(self.mechanism, options, "attention")
        h = modulate(self._norm("attention_norm")(x), shift1, scale1)
        if input_kind == "spatial":
            h = attention(h.reshape(batch, *self.grid, features), deterministic=deterministic)
            h = h.reshape(batch, length, features)
        else:
            h = attention(h, deterministic=deterministic)
        x = x + dropout(gate1[:, None, :] * h, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        if self.cross_attention is not None:
            h = self._cross_attend(self._norm("cross_attention_norm")(x), context, context_mask, False, deterministic)
            x = x + dropout(h, deterministic=deterministic)
            x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        h = Mlp(
            self.mlp_dim, self.mlp, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name="feed_forward"
        )(modulate(self._norm("mlp_norm")(x), shift2, scale2))
        x = x + dropout(gate2[:, None, :] * h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


# ---------------------------------------------------------------------------------------------------- the model
class DiT(nn.Module):
    """Text-to-image velocity model: `__call__(images float[B, H, W, C], times float[B], captions int[B, L], *,
    deterministic=True)` -> velocity float32 [B, H, W, C] (see the module docstring).

    Attributes:
      vocab_size: caption vocabulary. max_caption_len: rows of the caption position table (L <= max_caption_len).
      num_layers, d_model, num_heads, mlp_dim, head_dim, num_kv_heads: the denoiser's trunk sizes.
      patch_size: square patch side (H and W must be multiples). channels: C of the images.
      attention / attention_options: the denoiser's self-attention over the patches ("sequence", or "spatial"
        mechanisms that attend over the patch grid); one name or one per layer.
      cross_attention / cross_attention_options: the cross-attention from patches to caption tokens (None: none,
        the caption conditions only through adaLN); one name or one per layer.
      caption_layers: self-attention blocks of the caption encoder (0: embeddings only).
      norm, mlp, dropout_rate, dtype, param_dtype: as in `DecoderLM` (DiT: layernorm + gelu).
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 2
    channels: int = 3
    max_caption_len: int = 16
    caption_layers: int = 1
    head_dim: int | None = None
    num_kv_heads: int | None = None
    attention: str | Sequence[str] = "softmax"
    attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    cross_attention: str | Sequence[str] | None = "softmax"
    cross_attention_options: AttentionOptions = dataclasses.field(default_factory=dict)
    norm: str = "layernorm"
    mlp: str = "gelu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __hash__(self) -> int:
        return hash_fields(self)

    @nn.compact
    def __call__(
        self, images: jax.Array, times: jax.Array, captions: jax.Array, *, deterministic: bool = True
    ) -> jax.Array:
        if self.patch_size <= 0 or self.channels <= 0:
            raise ValueError(f"patch_size={self.patch_size} and channels={self.channels} must both be positive")
        grid = patch_grid(images, self.patch_size)
        if images.shape[-1] != self.channels:
            raise ValueError(f"images have {images.shape[-1]} channels; channels={self.channels} was expected")
        batch = images.shape[0]
        if times.shape != (batch,):
            raise ValueError(f"times must be float [batch={batch}]; got shape {times.shape}")
        if captions.ndim != 2 or captions.shape[0] != batch:
            raise ValueError(f"captions must be int [batch={batch}, length]; got shape {captions.shape}")
        head_dim = resolve_head_dim(self)

        context = SourceEncoder(
            vocab_size=self.vocab_size,
            num_layers=self.caption_layers,
            d_model=self.d_model,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            head_dim=head_dim,
            norm=self.norm,
            mlp=self.mlp,
            position_embedding="learned",
            max_len=self.max_caption_len,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="caption_encoder",
        )(captions, deterministic=deterministic)

        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = timestep_embedding(times, self.d_model).astype(self.dtype)
        t = nn.Dense(self.d_model, name="time_embedding_0", **dense)(t)
        t = nn.Dense(self.d_model, name="time_embedding_1", **dense)(nn.silu(t))
        conditioning = t + nn.Dense(self.d_model, name="caption_pool", **dense)(jnp.mean(context, axis=1))

        x = embed_patches(self, images.astype(self.dtype), grid, cls_token=False, deterministic=deterministic)
        layers = resolve_layers(self, grid=grid)
        cross_layers = resolve_cross_layers(self)
        fields = block_fields(self)  # the TransformerBlock fields every block shares (as block_stack's blocks)
        for i, ((name, options), (cross_name, cross_options)) in enumerate(zip(layers, cross_layers, strict=True)):
            x = DiTBlock(
                mechanism=name,
                attention_options=options,
                cross_attention=cross_name,
                cross_attention_options=cross_options,
                grid=grid,
                name=f"layers_{i}",
                **fields,
            )(x, conditioning, context=None if cross_name is None else context, deterministic=deterministic)

        shift, scale = jnp.split(
            _zero_dense(2 * self.d_model, ("embed", "mlp"), "final_modulation", **dense)(nn.silu(conditioning)), 2, -1
        )
        x = nn.LayerNorm(use_scale=False, use_bias=False, name="final_norm", **dense)(x)
        patch_values = self.patch_size * self.patch_size * self.channels
        x = _zero_dense(patch_values, ("embed", "mlp"), "output", **dense)(modulate(x, shift, scale))
        p, (gh, gw) = self.patch_size, grid
        x = x.reshape(batch, gh, gw, p, p, self.channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(batch, gh * p, gw * p, self.channels).astype(jnp.float32)


def check_cross_attention(model: Any, *, argument: str = "model") -> None:
    """ValueError naming `argument` unless `model` is a DiT whose every block has a cross-attention sublayer (the
    diffusion steering systems act on its cross-attention maps)."""
    if not isinstance(model, DiT):
        raise ValueError(f"{argument}={type(model).__name__}: expected an attn.models.DiT text-to-image denoiser")
    names = resolve_cross_layers(model)
    missing = [i for i, (name, _) in enumerate(names) if name is None]
    if missing:
        raise ValueError(
            f"{argument}: this DiT has cross_attention={model.cross_attention!r}, so layers {missing} have no "
            "cross-attention maps to steer; build it with a cross_attention mechanism (e.g. 'softmax')"
        )


# ---------------------------------------------------------------------------------------------------- sampling
def guided_velocity(model: DiT, variables: Any, captions: jax.Array, guidance: float = 1.0) -> Velocity:
    """v(x [B, H, W, C], t float scalar) -> [B, H, W, C]: the model's velocity for captions int [B, L], with
    classifier-free guidance v_null + guidance (v_caption - v_null) when guidance != 1 (the null caption is all 0)."""
    batch = captions.shape[0]

    def velocity(x: jax.Array, t: jax.Array) -> jax.Array:
        times = jnp.full((x.shape[0],), t, jnp.float32)
        if guidance == 1.0:
            return model.apply(variables, x, times, captions)
        both = model.apply(
            variables,
            jnp.concatenate([x, x]),
            jnp.concatenate([times, times]),
            jnp.concatenate([captions, jnp.zeros_like(captions)]),
        )
        conditional, null = both[:batch], both[batch:]
        return null + guidance * (conditional - null)

    return velocity


def euler_sample(
    velocity: Velocity,
    noise: jax.Array,
    num_steps: int,
    *,
    latent_update: Callable[[jax.Array, jax.Array, int], jax.Array] | None = None,
    start: float = 1.0,
    stop: float = 0.0,
) -> jax.Array:
    """Integrate dx/dt = velocity(x, t) from t = start (x = noise [B, ...]) to t = stop in `num_steps` equal Euler
    steps: x <- x + (t_next - t) v(x, t). start=1, stop=0 samples; start=0, stop=1 inverts an image to its noise.

    latent_update(x, t, step) -> x, if given, changes the latent before each velocity evaluation (test-time
    optimisation such as A-STAR's gradient step). Returns x at t = stop, [B, ...].
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an int >= 1")
    times = jnp.linspace(start, stop, num_steps + 1, dtype=jnp.float32)
    x = noise
    for step in range(num_steps):
        t, t_next = times[step], times[step + 1]
        if latent_update is not None:
            x = latent_update(x, t, step)
        x = x + (t_next - t) * velocity(x, t)
    return x
