"""The DataSource protocol on every source: determinism, exact resume, process sharding, registry errors."""

import json
import os

import numpy as np
import pytest

from train.data import list_sources, make_source, source_options


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("npz") / "toy.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), labels=np.arange(40) % 5)
    return str(path)


def _build(name, npz_path, **kwargs):
    options = {"path": npz_path} if name == "npz" else {}
    if name == "mqar":
        options["vocab_size"] = 64
    if name == "emphasis_qa":
        options["num_sentences"] = 7  # seq_len 32 = 3 * 7 sentences + 3 * 4 questions - 1
    if name == "tokenized_text":  # the tiny Llama fixture's tokenizer on 16 KiB of each split
        options.update(tokenizer=os.path.join(os.path.dirname(__file__), "../../fixtures/hf/llama"), max_bytes=1 << 14)
    defaults = {"batch_size": 4, "seq_len": 128 if name == "text_passkey" else 32, "seed": 3}  # needle + query: 104
    return make_source(name, **{**defaults, **kwargs}, **options)


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


ALL = list_sources()


def test_registry_lists_every_source():
    assert ALL == sorted(
        ["text", "mqar", "selective_copy", "passkey", "seq2seq", "images", "image_questions", "npz", "masked_lm"]
        + ["emphasis_qa", "mil_bags", "shape_captions", "video_clips"]
        + ["tokenized_text", "aspect_sentiment"]
        + ["user_behavior", "detection_scenes", "ordinal_successor", "text_passkey", "gcog", "fine_grained"]
    )


@pytest.mark.parametrize("name", ALL)
def test_batches_match_element_spec(name, npz_path):
    source = _build(name, npz_path)
    batch = source.next_batch()
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == source.element_spec


@pytest.mark.parametrize("name", ALL)
def test_same_seed_and_step_give_same_batch_and_steps_differ(name, npz_path):
    first = [_build(name, npz_path).next_batch() for _ in range(2)]
    assert _equal(first[0], first[1])
    source = _build(name, npz_path)
    b0, b1 = source.next_batch(), source.next_batch()
    assert not _equal(b0, b1)
    assert not _equal(b0, _build(name, npz_path, seed=4).next_batch())


@pytest.mark.parametrize("name", ALL)
def test_resume_from_state_is_exact(name, npz_path):
    source = _build(name, npz_path)
    for _ in range(3):
        source.next_batch()
    state = json.loads(json.dumps(source.get_state()))  # must survive JSON
    expected = [source.next_batch() for _ in range(3)]
    resumed = _build(name, npz_path)
    resumed.set_state(state)
    assert all(_equal(e, r) for e, r in zip(expected, resumed, strict=False))
    assert _equal(resumed.batch_at(4), expected[1])


@pytest.mark.parametrize("name", ALL)
def test_processes_get_their_own_rows(name, npz_path):
    p0 = _build(name, npz_path, process_index=0, process_count=2).next_batch()
    p1 = _build(name, npz_path, process_index=1, process_count=2).next_batch()
    key = (
        "images"
        if name in ("images", "npz", "shape_captions", "detection_scenes", "fine_grained")
        else "instances"
        if name == "mil_bags"
        else "inputs"
    )
    key = "behaviours" if name == "user_behavior" else key
    assert p0[key].shape[0] == p1[key].shape[0] == 2
    assert not np.array_equal(p0[key], p1[key])


@pytest.mark.parametrize("name", ALL)
def test_valid_split_differs_from_train(name, npz_path):
    train = _build(name, npz_path, split="train").next_batch()
    valid = _build(name, npz_path, split="valid").next_batch()
    assert not _equal(train, valid)


def test_batch_size_must_divide_by_process_count():
    with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by process_count=4"):
        make_source("mqar", batch_size=6, seq_len=32, seed=0, process_count=4)


def test_state_from_another_stream_is_rejected():
    source = make_source("passkey", batch_size=2, seq_len=32, seed=0)
    with pytest.raises(ValueError, match=r"state\['seed'\]=1"):
        source.set_state({"source": "passkey", "split": "train", "seed": 1, "step": 2})
    with pytest.raises(ValueError, match=r"'step'"):
        source.set_state({"seed": 0})


def test_unknown_source_names_the_closest():
    with pytest.raises(ValueError, match=r"unknown data source 'mqr' \(closest: 'mqar'\); valid names: \["):
        make_source("mqr", batch_size=2, seq_len=8, seed=0)


def test_unknown_option_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"'num_pairs' \(did you mean 'num_kv_pairs'\?\).*valid options: \["):
        make_source("mqar", batch_size=2, seq_len=32, seed=0, num_pairs=2)
    assert source_options("mqar") == {
        "num_kv_pairs": 8,
        "vocab_size": 8192,
        "query_keys": "each_once",
        "num_queries": None,
    }


def test_bad_split_and_seed_are_rejected():
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'valid'\), got 'test'"):
        make_source("passkey", split="test", batch_size=2, seq_len=32, seed=0)
    with pytest.raises(ValueError, match=r"seed must be >= 0, got -1"):
        make_source("passkey", batch_size=2, seq_len=32, seed=-1)
    with pytest.raises(ValueError, match=r"needs seq_len"):
        make_source("text", batch_size=2, seed=0)
