"""The XLA reference paths in the forms that lower like plain JAX: the softmax pipeline (q-first logits, the
softmax's own derivative) and the chunked linear attention (state carried in the scan), checked for their lowered
structure and against numpy references written from the equations."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attn
from attn import functional as F
from attn.core import pipeline


# ---------------------------------------------------------------------------------------------- helpers
def _walk(jaxpr, visit) -> None:
    """visit(eqn) for every equation of a jaxpr and of the jaxprs nested in its parameters."""
    for eqn in jaxpr.eqns:
        visit(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _walk(sub, visit)


def _primitive_counts(jaxpr, trailing: tuple[int, ...] | None = None) -> collections.Counter:
    """Primitive name -> count; with `trailing`, only equations with an output whose shape ends in it."""
    counts: collections.Counter = collections.Counter()

    def visit(eqn):
        shapes = [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        if trailing is None or any(s[-len(trailing) :] == trailing for s in shapes):
            counts[eqn.primitive.name] += 1

    _walk(jaxpr, visit)
    return counts


def _rand(seed: int, *shape: int, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _numpy_attention(q, k, v, allowed, sinks=None):
    """Explicit loops over batch, head and query: softmax over the allowed keys (plus an optional sink logit in
    the denominator), 0 for a query with no allowed key. q [B, Tq, H, D], k/v [B, Tk, KVH, D], allowed
    [B, H, Tq, Tk] -> (out [B, Tq, H, D], weights [B, H, Tq, Tk], lse [B, H, Tq])."""
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    out = np.zeros((batch, q_len, heads, v.shape[-1]))
    weights = np.zeros((batch, heads, q_len, kv_len))
    lse = np.full((batch, heads, q_len), -np.inf)
    for b in range(batch):
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            for i in range(q_len):
                logits = np.array([q[b, i, h] @ k[b, j, kvh] / np.sqrt(dim) for j in range(kv_len)])
                keep = allowed[b, h, i]
                terms = [logits[j] for j in range(kv_len) if keep[j]]
                if sinks is not None:
                    terms.append(sinks[h])
                if not terms:
                    continue
                top = max(terms)
                total = sum(np.exp(t - top) for t in terms)
                lse[b, h, i] = top + np.log(total)
                for j in range(kv_len):
                    if keep[j]:
                        weights[b, h, i, j] = np.exp(logits[j] - lse[b, h, i])
                        out[b, i, h] += weights[b, h, i, j] * v[b, j, kvh]
    return out, weights, lse


# ---------------------------------------------------------------------------------------------- softmax: structure
def test_softmax_forward_has_no_more_score_sized_transposes_than_jax_nn():
    """At T=512 the compiled forward HLO transposes [.., 512, 512] arrays no more often than
    jax.nn.dot_product_attention's (one, before the values product): the logits come out query-major."""
    length = 512
    q = jnp.zeros((1, length, 8, 64), jnp.float32)

    def score_transposes(attention):
        hlo = jax.jit(attention).lower(q, q, q).compile().as_text()
        found = []
        for line in hlo.splitlines():
            shape = re.search(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* transpose\(", line)
            if shape and [int(n) for n in shape.group(1).split(",") if n].count(length) >= 2:  # a Tq x Tk array
                found.append(line)
        return found

    ours = score_transposes(lambda q, k, v: F.softmax_attention(q, k, v, causal=True, implementation="xla"))
    plain = score_transposes(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    )
    assert len(ours) <= len(plain) <= 1, "\n".join(ours + plain)


def test_softmax_backward_does_not_differentiate_the_row_max():
    """At T=512 the backward pass has no reduce_max and no T x T equality mask (the row max's derivative); the
    only reduce_max of forward+backward is the forward's."""
    length = 512
    q = jnp.zeros((1, length, 8, 64), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(F.softmax_attention(q, k, v, causal=True, implementation="xla"))

    out, backward = jax.vjp(lambda q, k, v: F.softmax_attention(q, k, v, causal=True, implementation="xla"), q, q, q)
    backward_counts = _primitive_counts(jax.make_jaxpr(backward)(out).jaxpr)
    assert backward_counts["reduce_max"] == 0, backward_counts
    both = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q).jaxpr
    assert _primitive_counts(both)["reduce_max"] == 1
    score_sized = _primitive_counts(both, trailing=(length, length))
    assert score_sized["eq"] == 0, score_sized


# ---------------------------------------------------------------------------------------------- softmax: values
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_grouped_products_match_loops(kv_heads):
    """grouped_logits and grouped_weighted_values equal per-(batch, head, query, key) sums."""
    q, k = _rand(0, 2, 5, 4, 3, dtype=np.float32), _rand(1, 2, 6, kv_heads, 3, dtype=np.float32)
    w, v = _rand(2, 2, 4, 5, 6, dtype=np.float32), _rand(3, 2, 6, kv_heads, 2, dtype=np.float32)
    group = 4 // kv_heads
    logits = np.zeros((2, 4, 5, 6))
    mixed = np.zeros((2, 5, 4, 2))
    for b in range(2):
        for h in range(4):
            for i in range(5):
                for j in range(6):
                    logits[b, h, i, j] = sum(q[b, i, h, d] * k[b, j, h // group, d] for d in range(3))
                    mixed[b, i, h] += w[b, h, i, j] * v[b, j, h // group]
    np.testing.assert_allclose(pipeline.grouped_logits(jnp.asarray(q), jnp.asarray(k)), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        pipeline.grouped_weighted_values(jnp.asarray(w), jnp.asarray(v)), mixed, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("with_sinks", [False, True], ids=["plain", "sinks"])
def test_softmax_attention_matches_loops_with_empty_rows(with_sinks):
    """Causal + kv_lengths (batch 1 has no valid key: every row empty) + GQA: output, weights and lse equal the
    loop reference; empty rows give exactly 0 output and lse -inf (or the sink alone)."""
    with jax.enable_x64(True):
        q, k, v = _rand(0, 2, 5, 4, 3), _rand(1, 2, 5, 2, 3), _rand(2, 2, 5, 2, 3)
        kv_lengths = np.array([3, 0])
        sinks = np.array([0.5, -1.0, 0.0, 2.0]) if with_sinks else None
        allowed = np.zeros((2, 4, 5, 5), bool)
        for b in range(2):
            for i in range(5):
                for j in range(5):
                    allowed[b, :, i, j] = j <= i and j < kv_lengths[b]
        want_out, want_w, want_lse = _numpy_attention(q, k, v, allowed, sinks)
        out, aux = F.softmax_attention(
            *map(jnp.asarray, (q, k, v)),
            mask=attn.Mask(causal=True, kv_lengths=jnp.asarray(kv_lengths)),
            sinks=None if sinks is None else jnp.asarray(sinks),
            return_probs=True,
            return_lse=True,
            implementation="xla",
        )
        np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(aux["probs"], want_w, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(aux["lse"], want_lse, rtol=1e-12, atol=1e-12)
        assert np.all(np.asarray(out)[1] == 0.0)


def test_fully_masked_rows_have_zero_gradients_not_nan():
    """Gradients of output and lse through rows with no visible key are exactly 0 and never NaN."""
    q, k, v = (jnp.asarray(_rand(s, 2, 4, 2, 3, dtype=np.float32)) for s in range(3))
    mask = attn.Mask(causal=True, kv_lengths=jnp.array([4, 0]))

    def loss(q, k, v):
        out, aux = F.softmax_attention(q, k, v, mask=mask, return_lse=True, implementation="xla")
        finite_lse = jnp.where(jnp.isfinite(aux["lse"]), aux["lse"], 0.0)
        return jnp.sum(out**2) + jnp.sum(finite_lse)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g)[1], 0.0)
    assert np.any(np.asarray(grads[0])[0] != 0.0)


@pytest.mark.parametrize("with_sinks", [False, True], ids=["plain", "sinks"])
def test_softmax_weights_gradients_match_finite_differences(with_sinks):
    """The softmax's derivative rule, forward and reverse mode, in logits and sinks (float64)."""
    with jax.enable_x64(True):
        logits = jnp.asarray(_rand(4, 1, 2, 3, 5))
        sinks = jnp.asarray([0.3, -0.7]) if with_sinks else None

        def fn(logits, sinks):
            weights, lse = pipeline.softmax_weights(logits, sinks=sinks)
            return weights * jnp.arange(5.0) + lse[..., None]

        check_grads(fn, (logits, sinks), order=2, modes=("fwd", "rev"), eps=1e-4, atol=1e-6, rtol=1e-6)


def test_lse_gradient_is_the_weights():
    """d sum(lse) / d logits = softmax weights; masked keys get exactly 0."""
    with jax.enable_x64(True):
        logits = _rand(5, 1, 1, 3, 4)
        logits[0, 0, 1, 2] = -np.inf
        grad = jax.grad(lambda x: jnp.sum(pipeline.softmax_weights(x)[1]))(jnp.asarray(logits))
        exp = np.exp(logits - logits.max(-1, keepdims=True))
        np.testing.assert_allclose(grad, exp / exp.sum(-1, keepdims=True), rtol=1e-12, atol=1e-15)
        assert grad[0, 0, 1, 2] == 0.0


def test_softmax_attention_gradients_match_finite_differences():
    """check_grads of the whole XLA path with GQA, window, padding, bias and sinks (float64)."""
    with jax.enable_x64(True):
        q, k, v = (
            jnp.asarray(_rand(6, 1, 6, 4, 3)),
            jnp.asarray(_rand(7, 1, 6, 2, 3)),
            jnp.asarray(_rand(8, 1, 6, 2, 3)),
        )
        bias, sinks = jnp.asarray(_rand(9, 1, 4, 6, 6)), jnp.asarray([0.1, 0.2, -0.3, 0.0])
        mask = attn.Mask(causal=True, window=(2, 0), kv_lengths=jnp.array([5]))

        def fn(q, k, v, bias, sinks):
            return F.softmax_attention(q, k, v, mask=mask, bias=bias, sinks=sinks, implementation="xla")

        check_grads(fn, (q, k, v, bias, sinks), order=1, modes=("fwd", "rev"), eps=1e-4, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- linear attention
def _numpy_linear(q, k, v, decay, state):
    """S_t = lambda_t S_{t-1} + k_t v_t^T, o_t = q_t S_t by an explicit loop. q, k [B, T, H, D], v [B, T, H, Dv],
    decay [B, T, H], state [B, H, D, Dv] -> (out [B, T, H, Dv], final state)."""
    state = state.copy()
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for t in range(q.shape[1]):
        for b in range(q.shape[0]):
            for h in range(q.shape[2]):
                state[b, h] = decay[b, t, h] * state[b, h] + np.outer(k[b, t, h], v[b, t, h])
                out[b, t, h] = q[b, t, h] @ state[b, h]
    return out, state


@pytest.mark.parametrize("length", [8, 11], ids=["whole-chunks", "padded"])
def test_chunked_linear_attention_matches_the_recurrence(length):
    """The chunked form (chunk 4, data-dependent decay, an initial state) equals the token loop."""
    with jax.enable_x64(True):
        q, k, v = _rand(0, 2, length, 2, 3), _rand(1, 2, length, 2, 3), _rand(2, 2, length, 2, 4)
        decay = 1.0 / (1.0 + np.exp(-_rand(3, 2, length, 2)))
        state = _rand(4, 2, 2, 3, 4)
        want_out, want_state = _numpy_linear(q, k, v, decay, state)
        out, final = F.linear_attention(
            *map(jnp.asarray, (q, k, v)),
            decay=jnp.asarray(decay),
            initial_state=jnp.asarray(state),
            return_state=True,
            chunk_size=4,
            form="chunked",
            implementation="xla",
        )
        np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(final, want_state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay", [None, 0.9], ids=["no-decay", "decay"])
def test_chunked_linear_attention_keeps_no_per_chunk_state_stack(decay):
    """Outside its scans, neither the forward nor the forward+backward jaxpr makes a [B, H, N, Dk, Dv] (or
    chunk-major [N, B, H, Dk, Dv]) array, N = T / C chunks: the state lives in the scan carry. (Autodiff's own
    per-step residuals of the carry are outputs of a scan and allowed.)"""
    batch, length, heads, dim, dim_v, chunk = 1, 48, 2, 8, 6, 4
    q = jnp.zeros((batch, length, heads, dim), jnp.float32)
    v = jnp.zeros((batch, length, heads, dim_v), jnp.float32)

    def fn(q, k, v):
        return F.linear_attention(q, k, v, decay=decay, chunk_size=chunk, form="chunked", implementation="xla")

    num_chunks = length // chunk
    stacked = {(batch, heads, num_chunks, dim, dim_v), (num_chunks, batch, heads, dim, dim_v)}
    for jaxpr in (
        jax.make_jaxpr(fn)(q, q, v).jaxpr,
        jax.make_jaxpr(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2)))(q, q, v).jaxpr,
    ):
        made = [
            e
            for e in jaxpr.eqns
            if e.primitive.name != "scan" and any(tuple(o.aval.shape) in stacked for o in e.outvars)
        ]
        assert not made, [str(e)[:200] for e in made]


# ---------------------------------------------------------------------------------------------- overhead-suite baselines
def test_plain_chunk_scan_baseline_matches_the_recurrence():
    """The suite's plain-scan baseline computes the same causal linear attention (no decay, zero state)."""
    from eval.bench_overhead import plain_chunk_scan

    with jax.enable_x64(True):
        q, k, v = _rand(0, 1, 12, 2, 3), _rand(1, 1, 12, 2, 3), _rand(2, 1, 12, 2, 4)
        want, _ = _numpy_linear(q, k, v, np.ones((1, 12, 2)), np.zeros((1, 2, 3, 4)))
        got = plain_chunk_scan(*map(jnp.asarray, (q, k, v)), chunk=4)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_neighborhood_baseline_is_the_same_attention():
    """Dense attention under `neighborhood_dense_mask` equals `F.neighborhood_attention` (7x7 on an 8x8 grid, so
    the border windows are shifted), and the mask holds exactly kernel^2 keys per query."""
    from eval.bench_overhead import neighborhood_dense_mask

    side, kernel = 8, 7
    mask = neighborhood_dense_mask(side, kernel)
    assert mask.shape == (side * side, side * side) and np.all(mask.sum(-1) == kernel * kernel)
    for i in range(side):
        start = min(max(i - kernel // 2, 0), side - kernel)
        for j in range(side):
            col = min(max(j - kernel // 2, 0), side - kernel)
            want = np.zeros((side, side), bool)
            want[start : start + kernel, col : col + kernel] = True
            np.testing.assert_array_equal(mask[i * side + j].reshape(side, side), want)
    q, k, v = (jnp.asarray(_rand(s, 1, side, side, 2, 4, dtype=np.float32)) for s in range(3))
    flat = [x.reshape(1, side * side, 2, 4) for x in (q, k, v)]
    dense = jax.nn.dot_product_attention(*flat, mask=jnp.asarray(mask), implementation="xla")
    na = F.neighborhood_attention(q, k, v, kernel_size=kernel, implementation="xla")
    np.testing.assert_allclose(na.reshape(dense.shape), dense, rtol=1e-5, atol=1e-5)


def test_interleaved_ratio_rejects_empty_rounds():
    from eval.bench_overhead import interleaved_ratio

    with pytest.raises(ValueError, match=r"rounds=0 and calls=1 must both be >= 1"):
        interleaved_ratio(jnp.sin, jnp.cos, (jnp.ones(3),), rounds=0, calls=1, warmup=0)
