"""The grain pipeline under every source: exact mid-epoch resume, process sharding, prefetch, JSON-lines/Parquet."""

import json
import sys

import grain
import numpy as np
import pytest

from train.data import make_source
from train.data.base import DataSource


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.fixture(scope="module")
def records():
    """Twelve short texts of different lengths (ASCII and two-byte UTF-8)."""
    return [f"record {i}: " + "ab\u00e9" * (i + 1) for i in range(12)]


@pytest.fixture(scope="module")
def jsonl_path(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("jsonl") / "texts.jsonl"
    lines = [json.dumps({"id": i, "body": text}) for i, text in enumerate(records)]
    path.write_text("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("npz") / "toy.npz"
    rng = np.random.default_rng(1)
    np.savez(path, images=rng.integers(0, 256, (22, 4, 4, 3), dtype=np.uint8), labels=np.arange(22) % 3)
    return str(path)


def _jsonl_source(path, **kwargs):
    options = dict(batch_size=4, seq_len=8, seed=0, path=path, format="jsonl", field="body", valid_fraction=0.4)
    return make_source("text", **{**options, **kwargs})


def test_the_pipeline_is_a_grain_map_dataset_with_random_access():
    source = make_source("mqar", batch_size=4, seq_len=16, seed=2, num_kv_pairs=2, vocab_size=32)
    dataset = source.grain_dataset()
    assert isinstance(dataset, grain.MapDataset)
    first, second = source.next_batch(), source.next_batch()
    assert _equal(dataset[1], second) and _equal(dataset[0], first)
    assert source.get_state()["iterator"] == {"next_index": 2}


def test_mid_epoch_resume_of_a_finite_source_is_exact(jsonl_path):
    source = _jsonl_source(jsonl_path, split="valid", batch_size=2)
    total = source.num_batches
    assert total >= 4
    for _ in range(2):
        source.next_batch()
    state = json.loads(json.dumps(source.get_state()))
    assert state["step"] == 2 and state["iterator"]["next_index"] == 2
    rest = list(source)
    assert len(rest) == total - 2
    resumed = _jsonl_source(jsonl_path, split="valid", batch_size=2)
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(rest) and all(_equal(a, b) for a, b in zip(again, rest, strict=True))
    resumed.reset()
    assert resumed.step == 0 and len(list(resumed)) == total


def test_npz_epochs_resume_across_the_epoch_boundary(npz_path):
    # 20 train examples, 8 per batch: batch 2 spans epochs 0 and 1.
    source = make_source("npz", batch_size=8, seed=5, path=npz_path)
    source.next_batch()
    state = source.get_state()
    expected = [source.next_batch() for _ in range(3)]
    resumed = make_source("npz", batch_size=8, seed=5, path=npz_path)
    resumed.set_state(state)
    assert all(_equal(e, resumed.next_batch()) for e in expected)


@pytest.mark.parametrize("name", ["passkey", "npz", "user_behavior"])
def test_two_processes_take_disjoint_rows_whose_union_is_the_single_process_batch(name, npz_path):
    options = {"path": npz_path} if name == "npz" else {}
    build = dict(batch_size=8, seq_len=32, seed=4, **options)
    single = make_source(name, **build)
    shards = [make_source(name, process_index=p, process_count=2, **build) for p in range(2)]
    for _ in range(3):  # npz: the third batch crosses into the second epoch
        whole = single.next_batch()
        parts = [shard.next_batch() for shard in shards]
        for key, value in whole.items():
            assert parts[0][key].shape[0] == parts[1][key].shape[0] == 4
            rebuilt = np.empty_like(value)
            rebuilt[0::2], rebuilt[1::2] = parts[0][key], parts[1][key]
            assert np.array_equal(rebuilt, value), key
    if name == "npz":  # batches 0 and 1 of both processes are 16 distinct examples of the 20-example epoch 0
        images = [shard.batch_at(step)["images"].reshape(4, -1) for shard in shards for step in (0, 1)]
        assert len(np.unique(np.concatenate(images), axis=0)) == 16


@pytest.mark.parametrize("name", ["mqar", "images"])
def test_prefetch_on_and_off_give_identical_batches_and_states(name):
    build = (
        dict(batch_size=4, seq_len=16, seed=1, image_size=8)
        if name == "images"
        else dict(batch_size=4, seq_len=16, vocab_size=64, num_kv_pairs=2)
    )
    plain = make_source(name, **build)
    ahead = make_source(name, prefetch=3, **build)
    assert ahead.prefetch == 3
    for _ in range(4):
        assert _equal(plain.next_batch(), ahead.next_batch())
    assert plain.get_state() == ahead.get_state()
    ahead.set_prefetch(0)  # switching keeps the position
    assert _equal(plain.next_batch(), ahead.next_batch())


def test_jsonl_records_round_trip_into_the_byte_corpus(jsonl_path, records):
    source = _jsonl_source(jsonl_path)
    train, valid = records[:7], records[7:]  # valid_fraction 0.4: the last round(4.8) = 5 records
    assert source.corpus.train.tobytes() == b"\x00".join(t.encode("utf-8") for t in train)
    assert source.corpus.valid.tobytes() == b"\x00".join(t.encode("utf-8") for t in valid)
    batch = source.next_batch()
    for row in range(4):
        window = bytes(batch["inputs"][row].astype(np.uint8)) + bytes([batch["targets"][row, -1]])
        assert window in source.corpus.train.tobytes()
    # The valid walk predicts every byte of the held-out records once, in order.
    walk = _jsonl_source(jsonl_path, split="valid")
    targets = np.concatenate([b["targets"][b["weights"][:, 0] > 0] for b in walk]).reshape(-1)
    data = source.corpus.valid
    assert np.array_equal(targets, data[1 : 1 + len(targets)]) and len(targets) == (len(data) - 1) // 8 * 8


def test_jsonl_errors_name_the_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field='text' must be a string, got int"):
        make_source("text", batch_size=2, seq_len=4, path=str(bad), format="jsonl")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing.jsonl:1: the record has no field='text' \(its keys: \['body'\]\)"):
        make_source("text", batch_size=2, seq_len=4, path=str(missing), format="jsonl")
    with pytest.raises(ValueError, match=r"format='csv' must be one of \('files', 'jsonl', 'parquet'\)"):
        make_source("text", batch_size=2, seq_len=4, path=str(missing), format="csv")


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
    table = tmp_path / "texts.parquet"
    table.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"needs pyarrow, which is not installed: pip install pyarrow"):
        make_source("text", batch_size=2, seq_len=4, path=str(table), format="parquet")


def test_parquet_records_round_trip(tmp_path, records):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"body": records}), path)
    source = make_source("text", batch_size=2, seq_len=8, path=str(path), format="parquet", field="body")
    assert source.corpus.train.tobytes() == b"\x00".join(t.encode("utf-8") for t in records[:-1])


def test_parquet_directory_reads_its_files_in_name_order_over_row_groups(tmp_path, records):
    """Two files (the later name written first), several row groups and another column: the corpus is the `body`
    records of a.parquet then b.parquet, split 7 train / 5 valid like the JSON-lines corpus of the same records."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": list(range(5, 12)), "body": records[5:]}), tmp_path / "b.parquet", row_group_size=3)
    pq.write_table(pa.table({"id": list(range(5)), "body": records[:5]}), tmp_path / "a.parquet", row_group_size=2)
    assert pq.ParquetFile(tmp_path / "b.parquet").num_row_groups == 3
    (tmp_path / "notes.txt").write_text("not a record file", encoding="utf-8")
    options = dict(batch_size=4, seq_len=8, seed=0, path=str(tmp_path), format="parquet", field="body")
    source = make_source("text", valid_fraction=0.4, **options)
    assert source.corpus.train.tobytes() == b"\x00".join(t.encode("utf-8") for t in records[:7])
    assert source.corpus.valid.tobytes() == b"\x00".join(t.encode("utf-8") for t in records[7:])
    batch = source.next_batch()
    for row in range(4):
        window = bytes(batch["inputs"][row].astype(np.uint8)) + bytes([batch["targets"][row, -1]])
        assert window in source.corpus.train.tobytes()


def test_parquet_errors_name_the_file_column_and_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    options = dict(batch_size=2, seq_len=4, format="parquet")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["fine", "also fine"]}), path)
    with pytest.raises(
        ValueError, match=r"t.parquet: the table has no column field='text' \(its columns: \['body'\]\)"
    ):
        make_source("text", path=str(path), **options)
    pq.write_table(pa.table({"text": ["fine", None, "x"]}), path)
    with pytest.raises(ValueError, match=r"t.parquet row 1: field='text' must be a string, got NoneType"):
        make_source("text", path=str(path), **options)
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(ValueError, match=r"t.parquet row 0: field='text' must be a string, got int"):
        make_source("text", path=str(path), **options)


def test_iterator_state_must_match_the_step():
    source = make_source("passkey", batch_size=2, seq_len=32, seed=0)
    with pytest.raises(ValueError, match=r"state\['iterator'\]=\{'next_index': 5\} must be grain's iterator state"):
        source.set_state({"step": 2, "iterator": {"next_index": 5}})
    source.set_state({"step": 2})  # a state without grain's part resumes at "step"
    assert _equal(source.next_batch(), make_source("passkey", batch_size=2, seq_len=32, seed=0).batch_at(2))


class _PerProcessRows(DataSource):
    """A source that wrongly builds only this process's rows."""

    name = "per_process_rows"

    @property
    def element_spec(self):
        return {"x": ((self.batch_size,), np.dtype(np.int32))}

    def _make_batch(self, rng, step):
        return {"x": np.zeros(self.batch_size, np.int32)}


def test_a_source_must_build_the_global_batch():
    with pytest.raises(ValueError, match=r"returned 'x' with shape \(2,\) for step 0; expected global_batch_size=4"):
        _PerProcessRows(batch_size=4, process_index=1, process_count=2).next_batch()
    assert _PerProcessRows(batch_size=4).next_batch()["x"].shape == (4,)
