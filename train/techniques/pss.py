"""PSS: progressive self-supervised attention learning (Tang et al. 2019, "Progressive Self-Supervised Attention
Learning for Aspect-Level Sentiment Analysis", ACL, catalog [223]).

Aspect-level classifiers attend to a few frequent opinion words and ignore the rest. PSS mines, per training example,
the context words that drove its prediction by iterative erasing, then supervises the attention with them:

    for k = 1..K:                                              mining (K = `iterations`, official 5)
        alpha   = the aspect's attention over the context words of the example with the words mined so far erased
        if H(alpha) < max_entropy bits:                       (official: entropy of the non-zero alpha, log2, < 4.0)
            w    = argmax alpha over the context words not yet erased
            w is "active" if the example is predicted correctly, else "misleading"; erase w
    amask[t]  = 1 at mined words;  avalue[t] = 1 at active words, 0 at misleading ones
    L_att     = mean_b sum_t (amask[b, t] * alpha[b, t] - avalue[b, t])^2     on the train forward's alpha
    loss      = L_task + weight * L_att

The mining rule (entropy test, argmax, active/misleading by correctness, erased word id 0) and L_att with its
values (1 for active, 0 for misleading) are the official code's (DeepLearnXMU/PSSAttention, TNet(+AS)/utils.py
get_attention_mask_forerasing / get_attention_mask_final, MN(+AS)/models/FINAL_BL_MN.py attention_loss; weight is
its `lamda`: 1 for MN, 0.1 or 0.5 for TNet).

Schedule (where this differs from the paper): the paper trains K + 1 models in sequence, each on the training set
with the words mined by the previous ones erased, and only then trains the final model with L_att. Here the mined
words are recomputed deterministically at every step from the current parameters and the batch (K erasing forwards
of the model in eval mode, no gradient), and supervision starts at `start_step` (before it the model trains as the
baseline, so mining reads a trained model). So there is no dataset-level state: nothing beyond the model
parameters needs to be checkpointed, and a resumed run mines the same words as an uninterrupted one. Fidelity is
therefore "reconstructed" for the procedure, with the official mining rule and loss.

alpha for a transformer encoder: the attention row of the aspect mention's position (batch key `aspect_positions`)
in layer `layer` (default the last), averaged over heads, [B, T]; "context words" are batch key `context` [B, T]
(the aspect-sentiment source's context of the queried aspect). The official models exclude erased words from
their attention softmax; here an erased word's token becomes 0 (the padding id) and it stays a key. The erasing
forwards use the train state's model parameters as stored (before other techniques' parameter transforms).

Model: an encoder classifier (model.kind "encoder", head "classification") whose mechanism computes attention
weights; batches need `aspect_positions` and `context` (train.data "aspect_sentiment" provides them).

No-op setting: weight = 0 (the technique is skipped; the train step is the baseline's bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attn import attention_stats
from attn.core import validation

from .. import tasks
from .base import Option, Technique, register

ERASED = 0  # token id of an erased word (the official code sets the word id to 0)
BATCH_KEYS = ("aspect_positions", "context")


def aspect_attention(intermediates: Mapping[str, Any], positions: jax.Array, layer: int) -> jax.Array:
    """alpha [B, T]: the head-averaged attention row of query `positions` int [B] in layer `layer` (negative counts
    from the last) of the sown `attention_weights` [B, H, T, T]."""
    by_layer = attention_stats.attention_weights_by_layer(intermediates)
    if not by_layer:
        raise ValueError("pss found no attention weights in the forward's intermediates")
    layers = sorted(by_layer)
    weights = by_layer[layers[layer]].astype(jnp.float32)  # [B, H, T, T]
    rows = jnp.take_along_axis(weights, positions.astype(jnp.int32)[:, None, None, None], axis=2)[:, :, 0]
    return jnp.mean(rows, axis=1)


def entropy_bits(alpha: jax.Array, candidates: jax.Array) -> jax.Array:
    """Entropy in bits of alpha [B, T] renormalised over `candidates` bool [B, T] (0 log 0 = 0) -> [B]."""
    p = jnp.where(candidates, alpha, 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def mining_step(
    alpha: jax.Array, correct: jax.Array, candidates: jax.Array, max_entropy: float
) -> tuple[jax.Array, jax.Array]:
    """One erasing iteration: (mined one-hot bool [B, T], active one-hot bool [B, T]) from alpha [B, T], correct
    bool [B] and the words still minable `candidates` bool [B, T]; rows whose entropy is not below `max_entropy`
    bits, or with no candidate, mine nothing."""
    index = jnp.argmax(jnp.where(candidates, alpha, -jnp.inf), axis=-1)
    minable = (entropy_bits(alpha, candidates) < max_entropy) & jnp.any(candidates, axis=-1)
    mined = jax.nn.one_hot(index, alpha.shape[-1], dtype=jnp.bool_) & minable[:, None]
    return mined, mined & correct[:, None]


def attention_supervision_loss(alpha: jax.Array, amask: jax.Array, avalue: jax.Array) -> jax.Array:
    """L_att = mean_b sum_t (amask * alpha - avalue)^2 for alpha, amask, avalue [B, T] -> float32 scalar."""
    diff = amask.astype(jnp.float32) * alpha.astype(jnp.float32) - avalue.astype(jnp.float32)
    return jnp.mean(jnp.sum(jnp.square(diff), axis=-1))


@register
class PSS(Technique):
    """Progressive self-supervised attention learning (see the module docstring)."""

    name = "pss"
    fidelity = "reconstructed"
    reference = (
        "Tang et al. 2019 (ACL, arXiv 1906.01213) abstract and Sec. 3; DeepLearnXMU/PSSAttention TNet(+AS)/utils.py "
        "(get_attention_mask_forerasing, get_attention_mask_final: max_entroy 4.0), TNet(+AS)/main_total.py (lamda, "
        "5 iterations), MN(+AS)/models/FINAL_BL_MN.py (attention_loss); schedule recomputed per step (module doc)"
    )
    model_kinds = ("encoder",)
    options = {
        "weight": Option(0.1, validation.non_negative, "weight of L_att (official lamda 0.1 TNet, 1 MN); 0 = off"),
        "iterations": Option(5, validation.int_at_least(1), "K, erasing iterations (official 5)"),
        "max_entropy": Option(4.0, validation.positive, "mine only rows whose attention entropy (bits) is below"),
        "layer": Option(-1, validation.int_at_least(-1), "encoder layer whose aspect row is alpha (-1: the last)"),
        "start_step": Option(0, validation.int_at_least(0), "optimizer step from which L_att is applied"),
    }
    collections = ("intermediates",)
    needs_attention_weights = True

    @property
    def active(self) -> bool:
        return self.weight > 0

    def bind_model(self, model_config: Mapping[str, Any]) -> None:
        head = model_config.get("head")
        if head != "classification":
            raise ValueError(
                f"technique 'pss' supervises a classifier's attention: model.head={head!r}, expected 'classification'"
            )
        num_layers = int(model_config["num_layers"])
        if self.layer >= num_layers:
            raise ValueError(
                f"techniques[pss].layer={self.layer} must be -1 (the last) or in [0, {num_layers - 1}] "
                f"(model.num_layers={num_layers})"
            )
        self.model = tasks.build_task(dict(model_config)).model

    def _check_batch(self, batch: Mapping[str, jax.Array]) -> None:
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise ValueError(
                f"technique 'pss' needs batch keys {missing} (the aspect's position and its context words, as the "
                "'aspect_sentiment' data source gives them)"
            )

    def mine(self, params: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(amask, avalue) bool [B, T]: the words mined by `iterations` erasing forwards of the model with `params`
        (eval mode) on `batch` (see the module docstring)."""
        self._check_batch(batch)
        tokens, positions = batch["inputs"], batch["aspect_positions"]
        context = batch["context"].astype(jnp.bool_)
        erased = jnp.zeros(tokens.shape, jnp.bool_)
        active = jnp.zeros(tokens.shape, jnp.bool_)
        for _ in range(self.iterations):
            logits, collections = self.model.apply(
                {"params": params},
                jnp.where(erased, ERASED, tokens),
                lengths=batch.get("lengths"),
                mutable=["intermediates"],
            )
            alpha = aspect_attention(collections["intermediates"], positions, self.layer)
            correct = jnp.argmax(logits, axis=-1) == batch["labels"]
            mined, mined_active = mining_step(alpha, correct, context & ~erased, self.max_entropy)
            erased, active = erased | mined, active | mined_active
        return erased, active

    def transform_batch_with_params(
        self, batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array, params: Any, variables: Mapping[str, Any]
    ) -> dict[str, jax.Array]:
        amask, avalue = self.mine(params, batch)
        on = step >= self.start_step
        return {**batch, "pss_mask": amask & on, "pss_value": avalue & on}

    def loss(
        self,
        logits: jax.Array,
        collections: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        variables: Mapping[str, Any],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        alpha = aspect_attention(collections.get("intermediates", {}), batch["aspect_positions"], self.layer)
        amask, avalue = batch["pss_mask"], batch["pss_value"]
        supervision = attention_supervision_loss(alpha, amask, avalue)
        loss = self.weight * supervision
        rows = jnp.maximum(jnp.float32(alpha.shape[0]), 1.0)
        metrics = {
            "loss": loss,
            "attention_loss": supervision,
            "mined_per_row": jnp.sum(amask) / rows,
            "active_per_row": jnp.sum(avalue) / rows,
            "active_mass": jnp.sum(jnp.where(avalue, alpha, 0.0)) / rows,  # aspect attention on the active words
        }
        if "evidence" in batch:  # the planted evidence of the aspect-sentiment source
            metrics["evidence_mass"] = jnp.sum(jnp.where(batch["evidence"] > 0, alpha, 0.0)) / rows
        return loss, metrics


def aspect_attention_report(technique: PSS, params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """What the aspect attention of `technique.model` with `params` (eval mode) does on `batch` (aspect-sentiment
    keys, with `evidence`): float32 scalars "accuracy"; "evidence_mass" (alpha summed over the planted evidence
    words, mean over rows); "evidence_top1" (fraction of rows whose most attended context word is evidence);
    "active_mass" and "active_per_row" (alpha on, and the number of, the active words `technique.mine` finds for
    these parameters). `technique` must be bound to the model (`bind_model`)."""
    technique._check_batch(batch)
    logits, collections = technique.model.apply(
        {"params": params}, batch["inputs"], lengths=batch.get("lengths"), mutable=["intermediates"]
    )
    alpha = aspect_attention(collections["intermediates"], batch["aspect_positions"], technique.layer)
    evidence = batch["evidence"] > 0
    top = jnp.argmax(jnp.where(batch["context"] > 0, alpha, -jnp.inf), axis=-1)
    _, active = technique.mine(params, batch)
    rows = jnp.float32(alpha.shape[0])
    return {
        "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == batch["labels"]).astype(jnp.float32)),
        "evidence_mass": jnp.sum(jnp.where(evidence, alpha, 0.0)) / rows,
        "evidence_top1": jnp.mean(jnp.take_along_axis(evidence, top[:, None], axis=-1).astype(jnp.float32)),
        "active_mass": jnp.sum(jnp.where(active, alpha, 0.0)) / rows,
        "active_per_row": jnp.sum(active) / rows,
    }
