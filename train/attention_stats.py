"""Per-layer attention statistics from the sown `attention_weights` intermediates.

Softmax-style layers sow their probabilities float32 [B, H, Tq, Tk] under
`intermediates/.../layers_<i>/attention/attention_weights` when the "intermediates" collection is mutable.
For each layer this computes, as means over batch, heads and queries:

  entropy          -sum_k p log p  (nats; low = focused attention, log(Tk) = uniform)
  first_key_mass   p[..., 0], the probability on the first key — the "attention sink" of StreamingLLM

Mechanisms without a probability matrix sow nothing and get no entry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

_LAYER = re.compile(r"layers_(\d+)")


def sown_by_layer(intermediates: Mapping[str, Any], name: str) -> dict[int, jax.Array]:
    """Layer index -> the value sown under `name` inside `layers_<i>` of an "intermediates" tree.

    A layer sown more than once (sow appends to a tuple) contributes its last value.
    """
    found: dict[int, jax.Array] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        keys = [str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path]
        if name not in keys:
            continue
        layers = [int(m.group(1)) for key in keys if (m := _LAYER.fullmatch(key))]
        if layers:
            found[layers[-1]] = value
    return found


def attention_weights_by_layer(intermediates: Mapping[str, Any]) -> dict[int, jax.Array]:
    """Layer index -> attention probabilities [B, H, Tq, Tk] found in an "intermediates" tree."""
    return sown_by_layer(intermediates, "attention_weights")


def layer_stats(probs: jax.Array) -> dict[str, jax.Array]:
    """{"entropy", "first_key_mass"}: float32 scalars for probabilities [B, H, Tq, Tk] (rows sum to 1)."""
    probs = probs.astype(jnp.float32)
    # 0 log 0 = 0: masked keys have probability exactly 0 and must not produce nan.
    plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)
    return {"entropy": -jnp.mean(jnp.sum(plogp, axis=-1)), "first_key_mass": jnp.mean(probs[..., 0])}


def attention_stats(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Scalars "attention/entropy/layer_<i>" and "attention/first_key_mass/layer_<i>" for every sown layer."""
    out = {}
    for layer, probs in sorted(attention_weights_by_layer(intermediates).items()):
        for name, value in layer_stats(probs).items():
            out[f"attention/{name}/layer_{layer}"] = value
    return out
