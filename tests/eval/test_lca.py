"""eval.lca: the LCA-bench grid writes every cell (a mask pattern an implementation cannot express is recorded as
not supported, never dropped), the mask patterns mean what the docstring says, the measured softmax-family cells
agree with the dense masked reference, and a context-parallel degree that does not fit is named. Fields only:
timings are never asserted."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import lca

COMMON = ["--quick", "--warmup", "0", "--repeats", "1"]
LINEAR = ("lightning", "linear")
# the memory-efficient path under the two masks it cannot take from the dense reference's code: block and segments
BLOCKWISE_CHECKED = {("softmax_xla_blockwise", "block_sparse"), ("softmax_xla_blockwise", "document")}


def _loop_mask(pattern: lca.Pattern) -> np.ndarray:
    """The pattern's [T, T] mask from its definition, one (query, key) pair at a time."""
    t, left = pattern.length, pattern.length // 8
    keep = np.zeros((t, t), bool)
    for i in range(t):
        for j in range(t):
            if pattern.name == "full":
                keep[i, j] = True
            elif pattern.name == "causal":
                keep[i, j] = j <= i
            elif pattern.name == "sliding_window":
                keep[i, j] = j <= i and i - j <= left
            elif pattern.name == "block_sparse":
                keep[i, j] = bool(pattern.block_mask[i // pattern.block, j // pattern.block])
            else:
                keep[i, j] = j <= i and pattern.segment_ids[i] == pattern.segment_ids[j]
    return keep


@pytest.mark.parametrize("name", lca.PATTERNS)
def test_pattern_masks_match_their_definition(name):
    pattern = lca.make_pattern(name, 32, 8)
    np.testing.assert_array_equal(pattern.dense(), _loop_mask(pattern))
    if name == "document":
        ids = pattern.segment_ids
        assert ids[0] == 0 and np.all(np.diff(ids) >= 0) and ids[-1] >= 1  # packed, at least two documents
    if name == "block_sparse":
        blocks = pattern.block_mask
        assert blocks.diagonal().all() and blocks[:, 0].all() and not blocks.all()


@pytest.mark.slow
def test_kernel_cells_recorded_with_reasons_and_checked_against_reference(tmp_path):
    names = ("softmax_xla", "flash_pallas", "block_sparse_xla", "neighborhood")
    argv = COMMON + ["--part", "kernels", "--patterns", "block_sparse", "--directions", "fwd"]
    argv += ["--implementations", ",".join(names), "--output-dir", str(tmp_path), "--no-plot"]
    report = lca.main(argv)
    saved = json.loads((tmp_path / "lca_cpu.json").read_text())
    assert saved["suite"] == "lca" and saved["settings"]["quick"] and len(saved["records"]) == len(report["records"])
    cells = {(r["pattern"], r["name"]): r for r in saved["records"]}
    assert set(cells) == {("block_sparse", n) for n in names}
    for (pattern, name), r in cells.items():
        assert r["part"] == "kernels" and r["direction"] == "fwd" and r["seq_len"] == lca.QUICK_LENGTHS[0]
        if name == "flash_pallas":
            assert r["status"] == "not_supported" and "platform is cpu" in r["reason"]
        elif name == "neighborhood":
            assert r["status"] == "not_supported" and f"the {pattern} pattern" in r["reason"]
        else:
            assert r["status"] == "ok", r.get("reason")
            assert r["median_ms"] > 0 and r["tflops"] > 0 and r["compiled_memory_bytes"] > 0
            assert r["max_abs_error"] < 1e-5  # the same attention as the dense masked reference
    density = lca.make_pattern("block_sparse", lca.QUICK_LENGTHS[0], lca.QUICK_BLOCK).block_mask.mean()
    assert cells[("block_sparse", "softmax_xla")]["density"] == pytest.approx(density)


@pytest.mark.slow
def test_distributed_cells_ring_and_ulysses(tmp_path):
    argv = COMMON + ["--part", "distributed", "--patterns", "causal", "--degrees", "2", "--directions", "fwd"]
    report = lca.main(argv + ["--output-dir", str(tmp_path), "--no-plot"])
    cells = {r["name"]: r for r in report["records"]}
    assert set(cells) == set(lca.CP_METHODS)
    for r in cells.values():
        assert r["status"] == "ok", r.get("reason")
        assert (r["part"], r["devices"], r["pattern"], r["heads"]) == ("distributed", 2, "causal", lca.CP_HEADS)
        assert r["compiled_memory_bytes"] > 0


# (pattern, implementation) cells the grid measures; every other cell is recorded as not supported
SUPPORTED = {("full", n) for n in ("block_sparse_xla", "linear")} | {("causal", n) for n in LINEAR}
SUPPORTED |= {("causal", "block_sparse_xla"), ("sliding_window", "neighborhood"), ("block_sparse", "block_sparse_xla")}
SUPPORTED |= {(p, n) for p in lca.PATTERNS for n in ("softmax_xla", "softmax_xla_blockwise")}


def test_supported_cells_compute_the_masked_attention():
    rng = np.random.default_rng(0)
    t, heads, head_dim, block = 32, 2, 8, 8
    q, k, v = (rng.standard_normal((1, t, heads, head_dim)).astype(np.float32) for _ in range(3))
    built = set()
    for pattern_name in lca.PATTERNS:
        pattern = lca.make_pattern(pattern_name, t, block)
        keep = _loop_mask(pattern)
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        logits = np.where(keep, logits, -np.inf)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        expected = np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)
        for name in lca.IMPLEMENTATIONS:
            try:
                attend = lca.build(name, pattern, heads=heads, platform="cpu")
            except lca.NotSupported as reason:
                assert str(reason)
                continue
            built.add((pattern_name, name))
            if name in ("block_sparse_xla", "neighborhood") or (name, pattern_name) in BLOCKWISE_CHECKED:
                out = jax.jit(attend)(*(jnp.asarray(x) for x in (q, k, v)))
                np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)
    assert built == SUPPORTED


@pytest.mark.parametrize(
    ("degrees", "devices", "length", "message"),
    [
        ((2, 3), 8, 64, "degree=3: a context-parallel degree must divide the device count 8"),
        ((16,), 8, 64, "degree=16"),
        ((4,), 8, 12, "degree=4 with seq_len=12"),
        ((0,), 8, 64, "degree=0"),
    ],
)
def test_bad_degree_named(degrees, devices, length, message):
    with pytest.raises(ValueError, match=message):
        lca.check_degrees(degrees, devices=devices, length=length)


def test_bad_flags_named_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="degree=3"):
        lca.main(["--quick", "--part", "distributed", "--degrees", "3", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--patterns='diagonal'"):
        lca.main(["--quick", "--patterns", "diagonal", "--output-dir", str(tmp_path)])
    assert not (tmp_path / "lca_cpu.json").exists()


@pytest.mark.slow
def test_quick_grid_has_every_cell_and_png(tmp_path):
    report = lca.main(COMMON + ["--output-dir", str(tmp_path)])
    kernels = {(r["pattern"], r["direction"], r["name"]) for r in report["records"] if r["part"] == "kernels"}
    assert kernels == {(p, d, n) for p in lca.PATTERNS for d in lca.DIRECTIONS for n in lca.IMPLEMENTATIONS}
    distributed = [r for r in report["records"] if r["part"] == "distributed"]
    expected = {
        (p, d, m, n) for p in lca.CP_PATTERNS for d in lca.DIRECTIONS for m in lca.CP_METHODS for n in lca.DEGREES
    }
    assert {(r["pattern"], r["direction"], r["name"], r["devices"]) for r in distributed} == expected
    assert all(r["status"] in ("ok", "not_supported", "skipped") for r in report["records"])
    assert (tmp_path / "lca_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
