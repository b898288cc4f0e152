"""Optimizer: AdamW with linear warmup + cosine decay, global-norm clipping and gradient accumulation.

``make_optimizer(config.optim, total_steps)`` gives the optax transformation and the learning-rate
schedule. Steps count *trainer steps*: with ``grad_accum_steps = k`` every trainer step is one micro-batch,
the parameters change every k-th step, and ``schedule_fn(step)`` is the rate of the update that ``step``
contributes to, so logging ``schedule_fn(step)`` shows what was applied.

``freeze_parameters(tx, trainable, frozen)`` restricts an optimizer to the parameters whose paths the regexes select
(``parameter_paths`` spells the paths: "layers_0/attention/query/kernel"); the others get a zero update.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# Config fields of the optim block, with their defaults (None: required).
OPTIM_FIELDS: dict[str, Any] = {
    "learning_rate": None,  # peak learning rate, reached at the end of warmup
    "warmup_steps": 0,  # linear warmup from 0 over this many steps
    "min_lr_ratio": 0.0,  # the decay ends at learning_rate * min_lr_ratio at total_steps
    "schedule": "cosine",  # decay after warmup: "cosine", "linear" or "constant"
    "weight_decay": 0.0,  # decoupled (AdamW) decay of matrices only, see decay_mask
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "clip_norm": None,  # clip gradients to this global norm; 0 or None: off
    "grad_accum_steps": 1,  # average gradients over this many micro-steps per update
}

# Parameter names that are never decayed even when they are matrices: embeddings, learned positions,
# norm scales, biases (e.g. relative-position bias tables), learned tokens.
_NO_DECAY = re.compile(r"embed|pos(ition)?(_|$)|scale|bias|norm|cls|token", re.IGNORECASE)


def _get(cfg: Any, name: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, OPTIM_FIELDS[name])
    return getattr(cfg, name, OPTIM_FIELDS[name])


def _keys(cfg: Any) -> list[str]:
    if isinstance(cfg, Mapping):
        return list(cfg.keys())
    if hasattr(cfg, "keys"):  # ml_collections.ConfigDict
        return list(cfg.keys())
    raise ValueError(f"opt_cfg={cfg!r} must be a mapping or a ConfigDict")


def _path_names(path: tuple[Any, ...]) -> list[str]:
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        else:
            names.append(str(key))
    return names


def decay_mask(params: Any) -> Any:
    """Which parameters get weight decay: a tree of bools shaped like ``params``.

    A leaf decays when it has ndim >= 2 and neither its own name nor the name of a module on its path
    looks like an embedding, a learned position, a norm, a scale, a bias or a learned token (``cls``,
    ``mask_token``). Kernels of Dense/Conv layers decay, including patch-embedding projections named
    ``kernel``; ``embedding`` tables, LayerNorm/RMSNorm ``scale``, biases and 1-D params do not.
    Flax boxes (``nn.Partitioned``) are kept, holding the bool.
    """
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)

    def one(path: Any, leaf: Any) -> Any:
        value = leaf.unbox() if is_box(leaf) else leaf
        names = _path_names(path)
        leaf_name = names[-1] if names else ""
        modules = names[:-1]
        excluded = bool(_NO_DECAY.search(leaf_name)) or any(re.search("norm", m, re.IGNORECASE) for m in modules)
        decay = len(getattr(value, "shape", ())) >= 2 and not excluded
        return leaf.replace_boxed(decay) if is_box(leaf) else decay

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_box)


def make_schedule(
    learning_rate: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    schedule: str = "cosine",
) -> Callable[[Any], jax.Array]:
    """Learning rate at a step: linear warmup 0 -> learning_rate, then decay to learning_rate * min_lr_ratio.

    ``lr(s) = learning_rate * s / warmup_steps`` for ``s < warmup_steps``; then with
    ``t = (s - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1] and
    ``floor = learning_rate * min_lr_ratio``: cosine ``floor + (learning_rate - floor) * (1 + cos(pi t))/2``,
    linear ``learning_rate + (floor - learning_rate) * t``, constant ``learning_rate``. Returns float32.
    """
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule={schedule!r}; expected 'cosine', 'linear' or 'constant'")
    peak = float(learning_rate)
    floor = peak * float(min_lr_ratio)
    warmup = int(warmup_steps)
    decay_steps = max(int(total_steps) - warmup, 1)

    def lr(step: Any) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if schedule == "cosine":
            after = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        elif schedule == "linear":
            after = peak + (floor - peak) * t
        else:
            after = jnp.full_like(t, peak)
        return jnp.where(step < warmup, warm, after).astype(jnp.float32)

    return lr


def make_optimizer(
    opt_cfg: Mapping[str, Any] | Any, total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """Builds AdamW (+ clipping, + accumulation) and its learning-rate schedule from a config block.

    Args:
      opt_cfg: mapping or ConfigDict with the fields of ``OPTIM_FIELDS`` (only ``learning_rate`` is
        required); unknown fields are an error, to catch typos.
      total_steps: length of the run in trainer steps (micro-steps when accumulating).

    Returns:
      ``(tx, schedule_fn)``: ``tx.update(grads, opt_state, params)`` expects (unboxed or boxed) params;
      ``schedule_fn(step) -> float32`` is the learning rate of trainer step ``step``.
    """
    unknown = sorted(set(_keys(opt_cfg)) - set(OPTIM_FIELDS))
    if unknown:
        raise ValueError(f"opt_cfg has unknown fields {unknown}; expected fields from {sorted(OPTIM_FIELDS)}")
    lr = _get(opt_cfg, "learning_rate")
    if lr is None or float(lr) < 0:
        raise ValueError(f"opt_cfg.learning_rate={lr!r}; expected a float >= 0")
    total_steps = int(total_steps)
    warmup = int(_get(opt_cfg, "warmup_steps"))
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}; expected >= 1")
    if not 0 <= warmup <= total_steps:
        raise ValueError(f"opt_cfg.warmup_steps={warmup}; expected 0 <= warmup_steps <= total_steps={total_steps}")
    min_lr_ratio = float(_get(opt_cfg, "min_lr_ratio"))
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"opt_cfg.min_lr_ratio={min_lr_ratio}; expected a ratio in [0, 1]")
    accum = int(_get(opt_cfg, "grad_accum_steps") or 1)
    if accum < 1:
        raise ValueError(f"opt_cfg.grad_accum_steps={accum}; expected >= 1")
    clip = _get(opt_cfg, "clip_norm")
    if clip is not None and float(clip) < 0:
        raise ValueError(f"opt_cfg.clip_norm={clip}; expected None, 0 (off) or a positive norm")
    weight_decay = float(_get(opt_cfg, "weight_decay"))
    if weight_decay < 0:
        raise ValueError(f"opt_cfg.weight_decay={weight_decay}; expected >= 0")

    base = make_schedule(
        float(lr),
        total_steps,
        warmup_steps=warmup,
        min_lr_ratio=min_lr_ratio,
        schedule=str(_get(opt_cfg, "schedule")),
    )
    # The inner optimizer counts updates; update u is applied after trainer steps u*k .. u*k + k-1.
    inner_schedule = lambda count: base(count * accum)
    schedule_fn = lambda step: base(jnp.asarray(step) // accum * accum)

    parts = []
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(
        optax.adamw(
            learning_rate=inner_schedule,
            b1=float(_get(opt_cfg, "b1")),
            b2=float(_get(opt_cfg, "b2")),
            eps=float(_get(opt_cfg, "eps")),
            weight_decay=weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*parts)
    if accum > 1:
        # Clipping sits inside, so it applies to the averaged gradient, like one big-batch step.
        tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
    return tx, schedule_fn


def parameter_paths(params: Any) -> list[str]:
    """The "/"-joined path of every leaf of a (boxed or plain) parameter tree, in leaf order, e.g.
    "layers_0/attention/query/kernel"."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]
    return ["/".join(_path_names(path)) for path, _ in leaves]


def trainable_mask(params: Any, trainable: Sequence[str] = (), frozen: Sequence[str] = ()) -> Any:
    """Which parameters train: a tree of bools shaped like ``params`` (boxes hold the bool, as in ``decay_mask``).

    A parameter trains when its path (``parameter_paths``) matches one of the ``trainable`` regexes (``re.search``;
    an empty ``trainable`` selects every parameter) and none of the ``frozen`` ones.
    """
    keep = [re.compile(pattern) for pattern in trainable]
    drop = [re.compile(pattern) for pattern in frozen]
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731

    def one(path: Any, leaf: Any) -> Any:
        name = "/".join(_path_names(path))
        trains = (not keep or any(p.search(name) for p in keep)) and not any(p.search(name) for p in drop)
        return leaf.replace_boxed(trains) if is_box(leaf) else trains

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_box)


def check_freeze_patterns(params: Any, trainable: Sequence[str] = (), frozen: Sequence[str] = ()) -> tuple[int, int]:
    """(frozen leaves, frozen scalars) of ``params`` under the patterns; ValueError naming a pattern that is no valid
    regex or matches no parameter path, or patterns that leave nothing to train."""
    paths = parameter_paths(params)
    for field, patterns in (("trainable", trainable), ("frozen", frozen)):
        for pattern in patterns:
            try:
                compiled = re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{field} pattern {pattern!r} is no valid regular expression ({error})") from None
            if not any(compiled.search(path) for path in paths):
                raise ValueError(
                    f"{field} pattern {pattern!r} matches no parameter path; paths look like {paths[:4]} "
                    f"({len(paths)} in all)"
                )
    mask = jax.tree_util.tree_leaves(nn.unbox(trainable_mask(params, trainable, frozen)))
    sizes = [math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(nn.unbox(params))]
    if not any(mask):
        raise ValueError(f"trainable={list(trainable)} and frozen={list(frozen)} leave no parameter to train")
    return sum(not m for m in mask), sum(size for m, size in zip(mask, sizes, strict=True) if not m)


def freeze_parameters(
    tx: optax.GradientTransformation, trainable: Sequence[str] = (), frozen: Sequence[str] = ()
) -> optax.GradientTransformation:
    """``tx`` on the parameters ``trainable_mask`` selects, a zero update (and no optimizer state) for the rest:
    ``optax.multi_transform`` with ``optax.set_to_zero``. No patterns: ``tx`` itself, unchanged."""
    if not trainable and not frozen:
        return tx
    trainable, frozen = tuple(trainable), tuple(frozen)

    def labels(params: Any) -> Any:
        return jax.tree.map(
            lambda trains: "train" if trains else "frozen", nn.unbox(trainable_mask(params, trainable, frozen))
        )

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over all leaves of a gradient (or any array) tree, float32 scalar."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def param_norm(params: Any) -> jax.Array:
    """L2 norm over all parameters, float32 scalar."""
    return global_norm(params)
