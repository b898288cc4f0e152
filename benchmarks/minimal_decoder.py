"""A minimal hand-written Flax decoder LM: the plain-JAX baseline of the `overhead` suite's train-step ratio.

Same shapes and parameters as configs/lm_tiny.py (4 layers, d_model 128, 4 heads of 32, SwiGLU 384, RMSNorm,
RoPE on q and k, tied byte embeddings of 256; 885,888 parameters) but none of the project's machinery: attention
is `jax.nn.dot_product_attention(implementation="xla")`, RoPE is written inline (this file stays independent of
`attn`, which is what it is compared against), and the train step is value_and_grad of the mean next-token
cross-entropy followed by the optimizer update.

    tokens int32 [B, T] -> logits float32 [B, T, vocab]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

VOCAB, D_MODEL, HEADS, HEAD_DIM, MLP_DIM, LAYERS = 256, 128, 4, 32, 384, 4
ROPE_BASE = 10000.0


def _rope(x: jax.Array) -> jax.Array:
    """Rotary embedding of x [B, T, H, D] at positions 0..T-1 (pairs (i, i + D/2), base 10000)."""
    half = x.shape[-1] // 2
    inv_freq = ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class Block(nn.Module):
    """Pre-norm block: x + attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). x [B, T, d_model]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.RMSNorm(epsilon=1e-6, name="attention_norm")(x)
        dense = lambda name: nn.DenseGeneral((HEADS, HEAD_DIM), use_bias=False, name=name)  # noqa: E731
        q, k, v = dense("query")(h), dense("key")(h), dense("value")(h)
        out = jax.nn.dot_product_attention(_rope(q), _rope(k), v, is_causal=True, implementation="xla")
        x = x + nn.DenseGeneral(D_MODEL, axis=(-2, -1), use_bias=False, name="out")(out)
        h = nn.RMSNorm(epsilon=1e-6, name="mlp_norm")(x)
        gate = nn.Dense(MLP_DIM, use_bias=False, name="wi_gate")(h)
        up = nn.Dense(MLP_DIM, use_bias=False, name="wi_up")(h)
        return x + nn.Dense(D_MODEL, use_bias=False, name="wo")(nn.silu(gate) * up)


class MinimalDecoder(nn.Module):
    """Byte decoder LM: tokens int32 [B, T] -> logits float32 [B, T, 256]."""

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(VOCAB, D_MODEL, name="embedding")
        x = embed(tokens)
        for i in range(LAYERS):
            x = Block(name=f"layers_{i}")(x)
        return embed.attend(nn.RMSNorm(epsilon=1e-6, name="final_norm")(x))


def init_params(rng: jax.Array, batch: int, length: int) -> Any:
    """Parameters of MinimalDecoder for inputs [batch, length]."""
    return MinimalDecoder().init(rng, jnp.zeros((batch, length), jnp.int32))["params"]


def make_train_step(tx: optax.GradientTransformation):
    """train_step(params, opt_state, tokens [B, T + 1]) -> (params, opt_state, loss): next-token cross-entropy
    on tokens[:, :-1] -> tokens[:, 1:], its gradient and one optimizer update."""
    model = MinimalDecoder()

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step
