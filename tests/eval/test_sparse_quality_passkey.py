"""eval.sparse_quality's passkey scores: accuracy per answer digit and the answer digits' NLL."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from eval import sparse_quality as bsq


def test_passkey_scores_per_digit_and_nll_follow_the_logits():
    rng = np.random.default_rng(0)
    rows, seq_len, vocab = 4, 7, 12
    logits = rng.standard_normal((rows, seq_len, vocab)).astype(np.float32) * 3
    targets = rng.integers(0, vocab, size=(rows, seq_len))
    answer = slice(4, 7)
    targets[0, 4:7] = logits[0, 4:7].argmax(-1)  # row 0 right on every digit
    targets[1, 4] = logits[1, 4].argmax(-1)  # row 1 right on its first digit
    targets[1, 5:7] = (logits[1, 5:7].argmax(-1) + 1) % vocab  # ... and wrong on the others
    text = [{"inputs": np.zeros((rows, seq_len), np.int32), "targets": targets, "weights": np.ones((rows, seq_len))}]
    passkey = [{"inputs": np.zeros((rows, seq_len), np.int32), "targets": targets, "answer": answer}]
    metrics = bsq.evaluate_model(lambda tokens: jnp.asarray(logits), text, passkey)

    hits = np.zeros((rows, 3))
    nll = 0.0
    for r in range(rows):
        for j, t in enumerate(range(4, 7)):
            hits[r, j] = float(max(range(vocab), key=lambda v: logits[r, t, v]) == targets[r, t])
            log_z = math.log(sum(math.exp(float(x)) for x in logits[r, t]))
            nll += log_z - float(logits[r, t, targets[r, t]])
    assert metrics["passkey_accuracy_by_digit"] == pytest.approx(list(hits.mean(axis=0)))
    assert metrics["passkey_digit_accuracy"] == pytest.approx(hits.mean())
    assert metrics["passkey_key_accuracy"] == pytest.approx(hits.all(axis=1).mean())
    assert metrics["passkey_accuracy_by_digit"][0] >= 0.5 and metrics["passkey_key_accuracy"] >= 0.25
    assert metrics["passkey_digit_nll"] == pytest.approx(nll / (rows * 3), rel=1e-5)
    row = {"system": "dense", "density": 1.0, **metrics}
    line = bsq.table({"records": [row]}).splitlines()[-1]
    assert f"| {hits[:, 0].mean():.3f} | {nll / (rows * 3):.3f} | — |" in line
