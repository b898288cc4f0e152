"""eval.kv on imported Hugging Face checkpoints (the tiny fixtures): the held-out text and the passkey rows are built in
the checkpoint's vocabulary, a budget covering the context decodes exactly as the full cache (sliding-window layers
included), every policy runs on a GQA checkpoint, and the report names the checkpoint."""

import json
import os

import numpy as np
import pytest

from attn import pretrained
from eval import kv

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
CONTEXT, PROMPT = 16, 4
# Held-out text of a user path: a single file is split by bytes, its last 2% held out.
LINES = "".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}\n\n" for i in range(600))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.py"
    path.write_text(LINES, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return pretrained.load_tokenizer(os.path.join(FIXTURES, "llama"))


def test_text_rows_are_held_out_text_in_the_tokenizer_vocabulary(tokenizer):
    text = LINES[-2000:]
    (batch,) = kv.checkpoint_batches(tokenizer, "text", 3, CONTEXT, 1, text=text)
    inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
    assert inputs.shape == targets.shape == weights.shape == (3, CONTEXT)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])  # next-token targets
    assert weights.min() == 1.0
    for row in range(3):
        decoded = tokenizer.decode(list(targets[row]))
        assert decoded.strip() and decoded.strip() in text + text  # a window of the held-out text (maybe wrapped)


def test_passkey_rows_score_exactly_the_final_digits(tokenizer):
    text = LINES[-3000:]
    batches = kv.checkpoint_batches(tokenizer, "passkey", 2, 64, 2, seed=3, text=text)
    assert len(batches) == 2
    for batch in batches:
        for row in range(2):
            targets, weights = batch["targets"][row], batch["weights"][row]
            scored = tokenizer.decode([int(t) for t in targets[weights > 0]]).strip()
            assert len(scored) == 5 and scored.isdigit()  # the five digits, nothing else
            last = np.flatnonzero(weights).max()
            assert tokenizer.decode([int(t) for t in targets[last + 1 :]]) == "."  # the answer ends the row
            whole = tokenizer.decode([int(t) for t in batch["inputs"][row]])
            assert f"The pass key is {scored}. Remember it." in whole  # the needle holds the same key
    with pytest.raises(ValueError, match="context=16 is too short for a passkey row"):
        kv.checkpoint_batches(tokenizer, "passkey", 1, 16, 1, text=text)
    with pytest.raises(ValueError, match="tasks holds 'mqar'"):
        kv.checkpoint_batches(tokenizer, "mqar", 1, 16, 1, text=text)
    with pytest.raises(ValueError, match="rows=0 must be an int >= 1"):
        kv.checkpoint_batches(tokenizer, "text", 0, 16, 1, text=text)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("gpt2", marks=pytest.mark.slow),
        pytest.param("llama", marks=pytest.mark.slow),
        pytest.param("qwen2", marks=pytest.mark.slow),
        "mistral",
    ],
)
def test_full_budget_equals_full_cache_on_each_architecture(name, text_file):
    """GPT-2 (learned positions, biases), Llama (GQA, RoPE), Qwen2 (a windowed layer) and Mistral (windowed layers)."""
    record, entries = kv.checkpoint_grid(
        os.path.join(FIXTURES, name),
        ["h2o"],
        [1.0],
        ["text"],
        context=CONTEXT,
        prompt=PROMPT,
        rows=1,
        text_path=text_file,
        log=lambda line: None,
    )
    full, h2o = entries
    assert full["policy"] == "full" and h2o["policy"] == "h2o" and h2o["budget_entries"] == CONTEXT
    assert h2o["loss"] == pytest.approx(full["loss"], rel=1e-6, abs=1e-6)
    assert np.isfinite(full["loss"]) and full["loss"] > 0
    assert record["checkpoint"] == os.path.abspath(os.path.join(FIXTURES, name)) == h2o["checkpoint"]
    assert record["run"] == name and record["context"] == CONTEXT and record["prompt"] == PROMPT


@pytest.mark.slow
def test_window_on_checkpoint_layers_matters_and_quantized_policies_refuse_it(text_file):
    """Mistral's window (4) is part of the full model: with it removed the loss changes; a policy that replaces the
    decode attention (KIVI) cannot keep a window and says so."""
    model, params, tokenizer, _ = kv.load_checkpoint(os.path.join(FIXTURES, "mistral"))
    batches = kv.checkpoint_batches(tokenizer, "text", 1, CONTEXT, 1, text=kv.held_out_text(text_file))
    windowless = model.clone(
        attention_options=[{k: v for k, v in o.items() if k != "window"} for o in model.attention_options]
    )
    with_window = kv.evaluate_policy(model, params, batches, PROMPT)["loss"]
    without = kv.evaluate_policy(windowless, params, batches, PROMPT)["loss"]
    assert abs(with_window - without) > 1e-4
    with pytest.raises(ValueError, match=r"window=\(3, 0\) must be None for kivi"):
        kv.grid(model, params, {"text": batches}, ["kivi"], [1.0], context=CONTEXT, prompt=PROMPT, log=lambda x: None)


@pytest.mark.slow
def test_report_names_the_checkpoint(tmp_path, text_file):
    output = tmp_path / "report.json"
    record, entries = kv.checkpoint_grid(
        os.path.join(FIXTURES, "gpt2"),
        ["streaming"],
        [0.5],
        ["text"],
        context=CONTEXT,
        prompt=PROMPT,
        rows=1,
        text_path=text_file,
        log=lambda line: None,
    )
    report = {"runs": [record], "results": entries}
    kv.write(report, [str(output)])
    saved = json.loads(output.read_text())
    assert saved["runs"][0]["architecture"] == "GPT2LMHeadModel"
    assert {entry["checkpoint"] for entry in saved["results"]} == {record["checkpoint"]}
    assert saved["results"][1]["budget_entries"] == CONTEXT // 2 and saved["results"][1]["cache_ratio"] < 0.6
    assert (tmp_path / "report.png").stat().st_size > 0


@pytest.mark.slow
def test_every_policy_runs_on_a_gqa_checkpoint(text_file):
    # rsq is not a layer; attention_gate needs a checkpoint trained with its gates (configs/kv_attention_gate.py)
    policies = [name for name in kv.attn.list_mechanisms(family="kv") if name not in ("rsq", "attention_gate")]
    _, entries = kv.checkpoint_grid(
        os.path.join(FIXTURES, "llama"),
        policies,
        [0.5],
        ["text"],
        context=CONTEXT,
        prompt=PROMPT,
        rows=1,
        text_path=text_file,
        log=lambda line: None,
    )
    ran = {entry["policy"] for entry in entries}
    assert ran == {"full", *policies}
    assert all(np.isfinite(entry["loss"]) for entry in entries)


@pytest.mark.slow
def test_command_line_writes_a_report_naming_the_checkpoint(tmp_path, text_file):
    import subprocess
    import sys

    checkpoint = os.path.join(FIXTURES, "gpt2")
    flags = ["--checkpoint", checkpoint, "--policies", "h2o", "--budgets", "1.0", "--context", "16", "--prompt", "4"]
    flags += ["--rows", "1", "--text_path", text_file]
    output = tmp_path / "kv.json"
    done = subprocess.run([sys.executable, "-m", "eval.kv", *flags, "--output", str(output)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["runs"][0]["checkpoint"] == os.path.abspath(checkpoint)
    assert [entry["policy"] for entry in report["results"]] == ["full", "h2o"]
    refused = subprocess.run([sys.executable, "-m", "eval.kv", *flags], capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "--output is required with --checkpoint alone" in refused.stderr
