"""Long-context answering with citations: procedural L-CiteEval and SummHay tasks, their scorers, and greedy
evaluation of a decoder.

    python -m eval.longcite --task l_citeeval|summhay (--workdir W | --checkpoint HF_DIR)
        [--rows 4] [--passages 6] [--words 12] [--facts 2] [--max_new_tokens 32] [--seed 0] [--max_len N]
        [--noinstruction] [--output benchmarks/results/longcite_<task>_<model>.json]

Tasks (synthetic documents; every planted sentence is known, so "supports" is checked exactly where the papers use an
NLI model (L-CiteEval) or an LLM judge (SummHay)):

- `l_citeeval` (L-CiteEval, Tang et al. 2024, arXiv 2410.02115; its multi-document QA form): numbered passages of
  filler words; `facts` of them each hold one planted fact "The code of <name> is <number>.", `distractors` others a
  fact about another name. The question asks for the planted codes; every sentence of the answer cites passages,
  one "[i]" each. Prompt layout of the official prompts: "Passage [i]: ..." lines, the instruction, "Question: ...",
  "Answer:".
- `summhay` (Summary of a Haystack, Laban et al. 2024, arXiv 2407.01370): numbered articles; each insight of the
  queried subtopic ("On <subtopic>, <name> chose the <item>.") is planted in `repeats` articles, insights of another
  subtopic are distractors. The answer has one insight per line (bullet), each citing its articles "[i][j]". Prompt
  layout of the official news prompt: "Article i:" blocks, then the subtopic, the number of insights and the format.

Scorers (as the official evaluation scripts compute them, with exact support for the NLI / judge):

- L-CiteEval (ALCE's AutoAIS): the response is split into sentences; a sentence's citations are its "[n" markers
  (the first `at_most_citations` = 3); no citation or one out of range -> recall 0 and its citations are not counted;
  else recall 1 when the concatenated cited passages support it. A citation of a supported sentence with several
  citations is precise when it alone supports the sentence or removing it breaks the support; a supported sentence
  with one citation has that one precise. Precision = precise / counted citations, F1 = 2PR / (P + R), per row.
  "Supports": the sentence holds the key words (name, number) of a planted fact whose sentence is in the cited text.
  Answer quality: token precision / recall / F1 (lower case, no punctuation or articles) of the response's first line
  without citations against the asked facts' sentences.
- SummHay: each reference insight is matched to the bullet covering most of its key words (name, item): all ->
  fully covered (1), half or more -> partially covered (0.5), else 0; coverage = mean over insights. Citation score of
  a covered insight: F1 of its bullet's cited articles ("[1]", "[1][2]", "[1, 2]") against the articles holding it;
  citation = mean over covered insights (0 when none is, where the official script gives NaN); joint = mean over
  insights of coverage x citation F1. Scores are fractions in [0, 1] (the papers report x100).

Evaluation decodes greedily with `eval.generate` (`stream_text` for a byte-level run, `stream_checkpoint_text` for a
Hugging Face decoder) from the prompt of `prompt()`. `--max_len` lifts a RoPE checkpoint's maximum length (positions
beyond the trained length extrapolate); it is refused for learned positions.

Fidelity: reconstructed; the metrics checked against the official scripts (ZetangForward/L-CITEEVAL
script/eval_citation.py and eval_correct.py, salesforce/summary-of-a-haystack utils_eval.py, populate_summaries.py,
prompts/), the documents are synthetic rather than the papers' real / LLM-written ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

TASKS = ("l_citeeval", "summhay")
FILLER = (
    "river stone window garden paper winter market bridge candle forest silver harbor meadow lantern orchard canyon "
    "pillow ladder velvet thunder marble basket island feather copper pebble violin tunnel kettle saddle mirror "
    "compass quarry blanket chimney"
).split()
NAMES = (
    "jade ruby amber cobalt ivory onyx coral pearl opal topaz slate umber indigo scarlet olive azure crimson sable "
    "saffron teal"
).split()
ITEMS = "kayak tent canoe stove shovel rope map radio helmet drone sled tripod".split()
SUBTOPICS = ("travel", "budget", "hiring", "security")
AT_MOST_CITATIONS = 3  # L-CiteEval scores the first three citations of a sentence
CITE_EVAL_INSTRUCTION = (
    "Answer the question briefly, using only the passages above (some of them are irrelevant). End every sentence "
    "with the passages that support it, one to three of them, each number in its own brackets, like [1][2], and cite "
    "no more passages than needed."
)


@dataclasses.dataclass(frozen=True)
class Fact:
    """A planted sentence: its text, the key words a statement must hold to claim it, and the 1-based numbers of the
    passages (documents) that contain it."""

    sentence: str
    keys: tuple[str, ...]
    passages: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Example:
    """One row: passages [P] (text, cited as [1]..[P]), the question (SummHay: the query), its subtopic (SummHay;
    "" for L-CiteEval), the asked facts (reference insights), the distractor facts and the reference answer (a
    response that scores 1 on every metric)."""

    task: str
    passages: tuple[str, ...]
    question: str
    facts: tuple[Fact, ...]
    distractors: tuple[Fact, ...]
    reference: str
    subtopic: str = ""


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


def _documents(
    rng: np.random.Generator, count: int, words: int, planted: Sequence[tuple[str, Sequence[int]]]
) -> tuple[str, ...]:
    """`count` passages of `words` filler words; each (sentence, passage indices 0-based) is inserted between two
    filler words of each of its passages at a random position."""
    bodies = [[str(w) for w in rng.choice(FILLER, size=words)] for _ in range(count)]
    for sentence, where in planted:
        for index in where:
            cut = int(rng.integers(0, len(bodies[index]) + 1))
            bodies[index].insert(cut, sentence)
    return tuple(" ".join(body) for body in bodies)


def l_citeeval_example(
    seed: int, *, passages: int = 6, words: int = 12, facts: int = 2, distractors: int = 2
) -> Example:
    """A multi-document QA row: `facts` asked facts and `distractors` facts about other names, each in its own
    passage (distinct passages drawn at random), `words` filler words per passage. Deterministic in `seed`."""
    for name, value, low in (("passages", passages, 1), ("words", words, 0), ("facts", facts, 1)):
        _check_int(name, value, low)
    _check_int("distractors", distractors, 0)
    if facts + distractors > passages:
        raise ValueError(f"passages={passages} must be >= facts + distractors = {facts + distractors}")
    if facts + distractors > len(NAMES):
        raise ValueError(f"facts + distractors = {facts + distractors} must be <= {len(NAMES)} (the names)")
    rng = np.random.default_rng([seed, 204])
    names = [str(n) for n in rng.choice(NAMES, size=facts + distractors, replace=False)]
    codes = [str(c) for c in rng.choice(np.arange(1000, 10000), size=facts + distractors, replace=False)]
    slots = [int(s) for s in rng.choice(passages, size=facts + distractors, replace=False)]
    planted = [Fact(f"The code of {n} is {c}.", (n, c), (s + 1,)) for n, c, s in zip(names, codes, slots, strict=True)]
    texts = _documents(rng, passages, words, [(f.sentence, [f.passages[0] - 1]) for f in planted])
    asked = planted[:facts]
    question = f"What {'is the code' if facts == 1 else 'are the codes'} of {' and '.join(names[:facts])}?"
    reference = " ".join(f"{f.sentence[:-1]} [{f.passages[0]}]." for f in asked)
    return Example("l_citeeval", texts, question, tuple(asked), tuple(planted[facts:]), reference)


def summhay_example(
    seed: int, *, passages: int = 6, words: int = 12, facts: int = 2, distractors: int = 1, repeats: int = 2
) -> Example:
    """A haystack row: `facts` insights of the queried subtopic and `distractors` insights of another, each planted
    in `repeats` distinct documents of `passages` (documents may hold several insights). Deterministic in `seed`."""
    for name, value, low in (("passages", passages, 1), ("words", words, 0), ("facts", facts, 1)):
        _check_int(name, value, low)
    _check_int("distractors", distractors, 0)
    _check_int("repeats", repeats, 1)
    if repeats > passages:
        raise ValueError(f"repeats={repeats} must be <= passages={passages}")
    if facts + distractors > min(len(NAMES), len(ITEMS)):
        raise ValueError(f"facts + distractors = {facts + distractors} must be <= {min(len(NAMES), len(ITEMS))}")
    rng = np.random.default_rng([seed, 205])
    topic, other = (str(t) for t in rng.choice(SUBTOPICS, size=2, replace=False))
    names = [str(n) for n in rng.choice(NAMES, size=facts + distractors, replace=False)]
    items = [str(i) for i in rng.choice(ITEMS, size=facts + distractors, replace=False)]
    planted = []
    for k, (name, item) in enumerate(zip(names, items, strict=True)):
        where = tuple(sorted(int(d) + 1 for d in rng.choice(passages, size=repeats, replace=False)))
        planted.append(Fact(f"On {topic if k < facts else other}, {name} chose the {item}.", (name, item), where))
    texts = _documents(rng, passages, words, [(f.sentence, [p - 1 for p in f.passages]) for f in planted])
    asked = planted[:facts]
    reference = "\n".join(f"- {f.sentence[:-1]} {''.join(f'[{p}]' for p in f.passages)}." for f in asked)
    query = f"What did the team decide on {topic}?"
    return Example("summhay", texts, query, tuple(asked), tuple(planted[facts:]), reference, subtopic=topic)


def examples(task: str, rows: int, seed: int = 0, **sizes: int) -> list[Example]:
    """`rows` rows of `task` (row i from seed + i); `sizes` go to the task's generator."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be one of {TASKS}")
    _check_int("rows", rows, 1)
    make = l_citeeval_example if task == "l_citeeval" else summhay_example
    return [make(seed + i, **sizes) for i in range(rows)]


def prompt(example: Example, *, instruction: bool = True) -> str:
    """The prompt in the layout of the official prompts (wording ours). L-CiteEval: "Passage [i]: ..." lines, the
    instruction, "Question: ...", "Answer:". SummHay: "Article i:" blocks between the topic line and the subtopic,
    insight count and format request, then "Summary:". Without the instruction: the passages, the question (query)
    and the cue only."""
    if example.task == "l_citeeval":
        body = "".join(f"Passage [{i}]: {text}\n" for i, text in enumerate(example.passages, 1))
        middle = f"\n{CITE_EVAL_INSTRUCTION}\n" if instruction else ""
        return f"{body}{middle}\nQuestion: {example.question}\nAnswer:"
    body = "".join(f"Article {i}:\n{text}\n\n" for i, text in enumerate(example.passages, 1))
    if not instruction:
        return f"{body}Query: {example.question}\nSummary:"
    return (
        f"Below are {len(example.passages)} articles about the decisions of a team.\n\n{body}Some of them discuss "
        f'"{example.subtopic}" ({example.question}). Summarize the {len(example.facts)} insights they give on it: '
        "one insight per bullet point, one sentence each, ending with the numbers of all the articles that state it, "
        "each in its own brackets, like [2][5].\n\nSummary:"
    )


# ------------------------------------------------------------------------------------------------------------ scoring
def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def remove_citations(text: str) -> str:
    """`text` without its citation markers ("[3]", "[3, 4]")."""
    return re.sub(r"\s*\[[\d,\s]*\]?", "", text)


def sentence_citations(sentence: str) -> list[int]:
    """The passage numbers a sentence cites as L-CiteEval reads them: every "[n" in order, repeats kept (so "[2, 5]"
    cites 2 only)."""
    return [int(n) for n in re.findall(r"\[(\d+)", sentence)]


def bullet_citations(bullet: str) -> set[int]:
    """The article numbers a bullet cites as SummHay reads them: every number inside "[...]" ("[1][4]", "[1, 4]")."""
    return {int(n) for group in re.findall(r"\[([\d, ]+)\]", bullet) for n in group.split(",") if n.strip()}


def statements(response: str) -> list[str]:
    """The sentences of `response` (split after ".", "!", "?" followed by a space, and at line breaks; the papers use
    NLTK's sentence tokenizer), citations right after the full stop ("... is 5. [3]") kept with their sentence."""
    parts = re.split(r"(?<=[.!?])\s+(?!\[)|\n+", response.strip())
    return [part.strip() for part in parts if remove_citations(part).strip(" .")]


def bullets(response: str) -> list[str]:
    """The bullets of a summary: its non-empty lines (as SummHay splits them), a leading "-", "*" or bullet sign
    removed."""
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    return [line[1:].strip() if line[:1] in ("-", "*", "\u2022") else line for line in lines]


def supported(statement: str, cited: Sequence[int], example: Example) -> bool:
    """Whether the concatenation of the cited passages (1-based, in range) supports `statement`: some planted fact
    (asked or distractor) whose key words all occur in the statement has its sentence in the cited text."""
    text = "\n".join(example.passages[i - 1] for i in cited)
    words = _words(remove_citations(statement))
    return any(set(fact.keys) <= words and fact.sentence in text for fact in (*example.facts, *example.distractors))


def citation_scores(response: str, example: Example, *, at_most_citations: int = AT_MOST_CITATIONS) -> dict[str, float]:
    """L-CiteEval's citation recall, precision and F1 of `response` (see the module docstring); a response without
    a sentence scores 0 (the official script skips it)."""
    recalled, precise, total = 0, 0, 0
    parts = statements(response)
    for statement in parts:
        cited = sentence_citations(statement)[:at_most_citations]
        if not cited or any(not 1 <= c <= len(example.passages) for c in cited):
            continue  # recall 0; the citations are not counted
        total += len(cited)
        if not supported(statement, cited, example):
            continue
        recalled += 1
        if len(cited) == 1:
            precise += 1
            continue
        for k, c in enumerate(cited):
            rest = cited[:k] + cited[k + 1 :]
            if supported(statement, [c], example) or not supported(statement, rest, example):
                precise += 1
    recall = recalled / len(parts) if parts else 0.0
    precision = precise / total if total else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"citation_recall": recall, "citation_precision": precision, "citation_f1": f1}


def normalize_answer(text: str) -> list[str]:
    """The tokens of `text` for answer F1: lower case, punctuation and the articles a / an / the removed."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def answer_scores(response: str, example: Example) -> dict[str, float]:
    """Token precision, recall and F1 of the response's first line (citations removed) against the asked facts'
    sentences."""
    lines = response.strip().split("\n")
    predicted = normalize_answer(remove_citations(lines[0]))
    gold = normalize_answer(" ".join(f.sentence for f in example.facts))
    same = sum((Counter(predicted) & Counter(gold)).values())
    if same == 0:
        return {"answer_precision": 0.0, "answer_recall": 0.0, "answer_f1": 0.0}
    precision, recall = same / len(predicted), same / len(gold)
    return {
        "answer_precision": precision,
        "answer_recall": recall,
        "answer_f1": 2 * precision * recall / (precision + recall),
    }


def l_citeeval_scores(response: str, example: Example) -> dict[str, float]:
    """Citation recall / precision / F1 and answer precision / recall / F1 of `response`."""
    return {**citation_scores(response, example), **answer_scores(response, example)}


def summhay_scores(response: str, example: Example) -> dict[str, float]:
    """SummHay coverage, citation and joint scores of `response` (see the module docstring)."""
    points = [(_words(remove_citations(b)), bullet_citations(b)) for b in bullets(response)]
    coverages, f1s = [], []
    for fact in example.facts:
        best, cited = 0.0, set()
        for words, cites in points:
            share = sum(k in words for k in fact.keys) / len(fact.keys)
            level = 1.0 if share == 1 else 0.5 if share >= 0.5 else 0.0
            if level > best:
                best, cited = level, cites
        coverages.append(best)
        if best > 0:
            hits = len(cited & set(fact.passages))
            p = hits / len(cited) if cited else 0.0
            r = hits / len(fact.passages)
            f1s.append(2 * p * r / (p + r) if p + r else 0.0)
        else:
            f1s.append(None)
    covered = [f for f in f1s if f is not None]
    return {
        "coverage": float(np.mean(coverages)),
        "citation": float(np.mean(covered)) if covered else 0.0,
        "joint": float(np.mean([c * (f or 0.0) for c, f in zip(coverages, f1s, strict=True)])),
    }


def score(response: str, example: Example) -> dict[str, float]:
    """The scores of `response` for `example`'s task."""
    return (l_citeeval_scores if example.task == "l_citeeval" else summhay_scores)(response, example)


# ---------------------------------------------------------------------------------------------------------- evaluation
def evaluate(generate: Callable[[str], str], rows: Sequence[Example], *, instruction: bool = True) -> dict[str, Any]:
    """Scores `generate(prompt) -> response` on every row: {"mean": {metric: mean}, "rows": [{question, response,
    scores, reference_scores}]} (reference_scores: the reference answer's, 1 on every metric)."""
    if not rows:
        raise ValueError("rows=[] is empty; give at least one example (see `examples`)")
    records = []
    for example in rows:
        response = generate(prompt(example, instruction=instruction))
        records.append(
            {
                "question": example.question,
                "response": response,
                "scores": score(response, example),
                "reference": example.reference,
                "reference_scores": score(example.reference, example),
            }
        )
    metrics = records[0]["scores"].keys()
    return {"mean": {m: float(np.mean([r["scores"][m] for r in records])) for m in metrics}, "rows": records}


def checkpoint_generator(
    path: str, max_new_tokens: int, max_len: int | None = None
) -> tuple[Callable[[str], str], dict[str, Any]]:
    """(greedy generate(prompt) -> text, a description) of the Hugging Face decoder at `path`; max_len lifts its
    maximum length (RoPE checkpoints only). Continuations stop at the maximum length."""
    from .generate import stream_checkpoint_text
    from .kv import load_checkpoint

    model, params, tokenizer, hf_config = load_checkpoint(path)
    trained = model.max_len
    if max_len is not None:
        _check_int("max_len", max_len, 2)
        if model.position_embedding == "learned":
            raise ValueError(f"max_len={max_len}: checkpoint={path!r} has {trained} learned positions; it cannot grow")
        model = model.clone(max_len=max_len)

    def generate(text: str) -> str:
        room = model.max_len - len(tokenizer.encode(text).ids)
        if room < 1:
            raise ValueError(
                f"the prompt needs {model.max_len - room} tokens, the checkpoint holds {model.max_len}; use fewer "
                "--passages / --words, --noinstruction, or --max_len (RoPE checkpoints)"
            )
        pieces = stream_checkpoint_text(model, params, tokenizer, text, min(max_new_tokens, room), temperature=0.0)
        return "".join(pieces)

    name = os.path.basename(os.path.normpath(path))
    arch = (hf_config.get("architectures") or [hf_config.get("model_type")])[0]
    return generate, {"model": name, "architecture": arch, "trained_max_len": trained, "max_len": model.max_len}


def run_generator(workdir: str, max_new_tokens: int) -> tuple[Callable[[str], str], dict[str, Any]]:
    """(greedy generate(prompt) -> text, a description) of the byte-level decoder run in `workdir`."""
    from .generate import stream_text
    from .lm import open_run

    run = open_run(workdir)

    def generate(text: str) -> str:
        return "".join(stream_text(run, text, max_new_tokens, temperature=0.0))

    return generate, {"model": os.path.basename(os.path.normpath(workdir)), "step": run.step}


def main(argv: Sequence[str]) -> None:
    """Entry point of `python -m eval.longcite` (flags are defined below, only when run as a program)."""
    import jax
    from absl import flags

    from .lm import quiet_logs

    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])}")
    args = flags.FLAGS
    if (args.workdir is None) == (args.checkpoint is None):
        raise SystemExit(
            "error: give exactly one of --workdir (a training run) and --checkpoint (a Hugging Face model)"
        )
    quiet_logs()
    sizes = {"passages": args.passages, "words": args.words, "facts": args.facts}
    try:
        rows = examples(args.task, args.rows, args.seed, **sizes)
        if args.checkpoint is not None:
            generate, record = checkpoint_generator(args.checkpoint, args.max_new_tokens, args.max_len)
        else:
            generate, record = run_generator(args.workdir, args.max_new_tokens)
        result = evaluate(generate, rows, instruction=args.instruction)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    report = {
        "task": args.task,
        **record,
        "num_rows": args.rows,
        "seed": args.seed,
        "sizes": sizes,
        "instruction": args.instruction,
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy",
        "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores visible)",
        **result,
    }
    output = args.output or os.path.join("benchmarks", "results", f"longcite_{args.task}_{record['model']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(json.dumps(report["mean"]))
    print(f"wrote {output}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum("task", None, list(TASKS), "Which benchmark to generate and score.")
    flags.DEFINE_string("workdir", None, "Byte-level decoder run directory (or give --checkpoint).")
    flags.DEFINE_string("checkpoint", None, "Hugging Face decoder directory (or give --workdir).")
    flags.DEFINE_integer("rows", 4, "Rows (examples) to generate and score.", lower_bound=1)
    flags.DEFINE_integer("passages", 6, "Passages (documents) per row.", lower_bound=1)
    flags.DEFINE_integer("words", 12, "Filler words per passage.", lower_bound=0)
    flags.DEFINE_integer("facts", 2, "Asked facts (insights) per row.", lower_bound=1)
    flags.DEFINE_integer("max_new_tokens", 32, "Greedy tokens (bytes for --workdir) generated per row.", lower_bound=1)
    flags.DEFINE_integer("max_len", None, "--checkpoint with RoPE: lift the maximum length to this many tokens.")
    flags.DEFINE_integer("seed", 0, "Row i is generated from seed + i.")
    flags.DEFINE_bool("instruction", True, "Start the prompt with the task instruction.")
    flags.DEFINE_string("output", None, "JSON path (default benchmarks/results/longcite_<task>_<model>.json).")
    for name in ("max_new_tokens", "max_len"):
        flags.DEFINE_alias(name.replace("_", "-"), name)
    flags.mark_flags_as_required(["task"])
    app.run(main)
