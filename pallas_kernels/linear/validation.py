"""Argument checks shared by `lightning_attention` and its reference: each failure is a ValueError naming the
argument, its value and what was expected."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MAX_HEAD_DIM = 256


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_lightning_args(q: Any, k: Any, v: Any, decay: Any, initial_state: Any) -> tuple[int, int, int, int, int, int]:
    """Validates q, k, v, decay and initial_state; returns (B, T, H, Dk, Dv, KVH)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(_shape(x)) != 4:
            raise ValueError(f"{name} has shape {_shape(x)}; expected rank 4 [batch, length, heads, head_dim]")
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"{name} has dtype {jnp.result_type(x)}; expected a floating dtype")
    batch, length, heads, key_dim = _shape(q)
    if _shape(k)[:2] != (batch, length) or _shape(v)[:2] != (batch, length):
        raise ValueError(
            f"q {_shape(q)}, k {_shape(k)} and v {_shape(v)} must share [batch, length] (causal linear attention "
            "has one key per query)"
        )
    if length < 1:
        raise ValueError(f"q has length {length}; expected at least 1 token")
    kv_heads = _shape(k)[2]
    if _shape(k)[3] != key_dim:
        raise ValueError(f"k has head_dim {_shape(k)[3]}; expected q's head_dim {key_dim}")
    if _shape(v)[2] != kv_heads:
        raise ValueError(f"v has {_shape(v)[2]} heads; expected k's {kv_heads} heads")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"k has {kv_heads} heads; expected a divisor of q's {heads} heads (GQA/MQA)")
    value_dim = _shape(v)[3]
    for name, dim in (("q/k head_dim", key_dim), ("v head_dim", value_dim)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name}={dim}; expected 1 <= head_dim <= {MAX_HEAD_DIM}")
    if decay is not None:
        if _shape(decay) not in ((heads,), ()):
            raise ValueError(f"decay has shape {_shape(decay)}; expected [heads] = ({heads},) or a scalar")
        if not isinstance(decay, jax.core.Tracer):
            values = np.asarray(decay, np.float64)
            if not np.all((values > 0) & (values <= 1)):
                raise ValueError(f"decay={values.tolist()} must lie in (0, 1] for every head")
    if initial_state is not None:
        expected = (batch, heads, key_dim, value_dim)
        if _shape(initial_state) != expected:
            raise ValueError(
                f"initial_state has shape {_shape(initial_state)}; expected [batch, heads, Dk, Dv] = {expected}"
            )
    return batch, length, heads, key_dim, value_dim, kv_heads
