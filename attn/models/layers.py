"""Building blocks shared by the models: norms, the feed-forward MLP, token and position embeddings.

Every parameter is created through `nn.with_logical_partitioning`, so the boxed parameter tree carries
logical axis names (`vocab`, `embed`, `mlp`, `length`) that the trainer maps onto a device mesh. Compute
happens in `dtype`, parameters are stored in `param_dtype`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.validation import check_choice

Dtype = Any

NORMS = ("rmsnorm", "layernorm", "none")
MLPS = ("swiglu", "gelu", "gelu_exact", "linear")

# The activation layout every model keeps between blocks.
ACTIVATION_AXES = ("batch", "length", "embed")


def make_norm(
    kind: str, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None, epsilon: float = 1e-6
) -> nn.Module:
    """Normalisation over the last (embed) axis: x [..., E] -> [..., E] in `dtype`.

    kind: "rmsnorm" (scale only), "layernorm" (scale and bias) or "none" (the identity, no parameters: the
    LayerNorm-free models of Jha & Reagen 2025). Statistics are reduced in float32; `epsilon` is added to the
    variance (mean square for rmsnorm) before the reciprocal square root.
    """
    check_choice("norm", kind, NORMS)
    if kind == "none":
        return Identity(name=name)
    scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init, name=name)
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=scale_init,
        bias_init=bias_init,
        name=name,
    )


def _dense(
    features: int, axes: tuple[str, str], dtype: Dtype, param_dtype: Dtype, name: str, use_bias: bool = False
) -> nn.Dense:
    kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:])
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        bias_init=bias_init,
        name=name,
    )


class Identity(nn.Module):
    """x -> x (no parameters): the norm of kind "none"."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class Mlp(nn.Module):
    """Position-wise feed-forward network: x [..., E] -> [..., E] in `dtype`.

    kind "swiglu": (silu(x W_gate) * (x W_up)) W_down; kind "gelu": gelu(x W_in) W_out, with the tanh
    approximation of gelu (GPT-2's "gelu_new"); kind "gelu_exact": the same with the erf gelu (BERT's "gelu");
    kind "linear": (x W_in) W_out, no activation (the GELU-free, softmax-only models of Jha & Reagen 2025).
    Kernels: in ("embed", "mlp"), out ("mlp", "embed"); with `use_bias` every projection adds a bias (named like its
    output axis), as GPT-2's MLP does.
    """

    hidden_dim: int
    kind: str = "swiglu"
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_choice("mlp", self.kind, MLPS)
        features = x.shape[-1]
        args = (self.dtype, self.param_dtype)
        bias = self.use_bias
        if self.kind == "swiglu":
            gate = _dense(self.hidden_dim, ("embed", "mlp"), *args, name="wi_gate", use_bias=bias)(x)
            up = _dense(self.hidden_dim, ("embed", "mlp"), *args, name="wi_up", use_bias=bias)(x)
            hidden = nn.silu(gate) * up
        else:
            exact = self.kind == "gelu_exact"
            hidden = _dense(self.hidden_dim, ("embed", "mlp"), *args, name="wi", use_bias=bias)(x)
            if self.kind != "linear":
                hidden = nn.gelu(hidden, approximate=not exact)
        if hidden.ndim == 3:
            hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return _dense(features, ("mlp", "embed"), *args, name="wo", use_bias=bias)(hidden)


class TokenEmbedding(nn.Module):
    """Token embedding table `embedding` [vocab_size, features] with logical axes ("vocab", "embed").

    `__call__(tokens int[...]) -> [..., features]` in `dtype`;
    `attend(x [..., features]) -> [..., vocab_size]` projects onto the same table (tied output head).
    Initialised N(0, 1/features) so that tied logits of a normalised input start with unit variance.
    """

    vocab_size: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        init = nn.initializers.normal(stddev=self.features**-0.5)
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(init, ("vocab", "embed")),
            (self.vocab_size, self.features),
            self.param_dtype,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array; got dtype {tokens.dtype}")
        return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...e,ve->...v", x.astype(self.dtype), jnp.asarray(self.embedding, self.dtype))
