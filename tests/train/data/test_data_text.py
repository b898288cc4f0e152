"""Byte-level text: the stdlib corpus, the file split, shifted targets, the valid walk, user paths."""

import numpy as np
import pytest

from train.data import load_corpus, make_source
from train.data.text import stdlib_root


def test_stdlib_corpus_is_large_and_split_by_file():
    corpus = load_corpus()
    assert len(corpus.train) > 1_000_000
    assert corpus.valid_files and corpus.train_files
    assert not set(corpus.train_files) & set(corpus.valid_files)
    assert all(f.endswith(".py") and "site-packages" not in f for f in corpus.train_files + corpus.valid_files)
    # About 2% of the files are held out.
    share = len(corpus.valid_files) / (len(corpus.train_files) + len(corpus.valid_files))
    assert 0.005 < share < 0.05
    # The valid split is exactly its files joined by byte 0.
    root = stdlib_root()
    expected = b"\x00".join((root / f).read_bytes() for f in corpus.valid_files)
    assert corpus.valid.tobytes() == expected
    assert load_corpus() is corpus  # cached


def test_targets_are_inputs_shifted_by_one():
    batch = make_source("text", batch_size=4, seq_len=64, seed=0).next_batch()
    assert np.array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < 256
    assert np.all(batch["weights"] == 1)


def test_train_windows_come_from_the_train_split():
    corpus = load_corpus()
    batch = make_source("text", batch_size=2, seq_len=48, seed=5).next_batch()
    data = corpus.train.tobytes()
    for row in range(2):
        window = bytes(batch["inputs"][row].astype(np.uint8)) + bytes([batch["targets"][row, -1]])
        assert window in data


@pytest.fixture()
def small_dir(tmp_path):
    for i in range(30):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / f"f{i:02d}.txt").write_bytes(bytes([65 + i % 26]) * (50 + i))
    (tmp_path / "skip.bin").write_bytes(b"\xff" * 10)
    return tmp_path


def test_user_directory_with_glob(small_dir):
    corpus = load_corpus(small_dir, glob="*.txt", valid_fraction=0.1)
    files = sorted(corpus.train_files + corpus.valid_files)
    assert files == [f"sub/f{i:02d}.txt" for i in range(30)]
    assert len(corpus.valid_files) >= 1 and 255 not in corpus.train
    everything = load_corpus(small_dir, valid_fraction=0.1)
    assert "skip.bin" in everything.train_files + everything.valid_files


def test_valid_walk_covers_the_split_once_and_shards_across_processes(small_dir):
    seq_len = 7
    one = make_source(
        "text", split="valid", batch_size=4, seq_len=seq_len, seed=0, path=str(small_dir), valid_fraction=0.2
    )
    data = one.corpus.valid
    num_windows = (len(data) - 1) // seq_len
    assert one.num_batches == -(-num_windows // 4)
    batches = list(one)
    assert len(batches) == one.num_batches
    with pytest.raises(StopIteration):
        one.next_batch()
    targets = np.concatenate([b["targets"] for b in batches])
    weights = np.concatenate([b["weights"] for b in batches])
    real = weights[:, 0] == 1
    assert real.sum() == num_windows and np.all(weights[~real] == 0)
    # Every byte after the first is predicted exactly once, in order.
    assert np.array_equal(targets[real].reshape(-1), data[1 : 1 + num_windows * seq_len])
    # Two processes see disjoint rows of the same global batches (process p: rows p::2).
    halves = [
        make_source(
            "text",
            split="valid",
            batch_size=4,
            seq_len=seq_len,
            seed=0,
            path=str(small_dir),
            valid_fraction=0.2,
            process_index=p,
            process_count=2,
        )
        for p in range(2)
    ]
    for step, batch in enumerate(batches):
        for p, half in enumerate(halves):
            assert np.array_equal(half.batch_at(step)["inputs"], batch["inputs"][p::2])
    one.reset()
    assert np.array_equal(one.next_batch()["inputs"], batches[0]["inputs"])


def test_single_file_is_split_by_bytes(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes(bytes(range(256)) * 40)
    corpus = load_corpus(path)
    assert len(corpus.valid) == round(0.02 * 10240)
    assert corpus.train.tobytes() + corpus.valid.tobytes() == path.read_bytes()


def test_missing_path_names_the_config_field(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"^data\.path '.*nope' does not exist"):
        make_source("text", batch_size=2, seq_len=8, seed=0, path=str(missing))


def test_seq_len_longer_than_the_split_is_rejected(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"abcdefghij" * 10)
    with pytest.raises(ValueError, match=r"seq_len=500 needs at least 501 bytes but the train split has 98"):
        make_source("text", batch_size=2, seq_len=500, seed=0, path=str(path))
