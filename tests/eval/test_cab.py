"""eval.cab: every (pattern, task, registered mechanism) cell is in the JSON (not-supported cells with their reason,
never dropped), support follows the registry specs, CAB's compositional index matches its definition computed by
hand, and bad flags are named. Timings are never asserted."""

import json
import math

import pytest

import attn
from eval import cab


def _task(name):
    return next(t for t in cab.TASKS if t.name == name)


def test_support_follows_the_registry_specs():
    assert cab.support(_task("lm"), "softmax") is None
    assert "supports_causal=False" in cab.support(_task("lm"), "agent")  # agent has no causal form
    assert "input kind 'channels'" in cab.support(_task("classification"), "eca")
    assert cab.support(_task("image"), "neighborhood") is None  # spatial mechanisms attend over the patch grid
    assert "input kind 'spatial'" in cab.support(_task("mlm"), "neighborhood")
    assert cab.support(_task("seq2seq_cross"), "adem") is None  # a cross mechanism is tried as the cross sublayer
    assert {t.pattern for t in cab.TASKS} == set(cab.PATTERNS) - {"causal_cross"}


def _cell(pattern, task, mechanism, accuracy, loss):
    return dict(pattern=pattern, task=task, mechanism=mechanism, status="ok", accuracy=accuracy, loss=loss)


def test_compositional_index_matches_its_definition():
    cells = {
        ("lm", "a"): (0.5, 2.0),
        ("lm", "b"): (0.3, 2.5),
        ("lm", "c"): (0.4, 1.5),
        ("seq2seq_self", "a"): (0.9, 0.2),
        ("seq2seq_self", "b"): (0.7, 0.6),
    }
    records = [_cell("causal_self", t, m, acc, loss) for (t, m), (acc, loss) in cells.items()]
    records.append(dict(pattern="causal_self", task="lm", mechanism="d", status="not_supported", reason="x"))
    index = cab.compositional_index(records)
    assert set(index) == {"causal_self"} and set(index["causal_self"]) == {"a", "b", "c"}

    def z(task, mechanism, slot, sign):
        values = [v[slot] for (t, _), v in cells.items() if t == task]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))
        return sign * (cells[(task, mechanism)][slot] - mean) / std

    for mechanism in ("a", "b", "c"):
        tasks = [t for (t, m) in cells if m == mechanism]
        per_task = [(z(t, mechanism, 0, 1.0) + z(t, mechanism, 1, -1.0)) / 2 for t in tasks]
        assert index["causal_self"][mechanism] == pytest.approx(sum(per_task) / len(per_task), abs=1e-12)
    # the best on both metrics of both tasks (a) outranks the worst (b)
    assert index["causal_self"]["a"] > index["causal_self"]["c"] > index["causal_self"]["b"]


def test_every_cell_recorded_without_training():
    records = cab.run_grid((), cab.TASK_NAMES, steps=1, quick=True, eval_batches=1)  # no mechanism is run
    registered = set(attn.list_mechanisms())
    for task in cab.TASKS:
        cells = {r["mechanism"]: r for r in records if r["task"] == task.name}
        assert set(cells) == registered and len(cells) == sum(r["task"] == task.name for r in records)
        for name, r in cells.items():
            reason = cab.support(task, name)
            assert r["pattern"] == task.pattern
            assert (r["status"], r["reason"]) == (("not_supported", reason) if reason else ("not_run", r["reason"]))
    causal_cross = [r for r in records if r["pattern"] == "causal_cross"]
    assert {r["mechanism"] for r in causal_cross} == registered and all(
        r["status"] == "not_supported" for r in causal_cross
    )
    assert cab.compositional_index(records) == {}


@pytest.mark.slow
def test_quick_cells_present_with_reasons(tmp_path):
    path = tmp_path / "cab.json"
    argv = ["--quick", "--tasks", "seq2seq_cross", "--mechanisms", "softmax", "--output", str(path), "--no-plot"]
    cab.main(argv)
    saved = json.loads(path.read_text())
    registered = set(attn.list_mechanisms())
    by_pattern = {p: {r["mechanism"]: r for r in saved["records"] if r["pattern"] == p} for p in cab.PATTERNS}
    assert set(by_pattern["noncausal_cross"]) == registered and set(by_pattern["causal_cross"]) == registered
    assert not by_pattern["noncausal_self"] and not by_pattern["causal_self"]  # tasks not asked for
    ok = by_pattern["noncausal_cross"]["softmax"]
    assert ok["status"] == "ok" and ok["task"] == "seq2seq_cross" and ok["steps"] == cab.QUICK_STEPS
    assert 0.0 <= ok["accuracy"] <= 1.0 and ok["loss"] > 0 and ok["step_ms"] > 0 and ok["train_step_memory_bytes"] > 0
    eca = by_pattern["noncausal_cross"]["eca"]
    assert eca["status"] == "not_supported" and "input kind 'channels'" in eca["reason"]
    assert by_pattern["noncausal_cross"]["linear"]["status"] == "not_run"
    assert all(
        r["status"] == "not_supported" and "causal cross" in r["reason"] for r in by_pattern["causal_cross"].values()
    )
    assert saved["settings"]["steps"] == cab.QUICK_STEPS and saved["compositional_index"] == {}  # one mechanism: no CI


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps=0"),
        (["--tasks", "lm,speech"], "--tasks='lm,speech'"),
        (["--mechanisms", "softmaxx"], "--mechanisms='softmaxx'"),
        (["--eval-batches", "-1"], "--eval-batches=-1"),
    ],
)
def test_bad_flags_named(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        cab.main(["--quick", "--output", str(tmp_path / "cab.json"), *argv])
    assert not (tmp_path / "cab.json").exists()


@pytest.mark.slow
def test_quick_grid_every_task_with_index_and_png(tmp_path):
    path = tmp_path / "cab.json"
    report = cab.main(["--quick", "--mechanisms", "softmax,linear", "--output", str(path)])
    ok = {(r["task"], r["mechanism"]) for r in report["records"] if r["status"] == "ok"}
    assert {t for t, _ in ok} == set(cab.TASK_NAMES)
    assert {"noncausal_self", "causal_self"} <= set(report["compositional_index"])
    assert (tmp_path / "cab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
