"""Loading a config file the way `python -m train --config` names it: `path/to/config.py[:preset]`."""

from __future__ import annotations

import importlib.util
import os
from typing import Any


def load_config_file(spec: str) -> Any:
    """The ml_collections config of `path[:preset]` (`get_config(preset)`, or `get_config()` without one), with no
    command-line overrides applied. FileNotFoundError naming `spec` when the file does not exist."""
    path, _, preset = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config={spec!r}: no config file at {path!r}")
    module_spec = importlib.util.spec_from_file_location("_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()
