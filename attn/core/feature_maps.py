"""Feature maps phi of kernelised linear attention: sim(q, k) = phi(q) . phi(k).

A feature map is applied to the last axis of q and k ([..., head_dim] -> [..., feature_dim]) and must be the same
function for both (otherwise phi(q) . phi(k) is not a kernel). The named maps keep the feature dimension:

  identity       phi(x) = x                 (plain "linear attention"; features may be negative)
  elu_plus_one   phi(x) = elu(x) + 1 > 0    (Katharopoulos et al., "Transformers are RNNs")
  relu           phi(x) = max(x, 0) >= 0
  silu           phi(x) = x * sigmoid(x)    (TransNormerLLM's swish kernel)

Learnable maps (a per-head linear map) have parameters and live in the layers that own them; the activations of
Hedgehog's map ([217]) double the feature dimension and live here:

  spiky_exp      phi(x) = exp(x - c) ⊕ exp(-x - c)    (the paper's exp(xW + b) ⊕ exp(-xW - b), shifted by c)
  spiky_softmax  phi(x) = softmax(x) ⊕ softmax(-x)    (LoLCATs' form: each half normalised over the features)

`linear_attention` also accepts any callable.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
FeatureMap = Callable[[Array], Array]


def identity(x: Array) -> Array:
    return x


def elu_plus_one(x: Array) -> Array:
    return jax.nn.elu(x) + 1.0


def spiky_exp(x: Array, shift: Array | None = None) -> Array:
    """Hedgehog's map exp(x - c) ⊕ exp(-x - c) over the last axis: float32 [..., D] -> [..., 2D], positive.

    `shift` c (broadcastable to [..., 1]) multiplies every feature of a row by the same exp(-c), which cancels in
    normalised linear attention when c is constant per query row or shared by all keys of a normalisation. None
    uses each row's max |x| (then the largest feature is 1 and none overflows). The shift carries no gradient.
    """
    x = x.astype(jnp.float32)
    if shift is None:
        shift = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    shift = jax.lax.stop_gradient(jnp.asarray(shift, jnp.float32))
    return jnp.concatenate([jnp.exp(x - shift), jnp.exp(-x - shift)], axis=-1)


def spiky_softmax(x: Array) -> Array:
    """LoLCATs' form of Hedgehog's map, softmax(x) ⊕ softmax(-x) over the last axis: float32 [..., D] -> [..., 2D],
    positive, each half summing to 1."""
    x = x.astype(jnp.float32)
    return jnp.concatenate([jax.nn.softmax(x, axis=-1), jax.nn.softmax(-x, axis=-1)], axis=-1)


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
