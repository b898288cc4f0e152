"""The active intervention rules, as the layers see them while they are traced.

`attn.interventions.intervene(*rules)` pushes rules here (a context variable, so threads and nested blocks stay
apart) and keys JAX's trace cache on them (`jax.make_user_context`), so a function jitted before the block is
re-traced inside it instead of silently replaying a trace without the rules. The layers ask which stages the
active rules target on them (`targeted_stages`: to validate them and to leave the fused path) and what to record
(`capture_active`, `capture_requested`).

A rule is any object with `stage` (a name in STAGES, or "capture"), `targets(module) -> bool`, and
`apply(value, module, call) -> value`; capture rules also have `names` and `captures(name) -> bool`.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import jax

# Stages a layer exposes as methods, and the layout of each stage's value.
STAGES = ("attention_logits", "attention_weights", "head_outputs")
STAGE_LAYOUTS = {
    "attention_logits": "[batch, heads, q_len, kv_len]",
    "attention_weights": "[batch, heads, q_len, kv_len]",
    "head_outputs": "[batch, q_len (or *spatial), heads, head_dim]",
}
# Standard capture names in the "intermediates" collection.
CAPTURE_NAMES = ("attention_logits", "attention_weights", "head_outputs", "key_mass", "lse")
# Stages that exist only where the layer computes a probability matrix.
MATRIX_STAGES = ("attention_logits", "attention_weights", "key_mass", "lse")

_ACTIVE: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("attn_interventions", default=())
# Part of jax.jit's cache key: entering or leaving a block of rules forces a re-trace.
JIT_KEY = jax.make_user_context(default_value=())

logger = logging.getLogger("attn.interventions")
_LOGGED: set[tuple[str, str]] = set()


def active_rules() -> tuple[Any, ...]:
    return _ACTIVE.get()


def push(rules: tuple[Any, ...]) -> contextvars.Token:
    return _ACTIVE.set(_ACTIVE.get() + tuple(rules))


def pop(token: contextvars.Token) -> None:
    _ACTIVE.reset(token)


def capture_requested(module: Any, name: str) -> bool:
    """True if an active capture rule asks for `name` of this module."""
    return any(
        getattr(rule, "captures", None) and rule.captures(name) and rule.targets(module) for rule in _ACTIVE.get()
    )


def capture_active() -> bool:
    """True while some capture rule is active (then layers record exactly what capture rules ask for)."""
    return any(getattr(rule, "names", ()) for rule in _ACTIVE.get())


def targeted_stages(module: Any, *, captures: bool = True) -> set[str]:
    """Every stage (and, with captures=True, capture name) some active rule targets on `module`. Capture rules
    record what a layer has and skip what it has not; the other rules need their stage."""
    names: set[str] = set()
    for rule in _ACTIVE.get():
        if rule.targets(module):
            is_capture = bool(getattr(rule, "names", ()))
            if is_capture and captures:
                names.update(rule.names)
            elif not is_capture:
                names.add(rule.stage)
    return names


def log_once(mechanism: str, message: str) -> None:
    """Logs `message` once per (mechanism, message) at INFO level (e.g. why a call left the fused path)."""
    if (mechanism, message) not in _LOGGED:
        _LOGGED.add((mechanism, message))
        logger.info("%s: %s", mechanism, message)
