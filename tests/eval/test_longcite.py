"""eval.longcite: the L-CiteEval and SummHay generators (deterministic, facts planted where recorded), the scorers
against hand-computed cases, and a one-row greedy run on a tiny Hugging Face fixture."""

import os

import pytest

from eval import longcite
from eval.longcite import Example, Fact

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")


@pytest.mark.parametrize("task", longcite.TASKS)
def test_generators_are_deterministic_in_the_seed(task):
    first = longcite.examples(task, 3, seed=5)
    assert first == longcite.examples(task, 3, seed=5)
    assert first[1] == longcite.examples(task, 1, seed=6)[0]  # row i comes from seed + i
    assert first[0] != first[1]
    assert first != longcite.examples(task, 3, seed=6)


@pytest.mark.parametrize("task", longcite.TASKS)
def test_planted_passages_hold_the_facts_and_no_other_passage_does(task):
    for example in longcite.examples(task, 4, seed=1, passages=7, words=9, facts=3):
        assert len(example.passages) == 7 and len(example.facts) == 3
        for fact in (*example.facts, *example.distractors):
            holding = [i + 1 for i, text in enumerate(example.passages) if fact.sentence in text]
            assert tuple(holding) == fact.passages
            for key in fact.keys:  # the key words occur nowhere else (no filler word or other fact shares them)
                others = [t for i, t in enumerate(example.passages) if i + 1 not in fact.passages]
                assert all(key not in t.split(" ") and f"{key}." not in t for t in others)
        for fact in example.facts:
            assert fact.keys[0] in example.question or task == "summhay"
        text = longcite.prompt(example)
        for i, passage in enumerate(example.passages, 1):
            assert (f"Passage [{i}]: {passage}\n" if task == "l_citeeval" else f"Article {i}:\n{passage}\n\n") in text
        assert example.question in text and text.endswith("Answer:" if task == "l_citeeval" else "Summary:")


def test_summhay_plants_each_insight_in_repeats_documents_and_queries_its_subtopic():
    example = longcite.summhay_example(2, passages=8, facts=3, distractors=2, repeats=3)
    topic = example.question.removeprefix("What did the team decide on ").removesuffix("?")
    for fact in example.facts:
        assert len(fact.passages) == 3 and fact.sentence.startswith(f"On {topic}, ")
    for fact in example.distractors:
        assert len(fact.passages) == 3 and not fact.sentence.startswith(f"On {topic}, ")


def test_bad_sizes_raise_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="task='x'"):
        longcite.examples("x", 1)
    with pytest.raises(ValueError, match="rows=0"):
        longcite.examples("summhay", 0)
    with pytest.raises(ValueError, match="passages=3 must be >= facts"):
        longcite.l_citeeval_example(0, passages=3, facts=2, distractors=2)
    with pytest.raises(ValueError, match="repeats=4 must be <= passages=3"):
        longcite.summhay_example(0, passages=3, repeats=4)
    with pytest.raises(ValueError, match=r"rows=\[\] is empty"):
        longcite.evaluate(str, [])


def _cite_example():
    """Three passages: [1] holds the code of jade, [2] the code of ruby, [3] only filler."""
    return Example(
        task="l_citeeval",
        passages=("river The code of jade is 1111. stone", "The code of ruby is 2222. paper", "window garden"),
        question="What are the codes of jade and ruby?",
        facts=(
            Fact("The code of jade is 1111.", ("jade", "1111"), (1,)),
            Fact("The code of ruby is 2222.", ("ruby", "2222"), (2,)),
        ),
        distractors=(),
        reference="The code of jade is 1111 [1]. The code of ruby is 2222 [2].",
    )


def test_citations_and_statements_parse_as_the_official_scripts():
    assert longcite.sentence_citations("a [2][5] b [2, 7]") == [2, 5, 2]  # L-CiteEval reads "[n"
    assert longcite.bullet_citations("a [2][5] b [2, 7]") == {2, 5, 7}  # SummHay reads every number in brackets
    assert longcite.remove_citations("A is 1 [1][2]. B [3, 4].") == "A is 1. B."
    assert longcite.statements("A is 1 [1]. B is 2. [2]\nC [3]") == ["A is 1 [1].", "B is 2. [2]", "C [3]"]
    assert longcite.bullets("intro\n- one [1]\n\n* two\n") == ["intro", "one [1]", "two"]


def test_l_citeeval_perfect_answer_scores_one():
    example = _cite_example()
    assert longcite.score(example.reference, example) == {
        "citation_recall": 1.0,
        "citation_precision": 1.0,
        "citation_f1": 1.0,
        "answer_precision": 1.0,
        "answer_recall": 1.0,
        "answer_f1": 1.0,
    }
    for generated in longcite.examples("l_citeeval", 3):
        assert set(longcite.score(generated.reference, generated).values()) == {1.0}


def test_l_citeeval_an_extra_citation_lowers_precision_as_alce_says():
    # Statement 1 cites [1] (supports alone: precise) and [3] (not alone, and [1] still supports without it:
    # irrelevant); statement 2 cites [2] (precise). Recall 2/2, precision 2/3, F1 = 2 * (2/3) * 1 / (2/3 + 1) = 0.8.
    scores = longcite.score("The code of jade is 1111 [1][3]. The code of ruby is 2222 [2].", _cite_example())
    assert scores["citation_recall"] == 1.0
    assert scores["citation_precision"] == pytest.approx(2 / 3)
    assert scores["citation_f1"] == pytest.approx(0.8)


def test_l_citeeval_a_wrong_citation_unsupports_its_statement():
    # Statement 1 cites [2], which does not hold jade's code: recall 0 and its citation imprecise; statement 2 is
    # supported by [2]. Recall 1/2, precision 1/2, F1 1/2; the text is the reference's, so the answer scores 1.
    scores = longcite.score("The code of jade is 1111 [2]. The code of ruby is 2222 [2].", _cite_example())
    assert scores == pytest.approx(
        {
            "citation_recall": 0.5,
            "citation_precision": 0.5,
            "citation_f1": 0.5,
            "answer_precision": 1.0,
            "answer_recall": 1.0,
            "answer_f1": 1.0,
        }
    )
    # An uncited statement has recall 0 and adds no citation; a wrong code is supported by nothing. Answer tokens
    # (no "the"): 9 of the 10 predicted ("code of jade is 1111 code of ruby is 9999") are among the 10 gold ones.
    scores = longcite.score("The code of jade is 1111. The code of ruby is 9999 [2].", _cite_example())
    assert scores == pytest.approx(
        {
            "citation_recall": 0.0,
            "citation_precision": 0.0,
            "citation_f1": 0.0,
            "answer_precision": 0.9,
            "answer_recall": 0.9,
            "answer_f1": 0.9,
        }
    )


def test_l_citeeval_out_of_range_and_fourth_citations_are_not_counted():
    # Statement 1 cites passage 9 of 3: recall 0 and its citations are dropped; statement 2 is supported by [2].
    # Recall 1/2, precision 1/1, F1 2 * (1/2) * 1 / (3/2) = 2/3.
    scores = longcite.citation_scores("The code of jade is 1111 [1][9]. The code of ruby is 2222 [2].", _cite_example())
    assert scores == pytest.approx({"citation_recall": 0.5, "citation_precision": 1.0, "citation_f1": 2 / 3})
    # Only [1][3][3] of [1][3][3][2] count: [1] is precise, each [3] is not ([1] alone supports); with [2] of the
    # second statement, precision 2/4, recall 1, F1 2/3.
    scores = longcite.citation_scores(
        "The code of jade is 1111 [1][3][3][2]. The code of ruby is 2222 [2].", _cite_example()
    )
    assert scores == pytest.approx({"citation_recall": 1.0, "citation_precision": 0.5, "citation_f1": 2 / 3})


def _haystack_example():
    """Insight A (jade, kayak) in documents 1 and 2, insight B (ruby, tent) in documents 3 and 4."""
    a, b = "On travel, jade chose the kayak.", "On travel, ruby chose the tent."
    return Example(
        task="summhay",
        passages=(f"river {a}", f"{a} stone", f"{b} paper", f"window {b}", "garden"),
        question="What did the team decide on travel?",
        facts=(Fact(a, ("jade", "kayak"), (1, 2)), Fact(b, ("ruby", "tent"), (3, 4))),
        distractors=(),
        reference="- jade chose the kayak [1][2]\n- ruby chose the tent [3][4]",
    )


def test_summhay_perfect_summary_scores_one():
    example = _haystack_example()
    assert longcite.score(example.reference, example) == {"coverage": 1.0, "citation": 1.0, "joint": 1.0}
    for generated in longcite.examples("summhay", 3):
        assert set(longcite.score(generated.reference, generated).values()) == {1.0}


def test_summhay_partial_coverage_and_wrong_citations_by_hand():
    # A: fully covered (1) by bullet 1 citing {1, 3}: precision 1/2, recall 1/2, F1 1/2.
    # B: half its key words (ruby) in bullet 2 -> partially covered (0.5); cites {3}: precision 1, recall 1/2, F1 2/3.
    # coverage (1 + 0.5) / 2; citation (1/2 + 2/3) / 2; joint (1 * 1/2 + 0.5 * 2/3) / 2.
    scores = longcite.score("- jade chose the kayak [1, 3]\n- ruby chose a boat [3]", _haystack_example())
    assert scores == pytest.approx(
        {"coverage": 0.75, "citation": (1 / 2 + 2 / 3) / 2, "joint": (1 / 2 + 0.5 * 2 / 3) / 2}
    )
    assert longcite.score("- nothing relevant [1]", _haystack_example()) == {
        "coverage": 0.0,
        "citation": 0.0,
        "joint": 0.0,
    }


def test_a_prompt_longer_than_the_checkpoint_raises_value_error():
    generate, record = longcite.checkpoint_generator(os.path.join(FIXTURES, "gpt2"), 4)
    assert record == {"model": "gpt2", "architecture": "GPT2LMHeadModel", "trained_max_len": 64, "max_len": 64}
    with pytest.raises(ValueError, match="the prompt needs .* tokens, the checkpoint holds 64"):
        generate(longcite.prompt(longcite.examples("l_citeeval", 1)[0]))


@pytest.mark.slow
def test_one_row_greedy_run_on_a_llama_fixture():
    generate, record = longcite.checkpoint_generator(os.path.join(FIXTURES, "llama"), 4, max_len=160)
    assert record["max_len"] == 160 and record["trained_max_len"] == 64
    rows = longcite.examples("summhay", 1, passages=2, words=2, facts=1, distractors=0, repeats=1)
    result = longcite.evaluate(generate, rows, instruction=False)
    (row,) = result["rows"]
    assert isinstance(row["response"], str) and row["response"]
    assert row["scores"] == longcite.score(row["response"], rows[0]) == result["mean"]
    assert row["reference_scores"] == {"coverage": 1.0, "citation": 1.0, "joint": 1.0}


def test_max_len_is_refused_for_learned_positions():
    with pytest.raises(ValueError, match="max_len=128: checkpoint=.*64 learned positions"):
        longcite.checkpoint_generator(os.path.join(FIXTURES, "gpt2"), 4, max_len=128)


@pytest.mark.slow
def test_one_row_greedy_run_on_a_byte_level_run(tmp_path):
    from configs import lm_tiny
    from train import trainer

    config = lm_tiny.get_config("smoke")
    config.total_steps = 2
    trainer.run(config, str(tmp_path))
    generate, record = longcite.run_generator(str(tmp_path), 6)
    assert record == {"model": os.path.basename(tmp_path), "step": 2}
    rows = longcite.examples("l_citeeval", 1, passages=2, words=2, facts=1, distractors=1)
    result = longcite.evaluate(generate, rows, instruction=False)
    (row,) = result["rows"]
    assert len(row["response"].encode("utf-8", errors="replace")) >= 1
    assert row["scores"] == longcite.score(row["response"], rows[0]) == result["mean"]
