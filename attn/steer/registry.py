"""The steering systems by name, with the paper each follows and how faithfully (like the mechanism specs).

    from attn.steer import STEERERS
    STEERERS["pasta"].cls(head_config={1: [0, 2]}, alpha=0.01)

fidelity: "paper" (equations checked against the paper text), "official-code" (matches the authors' code), "peer"
(matches an established independent implementation), "reconstructed" (from the paper's description where its code
could not be read); `reference` says against what.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from attn.registry import FIDELITIES


@dataclasses.dataclass(frozen=True)
class SteererSpec:
    """name: the registry key; cls: the steerer class; paper: the catalog citation; fidelity / reference: what it
    was checked against; no_op: the exact setting that leaves the model's output bit-identical."""

    name: str
    cls: type
    paper: str
    fidelity: str
    reference: str
    no_op: str


STEERERS: dict[str, SteererSpec] = {}


def register(name: str, *, paper: str, fidelity: str, reference: str, no_op: str) -> Callable[[type], type]:
    """Class decorator adding a steerer to STEERERS (ValueError for a taken name or an unknown fidelity)."""
    if fidelity not in FIDELITIES:
        raise ValueError(f"fidelity={fidelity!r} must be one of {FIDELITIES}")

    def wrap(cls: Any) -> Any:
        if name in STEERERS:
            raise ValueError(f"steerer {name!r} is already registered (by {STEERERS[name].cls.__name__})")
        STEERERS[name] = SteererSpec(name, cls, paper, fidelity, reference, no_op)
        cls.registry_name = name
        return cls

    return wrap
