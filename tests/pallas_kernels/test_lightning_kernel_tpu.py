"""Lightning attention: the TPU (Mosaic) kernel in TPU interpret mode against the references."""

from __future__ import annotations

import pytest

from tests.pallas_kernels.lightning_cases import check_against_references, check_low_precision, check_state_passing

# (batch, length, heads, kv_heads, key_dim, value_dim, chunk, with_decay, with_state)
CASES = [
    (1, 1, 2, 2, 8, 8, 8, False, False),  # one token
    (3, 63, 4, 2, 16, 8, 16, True, True),  # GQA, T not a chunk multiple, batch 3
    (1, 130, 2, 1, 60, 128, 32, True, True),  # MQA, head dims 60 / 128 (60 padded to 128 lanes)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-T{c[1]}-H{c[2]}/{c[3]}-D{c[4]}/{c[5]}-C{c[6]}")
def test_tpu_kernel_matches_references(case):
    check_against_references("tpu", *case)


def test_tpu_state_passing_equals_one_call():
    check_state_passing("tpu", 16)


def test_tpu_bfloat16_within_flash_criterion():
    check_low_precision("tpu", 40, 16)
