"""Option validation at call time, for any module the registry registered.

`attn.registry.register(..., validators={...})` stores the validators of a mechanism's options on its class as
`option_validators` (the common options' and the inherited ones included). `check_options(module)` runs them over
the module instance's field values, so a module constructed directly (not through `attn.build`) is checked too.
Core code calls this instead of importing the registry.
"""

from __future__ import annotations

from typing import Any


def check_options(module: Any) -> None:
    """Raises ValueError("<option>=<value!r> must be <expected>") for the first option a validator rejects."""
    for name, validator in getattr(type(module), "option_validators", {}).items():
        validator(name, getattr(module, name))
