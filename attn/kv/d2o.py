"""D2O [171] (Wan et al. 2025, "D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of Large
Language Models"): H2O's eviction (heavy hitters + a recent window, with attention sinks) where an evicted entry is
merged into the most similar kept entry when their key similarity reaches a threshold that follows an exponential
moving average; per-layer budgets from the density of each layer's prompt attention.

Token level, per (batch, kv head), after each decode call (queries at positions n-L..n-1, n = tokens seen):

    s_j    <-  s_j + sum_{i in chunk} sum_{h in group} a_{h,i,j}                 accumulated attention (as H2O)
    keep   =   {j < S}  union  {j >= n - R}  union  top_{B-R-S} {s_j : S <= j < n - R}       B budget, R recent,
                                                             S = min(sinks, B - R) (the first tokens, kept first)
    for every evicted entry e:   c_e = max_{k kept} cos(K_e, K_k),   m_e = its argmax
    tau    =   mean_e c_e                          at the first eviction of the sequence
           <-  alpha tau + (1 - alpha) mean_e c_e   at later ones   (mean over the sequence's kv heads and evicted e)
    K_k    <-  (K_k + sum_{e : m_e = k, c_e >= tau} c_e K_e) / (1 + |{e : m_e = k, c_e >= tau}|)      and V alike

The merge is the official weighted merge: torch.scatter_reduce(reduce="mean", include_self=True) of c_e K_e into
the kept entry, so a merged entry is the mean of itself and its similarity-weighted partners; merging a copy of a
kept (key, value) pair (c_e = 1) leaves that entry unchanged. The threshold is side state of the cache
("merge_threshold" float32 [B], NaN before the first eviction).

Layer level (`attention_density`, `layer_budgets`): at the prefill each layer's density is

    v_l    =   mean_h minmax_h( mean_b var_j( sum_i a_{b,h,i,j} ) )      (the column sums' variance, min-max
                                                                         normalised over the layer's heads)
    r_l    =   clip(softmax_l(-v) * M * B / T, 0.01, 1)                  (M layers, T the prompt length)
    B_l    =   floor(T r_l (B - R) / B) + floor(T r_l R / B),   R_l = floor(T r_l R / B)

so layers with denser (lower-variance) attention keep more. A model takes per-layer budgets through one options dict
per layer (`attention_options=[{"budget": B_l, "recent": R_l}, ...]`): each layer's cache is allocated at its own
budget. `calibrate(model, variables, prompt, budget=B, recent=R)` computes them from one forward over the prompt
(the official code does the same at the prefill, inside the model). Time per decode call O((B + L)^2 D) for the
similarities (O(B D) per token for attention); memory B entries.

This follows the official code (AIoT-MLSys-Lab/d2o, LLM_merge_new/LMEval_kv_token_merge/
modeling_llama3_7b_13b_d2o.py D2O_LayerKVCache and modeling_llama3_new.py's dynamic allocation). Differences: the
official code sums scores over the batch (run at batch size 1) and decides "merge or not" per evicted rank from the
mean over heads of the similarities; here each (batch, kv head) decides for its own evicted entries and the
threshold is per sequence. Keys are cached before RoPE, so the cosine similarity reads unrotated keys (the official
code compares rotated ones). The official code leaves layers 0, 1 and the last uncompressed and starts evicting at
the first decode step; here every layer evicts once it holds more than its budget (a prompt chunk is compressed
after it, as H2O). alpha is the official `alpha` with `belta` = 1 - alpha (both 0.5 there). budget >= the
generated length keeps everything: decoding is causal softmax attention.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn import interventions
from attn.core import cache as cache_lib
from attn.core.layer import AttentionCall
from attn.core.validation import in_range, non_negative_int
from attn.kv.policy_layer import PolicyAttention
from attn.kv.score_eviction import (
    PER_HEAD_VALIDATORS,
    SCORE_OPTION_DOCS,
    HeavyRecentPolicy,
    say_if_never_evicting,
    top_k_mask,
)
from attn.registry import register

Array = jax.Array

THRESHOLD_VARIABLE = "merge_threshold"


def kept_mask(indices: Array, counts: Array, entries: int) -> Array:
    """bool [B, KVH, E]: the entries named by the first counts [B, KVH] of indices int32 [B, KVH, C]."""
    slot_used = jnp.arange(indices.shape[-1]) < counts[..., None]
    batch, heads = jnp.indices(indices.shape[:2])
    kept = jnp.zeros((*indices.shape[:2], entries), bool)
    return kept.at[batch[..., None], heads[..., None], indices].max(slot_used)


def merge_evicted(
    keys: Array, values: Array, kept: Array, evicted: Array, threshold: Array, alpha: float
) -> tuple[Array, Array, Array]:
    """D2O's merge. keys [B, E, KVH, D], values [B, E, KVH, Dv], kept / evicted bool [B, KVH, E], threshold float32
    [B] (NaN: no eviction yet) -> (keys, values, threshold): every evicted entry whose best cosine similarity to a
    kept entry reaches the updated threshold is folded into that entry (see the module docstring)."""
    kf = jnp.swapaxes(keys.astype(jnp.float32), 1, 2)  # [B, KVH, E, D]
    vf = jnp.swapaxes(values.astype(jnp.float32), 1, 2)
    unit = kf / jnp.maximum(jnp.linalg.norm(kf, axis=-1, keepdims=True), 1e-12)
    similarity = jnp.einsum("bged,bgkd->bgek", unit, unit)
    similarity = jnp.where(kept[:, :, None, :], similarity, -jnp.inf)
    best, target = jnp.max(similarity, axis=-1), jnp.argmax(similarity, axis=-1)  # [B, KVH, E]
    count = jnp.sum(evicted, axis=(1, 2))
    mean = jnp.sum(jnp.where(evicted, best, 0.0), axis=(1, 2)) / jnp.maximum(count, 1)
    updated = jnp.where(jnp.isnan(threshold), mean, alpha * threshold + (1.0 - alpha) * mean)
    threshold = jnp.where(count > 0, updated, threshold)
    merged = evicted & (best >= threshold[:, None, None])
    weight = jnp.where(merged, best, 0.0)
    onehot = (target[..., None] == jnp.arange(kf.shape[2])) & merged[..., None]  # [B, KVH, E(evicted), E(kept)]
    partners = jnp.sum(onehot, axis=2).astype(jnp.float32)  # [B, KVH, E]

    def fold(x: Array) -> Array:
        summed = jnp.einsum("bgek,bge,bged->bgkd", onehot.astype(jnp.float32), weight, x)
        folded = (x + summed) / (1.0 + partners[..., None])
        return jnp.swapaxes(jnp.where(kept[..., None], folded, x), 1, 2)

    return fold(kf).astype(keys.dtype), fold(vf).astype(values.dtype), threshold


@dataclasses.dataclass(frozen=True)
class D2OPolicy(HeavyRecentPolicy):
    """H2O's eviction with `sinks` first tokens always kept, and D2O's similarity merge of the evicted entries (see
    the module docstring). `threshold` float32 [B] is the merge threshold before this call (None: no eviction yet);
    `merge` hands the updated one to `report` (the layer stores it next to the cache)."""

    sinks: int = 4
    alpha: float = 0.5
    threshold: Array | None = None
    report: Callable[[Array], None] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha!r} must be in [0, 1]")

    def keep(self, cands: cache_lib.Candidates) -> tuple[Array, Array]:
        sinks = min(self.sinks, self.budget - self.recent)  # sinks take the heavy-hitter slots first, as officially
        recent = cands.valid & (cands.positions >= cands.index - self.recent)
        sink = cands.valid & (cands.positions < sinks) & ~recent
        heavy = top_k_mask(cands.key_mass, cands.valid & ~recent & ~sink, self.budget - self.recent - sinks)
        return cache_lib.ordered_keep(recent | sink | heavy, self.capacity)

    def merge(self, cands: cache_lib.Candidates, indices: Array, counts: Array) -> cache_lib.Candidates:
        kept = kept_mask(indices, counts, cands.valid.shape[-1])
        threshold = self.threshold
        if threshold is None:
            threshold = jnp.full((cands.valid.shape[0],), jnp.nan, jnp.float32)
        keys, values, threshold = merge_evicted(
            cands.keys, cands.values, kept, cands.valid & ~kept, threshold, self.alpha
        )
        if self.report is not None:
            self.report(threshold)
        stored_keys, stored_values = keys, values
        if isinstance(cands.stored_keys, cache_lib.QuantizedArray):  # re-encode the merged entries
            stored_keys = cache_lib.quantize(keys, cands.stored_keys.bits)
            stored_values = cache_lib.quantize(values, cands.stored_values.bits)
        return cands.replace(keys=keys, values=values, stored_keys=stored_keys, stored_values=stored_values)


# ---------------------------------------------------------------------------------------------- layer level
def attention_density(weights: Array) -> Array:
    """A layer's attention-density statistic v_l (float32 []) from its prompt attention weights [B, H, Tq, Tk]: the
    variance over keys of the column sums, averaged over the batch, min-max normalised over heads, averaged."""
    if weights.ndim != 4:
        raise ValueError(f"weights has shape {weights.shape}; expected [batch, heads, q_len, kv_len]")
    column = jnp.sum(weights.astype(jnp.float32), axis=2)
    variance = jnp.mean(jnp.var(column, axis=-1), axis=0)  # [H]
    low, high = jnp.min(variance), jnp.max(variance)
    return jnp.mean((variance - low) / (high - low + 1e-6))


def layer_budgets(densities: Sequence[float], *, budget: int, recent: int, length: int) -> list[dict[str, int]]:
    """Per-layer options [{"budget": B_l, "recent": R_l}, ...] from the layers' densities v_l (`attention_density`)
    for a uniform budget B (recent R) at prompt length T (see the module docstring)."""
    dens = np.asarray(densities, np.float64)
    if dens.ndim != 1 or dens.size == 0:
        raise ValueError(f"densities={densities!r} must be a non-empty sequence with one value per layer")
    if not 0 <= recent <= budget <= length or budget <= 0:
        raise ValueError(f"budget={budget!r}, recent={recent!r}, length={length!r}: expected 0 <= recent <= budget")
    weights = np.exp(-(dens - dens.max()))
    weights = weights / weights.sum()
    ratios = np.clip(weights * dens.size * budget / length, 0.01, 1.0)
    options = []
    for ratio in ratios:
        heavy, kept_recent = int(length * ratio * (budget - recent) / budget), int(length * ratio * recent / budget)
        options.append({"budget": max(1, heavy + kept_recent), "recent": kept_recent})
    return options


def calibrate(model: nn.Module, variables: Any, tokens: Array, *, budget: int, recent: int) -> list[dict[str, int]]:
    """Per-layer D2O options of a model (one dict per attention layer, in layer order) from one forward over the
    prompt tokens [B, T]: each layer's `attention_density` of its captured attention weights, then `layer_budgets`
    at length T. Use: `model.clone(attention="d2o", attention_options=calibrate(...))` (the model's layers must
    expose attention weights, e.g. softmax or d2o itself)."""
    _, captured = interventions.run_with_cache(model, variables, tokens, names=("attention_weights",))
    paths = [path for path in captured if "attention_weights" in captured[path]]
    if not paths:
        raise ValueError(f"model {type(model).__name__} exposes no attention_weights to calibrate D2O's budgets from")

    def layer_index(path: str) -> tuple[int, str]:
        found = re.search(r"layers_(\d+)", path)
        return (int(found.group(1)) if found else -1, path)

    densities = [
        float(attention_density(captured[path]["attention_weights"])) for path in sorted(paths, key=layer_index)
    ]
    return layer_budgets(densities, budget=budget, recent=recent, length=tokens.shape[1])


@register(
    "d2o",
    family="kv",
    paper="D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of Large Language Models",
    catalog=171,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="H2O eviction + sinks; evicted entries merged into the most similar kept key above an EMA threshold",
    option_docs={
        **SCORE_OPTION_DOCS,
        "budget": "cache entries per (batch, kv head) of this layer (per-layer budgets: d2o.layer_budgets)",
        "recent": "latest tokens always kept; the other budget - recent slots hold sinks and heavy hitters",
        "sinks": "first tokens always kept (the official code keeps 4)",
        "alpha": "EMA factor of the merge threshold: tau <- alpha tau + (1 - alpha) mean similarity",
    },
    validators={**PER_HEAD_VALIDATORS, "sinks": non_negative_int, "alpha": in_range(0.0, 1.0)},
    fidelity="official-code",
    reference=(
        "arXiv 2406.13035 Sec. 3 (dynamic allocation, EMA-threshold merging); github.com/AIoT-MLSys-Lab/d2o "
        "LLM_merge_new/LMEval_kv_token_merge/modeling_llama3_7b_13b_d2o.py (D2O_LayerKVCache) and "
        "modeling_llama3_new.py (layer ratios)"
    ),
    has_attention_weights=True,
)
class D2OAttention(PolicyAttention):
    """D2O: softmax attention whose decode cache keeps `sinks` + heavy hitters + `recent` entries per (batch, kv head)
    and merges evicted entries into similar kept ones. x [B, T, E] -> [B, T, E]; cache [B, budget, KVH, D]."""

    budget: int = 256
    recent: int = 128
    sinks: int = 4
    alpha: float = 0.5

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        self.cache_policy()  # recent <= budget, sinks fit
        say_if_never_evicting(self, call, self.budget)

    def cache_policy(self) -> D2OPolicy:
        side = cache_lib.load_state(self, (THRESHOLD_VARIABLE,), shared_index=True)
        return D2OPolicy(
            budget=self.budget,
            recent=self.recent,
            sinks=self.sinks,
            alpha=self.alpha,
            threshold=None if side is None else side.state[THRESHOLD_VARIABLE],
            report=lambda threshold: self.put_variable("cache", THRESHOLD_VARIABLE, threshold),
        )

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The creating decode call also creates the merge threshold (NaN: no eviction yet)."""
        if call.decode and cache_lib.load(self) is None:
            state = {THRESHOLD_VARIABLE: jnp.full((k.shape[0],), jnp.nan, jnp.float32)}
            names = ((THRESHOLD_VARIABLE, ("batch",)),)
            cache_lib.store_state(self, cache_lib.RecurrentState(state=state, index=None, names=names))
        return super().prepare(q, k, v, call)
