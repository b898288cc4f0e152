"""train.data emphasis_qa: in conflict rows exactly two sentences hold the last question's key and the answer is the
marked one's value (or id), earlier answers are teacher-forced, training value questions never hit a conflict, the
emphasis span is the key sentence, and bad sizes are refused."""

import numpy as np
import pytest

from train.data import make_source
from train.data.emphasis import EmphasisSource

N, S, Q = 5, 6, 3
T = 3 * N + 3 * Q - 1


def batch(fmt, seed=0, rows=64):
    source = make_source(
        "emphasis_qa",
        batch_size=rows,
        seq_len=T,
        seed=seed,
        num_sentences=N,
        num_symbols=S,
        num_questions=Q,
        format=fmt,
    )
    return source, source.next_batch()


def parts(b):
    """(ids, flags, keys, values) [B, N] and (kinds, asked keys, answers) [B, Q], read with explicit offsets; keys
    and values decoded from the pair tokens into their own token ids."""
    seq = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
    ids, flags, pairs = (seq[:, offset : 3 * N : 3] for offset in range(3))
    pairs = pairs - (EmphasisSource.FIRST_ID + N + 2 * S)
    keys = EmphasisSource.FIRST_ID + N + pairs // S
    values = EmphasisSource.FIRST_ID + N + S + pairs % S
    questions = tuple(seq[:, 3 * N + offset :: 3] for offset in range(3))
    return (ids, flags, keys, values), questions


def holders(keys, row, key):
    return [i for i in range(N) if keys[row, i] == key]


def test_conflict_rows_answer_the_marked_sentence():
    source, b = batch("answer_conflict")
    (ids, flags, keys, values), (kinds, asked, answers) = parts(b)
    assert (kinds == EmphasisSource.QA).all()
    for r in range(len(ids)):
        last = holders(keys, r, asked[r, -1])
        assert len(last) == 2 and values[r, last[0]] != values[r, last[1]]
        marked = [i for i in last if flags[r, i] == EmphasisSource.MARK]
        assert marked == [b["key_sentence"][r]]
        assert answers[r, -1] == values[r, marked[0]] == b["targets"][r, -1]
        for question in range(Q - 1):  # earlier questions: unique keys, teacher-forced answers
            (only,) = holders(keys, r, asked[r, question])
            assert answers[r, question] == values[r, only]
        start, stop = source.sentence_span(marked[0])
        assert b["emphasis"][r].tolist() == [1.0 if start <= j < stop else 0.0 for j in range(T)]
    assert b["weights"].sum(axis=1).tolist() == [float(Q)] * len(ids)
    assert (b["weights"][:, 3 * N + 1 :: 3] == 1).all()


def test_identify_rows_ask_which_sentence_last():
    _, b = batch("identify")
    (ids, flags, keys, values), (kinds, asked, answers) = parts(b)
    assert (kinds[:, -1] == EmphasisSource.QW).all() and (kinds[:, :-1] == EmphasisSource.QA).all()
    np.testing.assert_array_equal(answers[:, -1], EmphasisSource.FIRST_ID + b["key_sentence"])


def test_mixed_rows_never_ask_the_value_of_a_conflicting_key():
    _, b = batch("mixed", rows=256)
    (ids, flags, keys, values), (kinds, asked, answers) = parts(b)
    conflicts = 0
    for r in range(len(ids)):
        for question in range(Q):
            found = holders(keys, r, asked[r, question])
            if kinds[r, question] == EmphasisSource.QA:
                assert len(found) == 1 and answers[r, question] == values[r, found[0]]
            else:
                marked = [i for i in found if flags[r, i] == EmphasisSource.MARK] if len(found) == 2 else found
                assert len(marked) == 1 and answers[r, question] == ids[r, marked[0]]
                conflicts += len(found) == 2
    assert 0.1 < conflicts / len(ids) < 0.4
    assert b["inputs"].max() < EmphasisSource.FIRST_ID + N + 2 * S + S * S


def test_bad_sizes_name_the_option():
    with pytest.raises(ValueError, match="seq_len=20 must be 3 \\* num_sentences \\+ 3 \\* num_questions - 1 = 23"):
        make_source("emphasis_qa", batch_size=2, seq_len=20, num_sentences=N, num_symbols=S, num_questions=Q)
    with pytest.raises(ValueError, match="format='qa'"):
        make_source(
            "emphasis_qa", batch_size=2, seq_len=T, num_sentences=N, num_symbols=S, num_questions=Q, format="qa"
        )
    with pytest.raises(ValueError, match="num_sentences must be >= 5"):
        make_source("emphasis_qa", batch_size=2, seq_len=T, num_sentences=4, num_symbols=S, num_questions=Q)
