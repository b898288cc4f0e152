"""The dependency direction of DESIGN.md, read from the import statements of the source files (with `ast`, so
imports inside functions count too): attn/core imports no mechanism, not `attn.functional` and not the registry;
`pallas_kernels` imports nothing of attn, train or eval; `attn` imports nothing of train or eval; nothing outside
eval imports eval; eval uses only `train.run` of train, through eval/trainer_api.py; inside train/ and eval/ every
import of their own package is relative, so they work under their installed names attn_train and attn_eval."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# What attn/core may not import: the functional front end, the registry and every family package.
CORE_FORBIDDEN = (
    "attn.functional",
    "attn.registry",
    "attn.softmax",
    "attn.linear",
    "attn.local",
    "attn.channel",
    "attn.pooling",
    "attn.sparse",
    "attn.kv",
    "attn.cross",
    "attn.steer",
    "attn.models",
)


def module_name(path: pathlib.Path, root: pathlib.Path = REPO) -> str:
    """Dotted module name of a file under `root` (a package's __init__.py names the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute dotted names a module's source imports: `import a.b` gives a.b; `from a import b` gives a and a.b
    (b may be a submodule); relative imports are resolved against `module`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def files_under(*folders: str) -> list[pathlib.Path]:
    files = sorted(path for folder in folders for path in (REPO / folder).rglob("*.py"))
    assert files, f"no Python files under {folders}"
    return files


def offending(
    files: list[pathlib.Path],
    forbidden: tuple[str, ...],
    allowed: tuple[str, ...] = (),
    root: pathlib.Path = REPO,
) -> list[str]:
    """'file: name' for every import of a forbidden module (or a submodule of one) that is not allowed. The packages
    above an allowed module are allowed too (`from train import run` imports the package `train` first)."""

    def under(name: str, prefixes: tuple[str, ...]) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)

    def above_allowed(name: str) -> bool:
        return any(prefix.startswith(name + ".") for prefix in allowed)

    found = []
    for path in files:
        names = imports_of(path.read_text(encoding="utf-8"), module_name(path, root), path.name == "__init__.py")
        found += [
            f"{path.relative_to(root).as_posix()}: {name}"
            for name in sorted(names)
            if under(name, forbidden) and not under(name, allowed) and not above_allowed(name)
        ]
    return found


def test_import_reader_sees_every_form_of_import():
    source = (
        "import train.trainer\n"
        "from attn import functional as F\n"
        "from . import registry\n"
        "from ..linear.agent import x\n"
        "def f():\n"
        "    import eval.bench\n"
    )
    names = imports_of(source, "attn.core.windows")
    assert {"train.trainer", "attn.functional", "attn.core.registry", "attn.linear.agent", "eval.bench"} <= names
    assert imports_of("from . import masks\n", "attn.core", is_package=True) == {"attn.core", "attn.core.masks"}


def test_offending_reports_forbidden_imports_and_respects_allowed(tmp_path):
    package = tmp_path / "attn" / "core"
    package.mkdir(parents=True)
    (package / "bad.py").write_text("from attn import functional\nfrom attn.core import masks\n")
    (package / "good.py").write_text("from attn.core.masks import Mask\n")
    files = sorted(package.glob("*.py"))
    assert offending(files, CORE_FORBIDDEN, root=tmp_path) == ["attn/core/bad.py: attn.functional"]
    assert offending(files, ("attn.functional",), allowed=("attn.functional",), root=tmp_path) == []
    tool = tmp_path / "eval" / "tool.py"
    tool.parent.mkdir()
    tool.write_text("from train import run\nfrom train.run import load_run\nfrom train import trainer\n")
    assert offending([tool], ("train",), allowed=("train.run",), root=tmp_path) == ["eval/tool.py: train.trainer"]


def test_core_imports_no_mechanism_functional_or_registry():
    assert offending(files_under("attn/core"), CORE_FORBIDDEN) == []


def test_pallas_kernels_import_nothing_of_the_rest():
    assert offending(files_under("pallas_kernels"), ("attn", "train", "eval")) == []


@pytest.mark.parametrize("folder", ["attn", "train", "pallas_kernels", "configs"])
def test_nothing_imports_eval(folder):
    assert offending(files_under(folder), ("eval",)) == []


def test_attn_imports_nothing_of_train_or_eval():
    assert offending(files_under("attn"), ("train", "eval")) == []


def test_eval_uses_only_the_run_api_of_train():
    assert offending(files_under("eval"), ("train", "attn_train"), allowed=("train.run",)) == []
    # The one way in: eval/trainer_api.py imports the run module of the trainer beside eval under its own name.
    from eval import trainer_api
    from train import run

    assert trainer_api.run is run and trainer_api.TRAIN_PACKAGE == "train"
    assert all(getattr(trainer_api, name) is getattr(run, name) for name in run.__all__)
    # Besides trainer_api, only the command runner (console_scripts: `attn-train` runs the trainer package) and
    # eval/train.py name the trainer package: it installs train.preemption's JAX-free SIGTERM guard before train.run
    # loads JAX, as `python -m train` does.
    by_name = [p for p in files_under("eval") if "TRAIN_PACKAGE" in p.read_text(encoding="utf-8")]
    assert sorted(p.name for p in by_name) == ["__init__.py", "console_scripts.py", "train.py", "trainer_api.py"]


@pytest.mark.parametrize("folder", ["train", "eval", "configs"])
def test_no_import_of_train_or_eval_by_name(folder):
    """`from train.data import x` inside train/ (or in a config file) would fail, or import a user's train.py, when
    the package is installed as attn_train; relative imports name no package."""
    assert _absolute_imports_of(files_under(folder), ("train", "eval", "attn_train", "attn_eval")) == []


def _absolute_imports_of(files: list[pathlib.Path], packages: tuple[str, ...]) -> list[str]:
    """'file: name' for every absolute import of one of `packages` (or a module under one)."""
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            found += [f"{path.relative_to(REPO).as_posix()}: {n}" for n in names if n.split(".")[0] in packages]
    return found
