"""`python -m eval.analysis head_ablation`: ablate heads one at a time and measure the change of a metric ([231]).

"On the Role of Attention Heads in Large Language Model Safety" (Zhou et al., ICLR 2025) scores a head by ablating
it and measuring how the model's output distribution moves (Ships: the KL divergence between the full and the
ablated model's next-token distributions on a prompt set). This tool generalises the score to any language model
and batch: for each selected (layer, head) it zeroes the head's output with `attn.interventions.ablate_heads`
(exactly the model with that head's rows of the output projection zeroed) and reports, over the batches'
weighted next-token positions,

    loss_delta[l][h] = CE(ablated) - CE(full)                       (nats; > 0: the head helps prediction)
    kl[l][h]         = mean_positions KL(p_full || p_ablated)        (Ships' divergence, nats)

`metric` ("loss" or "kl") picks `score` and the ranking `most_important` (descending). Ships' alternative ablation
(scaling a head's query so its attention turns uniform) and Sahara's greedy multi-head search are not part of it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.interventions import ablate_heads

from .evaluator import (
    Evaluator,
    captured,
    check_selection,
    forward,
    layer_head_heatmap,
    lm_targets,
    pyplot,
)

METRICS = ("loss", "kl")


def _parse_indices(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _log_probs(model: Any, params: Any, batch: Mapping[str, Any], layer: int | None, head: int | None) -> Any:
    """(log-probabilities [B, T', V], targets [B, T'], weights [B, T']) with head (layer, head) ablated (None: none)."""
    if layer is None:
        logits = forward(model, params, batch)
    else:
        with attn.intervene(ablate_heads(layers=[layer], heads=[head])):
            logits = forward(model, params, batch)
    logits, targets, weights = lm_targets(batch, jnp.asarray(logits, jnp.float32))
    return jax.nn.log_softmax(logits, axis=-1), targets, weights


def _sums(model: Any, params: Any, batch: Mapping[str, Any], layer: int | None, head: int | None) -> dict[str, Any]:
    """Weighted sums over positions: cross-entropy, KL(p_full || p_ablated), weight (layer None: the full model)."""
    full, targets, weights = _log_probs(model, params, batch, None, None)
    ablated = full if layer is None else _log_probs(model, params, batch, layer, head)[0]
    nll = -jnp.take_along_axis(ablated, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(full) * (full - ablated), axis=-1)
    return {"loss": jnp.sum(nll * weights), "kl": jnp.sum(kl * weights), "weight": jnp.sum(weights)}


@dataclasses.dataclass(frozen=True)
class HeadAblation(Evaluator):
    """Options: metric ("loss" or "kl", what `score` holds); layers / heads (None: all) to ablate one by one."""

    metric: str = "loss"
    layers: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"parse": _parse_indices})
    heads: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"parse": _parse_indices})

    name = "head_ablation"
    paper = "[231] On the Role of Attention Heads in Large Language Model Safety (Ships / Sahara)"
    fidelity = "reconstructed"
    reference = (
        "Ships' score as the paper describes it (KL between the full and the head-ablated output distributions), "
        "with the ablation zeroing the head's output; no official code was available; loss change added as a "
        "general metric"
    )

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r} must be one of {METRICS}")

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        shapes = captured(model, params, batches[0], "head_outputs")
        layers = check_selection("layers", self.layers, len(shapes), "attention layers")
        heads = check_selection("heads", self.heads, next(iter(shapes.values())).shape[2], "heads per layer")
        layer_ids = [list(shapes)[i] for i in layers]

        sums_of = jax.jit(functools.partial(_sums, model), static_argnums=(2, 3))

        def totals(layer: int | None, head: int | None) -> dict[str, float]:
            sums = [jax.device_get(sums_of(params, batch, layer, head)) for batch in batches]
            weight = max(sum(float(s["weight"]) for s in sums), 1e-9)
            return {key: sum(float(s[key]) for s in sums) / weight for key in ("loss", "kl")}

        base = totals(None, None)
        loss = np.zeros((len(layer_ids), len(heads)))
        kl = np.zeros_like(loss)
        for i, layer in enumerate(layer_ids):
            for j, head in enumerate(heads):
                ablated = totals(layer, head)
                loss[i, j], kl[i, j] = ablated["loss"], ablated["kl"]
        score = loss - base["loss"] if self.metric == "loss" else kl
        order = np.argsort(-score, axis=None, kind="stable")
        return {
            "layers": layer_ids,
            "heads": list(heads),
            "base_loss": base["loss"],
            "ablated_loss": loss.tolist(),
            "loss_delta": (loss - base["loss"]).tolist(),
            "kl": kl.tolist(),
            "score": score.tolist(),
            "most_important": [[layer_ids[i // len(heads)], heads[i % len(heads)]] for i in order.tolist()],
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axis = plt.subplots(figsize=(6, 4.5))
        label = "loss change (nats)" if self.metric == "loss" else "KL(full || ablated) (nats)"
        layer_head_heatmap(axis, result["score"], f"head_ablation [231]: {label}", label, cmap="magma")
        axis.set(xticks=range(len(result["heads"])), xticklabels=result["heads"])
        axis.set(yticks=range(len(result["layers"])), yticklabels=result["layers"])
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
