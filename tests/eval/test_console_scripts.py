"""attn-train / attn-eval: this package's tools from any directory, even one with its own train.py and eval/."""

import ast
import os
import shutil
import subprocess
import sys

import pytest

from eval import console_scripts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def user_project(tmp_path):
    """A user's project whose own train.py and eval/ would shadow this package's under `python -m`."""
    (tmp_path / "train.py").write_text('raise SystemExit("the user\'s train.py ran")\n')
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "__init__.py").write_text('raise SystemExit("the user\'s eval/ ran")\n')
    return tmp_path


def _entry_points() -> dict[str, str]:
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
            return dict(line.replace(" ", "").split("=") for line in scripts)
    raise AssertionError("setup.py declares no entry_points")


def test_setup_declares_both_commands():
    assert _entry_points() == {
        "attn-train": "attn_eval.console_scripts:train_main",
        "attn-eval": "attn_eval.console_scripts:eval_main",
    }


def _as_console_script(code: str, cwd) -> subprocess.CompletedProcess:
    # -I: like an installed script, the current directory is not on sys.path (the package comes from the install).
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_python_m_is_shadowed_but_the_commands_are_not(user_project, tmp_path):
    shadowed = subprocess.run(
        [sys.executable, "-m", "eval.lm", "--workdir", "x"], cwd=user_project, capture_output=True, text=True
    )
    assert "the user's eval/ ran" in shadowed.stderr  # what `python -m` does in such a project

    missing = str(tmp_path / "no_run")
    done = _as_console_script(
        f"from attn_eval.console_scripts import eval_main; eval_main(['lm', '--workdir', {missing!r}])", user_project
    )
    assert done.returncode != 0 and "user's" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: --workdir={missing!r} does not exist; " + (
        "train a run there first (python -m train)"
    )

    # attn-train reads a checkout's config from another directory: its `configs` package comes from the file's folder.
    config = os.path.join(REPO, "configs", "lm_tiny.py")
    done = _as_console_script(
        "from attn_eval.console_scripts import train_main; "
        f"train_main(['--config', {config + ':smok'!r}, '--workdir', {str(tmp_path / 'run')!r}])",
        user_project,
    )
    assert done.returncode != 0 and "user's" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "unknown preset 'smok'" in done.stderr


def test_installed_packages_cannot_be_shadowed(user_project):
    """Installed, the trainer and the tools are attn_train and attn_eval: importable from a project with its own
    train.py and eval/, while the bare names train and eval are the user's."""
    done = _as_console_script(
        "import sys; sys.path.insert(0, '.'); import attn_eval.lm, attn_eval.analysis; "
        "from attn_train.run import load_run; from attn_eval.trainer_api import run; import attn_eval.bench as b; "
        "assert run.load_run is load_run and 'block_sparse' in b.available_suites(); "
        "print(attn_eval.lm.__file__); import train",
        user_project,
    )
    assert done.returncode != 0 and done.stderr.strip().endswith("the user's train.py ran"), done.stderr
    assert done.stdout.strip() == os.path.join(REPO, "eval", "lm.py")


def test_installed_scripts_when_present(user_project, tmp_path):
    script = shutil.which("attn-eval", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("attn-eval is not installed in this environment (pip install -e . installs it)")
    done = subprocess.run(
        [script, "lm", "--workdir", str(tmp_path / "none")], cwd=user_project, capture_output=True, text=True
    )
    assert done.returncode != 0 and "does not exist" in done.stderr and "user's" not in done.stderr


def test_eval_main_names_the_tools():
    with pytest.raises(SystemExit, match=r"'lmm' is not a tool; expected one of lm, generate, sweep"):
        console_scripts.eval_main(["lmm"])
    with pytest.raises(SystemExit, match="usage: attn-eval <tool>"):
        console_scripts.eval_main([])
    for tool in console_scripts.TOOLS:  # a module, or a package with a __main__ (eval.analysis)
        path = os.path.join(REPO, "eval", tool)
        assert os.path.isfile(f"{path}.py") or os.path.isfile(os.path.join(path, "__main__.py")), tool


def test_config_paths_and_package_import(tmp_path):
    assert console_scripts.config_paths(["--config", "a/b.py:smoke", "--config=c.py", "--configx", "d"]) == [
        "a/b.py",
        "c.py",
    ]
    package = tmp_path / "my_configs_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("MARK = 7\n")
    (package / "exp.py").write_text("")
    try:
        assert console_scripts.import_config_package(str(package / "exp.py")) == "my_configs_pkg"
        assert sys.modules["my_configs_pkg"].MARK == 7
        assert console_scripts.import_config_package(str(package / "exp.py")) is None  # already imported
    finally:
        sys.modules.pop("my_configs_pkg", None)
    assert console_scripts.import_config_package(str(tmp_path / "loose.py")) is None  # no package around it
