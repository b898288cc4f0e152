"""Pallas Mosaic (TPU) flash attention vs the trusted dense reference, in the TPU interpreter on CPU.

Each case combines several features (GQA/MQA, causal, window, segment ids, dense and low-rank bias, softcap,
sinks, lengths that are not block multiples, Tq != Tk, head_dim 60/128, batch 1/3) and checks the output, the
stats (lse, key_mass = column sums of the reference probabilities) and every gradient against jax.grad of
attn.core.reference.reference_softmax_attention. Tests marked `tpu` re-run cases compiled on a real TPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import Mask
from attn.core.reference import reference_softmax_attention
from pallas_kernels.flash.tiling import MaskSpec
from pallas_kernels.flash.tpu import flash_attention_tpu
from pallas_kernels.flash.tpu_tiles import FlashConfig, clamp, in_range, kv_range, q_range

FWD_TOL, GRAD_TOL = 2e-5, 4e-5
SMALL_BLOCKS = {"block_q": 32, "block_kv": 128, "block_q_bwd": 16, "block_kv_bwd": 128}

CASES = {
    # GQA, causal, segment ids with an orphan query segment (rows that see no key), sinks, softcap, D=60, T=130.
    "gqa_causal_segments_sinks_softcap": dict(
        batch=1, q_len=130, kv_len=130, heads=4, kv_heads=2, head_dim=60, causal=True, window=None,
        segments=True, bias=None, factors=None, softcap=5.0, sinks=True, blocks=SMALL_BLOCKS,
    ),
    # MQA, two-sided window, Tq != Tk, batch 3, batch-broadcast dense bias and low-rank factors (u head-broadcast,
    # v batch-broadcast), D=128.
    "mqa_window_bias_factors": dict(
        batch=3, q_len=63, kv_len=130, heads=2, kv_heads=1, head_dim=128, causal=False, window=(20, 10),
        segments=False, bias=(1, 2), factors=((3, 1), (1, 2), 4), softcap=None, sinks=False,
        blocks={"block_q": 16, "block_kv": 128, "block_q_bwd": 32, "block_kv_bwd": 128},
    ),
    # Tq > Tk, causal + left window: the last queries see no key at all (whole q blocks outside the band);
    # default block sizes.
    "causal_window_empty_rows": dict(
        batch=1, q_len=130, kv_len=63, heads=2, kv_heads=2, head_dim=60, causal=True, window=(40, 0),
        segments=False, bias=(1, 1), factors=None, softcap=None, sinks=False, blocks=None,
    ),
    # One query, one key.
    "single_token": dict(
        batch=1, q_len=1, kv_len=1, heads=2, kv_heads=1, head_dim=60, causal=True, window=None,
        segments=False, bias=None, factors=((1, 2), (1, 1), 3), softcap=None, sinks=True, blocks=None,
    ),
}  # fmt: skip


def _inputs(case: dict, dtype=jnp.float32, seed: int = 0) -> dict:
    b, tq, tk, h, kvh, d = (case[n] for n in ("batch", "q_len", "kv_len", "heads", "kv_heads", "head_dim"))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 12))
    x = {
        "q": jax.random.normal(next(keys), (b, tq, h, d), dtype),
        "k": jax.random.normal(next(keys), (b, tk, kvh, d), dtype),
        "v": jax.random.normal(next(keys), (b, tk, kvh, d), dtype),
        "ct": jax.random.normal(next(keys), (b, tq, h, d), jnp.float32),
    }
    if case["segments"]:
        kv_seg = (jnp.arange(tk) >= tk // 3).astype(jnp.int32) + (jnp.arange(tk) >= 2 * tk // 3)
        q_seg = (jnp.arange(tq) >= tq // 3).astype(jnp.int32) + (jnp.arange(tq) >= 2 * tq // 3)
        q_seg = q_seg.at[tq - 5 :].set(7)  # a segment no key has
        x["q_seg"] = jnp.broadcast_to(q_seg, (b, tq))
        x["kv_seg"] = jnp.broadcast_to(kv_seg, (b, tk))
    if case["bias"] is not None:
        x["bias"] = jax.random.normal(next(keys), (*case["bias"], tq, tk), jnp.float32)
    if case["factors"] is not None:
        (ub, uh), (vb, vh), rank = case["factors"]
        x["u"] = 0.5 * jax.random.normal(next(keys), (ub, tq, uh, rank), jnp.float32)
        x["vf"] = 0.5 * jax.random.normal(next(keys), (vb, tk, vh, rank), jnp.float32)
    if case["sinks"]:
        x["sinks"] = jax.random.normal(next(keys), (h,), jnp.float32)
    return x


DIFF = ("q", "k", "v", "bias", "u", "vf", "sinks")


def _reference(case: dict, x: dict, return_probs: bool = False):
    b, tq, tk, h = case["batch"], case["q_len"], case["kv_len"], case["heads"]
    mask = Mask(
        causal=case["causal"], window=case["window"], q_segment_ids=x.get("q_seg"), kv_segment_ids=x.get("kv_seg")
    )
    bias = None
    if "bias" in x:
        bias = jnp.broadcast_to(x["bias"], (b, h, tq, tk))
    if "u" in x:
        u = jnp.broadcast_to(x["u"], (b, tq, h, x["u"].shape[-1]))
        vf = jnp.broadcast_to(x["vf"], (b, tk, h, x["vf"].shape[-1]))
        low_rank = jnp.einsum("bihr,bjhr->bhij", u, vf, precision="highest")
        bias = low_rank if bias is None else bias + low_rank
    return reference_softmax_attention(
        x["q"], x["k"], x["v"], mask=mask, bias=bias, scale=case["head_dim"] ** -0.5, softcap=case["softcap"],
        sinks=x.get("sinks"), return_probs=return_probs, return_lse=return_probs,
    )  # fmt: skip


def _kernel(case: dict, x: dict, *, return_stats: bool = False, interpret: bool = True, via_api: bool = False):
    if via_api:
        from pallas_kernels.flash.api import flash_attention

        result = flash_attention(
            x["q"], x["k"], x["v"], causal=case["causal"], window=case["window"],
            segment_ids=(x["q_seg"], x["kv_seg"]) if "q_seg" in x else None, bias=x.get("bias"),
            bias_factors=(x["u"], x["vf"]) if "u" in x else None, softcap=case["softcap"], sinks=x.get("sinks"),
            return_stats=return_stats, block_sizes=case["blocks"], backend="tpu", interpret=interpret,
        )  # fmt: skip
        return (result[0], result[1]["lse"], result[1]["key_mass"]) if return_stats else result
    return flash_attention_tpu(
        x["q"], x["k"], x["v"], x.get("q_seg"), x.get("kv_seg"), x.get("bias"), x.get("u"), x.get("vf"),
        x.get("sinks"), causal=case["causal"], window=case["window"], softcap=case["softcap"],
        scale=case["head_dim"] ** -0.5, return_stats=return_stats, block_sizes=case["blocks"], interpret=interpret,
    )  # fmt: skip


def _loss_and_grads(fn, x: dict):
    """jit(value_and_grad) of sum(out * ct) over the differentiable inputs; fn(x) -> (out, aux)."""
    names = [n for n in DIFF if n in x]

    def loss(params):
        out, aux = fn({**x, **params})
        return jnp.sum(out.astype(jnp.float32) * x["ct"]), (out, aux)

    (_, (out, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))({n: x[n] for n in names})
    return out, aux, grads


def _check_case(case: dict, *, interpret: bool = True, via_api: bool = False):
    """Compares out, lse, key_mass and all gradients with the reference (one compile per side)."""
    x = _inputs(case)

    def kernel(x):
        out, lse, mass = _kernel(case, x, return_stats=True, interpret=interpret, via_api=via_api)
        return out, (lse, mass)

    out, (lse, mass), got = _loss_and_grads(kernel, x)
    ref, aux, want = _loss_and_grads(lambda x: _reference(case, x, return_probs=True), x)
    np.testing.assert_allclose(out, ref, atol=FWD_TOL, rtol=FWD_TOL)
    np.testing.assert_allclose(lse, aux["lse"], atol=FWD_TOL, rtol=FWD_TOL)
    np.testing.assert_allclose(mass, aux["probs"].sum(axis=2), atol=FWD_TOL, rtol=FWD_TOL)
    assert set(got) == set(want)
    for name in got:
        assert got[name].shape == x[name].shape, name
        np.testing.assert_allclose(got[name], want[name], atol=GRAD_TOL, rtol=GRAD_TOL, err_msg=name)
    return out, lse, x


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_forward_stats_and_grads(name):
    case = CASES[name]
    out, lse, x = _check_case(case)
    if name == "gqa_causal_segments_sinks_softcap":
        # Orphan-segment rows see no key: output 0 and lse equal to the sink logit (the reference's convention).
        np.testing.assert_array_equal(out[:, -5:], 0.0)
        np.testing.assert_allclose(lse[:, :, -5:], jnp.broadcast_to(x["sinks"][None, :, None], (1, 4, 5)))
    if name == "causal_window_empty_rows":
        assert np.all(np.asarray(lse[:, :, 104:]) == -np.inf)
        np.testing.assert_array_equal(out[:, 104:], 0.0)


def test_public_entry_with_tpu_backend():
    from pallas_kernels.flash.api import flash_attention  # noqa: F401  (written by another helper)

    case = dict(CASES["mqa_window_bias_factors"], batch=1, factors=((1, 1), (1, 2), 4), sinks=True, softcap=3.0)
    _check_case(case, via_api=True)


def _check_bf16(case: dict, *, interpret: bool = True) -> None:
    """FlashAttention's low-precision criterion: kernel error vs the f32 reference <= 2x the XLA bf16 error + 1e-3."""
    x32 = _inputs(case)
    x16 = {n: (a.astype(jnp.bfloat16) if n in ("q", "k", "v") else a) for n, a in x32.items()}
    ref, _, g_ref = _loss_and_grads(lambda x: (_reference(case, x), None), x32)
    xla, _, g_xla = _loss_and_grads(lambda x: (_reference(case, x), None), x16)
    got, _, g_got = _loss_and_grads(lambda x: (_kernel(case, x, interpret=interpret), None), x16)
    assert got.dtype == jnp.bfloat16 and g_got["q"].dtype == jnp.bfloat16

    def err(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))

    assert err(got, ref) <= 2 * err(xla, ref) + 1e-3
    for name in ("q", "k", "v"):
        assert err(g_got[name], g_ref[name]) <= 2 * err(g_xla[name], g_ref[name]) + 1e-3, name


BF16_CASE = dict(CASES["gqa_causal_segments_sinks_softcap"], segments=False, sinks=False, softcap=None, head_dim=64)


def test_bf16_error_within_twice_xla_bf16_error():
    _check_bf16(BF16_CASE)


@pytest.mark.parametrize(
    "causal,window,q_len,kv_len,bq,bk",
    [(True, None, 130, 130, 16, 128), (False, (20, 10), 63, 300, 8, 128), (True, (300, 0), 200, 64, 32, 128),
     (False, (0, 5), 64, 256, 16, 128)],
)  # fmt: skip
def test_band_is_exact_and_skipped_steps_reuse_a_block(causal, window, q_len, kv_len, bq, bk):
    """The visible band of each q block (kv block) holds exactly the tiles with a visible pair, and clamping the
    block index into it changes the index only at visible steps (so skipped steps trigger no DMA)."""
    q_pad, kv_pad = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
    spec = MaskSpec(causal, window, None, 1.0, q_len, kv_len, q_pad != q_len, kv_pad != kv_len)
    cfg = FlashConfig(spec, q_pad, kv_pad, 1, bq, bk, bq, bk, False, False, False, False, (0, 0), (0, 0), (0, 0), True)
    i, j = np.arange(q_pad)[:, None], np.arange(kv_pad)[None, :]
    allowed = (j < kv_len) & (i < q_len)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (j >= i - window[0]) & (j <= i + window[1])
    nq, nk = q_pad // bq, kv_pad // bk
    tiles = allowed.reshape(nq, bq, nk, bk).any(axis=(1, 3))
    for qb in range(nq):
        band = kv_range(cfg, jnp.int32(qb), bq, bk)
        visible = [bool(in_range(jnp.int32(kb), band)) for kb in range(nk)]
        # Rows past q_len are padding: the forward band may keep them, but never drops a visible tile.
        assert all(visible[kb] for kb in range(nk) if tiles[qb, kb])
        if (qb + 1) * bq <= q_len:
            assert visible == list(tiles[qb])
        fetched = [int(clamp(jnp.int32(kb), band)) for kb in range(nk)]
        changes = sum(1 for kb in range(1, nk) if fetched[kb] != fetched[kb - 1])
        assert changes <= max(sum(visible) - 1, 0)
    for kb in range(nk):
        band = q_range(cfg, jnp.int32(kb), bq, bk)
        visible = [bool(in_range(jnp.int32(qb), band)) for qb in range(nq)]
        assert visible == list(tiles[:, kb])
        fetched = [int(clamp(jnp.int32(qb), band)) for qb in range(nq)]
        assert sum(1 for qb in range(1, nq) if fetched[qb] != fetched[qb - 1]) <= max(sum(visible) - 1, 0)


@pytest.mark.parametrize(
    "block_sizes,dtype,message",
    [({"block_k": 128}, jnp.float32, "block_sizes key 'block_k' is unknown for the TPU kernel"),
     ({"block_kv": 96}, jnp.float32, r"block_sizes\['block_kv'\]=96 must be a positive int multiple of 128 on TPU"),
     ({"block_q_bwd": 12}, jnp.float32, r"block_sizes\['block_q_bwd'\]=12 must be a positive int multiple of 8 on TPU"),
     ({"block_q": 8}, jnp.bfloat16, r"block_sizes\['block_q'\]=8 must be a positive int multiple of 16 on TPU")],
)  # fmt: skip
def test_bad_block_sizes_raise(block_sizes, dtype, message):
    q = jnp.zeros((1, 8, 1, 8), dtype)
    with pytest.raises(ValueError, match=message):
        flash_attention_tpu(
            q, q, q, None, None, None, None, None, None, causal=False, window=None, softcap=None, scale=1.0,
            return_stats=False, block_sizes=block_sizes, interpret=True,
        )  # fmt: skip


def test_every_kernel_lowers_to_mosaic_for_tpu():
    """Without a TPU, jax.export still runs the Pallas -> Mosaic lowering of all four kernels (forward, key mass,
    dK/dV, dQ) with every feature on, compiled mode (no interpreter), bf16 inputs and default blocks."""
    from jax import export

    case = dict(
        CASES["gqa_causal_segments_sinks_softcap"], window=(50, 0), bias=(1, 4), factors=((1, 1), (1, 4), 4),
        blocks=None,
    )  # fmt: skip
    x = _inputs(case)
    x = {n: (a.astype(jnp.bfloat16) if n in ("q", "k", "v", "bias") else a) for n, a in x.items()}
    names = [n for n in DIFF if n in x]

    def loss(params):
        out, lse, mass = _kernel(case, {**x, **params}, return_stats=True, interpret=False)
        return jnp.sum(out.astype(jnp.float32) * x["ct"]), (lse, mass)

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    module = export.export(fn, platforms=["tpu"])({n: x[n] for n in names}).mlir_module()
    assert module.count("tpu_custom_call") == 4


# ---- compiled on a real TPU (skipped elsewhere) ----


@pytest.mark.tpu
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_on_tpu_matches_reference(name):
    _check_case(dict(CASES[name], blocks=None), interpret=False)


@pytest.mark.tpu
def test_compiled_on_tpu_small_blocks_and_bf16():
    _check_case(CASES["gqa_causal_segments_sinks_softcap"], interpret=False)
    _check_case(CASES["mqa_window_bias_factors"], interpret=False)
    _check_bf16(dict(BF16_CASE, q_len=1000, kv_len=1000, blocks=None), interpret=False)
