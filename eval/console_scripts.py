"""The installed commands `attn-train` and `attn-eval <tool>` (setup.py console_scripts).

    attn-train --config configs/lm_tiny.py --workdir runs/lm_tiny        # = python -m train ...
    attn-eval lm --workdir runs/lm_tiny                                   # = python -m eval.lm ...
    attn-eval generate --workdir runs/lm_tiny --prompt "def "            # = python -m eval.generate ...

`python -m train` / `python -m eval.<tool>` import `train` and `eval` from the current directory first, so in a
project with its own `train.py` or `eval/` they run the wrong code. Installed, the packages are `attn_train` and
`attn_eval` (setup.py), and a console script starts with its own folder, not the current directory, on sys.path, so
these commands always run this package's tools; in Python, `import attn_eval.lm` / `from attn_train.run import
load_run` can never be shadowed either. The config file's
own package (e.g. `configs/`, which config files import as `from configs import common`) is imported from the
folder the file sits in, so a checkout's configs work from any directory.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from collections.abc import Sequence

from . import TRAIN_PACKAGE

# `attn-eval <tool>`: the modules of eval/ that run as programs.
TOOLS = (
    "lm",
    "generate",
    "sweep",
    "analysis",
    "bench",
    "gna_speedup",
    "kv",
    "steer",
    "token_reduction",
    "techniques",
    "sample_dit",
    "diffusion_steer",
    "lca",
    "cab",
    "claims",
    "longcite",
    "gcog",
    "train",
    "sparse_quality",
)


def config_paths(argv: Sequence[str]) -> list[str]:
    """The config file paths named by `--config X`, `--config=X` or `--config X:preset` in `argv`."""
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return [path.partition(":")[0] for path in paths]


def import_config_package(config_path: str) -> str | None:
    """Imports the package the config file sits in (its folder, when that holds an __init__.py) under the folder's
    name, unless a module of that name is imported already; returns the name imported, or None."""
    folder = os.path.dirname(os.path.abspath(config_path))
    init = os.path.join(folder, "__init__.py")
    name = os.path.basename(folder)
    if not os.path.isfile(init) or not name.isidentifier() or name in sys.modules:
        return None
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return name


def _run_module(module: str, prog: str, args: Sequence[str]) -> None:
    for path in config_paths(args):
        import_config_package(path)
    sys.argv = [prog, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def train_main(argv: Sequence[str] | None = None) -> None:
    """`attn-train [flags]`: `python -m train [flags]`."""
    _run_module(TRAIN_PACKAGE, "attn-train", sys.argv[1:] if argv is None else argv)


def eval_main(argv: Sequence[str] | None = None) -> None:
    """`attn-eval <tool> [flags]`: `python -m eval.<tool> [flags]`; SystemExit(2) naming the tools otherwise."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        raise SystemExit(f"usage: attn-eval <tool> [flags]; tools: {', '.join(TOOLS)} (attn-eval <tool> --help)")
    tool, rest = args[0], args[1:]
    if tool not in TOOLS:
        raise SystemExit(f"error: attn-eval {tool!r} is not a tool; expected one of {', '.join(TOOLS)}")
    _run_module(f"{__package__}.{tool}", f"attn-eval {tool}", rest)
