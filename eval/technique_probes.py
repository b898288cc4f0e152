"""Probes `python -m eval.techniques --probe <name>` runs on each trained run's final checkpoint: the effects the
training techniques claim, measured the same way for the technique and its baseline.

    patch_corruption   image classifiers (vit_tiny): validation accuracy with 0%, 10% and 25% of each image's
                       patch x patch cells replaced by uniform noise (the TAP + ADL claim, Guo et al. 2023 [148]);
                       for a ViT whose mechanism computes attention weights also "adl_similarity", L_ADL of the
                       clean forward's attention (the adl_tap technique's own loss at the official threshold 2;
                       lower = more diverse attention).
    aspect_evidence    token classifiers on train.data "aspect_sentiment" (aspect_tiny): accuracy, the attention
                       mass on the planted evidence words per layer (mean over heads, queries and rows; "uniform" is
                       the share a uniform row would give), and accuracy and prediction flips with Gaussian noise
                       of EMBEDDING_NOISE x the table's RMS added to the token embedding table (the AT/VAT claims,
                       Kitada & Iyatomi 2021 [16], 2023 [92]).
    pss_attention      the aspect task's classifier: accuracy and what the aspect's attention row (last layer,
                       head mean) does, measured by the pss technique itself with its default mining options (5
                       erasing iterations, 4 bits, the official ones) for every run, trained with pss or not:
                       "active_mass" / "active_per_row" / "mined_per_row" (the attention on, and the number of, the
                       words PSS mines for these parameters), "evidence_mass" (on the planted evidence words) and
                       "evidence_top1" (the most attended context word is evidence) (the PSS claim, Tang et al.
                       2019 [223]; train.techniques.pss.aspect_attention_report's figures).

    question_kinds     vision-language models on train.data "image_questions": answer accuracy per question kind
                       (position, count, colour) on PROBE_ROWS validation questions, with each kind's question-only
                       chance ("chance/<kind>": the best answer that reads the question but not the image).

A probe is probe(run) -> {metric: float}, `run` a trainer_api.Run restored from the checkpoint (its config, task,
data and parameters). Each probe uses fixed seeds: every run sees the same images and the same corruption. A probe
that measures with a technique's own code takes the technique from `trainer_api.build_run` of the run's config with
that technique listed (eval reaches the trainer only through trainer_api).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PROBE_ROWS = 512  # validation rows every probe evaluates
CORRUPTED_FRACTIONS = (0.0, 0.1, 0.25)  # fractions of patch cells replaced by noise
EMBEDDING_NOISE = (0.5, 1.0)  # embedding noise standard deviations, in units of the embedding table's RMS
ADL_THRESHOLD = 2.0  # adl_tap's official threshold (x uniform) for the "adl_similarity" of patch_corruption
ALL_ROWS_BITS = 1e9  # a pss max_entropy no attention row reaches: one erasing iteration then mines every row's top word


def bound_technique(run: Any, entry: dict[str, Any]) -> Any:
    """The training technique `entry` ({"name": ..., options}) bound to `run`'s model, as the trainer builds it for
    run.config with techniques = [entry] (whatever the run itself was trained with); ValueError (the trainer's
    ConfigError) when the run's model cannot take it."""
    from .trainer_api import build_run

    config = ml_collections.ConfigDict(run.config.to_dict())
    config.techniques = [entry]
    with tempfile.TemporaryDirectory() as workdir:
        (technique,) = build_run(config, workdir).task.plan.techniques
    return technique


def corrupt_patches(images: np.ndarray, patch: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """images [B, H, W, C] with round(fraction * cells) of the patch x patch cells of each image (drawn without
    replacement, per image) replaced by uniform [0, 1) noise; H and W must be multiples of `patch`."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1]")
    batch, height, width, channels = images.shape
    if height % patch or width % patch:
        raise ValueError(f"patch={patch} must divide the image size {height}x{width}")
    cells = [(i, j) for i in range(0, height, patch) for j in range(0, width, patch)]
    count = int(round(fraction * len(cells)))
    out = np.array(images, copy=True)
    for row in range(batch):
        for index in rng.choice(len(cells), size=count, replace=False):
            i, j = cells[index]
            out[row, i : i + patch, j : j + patch] = rng.random((patch, patch, channels))
    return out


def _logits(run: Any, images: np.ndarray) -> np.ndarray:
    with run.tracing():
        apply = jax.jit(lambda p, x: run.task.model.apply({"params": p}, x))
        return np.asarray(apply(run.model_params, jnp.asarray(images)))


def patch_corruption(run: Any) -> dict[str, float]:
    """{"accuracy/patches_<pct>": accuracy} on PROBE_ROWS validation images for each CORRUPTED_FRACTIONS."""
    if run.task.kind not in ("vit", "cnn"):
        raise ValueError(f"probe 'patch_corruption' needs an image classifier; model.kind={run.task.kind!r}")
    batch = run.data("valid", batch_size=PROBE_ROWS, per_process=False).next_batch()
    patch = int(run.config.model.get("patch_size", 4))
    out = {}
    for fraction in CORRUPTED_FRACTIONS:
        images = corrupt_patches(np.asarray(batch["images"]), patch, fraction, np.random.default_rng(1))
        predictions = np.argmax(_logits(run, images), axis=-1)
        out[f"accuracy/patches_{round(100 * fraction)}"] = float(np.mean(predictions == np.asarray(batch["labels"])))
    if run.task.kind == "vit":
        try:  # refused for a mechanism that computes no attention weights: no similarity then
            adl = bound_technique(run, {"name": "adl_tap", "weight": 1.0, "threshold": ADL_THRESHOLD})
        except ValueError:
            adl = None
        if adl is not None:
            out["adl_similarity"] = _adl_similarity(run, adl, np.asarray(batch["images"]))
    return out


def _adl_similarity(run: Any, adl: Any, images: np.ndarray) -> float:
    """L_ADL (the bound adl_tap technique's loss) of the clean forward's attention weights on `images` [B, H, W, C]."""
    with run.tracing():

        @jax.jit
        def similarity(params: Any, x: jax.Array) -> jax.Array:
            logits, collections = run.task.model.apply({"params": params}, x, mutable=["intermediates"])
            return adl.loss(logits, collections, {}, {})[1]["similarity"]

        return float(similarity(run.model_params, jnp.asarray(images)))


def aspect_evidence(run: Any) -> dict[str, float]:
    """{"accuracy", "evidence_mass/layer_<i>", "evidence_mass/uniform", "accuracy/embedding_noise_<s>",
    "flips/embedding_noise_<s>"} on PROBE_ROWS validation rows of the aspect task (see the module docstring)."""
    from attn import attention_stats

    if run.config.data.name != "aspect_sentiment" or "embedding" not in run.model_params:
        raise ValueError(
            f"probe 'aspect_evidence' needs a token model on data.name='aspect_sentiment'; got {run.config.data.name!r}"
        )
    batch = {
        k: jnp.asarray(v) for k, v in run.data("valid", batch_size=PROBE_ROWS, per_process=False).next_batch().items()
    }
    labels, evidence = np.asarray(batch["labels"]), np.asarray(batch["evidence"], np.float32)
    with run.tracing():
        apply = jax.jit(lambda p: run.task.apply({"params": p}, batch, mutable=["intermediates"]))
        logits, collections = apply(run.model_params)
        clean = np.argmax(np.asarray(logits), axis=-1)
        out = {"accuracy": float(np.mean(clean == labels))}
        by_layer = attention_stats.attention_weights_by_layer(collections["intermediates"])
        for layer, weights in sorted(by_layer.items()):
            mass = np.einsum("bhqk,bk->bhq", np.asarray(weights, np.float32), evidence)
            out[f"evidence_mass/layer_{layer}"] = float(np.mean(mass))
        out["evidence_mass/uniform"] = float(np.mean(evidence.sum(-1) / evidence.shape[-1]))
        table = np.asarray(run.model_params["embedding"]["embedding"], np.float32)
        rms = float(np.sqrt(np.mean(np.square(table))))
        for scale in EMBEDDING_NOISE:
            noise = np.random.default_rng(2).standard_normal(table.shape).astype(np.float32) * scale * rms
            params = {**run.model_params, "embedding": {"embedding": jnp.asarray(table + noise)}}
            noisy = np.argmax(np.asarray(apply(params)[0]), axis=-1)
            out[f"accuracy/embedding_noise_{scale}"] = float(np.mean(noisy == labels))
            out[f"flips/embedding_noise_{scale}"] = float(np.mean(noisy != clean))
    return out


def pss_attention(run: Any) -> dict[str, float]:
    """{"accuracy", "active_mass", "active_per_row", "mined_per_row", "evidence_mass", "evidence_top1"} on
    PROBE_ROWS validation rows of the aspect task (see the module docstring)."""
    if run.config.data.name != "aspect_sentiment" or run.config.model.get("head") != "classification":
        raise ValueError(
            "probe 'pss_attention' needs a classifier on data.name='aspect_sentiment'; got "
            f"data.name={run.config.data.name!r}, model.head={run.config.model.get('head')!r}"
        )
    mining = bound_technique(run, {"name": "pss"})  # default mining options, the same for every run
    top_word = bound_technique(run, {"name": "pss", "iterations": 1, "max_entropy": ALL_ROWS_BITS})
    batch = {
        k: jnp.asarray(v) for k, v in run.data("valid", batch_size=PROBE_ROWS, per_process=False).next_batch().items()
    }
    with run.tracing():

        @jax.jit
        def report(params: Any) -> dict[str, jax.Array]:
            logits, collections = mining.model.apply(
                {"params": params}, batch["inputs"], lengths=batch.get("lengths"), mutable=["intermediates"]
            )
            mined = mining.transform_batch_with_params(dict(batch), jax.random.key(0), jnp.int32(0), params, {})
            scalars = mining.loss(logits, collections, mined, {})[1]
            top, _ = top_word.mine(params, batch)  # [B, T] one-hot: the most attended context word
            return {
                "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == batch["labels"]).astype(jnp.float32)),
                **{key: scalars[key] for key in ("active_mass", "active_per_row", "mined_per_row", "evidence_mass")},
                "evidence_top1": jnp.mean(jnp.any(top & (batch["evidence"] > 0), axis=-1).astype(jnp.float32)),
            }

        return {key: float(value) for key, value in report(run.model_params).items()}


def question_kinds(run: Any) -> dict[str, float]:
    """{"accuracy", "accuracy/<kind>", "chance/<kind>", "chance/overall"} on PROBE_ROWS validation questions of an
    image_questions VLM (the answer is the argmax at the last position)."""
    if run.task.kind != "vlm" or run.config.data.name != "image_questions":
        raise ValueError(
            f"probe 'question_kinds' needs a VLM on data 'image_questions'; got model.kind={run.task.kind!r}, "
            f"data.name={run.config.data.name!r}"
        )
    source = run.data("valid", batch_size=PROBE_ROWS, per_process=False)
    batch = source.next_batch()
    with run.tracing():
        apply = jax.jit(lambda p, images, tokens: run.task.model.apply({"params": p}, images, tokens))
        logits = apply(run.model_params, jnp.asarray(batch["images"]), jnp.asarray(batch["inputs"]))
    correct = np.argmax(np.asarray(logits)[:, -1], axis=-1) == batch["targets"][:, -1]
    kinds = source.question_kinds(batch["inputs"])
    chance = source.question_only_chance()
    out = {"accuracy": float(correct.mean()), "chance/overall": chance["overall"]}
    for index, kind in enumerate(source.KINDS):
        if kind in chance:
            out[f"accuracy/{kind}"] = float(correct[kinds == index].mean())
            out[f"chance/{kind}"] = chance[kind]
    return out


PROBES: dict[str, Callable[[Any], dict[str, float]]] = {
    "patch_corruption": patch_corruption,
    "aspect_evidence": aspect_evidence,
    "pss_attention": pss_attention,
    "question_kinds": question_kinds,
}
