"""PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069): SnapKV's selection (attn/kv/snapkv.py: the last w prompt queries vote, pooled, top-k per head plus
the window) with a budget per layer that decreases linearly with depth, lower layers keeping more.

With the average per-layer budget b = budget - w (the prompt keys before the window), m = num_layers, l = layer_index
and a prompt of P tokens (the official code's integer arithmetic for the paper's arithmetic sequence):

    k_min = b // beta,  k_max = 2 b - k_min                 (k_max + k_min = 2 b: the total over layers stays m b)
    if k_max >= P - w:  k_max = P - w,  k_min = 2 b - k_max  (no layer keeps more keys than the prompt has)
    k_l   = k_max - l ((k_max - k_min) // (m - 1))
    kept  = every prompt token                               if P <= budget
          = top_b(score) + window  (SnapKV)                  if budget < P < 2 b
          = top_{k_l}(score) + window                        otherwise

A single layer (m = 1) keeps b, as SnapKV. Each layer's cache is allocated at the largest selection its rule can
make (the maximum of b + w, budget and k_l + w over the prompt lengths) plus `decode_budget` slots for generated
tokens, so lower layers hold larger caches; decoding is SnapKV's (append, then a sliding window over the slots after
the prompt's selection). The models fill `layer_index` and `num_layers` per layer (the spec's `layer_fields`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.core.validation import non_negative_int, positive_int
from attn.kv.snapkv import SNAPKV_OPTION_DOCS, SNAPKV_VALIDATORS, SnapKVAttention, SnapKVPolicy
from attn.registry import register

Array = jax.Array


def layer_prefix_budget(
    prompt_length: Any, *, budget: int, window: int, beta: int, layer_index: int, num_layers: int, xp: Any = jnp
) -> Any:
    """Prompt keys kept before the window by layer `layer_index` of `num_layers` for prompts of prompt_length > budget
    tokens (int array of any shape, numpy with xp=np or jax with xp=jnp) -> ints of the same shape."""
    base = budget - window
    uniform = xp.full_like(prompt_length, base)
    if num_layers == 1:
        return uniform
    low = base // beta
    high = 2 * base - low
    clipped = high >= prompt_length - window
    k_max = xp.where(clipped, prompt_length - window, high)
    k_min = xp.where(clipped, 2 * base - k_max, low)
    layer = k_max - layer_index * ((k_max - k_min) // (num_layers - 1))
    return xp.where(prompt_length < 2 * base, uniform, layer)


@dataclasses.dataclass(frozen=True)
class PyramidKVPolicy(SnapKVPolicy):
    """SnapKV's selection with the layer's budget (see the module docstring)."""

    beta: int = 20
    layer_index: int = 0
    num_layers: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.layer_index < self.num_layers:
            raise ValueError(f"layer_index={self.layer_index} must lie in [0, num_layers={self.num_layers})")

    def layer_budget(self, prompt_length: Any, xp: Any) -> Any:
        return layer_prefix_budget(
            prompt_length,
            budget=self.budget,
            window=self.window,
            beta=self.beta,
            layer_index=self.layer_index,
            num_layers=self.num_layers,
            xp=xp,
        )

    def prefix_budget(self, prompt_length: Array, scores: Array, prefix: Array) -> Array:
        return self.layer_budget(jnp.asarray(prompt_length, jnp.int32), jnp)

    @property
    def prefix_capacity(self) -> int:
        # beyond the longest clipped prompt the budget no longer depends on the length
        base = self.budget - self.window
        longest = 2 * base - base // self.beta + self.window + 1
        lengths = np.arange(self.budget + 1, max(self.budget + 1, longest) + 1)
        return int(max(base, self.layer_budget(lengths, np).max()))


@register(
    "pyramidkv",
    family="kv",
    paper="PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
    catalog=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="SnapKV's prompt selection with per-layer budgets decreasing linearly with depth",
    option_docs={
        **SNAPKV_OPTION_DOCS,
        "budget": "average prompt entries kept per (batch, kv head) over the layers, window included",
        "beta": "the top layer keeps (budget - observation_window) // beta prompt keys before the window",
        "layer_index": "this layer's index l (0-based), filled by the models",
        "num_layers": "number of layers m of the model, filled by the models",
    },
    validators={**SNAPKV_VALIDATORS, "beta": positive_int, "layer_index": non_negative_int, "num_layers": positive_int},
    fidelity="official-code",
    reference=(
        "arXiv 2406.02069 (arithmetic per-layer budgets, beta); "
        "github.com/Zefan-Cai/PyramidKV pyramidkv/pyramidkv_utils.py "
        "(PyramidKVCluster.update_kv)"
    ),
    has_attention_weights=True,
    layer_fields=("layer_index", "num_layers"),
)
class PyramidKVAttention(SnapKVAttention):
    """PyramidKV: SnapKV with a per-layer prompt budget. x [B, T, E] -> [B, T, E]; cache [B, C_l, KVH, D] with
    C_l the layer's largest selection plus decode_budget."""

    beta: int = 20
    layer_index: int = 0
    num_layers: int = 1

    def cache_policy(self) -> PyramidKVPolicy:
        return PyramidKVPolicy(
            budget=self.budget,
            window=self.observation_window,
            kernel_size=self.kernel_size,
            pooling=self.pooling,
            decode_budget=self.decode_budget,
            beta=self.beta,
            layer_index=self.layer_index,
            num_layers=self.num_layers,
        )
