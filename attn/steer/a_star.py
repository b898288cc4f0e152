"""[66] A-STAR (Agarwal et al., ICCV 2023, "A-STAR: Test-time Attention Segregation and Retention for Text-to-image
Synthesis"): test-time losses on the cross-attention maps of a text-to-image model, minimised by gradient steps on
the latent during the first denoising steps, so that every concept of a multi-concept prompt is generated.

Concept maps. At step s (time t_s) the latent x is run through the denoiser with the prompt; the cross-attention
weights [B, H, N, L] of every block are averaged over heads and blocks to M [B, N, L]. The map of concept m (a group
of caption positions, e.g. "red circle" = positions (0, 1)) is the mean of its columns, scaled to a maximum of 1:

    A_m = mean_{j in m} M[:, :, j],      A_m <- A_m / max_pixels(A_m)                      [B, N]

Segregation: concepts should not attend to the same pixels (the overlap of each pair, as an intersection over the
sum of the two maps):

    L_seg = sum_{m < n} sum_p min(A_m, A_n) / sum_p (A_m + A_n)

Retention: each concept keeps the region it held at the previous step. B_m is the previous step's map binarised at
`threshold` (no gradient); the loss is one minus the soft intersection over union:

    L_ret = sum_m [1 - sum_p A_m B_m / sum_p (A_m + B_m - A_m B_m)]        (0 at the first step: no previous map)

Update (before the velocity evaluation of each of the first `max_steps` steps):

    x <- x - step_size * grad_x (L_seg + retention_weight * L_ret)

Fidelity: reconstructed. The paper's abstract (arXiv 2306.14544) and the catalog's reading name the two losses (pair
overlap, retention across steps from binarised maps) and the gradient step on the latent; there is no official code.
The exact normalisations (max-scaling of the maps, the soft IoU, a constant step size on the flow-matching latent
instead of Attend-and-Excite's schedule on the DDPM latent) are this implementation's choices.

No-op: step_size = 0 or max_steps = 0 give no latent update at all, so samples are bit-identical to the unsteered
model. A model without cross-attention raises ValueError naming `model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn import interventions as iv
from attn.models.dit import check_cross_attention
from attn.steer.registry import register

CROSS_ATTENTION = "*/cross_attention"
_EPS = 1e-8


def concept_maps(weights: jax.Array, concepts: Sequence[Sequence[int]]) -> jax.Array:
    """Concept maps [B, K, N] in [0, 1] from cross-attention weights [B, N, L] (averaged over heads and layers):
    the mean over each concept's caption positions, divided by its maximum over the N pixels (patches)."""
    maps = jnp.stack([jnp.mean(weights[:, :, list(group)], axis=-1) for group in concepts], axis=1)
    return maps / (jnp.max(maps, axis=-1, keepdims=True) + _EPS)


def segregation_loss(maps: jax.Array) -> jax.Array:
    """L_seg [B]: sum over concept pairs m < n of sum_p min(A_m, A_n) / sum_p (A_m + A_n), maps [B, K, N]."""
    count = maps.shape[1]
    total = jnp.zeros(maps.shape[:1], maps.dtype)
    for m in range(count):
        for n in range(m + 1, count):
            overlap = jnp.sum(jnp.minimum(maps[:, m], maps[:, n]), -1)
            total = total + overlap / (jnp.sum(maps[:, m] + maps[:, n], -1) + _EPS)
    return total


def retention_loss(maps: jax.Array, previous: jax.Array) -> jax.Array:
    """L_ret [B]: sum over concepts of 1 - soft IoU(A_m, B_m), maps [B, K, N], previous binarised maps [B, K, N]."""
    intersection = jnp.sum(maps * previous, -1)
    union = jnp.sum(maps + previous - maps * previous, -1)
    return jnp.sum(1.0 - intersection / (union + _EPS), -1)


def mean_cross_attention(cache: dict[str, dict[str, jax.Array]]) -> jax.Array:
    """The cross-attention weights of `run_with_cache` output averaged over heads and layers: [B, N, L]."""
    weights = [entry["attention_weights"] for entry in cache.values() if "attention_weights" in entry]
    return jnp.mean(jnp.stack([w.mean(axis=1) for w in weights]), axis=0)


def check_concepts(concepts: Any, caption_length: int) -> tuple[tuple[int, ...], ...]:
    """Concept groups as tuples of caption positions in [0, caption_length); ValueError naming `concepts`."""
    try:
        groups = tuple(tuple(int(j) for j in group) for group in concepts)
    except TypeError:
        raise ValueError(
            f"concepts={concepts!r} must be a sequence of caption-position groups, e.g. [(0, 1), (3, 4)]"
        ) from None
    if len(groups) < 2 or any(not group for group in groups):
        raise ValueError(f"concepts={concepts!r} must hold at least two non-empty groups of caption positions")
    bad = [j for group in groups for j in group if not 0 <= j < caption_length]
    if bad:
        raise ValueError(
            f"concepts={concepts!r} holds positions {bad} outside the caption (length {caption_length}: 0..."
            f"{caption_length - 1})"
        )
    return groups


@register(
    "a_star",
    paper="[66] A-STAR: Test-time Attention Segregation and Retention for Text-to-image Synthesis (ICCV 2023)",
    fidelity="reconstructed",
    reference=(
        "arXiv 2306.14544 abstract and figure 5 caption (segregation loss on concept-pair overlap, retention loss on "
        "binarised maps of earlier steps, gradient step on the latent); no official code. Map normalisation, the "
        "soft IoU and the constant step size are choices made here (see the module docstring)"
    ),
    no_op="step_size=0 or max_steps=0 (no latent update)",
)
@dataclasses.dataclass(frozen=True)
class AStar:
    """step_size: gradient step on the latent; max_steps: denoising steps that get an update (the first ones);
    retention_weight: weight of L_ret; threshold: binarisation level of the previous step's maps."""

    step_size: float = 1.0
    max_steps: int = 10
    retention_weight: float = 1.0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("step_size", "retention_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 0:
            raise ValueError(f"max_steps={self.max_steps!r} must be an int >= 0")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold={self.threshold!r} must lie in (0, 1)")

    @property
    def active(self) -> bool:
        return self.step_size > 0 and self.max_steps > 0

    def losses(
        self, model: Any, params: Any, x: jax.Array, t: jax.Array, captions: jax.Array, concepts: Any, previous: Any
    ) -> tuple[jax.Array, jax.Array]:
        """(total loss summed over the batch, concept maps [B, K, N]) at latent x [B, H, W, C] and time t;
        previous: binarised maps [B, K, N] of the last step, or None."""
        times = jnp.full((x.shape[0],), t, jnp.float32)
        _, cache = iv.run_with_cache(
            model, {"params": params}, x, times, captions, names=("attention_weights",), layers=[CROSS_ATTENTION]
        )
        maps = concept_maps(mean_cross_attention(cache), concepts)
        loss = segregation_loss(maps)
        if previous is not None:
            loss = loss + self.retention_weight * retention_loss(maps, previous)
        return jnp.sum(loss), maps

    def latent_update(
        self, model: Any, params: Any, captions: jax.Array, concepts: Any
    ) -> Callable[[jax.Array, jax.Array, int], jax.Array] | None:
        """The update x -> x - step_size grad_x L for `attn.models.dit.euler_sample(latent_update=...)`, or None
        when inactive (the no-op). captions int [B, L]; concepts: groups of caption positions, e.g. [(0, 1), (3, 4)].
        ValueError naming `model` for a model without cross-attention, `concepts` for positions outside the caption.
        """
        check_cross_attention(model, argument="model")
        groups = check_concepts(concepts, captions.shape[1])
        if not self.active:
            return None

        def first(params, x, t):
            return jax.value_and_grad(lambda z: self.losses(model, params, z, t, captions, groups, None), has_aux=True)(
                x
            )

        def later(params, x, t, previous):
            return jax.value_and_grad(
                lambda z: self.losses(model, params, z, t, captions, groups, previous), has_aux=True
            )(x)

        first, later = jax.jit(first), jax.jit(later)
        state: dict[str, Any] = {"previous": None}

        def update(x: jax.Array, t: jax.Array, step: int) -> jax.Array:
            if step == 0:  # a fresh trajectory: no map to retain yet
                state["previous"] = None
            if step >= self.max_steps:
                return x
            previous = state["previous"]
            (_, maps), grad = first(params, x, t) if previous is None else later(params, x, t, previous)
            state["previous"] = (jax.lax.stop_gradient(maps) >= self.threshold).astype(maps.dtype)
            return x - jnp.asarray(self.step_size, x.dtype) * grad

        return update
