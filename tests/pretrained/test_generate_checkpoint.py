"""`python -m eval.generate --checkpoint DIR` and its pieces: the streamed text is the tokenizer's decoding of the
greedy tokens transformers produced; bad requests fail with one line; attention swaps keep or refuse parameters."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from attn.pretrained.swap import with_attention
from eval.generate import check_checkpoint_length, stream_checkpoint_text
from tests.pretrained.fixtures import fixture_dir, loaded, reference

REPO = pathlib.Path(__file__).resolve().parents[2]
PROMPT = "def fibonacci(n):\n    return"


def test_streamed_text_is_the_greedy_continuation():
    model, params, tokenizer, _ = loaded("llama_yarn")
    greedy = reference("llama_yarn")["greedy"][0]
    new = len(greedy) - len(tokenizer.encode(PROMPT).ids)
    pieces = list(stream_checkpoint_text(model, params, tokenizer, PROMPT, new, temperature=0.0))
    assert len(pieces) == new + 1  # one per token, then what an incomplete last character leaves
    assert "".join(pieces) == tokenizer.decode(greedy[-new:].tolist())


def test_length_and_prompt_checks():
    model, params, tokenizer, _ = loaded("gpt2")
    with pytest.raises(ValueError, match=r"prompt \(19 tokens\) \+ max_new_tokens=50 = 69 tokens exceed .* 64"):
        check_checkpoint_length(model, 19, 50)
    with pytest.raises(ValueError, match=r"prompt='' is empty"):
        next(stream_checkpoint_text(model, params, tokenizer, "", 4))


def test_command_streams_and_reports_errors(tmp_path):
    command = [sys.executable, "-m", "eval.generate", "--checkpoint", str(fixture_dir("gpt2")), "--prompt", PROMPT]
    done = subprocess.run(
        [*command, "--max-new-tokens", "6", "--temperature", "0.7", "--top-k", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(PROMPT) and len(done.stdout) > len(PROMPT) + 1
    no_tokenizer = tmp_path / "gpt2"
    shutil.copytree(fixture_dir("gpt2"), no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "eval.generate", "--checkpoint", str(no_tokenizer), "--prompt", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"error: {no_tokenizer / 'tokenizer.json'} is missing: attn.pretrained reads tokenizers from tokenizer.json only"
    ]


def test_attention_swap_keeps_the_parameters_or_names_what_differs():
    model, params, _, _ = loaded("llama")
    tokens = jnp.asarray(reference("llama")["input_ids"], jnp.int32)
    logits = np.asarray(model.apply({"params": params}, tokens))
    same, _ = with_attention(model, params, "softmax")
    np.testing.assert_array_equal(np.asarray(same.apply({"params": params}, tokens)), logits)
    mixed, _ = with_attention(model, params, ["softmax", "softplus"])
    swapped = np.asarray(mixed.apply({"params": params}, tokens))
    assert np.isfinite(swapped).all() and not np.allclose(swapped, logits, atol=1e-3)
    with pytest.raises(ValueError, match=r"attention='gated' needs parameters the checkpoint does not hold"):
        with_attention(model, params, "gated")
