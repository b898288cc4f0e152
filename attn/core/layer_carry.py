"""Values one attention layer leaves for the later layers of the same forward pass (a cross-layer seam).

A model's block stack opens a carry around its layers (`with layer_carry():`, attn.models.trunk.block_stack); a layer
reads it with `current_carry()`: a dict shared by the layers of this one call, or None outside any stack (a layer
applied on its own). TidalDecode's token-selection layers put the positions they select there, and the following
layers of the stack read them (attn.sparse.tidal).

The carry is a trace-time side channel: its values are arrays of the trace that runs the stack (tracers under jit),
valid only while that stack runs, in layer order (the stack is a Python loop). It is reset when the stack returns, so
nothing leaks between calls or traces. A model whose layers never touch it computes exactly what it computed
without it: opening the carry adds no operation.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

__all__ = ["current_carry", "layer_carry"]

_CARRY: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("attn_layer_carry", default=None)


@contextlib.contextmanager
def layer_carry() -> Iterator[dict[str, Any]]:
    """Opens an empty carry for the layers run inside the block (nested stacks, e.g. an encoder inside a model,
    get their own); yields it."""
    token = _CARRY.set({})
    try:
        yield _CARRY.get()
    finally:
        _CARRY.reset(token)


def current_carry() -> dict[str, Any] | None:
    """The carry of the block stack now running, or None outside any."""
    return _CARRY.get()
