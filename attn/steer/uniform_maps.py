"""[127] Uniform Attention Maps (Mo et al. 2024, "Uniform Attention Maps: Boosting Image Fidelity in Reconstruction
and Editing"): during inversion and reconstruction of an image by a text-conditioned diffusion model, every
cross-attention probability map is replaced by the uniform map, so the text conditions every pixel alike and the
inversion and reconstruction trajectories no longer disagree through prompt-dependent attention:

    A_ij = softmax(q_i k_j / sqrt(d)) over the L text tokens  ->  A_ij = 1 / L          (every query i, key j)
    cross_attention(x)_i = sum_j A_ij v_j  =  mean_j v_j                                 (the same for every query)

As in the official code, L counts every caption position, padding included (their 1/77 is the CLIP context length),
and the maps are replaced in every cross-attention layer of the denoiser at every step of both the inversion
(t: 0 -> 1) and the reconstruction (t: 1 -> 0). Self-attention is untouched.

Shapes: the rule acts on attention_weights [B, H, N, L] of the `layers_<i>/cross_attention` layers of a DiT
(`attn.models.DiT`), selected by the module pattern "*/cross_attention".

No-op: enabled=False gives no rules, so samples are bit-identical to the unsteered model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attn import interventions as iv
from attn.models.dit import check_cross_attention
from attn.steer.registry import register

CROSS_ATTENTION = "*/cross_attention"


def uniform_weights(weights: jax.Array, path: str) -> jax.Array:
    """The uniform map 1 / L of the same shape and dtype as weights [B, H, N, L] (`path` is unused)."""
    del path
    return jnp.full(weights.shape, 1.0 / weights.shape[-1], weights.dtype)


@register(
    "uniform_maps",
    paper="[127] Uniform Attention Maps: Boosting Image Fidelity in Reconstruction and Editing (Mo et al., WACV 2025)",
    fidelity="official-code",
    reference=(
        "Mowenyii/Uniform-Attention-Maps models/p2p/attention_control.py: in cross-attention (is_cross) the softmax "
        "probabilities are replaced by ones * (1/77) before the einsum with V, in inversion and reconstruction; "
        "paper section 3.3.1. The adaptive mask-guided editing of section 3.3.2 is not implemented"
    ),
    no_op="enabled=False (no rules)",
)
@dataclasses.dataclass(frozen=True)
class UniformMaps:
    """enabled: replace the cross-attention maps of every denoiser block by the uniform map."""

    enabled: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled={self.enabled!r} must be a bool")

    def rules(self, model: Any) -> tuple[iv.Rule, ...]:
        """Rules for `attn.intervene`: uniform maps in every cross-attention of `model` (a DiT with
        cross-attention; ValueError naming `model` otherwise). Wrap both the inversion and the reconstruction."""
        check_cross_attention(model, argument="model")
        if not self.enabled:
            return ()
        return (iv.hook("attention_weights", uniform_weights, module=CROSS_ATTENTION),)
