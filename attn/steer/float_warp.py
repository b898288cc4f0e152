"""[186] FloAt (Mishra et al. 2024, "FloAt: Flow Warping of Self-Attention for Clothing Animation Generation"): the
self-attention maps of a frame are recomputed as a linear combination of themselves and the same layer's maps of the
previous (reference) frame, warped by the flow between the two frames, so the generated frame follows the
reference's layout where the flow says it moved. Here on a DiT (`attn.models.DiT`), sampling a frame next to a
reference sample.

Warp. flow int [B|1, gh, gw, 2] on the patch grid (row, column displacement in patches): the frame's patch i at
(r, c) shows the reference's patch pi(i) = (r - flow_r, c - flow_c); v_i = 1 when pi(i) lies on the grid. For a
reference map A_ref [B, H, N, N] of a block at the same step:

    W_ij = v_i v_j A_ref[pi(i), pi(j)] / sum_j' v_j' A_ref[pi(i), pi(j')]          (rows renormalised to 1)
    A_ij <- weight A_ij + (1 - weight) W_ij     where v_i = 1,       A_ij unchanged where v_i = 0

(rows stay distributions). The reference is sampled first with the same sampler, recording every block's
self-attention weights at every step; the frame is then sampled with the rule at each step using the maps of that
step (classifier-free guidance: both halves, each with its own reference half).

Shapes: images [B, H, W, C]; captions int [B, L]; the rule acts on attention_weights [B, H, N, N] of the
`layers_<i>/attention` blocks.

Fidelity: reconstructed. Checked against the paper's abstract (arXiv 2411.15028: "the self-attention maps of a
particular layer and frame are recomputed as a linear combination of itself and the self-attention maps of the same
layer and the previous frame, warped by the flow on the normal maps of the two frames") and the claims of the
related patent application US 2026/0051101 (a modified map = linear combination of the frame's map and the flow-warped
previous map; a binarized flow map also enters). There is no official code; the normal-map ControlNet, the choice of
layers and the use of the binarized flow map are not reproduced, the warp of both map axes by nearest patch with row
renormalisation is this implementation's reading.

No-op: weight=1 gives no rules, so the frame is bit-identical to an unsteered sample. A model without
cross-attention raises ValueError naming `model`; a flow of the wrong shape names `flow`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn import interventions as iv
from attn.models import dit
from attn.steer.registry import register

Array = jax.Array
SELF_ATTENTION = "*/attention"


def check_flow(flow: Any, batch: int, grid: tuple[int, int]) -> np.ndarray:
    """flow as int32 [batch, gh, gw, 2] from [gh, gw, 2] or [batch|1, gh, gw, 2] (rounded to whole patches).
    ValueError naming `flow` for another shape."""
    flow = np.asarray(flow)
    if flow.shape == (*grid, 2):
        flow = flow[None]
    if flow.ndim != 4 or flow.shape[0] not in (1, batch) or flow.shape[1:] != (*grid, 2):
        raise ValueError(
            f"flow has shape {flow.shape}; expected [gh, gw, 2] or [batch|1, gh, gw, 2] = [{batch}|1, {grid[0]}, "
            f"{grid[1]}, 2] on the patch grid"
        )
    return np.broadcast_to(np.round(flow).astype(np.int32), (batch, *grid, 2))


def source_indices(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pi int32 [B, N], valid float32 [B, N]): each patch's reference patch (row-major, 0 where invalid) and whether
    it lies on the grid, for flow int [B, gh, gw, 2]."""
    b, gh, gw, _ = flow.shape
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    src_r, src_c = rows[None] - flow[..., 0], cols[None] - flow[..., 1]
    valid = (src_r >= 0) & (src_r < gh) & (src_c >= 0) & (src_c < gw)
    index = np.where(valid, src_r * gw + src_c, 0)
    return index.reshape(b, -1).astype(np.int32), valid.reshape(b, -1).astype(np.float32)


def warp_map(reference: Array, index: Array, valid: Array) -> Array:
    """W [B, H, N, N] (see the module docstring) from reference weights [B, H, N, N], index and valid [B, N]; rows of
    invalid queries are 0."""
    rows = jnp.take_along_axis(reference, index[:, None, :, None], axis=2)
    both = jnp.take_along_axis(rows, index[:, None, None, :], axis=3) * valid[:, None, None, :]
    total = jnp.sum(both, axis=-1, keepdims=True)
    return jnp.where(total > 0, both / jnp.where(total > 0, total, 1.0), 0.0) * valid[:, None, :, None]


def blend_maps(weights: Array, reference: Array, index: Array, valid: Array, weight: float) -> Array:
    """weight A + (1 - weight) W on rows of valid queries, A elsewhere; weights, reference [B, H, N, N]."""
    warped = warp_map(reference.astype(jnp.float32), index, valid)
    mixed = weight * weights + (1.0 - weight) * warped.astype(weights.dtype)
    return jnp.where(valid[:, None, :, None] > 0, mixed, weights)


def _blend_hook(weights: Array, path: str, *, references: dict[str, Array], index: Array, valid: Array, weight: float):
    reps = weights.shape[0] // index.shape[0]
    return blend_maps(weights, references[path], jnp.tile(index, (reps, 1)), jnp.tile(valid, (reps, 1)), weight)


@register(
    "float",
    paper="[186] FloAt: Flow Warping of Self-Attention for Clothing Animation Generation (Mishra et al., 2024)",
    fidelity="reconstructed",
    reference=(
        "arXiv 2411.15028 abstract (self-attention map = linear combination of itself and the previous frame's map "
        "of the same layer warped by the flow) and patent application US 2026/0051101 claims 1-3; no official code. "
        "Nearest-patch warp of both axes with row renormalisation is this implementation's choice"
    ),
    no_op="weight=1 (no rules)",
)
@dataclasses.dataclass(frozen=True)
class FloAt:
    """weight: the frame's own map's share (1: no change, 0: the warped reference map); layers: blocks whose
    self-attention is blended (None: all)."""

    weight: float = 0.5
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0 <= self.weight <= 1:
            raise ValueError(f"weight={self.weight!r} must be a number in [0, 1]")
        if self.layers is not None and (
            not isinstance(self.layers, tuple) or any(not isinstance(v, int) or v < 0 for v in self.layers)
        ):
            raise ValueError(f"layers={self.layers!r} must be None or a tuple of block indices")

    @property
    def active(self) -> bool:
        return self.weight < 1

    def rules(self, model: dit.DiT, references: dict[str, Array], flow: Any) -> tuple[iv.Rule, ...]:
        """Rules for `attn.intervene`: blend each selected block's self-attention weights with its warped reference
        map. references: {"layers_<i>/attention": weights [B or 2B, H, N, N]} at this step (what `run_with_cache`
        returns); flow: see `check_flow`. Enter them inside the traced function when the references are traced."""
        dit.check_cross_attention(model, argument="model")
        if not self.active:
            return ()
        layers = [
            f"layers_{i}/attention" for i in (self.layers if self.layers is not None else range(model.num_layers))
        ]
        missing = [p for p in layers if p not in references]
        if missing:
            raise ValueError(f"references lack the self-attention maps of {missing}; they have {sorted(references)}")
        shape = np.shape(flow)
        if len(shape) not in (3, 4) or shape[-1] != 2:
            raise ValueError(f"flow has shape {shape}; expected [gh, gw, 2] or [batch|1, gh, gw, 2] on the patch grid")
        grid = (int(shape[-3]), int(shape[-2]))
        patches = references[layers[0]].shape[-1]
        if patches != grid[0] * grid[1]:
            raise ValueError(f"flow has shape {shape}: its grid {grid} does not cover the maps' {patches} patches")
        index, valid = source_indices(check_flow(flow, shape[0] if len(shape) == 4 else 1, grid))
        hook = functools.partial(
            _blend_hook,
            references=references,
            index=jnp.asarray(index),
            valid=jnp.asarray(valid),
            weight=float(self.weight),
        )
        return (iv.hook("attention_weights", hook, layers=layers),)

    def sample_pair(
        self,
        model: dit.DiT,
        params: Any,
        captions: Array,
        reference_noise: Array,
        noise: Array,
        flow: Any,
        *,
        steps: int = 20,
        guidance: float = 1.0,
    ) -> tuple[Array, Array]:
        """(reference, frame) float32 [B, H, W, C] in [-1, 1]: the reference sampled from reference_noise, then the
        frame from noise with each step's self-attention blended with the reference's warped maps (Euler steps of
        `attn.models.dit.euler_sample`, classifier-free guidance `guidance`). flow: [gh, gw, 2] or [B|1, gh, gw, 2]."""
        dit.check_cross_attention(model, argument="model")
        grid = (noise.shape[1] // model.patch_size, noise.shape[2] // model.patch_size)
        check_flow(flow, noise.shape[0], grid)
        flow = np.asarray(flow)

        def guided(x: Array, t: Array, references: dict[str, Array] | None) -> tuple[Array, Any]:
            batch = x.shape[0]
            times = jnp.full((batch,), t, jnp.float32)
            args = (x, times, captions)
            if guidance != 1.0:
                args = (
                    jnp.concatenate([x, x]),
                    jnp.concatenate([times, times]),
                    jnp.concatenate([captions, jnp.zeros_like(captions)]),
                )
            rules = () if references is None else self.rules(model, references, flow)
            with iv.intervene(*rules):
                out, cache = iv.run_with_cache(
                    model, {"params": params}, *args, names=("attention_weights",), layers=[SELF_ATTENTION]
                )
            if guidance != 1.0:
                out = out[batch:] + guidance * (out[:batch] - out[batch:])
            return out, {path: entry["attention_weights"] for path, entry in cache.items()}

        record = jax.jit(lambda x, t: guided(x, t, None))
        steered = jax.jit(lambda x, t, refs: guided(x, t, refs)[0])
        times = jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)
        reference, frame = reference_noise, noise
        for step in range(steps):
            t, t_next = times[step], times[step + 1]
            v_ref, maps = record(reference, t)
            reference = reference + (t_next - t) * v_ref
            v = steered(frame, t, maps) if self.active else record(frame, t)[0]
            frame = frame + (t_next - t) * v
        return reference, frame


def warped_region(flow: Any, batch: int, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """bool [batch, H, W]: the pixels of patches whose reference patch lies on the grid (where the frame can be
    compared with the warped reference)."""
    _, valid = source_indices(check_flow(flow, batch, grid))
    patches = valid.reshape(batch, *grid) > 0
    return np.repeat(np.repeat(patches, patch_size, axis=1), patch_size, axis=2)


def warp_image(image: np.ndarray, flow: Any, patch_size: int) -> np.ndarray:
    """images [B, H, W, C] moved by the patch flow (each patch shows its reference patch; invalid patches 0)."""
    b, h, w, c = image.shape
    grid = (h // patch_size, w // patch_size)
    index, valid = source_indices(check_flow(flow, b, grid))
    patches = image.reshape(b, grid[0], patch_size, grid[1], patch_size, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, -1, patch_size, patch_size, c)
    moved = np.take_along_axis(patches, index[:, :, None, None, None], axis=1) * valid[:, :, None, None, None]
    moved = moved.reshape(b, *grid, patch_size, patch_size, c).transpose(0, 1, 3, 2, 4, 5)
    return moved.reshape(b, h, w, c)
