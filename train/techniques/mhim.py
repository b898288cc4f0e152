"""MHIM-MIL: Masked Hard Instance Mining (Tang et al. 2023, "Multiple Instance Learning Framework with Masked Hard
Instance Mining for Whole Slide Image Classification", ICCV 2023, catalog [165]).

A momentum teacher (an exponential moving average of the attention-MIL model) scores the instances of each bag; the
student trains on the bag with the most attended ("easy", salient) instances masked out, so it must learn from the
harder ones, plus a consistency loss that pulls its bag feature toward the teacher's. Per bag of n valid instances
(official modules/mhim_abmil.py CLR.get_mask / select_mask_fn, train_abmil.py train_loop):

    a^T, z^T     = teacher forward on the full bag (no gradient): attention [N], bag feature [L]
    high mask    the ceil(m * r_hr) instances chosen uniformly at random among the m = ceil(n min(1, r_h / r_hr))
                 instances of highest a^T (r_hr = mask_ratio_hr; when r_h / r_hr > 1, r_hr is replaced by r_h, as in
                 the official code); r_hr = 1: exactly the top ceil(n r_h)
    random mask  ceil(n r) instances chosen uniformly at random (r = mask_ratio)
    keep         valid and in neither mask                    -> the student's forward sees only these
    L_cons       = mean_b sum_l -softmax(z^T_b / tau_t)_l log softmax(z^S_b / tau_s)_l      (SoftTargetCrossEntropy_v2)
    loss         = CE(student bag logits, y) + weight * L_cons
    teacher      <- m_ema * teacher + (1 - m_ema) * student                 after every step

The teacher's parameters live in the train state (params["techniques"]["mhim"]["teacher"], a state variable:
no gradient, replaced after each step), so checkpoints carry them and a resumed run continues bit for bit. Two
differences from the official code: the teacher starts as a copy of the student's initial parameters (the paper
initialises it from a pre-trained ABMIL), and its EMA update reads the student parameters of the step's forward
(before that step's optimizer update; the official code reads them after it), a one-step lag.

Defaults: temp_t = 0.1, temp_s = 1, mask_ratio_hr = 1, mask_ratio = 0 are the official ones. The official flags
default to weight (cl_alpha) 0, mask_ratio_h 0 and momentum (mm) 0.9999 and the paper's runs set them per dataset for
bags of thousands of patches and a pre-trained teacher; weight 0.1, mask_ratio_h 0.1 and momentum 0.99 here are this
implementation's choices for bags of tens of instances and runs of hundreds of steps.

No-op setting: weight = 0 and mask_ratio_h = mask_ratio = 0 (the technique is skipped; the train step is the
baseline's bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import validation
from attn.core.padding import valid_tokens
from attn.models.mil import descending_rank, intermediate, random_subset

from .. import tasks
from .base import Option, Technique, register


def hard_instance_keep(
    rng: jax.Array,
    teacher_attention: jax.Array,
    lengths: jax.Array | None,
    *,
    high_ratio: float,
    high_random_ratio: float,
    random_ratio: float,
) -> jax.Array:
    """bool [B, N]: the instances the student keeps — valid ones outside the high-attention mask and the random
    mask (see the module docstring); teacher_attention float [B, N], lengths int [B] or None (all valid)."""
    batch, count = teacher_attention.shape
    valid = valid_tokens(lengths, batch, count)
    n = jnp.sum(valid, axis=-1).astype(jnp.float32)  # [B]
    high_rng, random_rng = jax.random.split(rng)
    masked = jnp.zeros((batch, count), bool)
    if high_ratio > 0:
        widened, pick = high_ratio / high_random_ratio, high_random_ratio
        if widened > 1:
            widened, pick = 1.0, high_ratio
        top = jnp.ceil(n * widened)
        candidates = valid & (descending_rank(teacher_attention, valid) < top[:, None])
        masked = random_subset(high_rng, candidates, jnp.ceil(top * pick).astype(jnp.int32))
    if random_ratio > 0:
        masked = masked | random_subset(random_rng, valid, jnp.ceil(n * random_ratio).astype(jnp.int32))
    return valid & ~masked


def soft_target_cross_entropy(student: jax.Array, teacher: jax.Array, temp_s: float, temp_t: float) -> jax.Array:
    """mean_b sum_l -softmax(teacher / temp_t) log softmax(student / temp_s) over the last axis: [B, L] -> scalar."""
    target = jax.nn.softmax(teacher.astype(jnp.float32) / temp_t, axis=-1)
    log_probs = jax.nn.log_softmax(student.astype(jnp.float32) / temp_s, axis=-1)
    return jnp.mean(jnp.sum(-target * log_probs, axis=-1))


@register
class Mhim(Technique):
    """Masked hard instance mining with a momentum teacher (see the module docstring)."""

    name = "mhim"
    fidelity = "official-code"
    reference = (
        "Tang et al. 2023 (arXiv 2307.15254) Sec. 3; DearCaat/MHIM-MIL modules/mhim_abmil.py (CLR.get_mask, "
        "select_mask_fn, SoftTargetCrossEntropy_v2) and train_abmil.py (train_loop, ema_update, option defaults)"
    )
    model_kinds = ("mil",)
    options = {
        "weight": Option(0.1, validation.non_negative, "consistency loss weight (official cl_alpha); 0 = none"),
        "mask_ratio_h": Option(0.1, validation.in_range(0.0, 1.0), "fraction of instances masked by teacher attention"),
        "mask_ratio_hr": Option(
            1.0, validation.in_range(0.0, 1.0, low_inclusive=False), "random share of the high-attention candidates"
        ),
        "mask_ratio": Option(0.0, validation.in_range(0.0, 1.0), "fraction of instances masked at random"),
        "momentum": Option(0.99, validation.in_range(0.0, 1.0), "EMA decay of the teacher (official mm 0.9999)"),
        "temp_t": Option(0.1, validation.positive, "teacher temperature (official 0.1)"),
        "temp_s": Option(1.0, validation.positive, "student temperature (official 1)"),
    }
    collections = ("intermediates",)
    state_variables = ("teacher",)

    @property
    def active(self) -> bool:
        return self.weight > 0 or self.mask_ratio_h > 0 or self.mask_ratio > 0

    def bind_model(self, model_config: Mapping[str, Any]) -> None:
        config = {key: value for key, value in model_config.items()}
        self.teacher_model = tasks.build_task(config).model  # float32: the teacher only scores instances

    def init_variables(self, rng: jax.Array, params: Any) -> dict[str, Any]:
        """{"teacher": a copy of the model's initial parameters (plain arrays)}."""
        return {"teacher": jax.tree.map(jnp.array, nn.unbox(params))}

    def transform_batch_with_params(
        self, batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array, params: Any, variables: Mapping[str, Any]
    ) -> dict[str, jax.Array]:
        """Adds "keep" bool [B, N] (the student's instances) and "teacher_features" float32 [B, L]."""
        output, collections = self.teacher_model.apply(
            {"params": variables["teacher"]},
            batch["instances"],
            lengths=batch.get("lengths"),
            mutable=["intermediates"],
        )
        keep = hard_instance_keep(
            rng,
            output.attention,
            batch.get("lengths"),
            high_ratio=self.mask_ratio_h,
            high_random_ratio=self.mask_ratio_hr,
            random_ratio=self.mask_ratio,
        )
        return {**batch, "keep": keep, "teacher_features": intermediate(collections, "bag_features")}

    def transform_params(self, params: Any, variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        momentum = self.momentum
        teacher = jax.tree.map(
            lambda t, s: momentum * t + (1.0 - momentum) * jax.lax.stop_gradient(s), variables["teacher"], params
        )
        return params, {"teacher": teacher}

    def loss(
        self,
        logits: Any,
        collections: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        variables: Mapping[str, Any],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        kept = jnp.mean(jnp.sum(batch["keep"], axis=-1).astype(jnp.float32))
        if self.weight == 0:
            return jnp.float32(0.0), {"kept_instances": kept}
        student = intermediate(collections, "bag_features")
        consistency = soft_target_cross_entropy(student, batch["teacher_features"], self.temp_s, self.temp_t)
        loss = self.weight * consistency
        return loss, {"loss": loss, "consistency": consistency, "kept_instances": kept}
