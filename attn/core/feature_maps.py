"""Feature maps phi of kernelised linear attention: sim(q, k) = phi(q) . phi(k).

A feature map is applied to the last axis of q and k ([..., head_dim] -> [..., feature_dim]) and must be the same
function for both (otherwise phi(q) . phi(k) is not a kernel). The named maps keep the feature dimension:

  identity       phi(x) = x                 (plain "linear attention"; features may be negative)
  elu_plus_one   phi(x) = elu(x) + 1 > 0    (Katharopoulos et al., "Transformers are RNNs")
  relu           phi(x) = max(x, 0) >= 0
  silu           phi(x) = x * sigmoid(x)    (TransNormerLLM's swish kernel)

Learnable maps (a per-head linear map, Hedgehog's spiky softmax map) have parameters and live in the layers that
own them; `linear_attention` also accepts any callable.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

Array = jax.Array
FeatureMap = Callable[[Array], Array]


def identity(x: Array) -> Array:
    return x


def elu_plus_one(x: Array) -> Array:
    return jax.nn.elu(x) + 1.0


FEATURE_MAPS: dict[str, FeatureMap] = {
    "identity": identity,
    "elu_plus_one": elu_plus_one,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def resolve_feature_map(feature_map: str | FeatureMap | None) -> FeatureMap | None:
    """The function behind `feature_map`: a registry name, a callable, or None (no map)."""
    if feature_map is None or callable(feature_map):
        return feature_map
    if feature_map not in FEATURE_MAPS:
        raise ValueError(
            f"feature_map={feature_map!r} is not supported; expected one of {', '.join(map(repr, FEATURE_MAPS))}, "
            "a callable, or None"
        )
    return FEATURE_MAPS[feature_map]
