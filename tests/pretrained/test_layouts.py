"""Block reads of a parameter equal the same block of the whole parameter built with explicit numpy loops, for
transposed, reshaped and fused tensors; joining parameters rebuilds the tensor; llama3 RoPE frequencies follow
their defining equations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from attn.core.positions import rope_frequencies
from attn.pretrained.layouts import TensorRule, join_parameters, read_block, tensor_shape
from attn.pretrained.safetensors_files import SafetensorsFiles

E, H, D = 6, 4, 3


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "linear": rng.standard_normal((H * D, E)).astype(np.float32),  # torch Linear [out, in]
        "out": rng.standard_normal((E, H * D)).astype(np.float32),  # o_proj [E, H * D]
        "fused": rng.standard_normal((E, 3 * H * D)).astype(np.float32),  # GPT-2 c_attn [E, 3 H D]
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with SafetensorsFiles(tmp_path) as handle:
        yield handle, tensors


def _query_from_linear(weight):
    """[E, H, D] with kernel[e, h, d] = weight[h * D + d, e]."""
    out = np.zeros((E, H, D), weight.dtype)
    for e, h, d in itertools.product(range(E), range(H), range(D)):
        out[e, h, d] = weight[h * D + d, e]
    return out


def _out_from_linear(weight):
    """[H, D, E] with kernel[h, d, e] = weight[e, h * D + d]."""
    out = np.zeros((H, D, E), weight.dtype)
    for h, d, e in itertools.product(range(H), range(D), range(E)):
        out[h, d, e] = weight[e, h * D + d]
    return out


def _part_of_fused(weight, part):
    """[E, H, D] with kernel[e, h, d] = weight[e, part * H * D + h * D + d]."""
    out = np.zeros((E, H, D), weight.dtype)
    for e, h, d in itertools.product(range(E), range(H), range(D)):
        out[e, h, d] = weight[e, part * H * D + h * D + d]
    return out


BLOCKS = [
    None,
    (slice(0, 3), slice(0, 2), slice(0, 3)),
    (slice(3, 6), slice(2, 4), slice(None)),
    (slice(1, 5), slice(1, 3), slice(1, 2)),  # partial inner axis: read whole rows, slice after
]


@pytest.mark.parametrize("block", BLOCKS)
def test_blocks_of_transposed_and_fused_tensors(files, block):
    handle, tensors = files
    cases = [
        (TensorRule("linear", ("q",), groups=(1, 2), transpose=True), _query_from_linear(tensors["linear"])),
        (TensorRule("fused", ("k",), groups=(1, 2), part=1, parts=3), _part_of_fused(tensors["fused"], 1)),
        (TensorRule("fused", ("v",), groups=(1, 2), part=2, parts=3), _part_of_fused(tensors["fused"], 2)),
    ]
    for rule, whole in cases:
        got = read_block(handle, rule, whole.shape, block)
        np.testing.assert_array_equal(got, whole if block is None else whole[block])
    rule = TensorRule("out", ("o",), groups=(2, 1), transpose=True)
    whole = _out_from_linear(tensors["out"])
    out_block = None if block is None else (block[1], block[2], block[0])
    got = read_block(handle, rule, whole.shape, out_block)
    np.testing.assert_array_equal(got, whole if block is None else whole[out_block])


def test_join_rebuilds_tensors_and_shapes_follow_the_rules(files):
    _, tensors = files
    query = TensorRule("linear", ("q",), groups=(1, 2), transpose=True)
    np.testing.assert_array_equal(join_parameters([query], [_query_from_linear(tensors["linear"])]), tensors["linear"])
    parts = [TensorRule("fused", (p,), groups=(1, 2), part=i, parts=3) for i, p in enumerate("qkv")]
    pieces = [_part_of_fused(tensors["fused"], i) for i in range(3)]
    np.testing.assert_array_equal(join_parameters(parts, pieces), tensors["fused"])
    assert tensor_shape(query, (E, H, D)) == (H * D, E)
    assert tensor_shape(parts[0], (E, H, D)) == (E, 3 * H * D)
    with pytest.raises(ValueError, match=r"groups \(1, 2\) do not cover the parameter shape \(6, 12\)"):
        tensor_shape(query, (E, H * D))


def test_llama3_frequencies_follow_the_bands():
    head_dim, base, factor, low, high, original = 32, 500000.0, 8.0, 1.0, 4.0, 64
    inv_freq, multiplier = rope_frequencies(
        head_dim,
        base=base,
        scaling="llama3",
        factor=factor,
        original_max_len=original,
        low_freq_factor=low,
        high_freq_factor=high,
    )
    assert multiplier == 1.0
    bands = set()
    for i in range(head_dim // 2):
        theta = base ** (-2 * i / head_dim)
        wavelength = 2 * math.pi / theta
        if wavelength < original / high:
            expected, band = theta, "kept"
        elif wavelength > original / low:
            expected, band = theta / factor, "interpolated"
        else:
            smooth = (original / wavelength - low) / (high - low)
            expected, band = (1 - smooth) * theta / factor + smooth * theta, "between"
        bands.add(band)
        assert inv_freq[i] == pytest.approx(expected, rel=1e-12)
    assert bands == {"kept", "interpolated", "between"}
