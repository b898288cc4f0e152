"""MEAP: Mask-Enhanced Autoregressive Prediction (Zhuang et al. 2025, "Mask-Enhanced Autoregressive Prediction: Pay
Less Attention to Learn More", catalog [158]) — the pre-training recipe.

A decoder LM trains with the ordinary next-token loss on inputs in which a few tokens are replaced by a mask token;
the targets stay the original next tokens (so a masked position is still predicted from the position before it):

    n          = max(1, floor(T · ratio))                      T: the sequence length of the batch
    P          = n distinct positions drawn uniformly from {0, ..., T - 2}   (the last input position is never masked)
    inputs'    = inputs with inputs'[:, p] = mask_token for p in P            (the same positions in every row)
    targets'   = targets, weights' = weights                                   (unchanged)

as the official pre-training script does (scitix/MEAP MEAP-Pretain/pretrained/meap_1b.py: `num_masks = max(1,
int(block_size * mask_ratio))`, `random.sample(range(0, block_size - 1), num_masks)`, `input_ids[:, mask_positions] =
[MASK]`). The positions are redrawn every step from the step's key (the official code seeds Python's `random` by the
step), so a resumed run masks the same positions. The official tokenizer adds a dedicated [MASK] id; here
`mask_token` must be a token id of the model's vocabulary (default: the last id, vocab_size - 1 — give the model one
more id than the data uses, e.g. model.vocab_size = 257 for bytes, to keep it out of the data). The SFT variant
(duplicating the sample and masking the copy) is not this technique.

No-op setting: ratio = 0 (the technique is skipped; the train step is the baseline's bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attn.core import validation

from .base import Option, Technique, register


def mask_count(length: int, ratio: float) -> int:
    """n = max(1, floor(length * ratio)), capped at the length - 1 maskable positions."""
    return min(max(1, int(length * ratio)), length - 1)


def mask_positions(rng: jax.Array, length: int, ratio: float) -> jax.Array:
    """int32 [n]: distinct positions in [0, length - 2], uniformly drawn without replacement."""
    return jax.random.permutation(rng, length - 1)[: mask_count(length, ratio)].astype(jnp.int32)


@register
class Meap(Technique):
    """MEAP input masking for next-token training (see the module docstring)."""

    name = "meap"
    fidelity = "official-code"
    reference = (
        "Zhuang et al. 2025 (arXiv 2502.07490) Sec. 3 (pre-training); scitix/MEAP "
        "MEAP-Pretain/pretrained/meap_1b.py (mask count, positions, [MASK] replacement, unchanged targets)"
    )
    model_kinds = ("decoder",)
    options = {
        "ratio": Option(0.15, validation.in_range(0.0, 1.0, high_inclusive=False), "fraction of positions masked"),
        "mask_token": Option(None, validation.optional(validation.non_negative_int), "mask id; None = vocab_size - 1"),
    }

    @property
    def active(self) -> bool:
        return self.ratio > 0

    def bind_model(self, model_config: Mapping[str, Any]) -> None:
        vocab = int(model_config["vocab_size"])
        token = vocab - 1 if self.mask_token is None else self.mask_token
        if token >= vocab:
            raise ValueError(
                f"techniques[meap].mask_token={token} must be a token id below model.vocab_size={vocab}; "
                f"raise model.vocab_size to {token + 1} or pick a smaller id"
            )
        self.token = token

    def transform_batch(self, batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
        inputs = batch["inputs"]
        positions = mask_positions(rng, inputs.shape[1], self.ratio)
        masked = inputs.at[:, positions].set(jnp.asarray(self.token, inputs.dtype))
        return {**batch, "inputs": masked}
