"""Every Python snippet of the README runs as pasted (a fresh interpreter, nothing defined beforehand)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")

# Sections whose snippets take minutes of CPU (a trained-size loop, 1024 decode steps, the interpreted kernels) or
# over 10 s in the CI rehearsal: they run with the slow tests.
SLOW_SECTIONS = (
    "Intervening on attention",
    "Decoding with a cache policy",
    "Kernels",
    "Steering",
    "Block-sparse and dynamic sparse attention",
    "Use a module in your own JAX project",
    "Inpainting, quantization and flow-warped attention (hd_painter, dgq, float)",
    "Dynamic sparse systems on the block-sparse core (`attn/sparse/`)",
    "On a Hugging Face checkpoint",
    "Learned eviction: attention_gate",
    "Modality-aware mechanisms: `moda`, `concept_centric`",
    'Fine-grained vision: `dcal` [46] and `tcpa` (`train.data` "fine_grained")',
    "KV-cache policies: D2O, ZipCache; RSQ's attention-weighted GPTQ",
    "Retrieval: A²ATS",
    'Detection task: `configs/detect_tiny.py` (train.data "detection_scenes", model.kind "detector"), `focus_detr` [182]',
    "TAP: token-aware average pooling (ViT field), measured with ADL",
    "Context parallelism (ring and Ulysses attention)",
    'Recommendation task: `configs/recsys_tiny.py` (train.data "user_behavior", model.kind "ctr")',
)


def python_blocks(text: str) -> list[tuple[str, str]]:
    """(section heading, code) of every ```python block of a Markdown text, in order."""
    blocks, heading = [], ""
    for match in re.finditer(r"^(#+ [^\n]*)$|^```python\n(.*?)^```$", text, flags=re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("#").strip()
        else:
            blocks.append((heading, match.group(2)))
    return blocks


def _cases() -> list:
    with open(README, encoding="utf-8") as f:
        blocks = python_blocks(f.read())
    cases = []
    for index, (heading, code) in enumerate(blocks):
        marks = [pytest.mark.slow] if heading in SLOW_SECTIONS else []
        cases.append(pytest.param(heading, code, id=f"{index}-{heading[:24]}", marks=marks))
    return cases


def test_blocks_are_found_with_their_sections():
    text = "# A\n```python\nx = 1\n```\n## B\ntext\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [("A", "x = 1\n"), ("B", "y = 2\n")]


@pytest.mark.parametrize("heading, code", _cases())
def test_readme_snippet_runs(heading, code, tmp_path):
    if '"runs/' in code:  # reads a trained run: run against a real one in tests/eval/test_generate.py
        pytest.skip("needs a trained run; tests/eval/test_generate.py runs this line on one")
    if "pallas_kernels" in code and jax.default_backend() == "cpu":
        pytest.skip("the compiled Pallas kernels need a GPU or TPU (on CPU they run only in interpret mode)")
    # A fresh interpreter outside the repository: only what the snippet imports and defines is available.
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=os.environ
    )
    assert result.returncode == 0, f"README snippet under {heading!r} failed:\n{code}\n{result.stderr[-3000:]}"


def _readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def test_input_kinds_table_matches_the_registry():
    import attn
    from attn.registry import INPUT_KINDS, INPUT_SHAPES

    rows = re.findall(r"^\| `(\w+)` \| (x \[[^|]*?) \| ([^|]*) \|$", _readme(), flags=re.M)
    table = {kind: (shapes, examples) for kind, shapes, examples in rows}
    assert set(table) == set(INPUT_KINDS)
    for kind, (shapes, examples) in table.items():
        assert shapes == INPUT_SHAPES[kind], kind
        for name in re.findall(r"`(\w+)`", examples):
            if name != "context":
                assert attn.get(name).input_kind == kind, (kind, name)


def test_spec_prints_readably_with_its_shapes():
    import attn

    spec = attn.get("neighborhood")
    shown = repr(spec)  # what the interactive prompt prints
    assert shown == str(spec) and shown.startswith("neighborhood: ") and "MechanismSpec(" not in shown
    assert "input: spatial, x [batch, *spatial, embed]" in shown
    assert "input: pooling, x [batch, length, embed] -> [batch, embed]" in str(attn.get("attentive_pooling"))


def test_first_commands_state_their_timing_without_an_idle_machine():
    first = _readme().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert "idle" not in first and "about\n3 minutes on 2 CPU cores" in first
    assert "python -m eval.generate --workdir runs/lm_tiny" in first and "attn-train" in first
