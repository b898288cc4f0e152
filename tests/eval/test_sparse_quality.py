"""eval.sparse_quality (quality against density) and its data, train.data "text_passkey"."""

import json

import numpy as np
import pytest

from configs import sparse_long
from eval import lm as eval_lm
from eval import sparse_quality as bsq
from train.data import make_source
from train.run import load_run, train


def _expected_window(num_q_blocks, budget):
    """Explicit loop: block 0 and the most recent blocks, all of 0..r when they fit the budget."""
    rows = []
    for r in range(num_q_blocks):
        visible = list(range(r + 1))
        if len(visible) <= budget:
            kept = set(visible)
        else:
            kept = {0} | set(range(r - budget + 2, r + 1))
        rows.append(kept)
    return rows


@pytest.mark.parametrize("num_q_blocks,budget", [(5, 1), (6, 2), (7, 3), (4, 4), (9, 9)])
def test_window_sink_indices_keep_the_sink_and_the_recent_blocks(num_q_blocks, budget):
    indices = bsq.window_sink_indices(num_q_blocks, budget)
    assert indices.shape == (num_q_blocks, budget) and indices.dtype == np.int32
    for r, expected in enumerate(_expected_window(num_q_blocks, budget)):
        kept = [int(i) for i in indices[r] if i >= 0]
        assert len(kept) == len(set(kept)) and set(kept) == expected, (r, indices[r])
        assert len(kept) == min(budget, r + 1)


def test_block_budget_and_options_reject_bad_input():
    assert bsq.block_budget(0.1, 1024, 32) == 3 and bsq.block_budget(1.0, 100, 32) == 4
    assert bsq.block_budget(0.001, 1024, 32) == 1
    for bad in (0, 1.5, -0.2, True, "0.5"):
        with pytest.raises(ValueError, match="density"):
            bsq.block_budget(bad, 1024, 32)
    with pytest.raises(ValueError, match="system='dma'"):
        bsq.system_options("dma", 0.5, 1024, 32)


def test_losses_to_window_lists_every_worse_cell():
    def row(system, density, loss, keys, digits, nll):
        return {
            "system": system,
            "density": density,
            "loss": loss,
            "passkey_key_accuracy": keys,
            "passkey_digit_accuracy": digits,
            "passkey_digit_nll": nll,
        }

    rows = [
        row("dense", 1.0, 1.0, 1.0, 1.0, 0.1),
        row("window_sinks", 0.5, 1.5, 0.5, 0.6, 1.0),
        row("hip", 0.5, 1.4, 0.25, 0.6, 1.0),  # fewer keys
        row("top_m", 0.5, 1.6, 0.75, 0.8, 0.5),  # a higher loss
        row("hcam", 0.5, 1.5, 0.5, 0.4, 1.2),  # fewer digits, a higher digit NLL
        row("hyper", 0.5, 1.5, 0.5, 0.6, 1.0),  # ties are not losses
        {"system": "longheads", "density": 0.5, "loss": 1.7, "passkey_key_accuracy": 0.5},  # an older report's row
    ]
    cells = {(c["system"], c["metric"]) for c in bsq.losses_to_window(rows)}
    assert cells == {
        ("hip", "passkey_key_accuracy"),
        ("top_m", "loss"),
        ("hcam", "passkey_digit_accuracy"),
        ("hcam", "passkey_digit_nll"),
        ("longheads", "loss"),
    }


def test_text_passkey_rows_hide_the_key_and_ask_for_it_at_the_end():
    source = make_source("text_passkey", split="valid", batch_size=1, seq_len=160, num_digits=4)
    batch = source.passkey_batch(np.random.default_rng(0), 3, depth=0.0)
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (3, 160)
    for row in range(3):
        key = str(int(batch["keys"][row]))
        sequence = bytes(np.concatenate([batch["inputs"][row], batch["targets"][row, -1:]]).astype(np.uint8))
        assert len(key) == 4 and sequence.startswith(f" The pass key is {key}. Remember it.".encode())
        assert sequence.endswith(f" What is the pass key? The pass key is {key}".encode())
        assert bytes(batch["targets"][row, source.answer_slice].astype(np.uint8)) == key.encode()
    assert np.array_equal(np.flatnonzero(batch["weights"][0]), np.arange(156, 160))
    with pytest.raises(ValueError, match="passkey_rate"):
        make_source("text_passkey", batch_size=1, seq_len=160, passkey_rate=1.5)
    with pytest.raises(ValueError, match="too short"):
        make_source("text_passkey", batch_size=1, seq_len=64).passkey_batch(np.random.default_rng(0), 1)


def test_text_passkey_valid_split_is_the_held_out_text():
    plain = make_source("text", split="valid", batch_size=2, seq_len=64, num_batches=2)
    mixed = make_source("text_passkey", split="valid", batch_size=2, seq_len=64, num_batches=2)
    for _ in range(2):
        a, b = plain.next_batch(), mixed.next_batch()
        assert all(np.array_equal(a[key], b[key]) for key in ("inputs", "targets", "weights"))
    rows = make_source("text_passkey", batch_size=64, seq_len=128, passkey_rate=0.5).next_batch()
    asks = [b"What is the pass key?" in bytes(row.astype(np.uint8)) for row in rows["inputs"]]
    assert 16 < sum(asks) < 48 and rows["weights"].min() == 1.0


def test_text_passkey_weights_only_the_answer_digits_of_passkey_rows():
    rows = make_source("text_passkey", batch_size=64, seq_len=128, passkey_weight=7.5, num_digits=5).next_batch()
    for inputs, targets, weights in zip(rows["inputs"], rows["targets"], rows["weights"], strict=True):
        text = bytes(np.append(inputs, targets[-1]).astype(np.uint8))
        if text[:-5].endswith(b" What is the pass key? The pass key is "):
            assert text[-5:].isdigit() and list(weights[-5:]) == [7.5] * 5, text[-60:]
            assert np.all(weights[:-5] == 1.0)
        else:
            assert np.all(weights == 1.0)
    assert 16 < int(np.sum(rows["weights"] == 7.5)) // 5 < 48
    for bad in (0, -1.0, True, "2"):
        with pytest.raises(ValueError, match="passkey_weight"):
            make_source("text_passkey", batch_size=1, seq_len=128, passkey_weight=bad)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sparse_long_smoke"))
    train(sparse_long.get_config("smoke"), workdir)
    return load_run(workdir)


@pytest.mark.slow
def test_dense_row_is_eval_lm_and_every_system_at_full_density_is_dense(tiny_run, tmp_path):
    report = bsq.measure(tiny_run, densities=(1.0,), overhead=False, passkey_count=8, log=lambda _: None)
    dense = next(r for r in report["records"] if r["system"] == "dense")
    expected = eval_lm.evaluate_lengths(tiny_run, [1], tiny_run.config.eval.num_batches)[0]
    assert dense["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert dense["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    systems = {r["system"] for r in report["records"]}
    assert systems == {"dense", "window_sinks", *bsq.SYSTEMS}
    for row in report["records"]:
        assert row["loss"] == pytest.approx(dense["loss"], rel=1e-5), row["system"]
        assert row["passkey_digit_accuracy"] == dense["passkey_digit_accuracy"], row["system"]
    paths = bsq.write(report, str(tmp_path))
    with open(paths[0]) as f:
        assert json.load(f)["records"][0]["system"] == "dense"


@pytest.mark.slow
def test_sparse_window_differs_from_dense_and_overhead_is_a_share(tiny_run):
    report = bsq.measure(tiny_run, densities=(0.25,), systems=("hip",), repeats=1, passkey_count=8, log=lambda _: None)
    rows = {r["system"]: r for r in report["records"]}
    assert rows["window_sinks"]["loss"] != pytest.approx(rows["dense"]["loss"], rel=1e-6)
    assert rows["hip"]["budget_blocks"] == 1 and 0 < rows["hip"]["selector_share"]
    assert rows["window_sinks"]["selector_share"] is None


@pytest.mark.slow
def test_trained_seer_gate_run_is_measured_and_equals_dense_at_full_density(tiny_run, tmp_path):
    config = sparse_long.get_config("smoke")
    config.model.attention = "seer"
    config.model.attention_options = {"block_size": 32, "gate_dim": 16, "top_k": 2, "distill": True}
    config.init_from, config.trainable = tiny_run.workdir, ("gate_query", "gate_key")
    train(config, str(tmp_path / "seer"))
    seer_run = load_run(str(tmp_path / "seer"))
    report = bsq.measure(
        tiny_run, densities=(1.0, 0.25), systems=("hip",), overhead=False, passkey_count=8, seer_run=seer_run,
        log=lambda _: None,
    )  # fmt: skip
    rows = {(r["system"], r["density"]): r for r in report["records"]}
    assert rows[("seer", 1.0)]["loss"] == pytest.approx(rows[("dense", 1.0)]["loss"], rel=1e-5)
    assert rows[("seer", 0.25)]["options"] == {"top_k": 1, "distill": False}
    assert "seer" not in report["needs_training"] and report["seer_step"] == 2
    with pytest.raises(ValueError, match="expected 'seer'"):
        bsq.measure(tiny_run, densities=(0.5,), systems=("hip",), overhead=False, seer_run=tiny_run)
