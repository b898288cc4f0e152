"""A small concept classifier for the captioned shapes, trained here: which (colour, shape) concepts an image holds.

Used to score generated images ("is the concept present?"), e.g. by `eval.diffusion_steer`. The model is a tiny ViT
(attn.models.ViT, mean-pooled patches) with one sigmoid output per concept (multi-label), trained with binary
cross-entropy on the "shape_captions" source's images and `concepts` vectors:

    classifier, params, accuracy = train_classifier(steps=400)      # accuracy: exact concept-set match on "valid"
    present = concepts_present(classifier, params, images)           # bool [B, NUM_CONCEPTS]
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attn.models import ViT

from .trainer_api import make_source

SOURCE = "shape_captions"


def build_classifier(num_concepts: int) -> ViT:
    """The classifier: images float [B, S, S, 3] in [0, 1] -> concept logits float32 [B, num_concepts]."""
    return ViT(num_classes=num_concepts, patch_size=4, num_layers=2, d_model=48, num_heads=4, mlp_dim=96, pool="mean")


def train_classifier(
    *, image_size: int = 16, steps: int = 400, batch_size: int = 64, seed: int = 0, eval_batches: int = 4
) -> tuple[ViT, Any, float]:
    """Train the concept classifier on the procedural captioned shapes; returns (model, params, valid accuracy),
    the accuracy being the share of valid images whose predicted concept set (sigmoid > 0.5) is exactly right."""
    train = make_source(SOURCE, split="train", batch_size=batch_size, seed=seed, image_size=image_size)
    valid = make_source(SOURCE, split="valid", batch_size=batch_size, seed=seed, image_size=image_size)
    first = train.next_batch()
    model = build_classifier(first["concepts"].shape[1])
    params = model.init(jax.random.key(seed), jnp.asarray(first["images"]))["params"]
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 2e-3, steps // 10 + 1, steps), weight_decay=0.01)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, images, concepts):
        def loss_fn(p):
            logits = model.apply({"params": p}, images)
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, concepts))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = first
    for _ in range(steps):
        params, opt_state, _ = step(params, opt_state, jnp.asarray(batch["images"]), jnp.asarray(batch["concepts"]))
        batch = train.next_batch()
    correct = total = 0
    for _ in range(eval_batches):
        batch = valid.next_batch()
        present = concepts_present(model, params, batch["images"])
        correct += int(np.sum(np.all(present == (batch["concepts"] > 0.5), axis=-1)))
        total += len(present)
    return model, params, correct / total


@functools.lru_cache(maxsize=4)
def _logits_fn(model: ViT) -> Any:
    return jax.jit(lambda params, images: model.apply({"params": params}, images))


def concepts_present(model: ViT, params: Any, images: Any, threshold: float = 0.5) -> np.ndarray:
    """bool [B, num_concepts]: the classifier's sigmoid probability of each concept in images [B, S, S, 3] exceeds
    `threshold`."""
    logits = _logits_fn(model)(params, jnp.asarray(images, jnp.float32))
    return np.asarray(jax.nn.sigmoid(logits) > threshold)
