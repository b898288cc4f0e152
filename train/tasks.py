"""What is trained, per model kind: the model built from `config.model`, its inputs, loss and metrics.

    decoder  batch {inputs, targets, weights [, segment_ids]} -> next-token cross-entropy, accuracy, ppl
    encoder  head "mlm": batch {inputs, targets, weights [, lengths]} -> masked-token cross-entropy, accuracy
             head "classification": batch {inputs, labels [, lengths, weights]} -> cross-entropy, accuracy
    vit      batch {images, labels} -> cross-entropy, accuracy
    cnn      batch {images, labels} -> cross-entropy, accuracy (channel attention mechanisms)
    encoder_decoder  batch {sources, source_lengths, inputs, targets, weights} -> teacher-forced target
             cross-entropy and token accuracy (the encoder reads `sources`, the decoder `inputs`)
    vlm      batch {images, inputs, targets, weights} -> cross-entropy and accuracy at the weighted (answer)
             positions of the text decoder
    dit      batch {images, captions, noise, times} -> flow matching (rectified flow): the model sees
             x_t = (1 - t) x0 + t noise (x0 = images scaled to [-1, 1]) and predicts the velocity noise - x0; loss is
             the mean squared error per example (no accuracy)
    mil      batch {instances, lengths, labels, instance_labels [, weights]} -> bag cross-entropy and accuracy, and
             the localisation of the bag attention: instance_auc, top1_hit, positive_mass over the positive bags
    detector batch {images, centres, classes, valid [, weights]} -> per-token objectness/class cross-entropy (background
             and object tokens balanced) + centre-offset L1; accuracy = mean per-image hit rate within
             model.hit_radius pixels, plus hit_rate, precision, f1 (attn.models.detector)
    ctr      batch {behaviours, target, labels [, weights]} -> click cross-entropy (logits [0, z]: a sigmoid), accuracy
             and the ROC AUC of z over every evaluated example (binned: `binned_auc_sums`, `binned_auc`)

Losses are weighted means. `loss_sums` returns sums (loss, correct predictions, weight) so that evaluation
over several batches averages over tokens/examples exactly, not over batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import attn.models
from attn.models import detector, dit, mil

MODEL_KINDS = ("decoder", "encoder", "vit", "cnn", "encoder_decoder", "vlm", "dit", "mil", "ctr", "detector")

# Registry input kinds each model's `attention` field accepts (vit's spatial mechanisms attend over the patch grid;
# the cnn's attention is a channel mechanism; encoder_decoder's and vlm's `attention` is the decoder's causal
# self-attention, their other mechanism fields are checked by the models).
INPUT_KINDS: dict[str, tuple[str, ...]] = {
    "decoder": ("sequence",),
    "encoder": ("sequence",),
    "vit": ("sequence", "spatial"),
    "cnn": ("channels",),
    "encoder_decoder": ("sequence",),
    "vlm": ("sequence",),
    "dit": ("sequence", "spatial"),
    "mil": ("sequence",),
    "ctr": ("sequence", "cross"),
    "detector": ("sequence", "spatial"),
}

# Kinds whose batches are {images, labels}: one class per image.
IMAGE_CLASSIFIERS = ("vit", "cnn")

# Model dataclass fields the trainer sets itself (from precision.compute_dtype) rather than config.model.
_TRAINER_SET = ("parent", "name", "dtype", "param_dtype")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_fields(kind: str) -> frozenset[str]:
    """Names allowed in `config.model` for model `kind`: "kind" plus the model class's dataclass fields."""
    module = attn.models.MODELS[kind]
    return frozenset({"kind"} | {f.name for f in dataclasses.fields(module) if f.name not in _TRAINER_SET})


def _plain(value: Any) -> Any:
    """ConfigDict / lists -> dicts / tuples, so the model gets hashable, JSON-like field values."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(item) for item in value)
    return value


@dataclasses.dataclass(frozen=True)
class Task:
    """A model and how to feed it and score it.

    Attributes:
      kind: one of MODEL_KINDS.
      model: the flax.linen Module (compute dtype from the config, float32 parameters).
      head: the encoder head ("mlm" or "classification"); None for the other kinds.
    """

    kind: str
    model: nn.Module
    head: str | None = None

    @property
    def is_language_model(self) -> bool:
        """True when the loss is a per-token cross-entropy over a vocabulary (perplexity is meaningful)."""
        return self.kind == "decoder" or self.head == "mlm"

    def apply(
        self,
        variables: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        mutable: Any = False,
    ) -> Any:
        """Logits float32 ([B, T, V] or [B, C]) for `batch`; with `mutable`, (logits, updated collections)."""
        rngs = {} if rng is None else {"dropout": rng}
        if self.kind in (*IMAGE_CLASSIFIERS, "detector"):
            args, kwargs = (batch["images"],), {}
        elif self.kind == "encoder_decoder":
            args, kwargs = (batch["sources"], batch["inputs"]), {"src_lengths": batch.get("source_lengths")}
        elif self.kind == "vlm":
            args, kwargs = (batch["images"], batch["inputs"]), {}
        elif self.kind == "dit":
            args, kwargs = _flow_inputs(batch), {}
        elif self.kind == "mil":  # returns attn.models.mil.MILOutput(logits, attention)
            args, kwargs = (batch["instances"],), {"lengths": batch.get("lengths"), "keep": batch.get("keep")}
        elif self.kind == "ctr":  # attn.models.ctr.CTRModel: logits [B, 2] = [0, z]
            args, kwargs = (batch["behaviours"], batch["target"]), {}
        elif self.kind == "encoder":
            args, kwargs = (batch["inputs"],), {"lengths": batch.get("lengths")}
        else:
            args, kwargs = (batch["inputs"],), {"segment_ids": batch.get("segment_ids")}
        return self.model.apply(variables, *args, deterministic=deterministic, rngs=rngs, mutable=mutable, **kwargs)

    def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> Any:
        """Boxed (logically partitioned) variables for a batch like `batch` (arrays or ShapeDtypeStructs)."""
        dummy = {key: jnp.zeros(value.shape, value.dtype) for key, value in batch.items()}
        if self.kind in (*IMAGE_CLASSIFIERS, "detector"):
            return self.model.init(rng, dummy["images"])
        if self.kind == "encoder_decoder":
            return self.model.init(rng, dummy["sources"], dummy["inputs"])
        if self.kind == "vlm":
            return self.model.init(rng, dummy["images"], dummy["inputs"])
        if self.kind == "dit":
            return self.model.init(rng, *_flow_inputs(dummy))
        if self.kind == "mil":
            return self.model.init(rng, dummy["instances"])
        if self.kind == "ctr":
            return self.model.init(rng, dummy["behaviours"], dummy["target"])
        return self.model.init(rng, dummy["inputs"])

    def loss_sums(self, logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Float32 scalars: "loss_sum" (weighted cross-entropy, nats; dit: squared velocity error, mean per example),
        "correct" and "weight" sums."""
        if self.kind == "dit":
            return _flow_loss_sums(logits, batch)
        if self.kind == "detector":  # per-token objectness/class + centre offsets; hit counts (attn.models.detector)
            return detector.detection_loss_sums(logits, batch, self.model.patch_size, self.model.hit_radius)
        extra = {}
        if self.kind == "mil":  # MILOutput: bag logits and attention; plus the localisation sums
            lengths = batch.get("lengths")
            extra = mil.localization_sums(logits.attention, batch["instance_labels"], batch["labels"], lengths)
            logits = logits.logits
        if self.kind == "ctr":
            weights = batch.get("weights", jnp.ones(batch["labels"].shape, jnp.float32))
            extra = binned_auc_sums(logits[:, 1] - logits[:, 0], batch["labels"], weights)
        if self.kind in IMAGE_CLASSIFIERS or self.head == "classification" or self.kind in ("mil", "ctr"):
            labels = batch["labels"]
            weights = batch.get("weights", jnp.ones(labels.shape, jnp.float32))
        else:
            labels, weights = batch["targets"], batch["weights"]
        weights = weights.astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(nll * weights),
            "correct": jnp.sum(correct * weights),
            "weight": jnp.sum(weights),
            **extra,
        }

    def metrics(self, sums: Mapping[str, Any]) -> dict[str, Any]:
        """ "loss" (mean nats), "accuracy" and, for language models, "perplexity" = exp(loss)."""
        weight = jnp.maximum(sums["weight"], 1e-9)
        loss = sums["loss_sum"] / weight
        if self.kind == "dit":
            return {"loss": loss}
        if self.kind == "detector":  # accuracy: the mean per-image hit rate
            return {"loss": loss, "accuracy": sums["correct"] / weight, **detector.detection_metrics(sums)}
        if self.kind == "mil":
            bags = jnp.maximum(sums["positive_bags"], 1.0)
            names = ("instance_auc", "top1_hit", "positive_mass")
            return {"loss": loss, "accuracy": sums["correct"] / weight} | {n: sums[f"{n}_sum"] / bags for n in names}
        out = {"loss": loss, "accuracy": sums["correct"] / weight}
        if self.kind == "ctr":
            out["auc"] = binned_auc(sums["auc_positive"], sums["auc_negative"])
        if self.is_language_model:
            out["perplexity"] = jnp.exp(loss)
        return out

    def tokens_per_example(self, batch_spec: Mapping[str, tuple[tuple[int, ...], Any]]) -> int:
        """Positions the model attends over per example: sequence length, patches (+ class token), source plus
        target length (encoder_decoder), patches plus text length (vlm), or 1 for the cnn (an image: its
        throughput is counted in images)."""
        if self.kind == "cnn":
            return 1
        if self.kind == "mil":
            return int(batch_spec["instances"][0][1])
        if self.kind == "ctr":
            return int(batch_spec["behaviours"][0][1]) + 1
        if self.kind == "dit":
            height, width = batch_spec["images"][0][1:3]
            patches = (height // self.model.patch_size) * (width // self.model.patch_size)
            return patches + int(batch_spec["captions"][0][1])
        if self.kind == "detector":
            height, width = batch_spec["images"][0][1:3]
            return (height // self.model.patch_size) * (width // self.model.patch_size)
        if self.kind in ("vit", "vlm"):
            height, width = batch_spec["images"][0][1:3]
            patches = (height // self.model.patch_size) * (width // self.model.patch_size)
            if self.kind == "vlm":
                return patches + int(batch_spec["inputs"][0][1])
            return patches + (1 if self.model.pool == "cls" else 0)
        if self.kind == "encoder_decoder":
            return int(batch_spec["sources"][0][1]) + int(batch_spec["inputs"][0][1])
        return int(batch_spec["inputs"][0][1])


def _flow_inputs(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x_t, times, captions) of a dit batch: x_t interpolates the images (scaled to [-1, 1]) toward the noise."""
    x0 = dit.to_model_range(batch["images"])
    return dit.flow_interpolate(x0, batch["noise"], batch["times"]), batch["times"], batch["captions"]


def _flow_loss_sums(velocity: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Sum over examples of the mean squared error between the predicted and the true velocity; weight = examples."""
    target = dit.flow_velocity(dit.to_model_range(batch["images"]), batch["noise"])
    error = jnp.mean(jnp.square(velocity.astype(jnp.float32) - target), axis=tuple(range(1, target.ndim)))
    count = jnp.float32(error.shape[0])
    return {"loss_sum": jnp.sum(error), "correct": jnp.float32(0.0), "weight": count}


AUC_BINS = 1024


def binned_auc_sums(
    scores: jax.Array, labels: jax.Array, weights: jax.Array, bins: int = AUC_BINS
) -> dict[str, jax.Array]:
    """Weighted histograms of sigmoid(scores) over `bins` equal bins of [0, 1], for the positive and the negative
    examples: {"auc_positive", "auc_negative"} float32 [bins]. Histograms add across batches, so an evaluation over
    many batches gets the AUC of all its examples from `binned_auc`. scores float [N], labels int [N] in {0, 1},
    weights float [N]."""
    index = jnp.clip(jnp.floor(jax.nn.sigmoid(scores.astype(jnp.float32)) * bins), 0, bins - 1).astype(jnp.int32)
    weights = weights.astype(jnp.float32)
    positive = jnp.zeros(bins, jnp.float32).at[index].add(jnp.where(labels == 1, weights, 0.0))
    negative = jnp.zeros(bins, jnp.float32).at[index].add(jnp.where(labels == 1, 0.0, weights))
    return {"auc_positive": positive, "auc_negative": negative}


def binned_auc(positive: jax.Array, negative: jax.Array) -> jax.Array:
    """ROC AUC from `binned_auc_sums` histograms [bins]: P(score of a positive > score of a negative), a pair in the
    same bin counting 1/2 (exact when no bin holds both a positive and a negative). 0.5 when either class is empty."""
    below = jnp.cumsum(negative) - negative  # negatives in lower bins
    pairs = jnp.sum(positive) * jnp.sum(negative)
    wins = jnp.sum(positive * (below + 0.5 * negative))
    return jnp.where(pairs > 0, wins / jnp.maximum(pairs, 1e-30), 0.5)


def build_task(model_config: Mapping[str, Any], compute_dtype: str = "float32") -> Task:
    """The Task of `model_config` (config.model): model kind, fields, compute dtype; params stay float32."""
    fields = _plain(model_config)
    kind = fields.pop("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind={kind!r} must be one of {MODEL_KINDS}")
    fields["attention_options"] = fields.get("attention_options") or {}
    model = attn.models.build_model(kind, **fields, dtype=DTYPES[compute_dtype], param_dtype=jnp.float32)
    return Task(kind=kind, model=model, head=model.head if kind == "encoder" else None)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (boxed or not)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(params))))


def attention_layout(task: Task) -> tuple[int, int, int]:
    """(num_layers, num_heads, head_dim) of the model, for the attention part of the FLOP estimate.

    Attention sublayers are counted as layers: encoder_decoder has encoder_layers + 2 * num_layers (decoder self
    and cross), vlm vision_layers + num_layers (+ num_layers with fusion="cross"); every one is counted at the
    tokens_per_example length, so the estimate is an upper bound for them. The cnn has no sequence attention:
    (0, 0, 0).
    """
    model = task.model
    if task.kind == "cnn":
        return 0, 0, 0
    head_dim = model.head_dim or model.d_model // model.num_heads
    layers = model.num_layers
    if task.kind == "encoder_decoder":
        encoder_layers = model.num_layers if model.encoder_layers is None else model.encoder_layers
        layers = encoder_layers + 2 * model.num_layers
    elif task.kind == "dit":
        layers = model.caption_layers + model.num_layers * (1 if model.cross_attention is None else 2)
    elif task.kind == "vlm":
        layers = model.vision_layers + model.num_layers * (2 if model.fusion == "cross" else 1)
    return layers, model.num_heads, head_dim
