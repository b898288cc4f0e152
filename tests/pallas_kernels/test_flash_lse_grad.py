"""The flash kernels' lse carries its gradient: d/d(q, k, v, bias, sinks) of sum(w1 * out) + sum(w2 * lse) from the
GPU (Triton) and TPU (Mosaic) kernels, both in the Pallas interpreter on CPU, against an independent dense jnp
reference written here (explicit softmax and logsumexp, the sink as an extra logit column). Shapes are tiny:
lengths that are not block multiples, causal and not, GQA, Tq != Tk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash import flash_attention

TOL = 5e-5
GPU_BLOCKS = dict(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16, block_k_dq=16)
TPU_BLOCKS = {"block_q": 32, "block_kv": 128, "block_q_bwd": 32, "block_kv_bwd": 128}
BACKENDS = {"gpu": GPU_BLOCKS, "tpu": TPU_BLOCKS}

CASES = {
    # causal, GQA 4 heads over 2, Tq != Tk (37 vs 45, neither a block multiple), dense bias, per-head sinks.
    "causal_gqa_bias_sinks": dict(q_len=37, kv_len=45, heads=4, kv_heads=2, causal=True, bias=True, sinks=True),
    # not causal, MHA, Tq != Tk (24 vs 40), dense bias, no sinks.
    "full_bias": dict(q_len=24, kv_len=40, heads=2, kv_heads=2, causal=False, bias=True, sinks=False),
    # segment ids with an orphan query segment (rows that see no key: out 0, lse = sink, d lse / d sink = 1), MQA.
    "segments_orphans_sinks": dict(
        q_len=30, kv_len=30, heads=2, kv_heads=1, causal=False, bias=False, sinks=True, segments=True
    ),
}
# pytest ids avoid the bare words "gpu" / "tpu", which conftest.py treats as "needs that device" markers.
BACKEND_PARAMS = [pytest.param(name, id=f"{name}_interpret") for name in sorted(BACKENDS)]
CASE_PARAMS = [
    pytest.param("causal_gqa_bias_sinks"),
    pytest.param("full_bias", marks=pytest.mark.slow),  # 9-12 s per backend on the busy 2-core box
    pytest.param("segments_orphans_sinks", marks=pytest.mark.slow),
]


def _inputs(case: dict, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    b, tq, tk, h, kvh, d = 1, case["q_len"], case["kv_len"], case["heads"], case["kv_heads"], 8

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    x = {"q": normal(b, tq, h, d), "k": normal(b, tk, kvh, d), "v": normal(b, tk, kvh, d)}
    if case["bias"]:
        x["bias"] = 0.5 * normal(1, h, tq, tk)
    if case["sinks"]:
        x["sinks"] = normal(h)
    if case.get("segments"):
        q_seg = np.repeat([0, 1, 2], [tq // 3, tq // 3, tq - 2 * (tq // 3)])  # segment 2 has no key
        kv_seg = np.repeat([0, 1], [tk // 2, tk - tk // 2])
        x["segment_ids"] = (jnp.asarray(q_seg[None], jnp.int32), jnp.asarray(kv_seg[None], jnp.int32))
    weights = {"w_out": normal(b, tq, h, d), "w_lse": normal(b, h, tq), "w_mass": normal(b, h, tk)}
    return x, weights


def _dense_reference(q, k, v, bias=None, sinks=None, segment_ids=None, *, causal: bool):
    """(out [B, Tq, H, D], lse [B, H, Tq]): softmax(scale q k^T + bias, causal mask, sink column) v, from scratch."""
    groups = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    hp = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bihd,bjhd->bhij", q, kk, precision=hp) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    if causal:
        tq, tk = s.shape[-2:]
        s = jnp.where(jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None], s, -jnp.inf)
    if segment_ids is not None:
        s = jnp.where(segment_ids[0][:, None, :, None] == segment_ids[1][:, None, None, :], s, -jnp.inf)
    if sinks is not None:
        s = jnp.concatenate([s, jnp.broadcast_to(sinks[None, :, None, None], s.shape[:-1] + (1,))], axis=-1)
    lse = jax.scipy.special.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])[..., : vv.shape[1]]
    return jnp.einsum("bhij,bjhd->bihd", p, vv, precision=hp), lse


def _grads(fn, x: dict, weights: dict, lse_weight: float = 1.0) -> dict:
    """Gradients of sum(w_out * out) + lse_weight * sum(w_lse * lse) [+ sum(w_mass * key_mass) for the kernel]."""

    fixed = {name: x[name] for name in ("segment_ids",) if name in x}  # integer inputs: not differentiated

    def loss(params):
        out, lse, *mass = fn(**params, **fixed)
        extra = sum(jnp.sum(weights["w_mass"] * m) for m in mass)  # key_mass is a statistic: adds no gradient
        return jnp.sum(weights["w_out"] * out) + lse_weight * jnp.sum(weights["w_lse"] * lse) + extra

    return jax.jit(jax.grad(loss))({name: value for name, value in x.items() if name not in fixed})


def _kernel(backend: str, causal: bool):
    def fn(q, k, v, bias=None, sinks=None, segment_ids=None):
        out, stats = flash_attention(
            q, k, v, causal=causal, bias=bias, sinks=sinks, segment_ids=segment_ids, return_stats=True,
            block_sizes=BACKENDS[backend], backend=backend, interpret=True,
        )  # fmt: skip
        return out, stats["lse"], stats["key_mass"]

    return fn


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("name", CASE_PARAMS)
def test_lse_gradient_matches_dense_reference(backend, name):
    """The kernel's loss also adds sum(w_mass * key_mass), which must change no gradient (key_mass is a statistic)."""
    case = CASES[name]
    x, weights = _inputs(case)
    got = _grads(_kernel(backend, case["causal"]), x, weights)
    want = _grads(lambda **a: _dense_reference(**a, causal=case["causal"]), x, weights)
    without_lse = _grads(lambda **a: _dense_reference(**a, causal=case["causal"]), x, weights, lse_weight=0.0)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=TOL, rtol=TOL, err_msg=f"{backend} {name} d{key}")
        if key != "v":  # lse does not depend on v; for every other input the lse term must change the gradient,
            # or this test could not tell a dropped lse cotangent from a correct one.
            assert float(jnp.max(jnp.abs(want[key] - without_lse[key]))) > 100 * TOL, key
