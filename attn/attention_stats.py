"""Per-layer attention statistics from the sown `attention_weights` intermediates: pure functions of an
"intermediates" tree, used by the trainer (logged per layer at the evaluation cadence) and by eval.analysis.

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


def sown_by_path(intermediates: Mapping[str, Any], name: str) -> dict[str, jax.Array]:
    """Module path ("layers_0/attention", "decoder/layers_1/cross_attention", ...) -> the last value sown under
    `name` there, for modules inside a `layers_<i>`: unlike `sown_by_layer`, stacks of multi-stack models
    (encoder-decoder, VLM) and cross-attention stay apart."""
    found: dict[str, jax.Array] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        keys = [str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path]
        if name in keys and any(_LAYER.fullmatch(key) for key in keys[: keys.index(name)]):
            found["/".join(keys[: keys.index(name)])] = value
    return found


def stat_label(module_path: str) -> str:
    """The scalar suffix of a layer: its module path with "layers_<i>" shortened to "layer_<i>" and a final
    "/attention" (self-attention, the default) dropped: "layers_2/attention" -> "layer_2",
    "decoder/layers_1/cross_attention" -> "decoder/layer_1/cross_attention"."""
    label = _LAYER.sub(lambda m: f"layer_{m.group(1)}", module_path)
    return label[: -len("/attention")] if label.endswith("/attention") else label


def attention_stats(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Scalars "attention/entropy/<layer>" and "attention/first_key_mass/<layer>" for every sown layer, <layer> as
    `stat_label` names it ("layer_<i>" in single-stack models)."""
    out = {}
    for path, probs in sorted(sown_by_path(intermediates, "attention_weights").items()):
        for name, value in layer_stats(probs).items():
            out[f"attention/{name}/{stat_label(path)}"] = value
    return out
