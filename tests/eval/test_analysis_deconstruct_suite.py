"""deconstruct_suite: each variant's layer against an explicit numpy computation, where each variant's queries and keys
come from in the LM, the copy task by explicit loops, bad options, and (slow) a 4-step run of the command line."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.core.masks import Mask
from attn.softmax.multi_head import MultiHeadAttention
from eval.analysis import TOOLS
from eval.analysis.__main__ import main
from eval.analysis.deconstruct_suite import (
    VARIANTS,
    DeconstructLM,
    DeconstructSuite,
    EmbeddingQKAttention,
    ReluNormalizedAttention,
    SelfOnlyAttention,
    TaylorSoftmaxAttention,
    copy_markov_rows,
    layer_variants,
    qk_source,
    transition_matrix,
)
from eval.analysis.evaluator import captured, unboxed

B, T, E, H, D = 2, 5, 4, 2, 3


def _normalise(kind, scores):
    """Weights of one causal row of scores (the visible keys only), by the variant's equation."""
    if kind == "softmax":
        e = [math.exp(s) for s in scores]
        return [x / sum(e) for x in e]
    if kind == "taylor":
        t = [1 + s + s * s / 2 for s in scores]
        return [x / sum(t) for x in t]
    if kind == "relu":
        return [max(s, 0.0) / len(scores) for s in scores]
    return [0.0] * (len(scores) - 1) + [1.0]  # self only


def _reference(params, x, source, kind):
    """Explicit loops: q, k from `source`, v from x, causal weights, per-head outputs, output projection."""
    wq, wk, wv, wo = (np.asarray(params[n]["kernel"], np.float64) for n in ("query", "key", "value", "out"))
    out = np.zeros((B, T, E))
    for b in range(B):
        for h in range(H):
            q = [source[b, t] @ wq[:, h] for t in range(T)]
            k = [source[b, t] @ wk[:, h] for t in range(T)]
            v = [x[b, t] @ wv[:, h] for t in range(T)]
            for i in range(T):
                weights = _normalise(kind, [float(q[i] @ k[j]) / math.sqrt(D) for j in range(i + 1)])
                head = sum(w * v[j] for j, w in enumerate(weights))
                out[b, i] += head @ wo[h]
    return out


@pytest.mark.parametrize(
    "layer_class, kind, qk_from_context",
    [
        (MultiHeadAttention, "softmax", False),
        (SelfOnlyAttention, "self", False),
        (TaylorSoftmaxAttention, "taylor", False),
        (ReluNormalizedAttention, "relu", False),
        (EmbeddingQKAttention, "softmax", True),
    ],
)
def test_variant_layer_matches_numpy(layer_class, kind, qk_from_context):
    kx, kc, ki = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (B, T, E))
    context = jax.random.normal(kc, (B, T, E)) if qk_from_context else None
    layer = layer_class(num_heads=H, head_dim=D, position="none")
    variables = layer.init(ki, x, context=context, mask=Mask(causal=True))
    params = unboxed(variables["params"])
    # scale the q/k kernels so the scores leave the region where every form looks alike
    params = {**params, "query": {"kernel": 2.0 * params["query"]["kernel"]}}
    got = layer.apply({"params": params}, x, context=context, mask=Mask(causal=True))
    source = np.asarray(context if qk_from_context else x, np.float64)
    want = _reference(params, np.asarray(x, np.float64), source, kind)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)


def test_embedding_qk_needs_an_aligned_source():
    layer = EmbeddingQKAttention(num_heads=H, head_dim=D, position="none")
    with pytest.raises(ValueError, match="context=None"):
        layer.init(jax.random.key(0), jnp.zeros((B, T, E)))


def test_qk_sources_by_numpy():
    tokens = np.array([[0, 3, 1, 3], [2, 2, 0, 1]])
    embedding = np.arange(5 * 3, dtype=np.float32).reshape(5, 3) / 10
    position = np.ones((4, 3), np.float32)
    assert qk_source("hidden", tokens, embedding, position) is None
    static = np.asarray(qk_source("static", tokens, embedding, position))
    for b in range(2):
        for t in range(4):
            np.testing.assert_allclose(static[b, t], embedding[tokens[b, t]] + position[t])
    random = np.asarray(qk_source("random", tokens, embedding, position))
    np.testing.assert_allclose(random[0, 1], random[0, 3])  # token 3 at two positions (equal position rows)
    assert np.abs(random[0, 0] - random[0, 2]).max() > 1e-3  # tokens 0 and 1
    np.testing.assert_allclose(np.asarray(qk_source("random", tokens, 2 * embedding, position)), random)
    fixed = np.asarray(qk_source("fixed", tokens, embedding, position))
    np.testing.assert_allclose(fixed[0], fixed[1])  # the same for every row
    for t in range(4):  # each position holds the embedding of some token plus its position
        assert min(np.abs(fixed[0, t] - position[t] - embedding[r]).max() for r in range(5)) < 1e-6
    with pytest.raises(ValueError, match="kind='query'"):
        qk_source("query", tokens, embedding, position)


@pytest.mark.slow
def test_fixed_seq_weights_do_not_depend_on_the_input():
    """In the LM, fixed_seq_qk's attention weights are the same for two different inputs; hybrid placement keeps
    standard attention in even layers."""
    tokens = jax.random.randint(jax.random.key(1), (1, 8), 0, 6)
    model = DeconstructLM(vocab=6, seq_len=8, variant="fixed_seq_qk", num_layers=1, embed=8, num_heads=2, head_dim=4)
    params = unboxed(model.init(jax.random.key(2), tokens)["params"])
    capture = lambda t: captured(model, params, {"inputs": t}, "attention_weights")[0]  # noqa: E731
    first, second = np.asarray(capture(tokens)), np.asarray(capture((tokens + 1) % 6))
    np.testing.assert_allclose(first, second, atol=1e-6)
    assert layer_variants("no_mixing", "hybrid", 3) == ("standard", "no_mixing", "standard")
    assert layer_variants("no_mixing", "all", 2) == ("no_mixing", "no_mixing")


def test_copy_markov_rows_by_loops():
    rows = copy_markov_rows(jax.random.key(3), 6, 16, transition_matrix(5, 0))
    inputs, targets, copy, offset = (np.asarray(rows[k]) for k in ("inputs", "targets", "copy", "offset"))
    assert inputs.shape == targets.shape == copy.shape == (6, 16)
    for r in range(6):
        n = int(offset[r])
        assert 4 <= n <= 8
        seq = list(inputs[r]) + [targets[r, -1]]
        assert list(targets[r, :-1]) == seq[1:-1]
        for t in range(n, 2 * n):
            assert seq[t] == seq[t - n]
        assert [bool(c) for c in copy[r]] == [n < t + 1 < 2 * n for t in range(16)]


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="variants=.*'softmaxx'"):
        DeconstructSuite(variants=("softmaxx",))
    with pytest.raises(ValueError, match="length=4"):
        DeconstructSuite(length=4)
    with pytest.raises(ValueError, match="placement='middle'"):
        layer_variants("standard", "middle", 2)
    assert TOOLS["deconstruct_suite"] is DeconstructSuite and set(VARIANTS) >= {"rnd_emb_qk", "fixed_seq_qk"}


@pytest.mark.slow
def test_command_line_four_steps(tmp_path):
    output = tmp_path / "deconstruct.json"
    main(
        [
            "deconstruct_suite",
            "--output",
            str(output),
            "--steps",
            "4",
            "--batch",
            "4",
            "--eval-rows",
            "8",
            "--log-every",
            "2",
            "--length",
            "16",
            "--variants",
            "standard,no_mixing",
        ]
    )
    result = json.loads(output.read_text())
    assert result["fidelity"] == "reconstructed" and output.with_suffix(".png").exists()
    assert [(row["variant"], row["placement"]) for row in result["table"]] == [
        ("standard", "all"),
        ("no_mixing", "all"),
        ("no_mixing", "hybrid"),
    ]
    for row in result["table"]:
        assert np.isfinite([row["loss"], row["copy_loss"], row["markov_loss"]]).all()
        assert row["curve"]["step"] == [2, 4]
