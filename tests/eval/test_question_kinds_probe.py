"""eval.technique_probes' question_kinds probe: per-kind accuracy of an image-question VLM, checked with a stand-in
model that always answers "yes" (right exactly on the yes/no colour questions whose answer is yes), counted here
from the batch's own words."""

import contextlib
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eval import technique_probes
from train.data import make_source
from train.data.image_questions import TOKEN, WORDS


class AlwaysYes:
    """apply(variables, images [B, H, W, 3], tokens [B, T]) -> logits [B, T, V] whose argmax is "yes" everywhere."""

    def apply(self, variables, images, tokens):
        return jnp.zeros((*tokens.shape, len(WORDS))).at[..., TOKEN["yes"]].set(1.0)


def fake_run(questions):
    config = ml_collections.ConfigDict(dict(data=dict(name="image_questions", questions=questions), seed=0))

    def data(split, *, batch_size, per_process):
        return make_source("image_questions", split=split, batch_size=batch_size, seed=0, questions=questions)

    return types.SimpleNamespace(
        config=config,
        task=types.SimpleNamespace(kind="vlm", model=AlwaysYes()),
        data=data,
        tracing=contextlib.nullcontext,
        model_params={},
    )


def test_accuracy_per_kind_counts_the_rows_of_each_kind():
    questions = ("position", "count", "colour")
    probed = technique_probes.question_kinds(fake_run(questions))
    batch = make_source(
        "image_questions", split="valid", batch_size=technique_probes.PROBE_ROWS, seed=0, questions=questions
    ).next_batch()
    first = np.array([WORDS[row[row > 0][1]] for row in batch["inputs"]])  # the word after <bos>
    yes = batch["targets"][:, -1] == TOKEN["yes"]
    assert probed["accuracy/position"] == 0.0 and probed["accuracy/count"] == 0.0
    assert probed["accuracy/colour"] == pytest.approx(yes[np.isin(first, ["is", "which"])].mean())
    assert probed["accuracy"] == pytest.approx(yes.mean())
    assert 0.2 < probed["accuracy/colour"] < 0.3  # a quarter of the colour questions are answered "yes"
    assert probed["chance/colour"] == 0.375 and probed["chance/position"] == 0.25


def test_only_the_sources_kinds_are_reported_and_other_tasks_are_refused():
    probed = technique_probes.question_kinds(fake_run(("count",)))
    assert set(probed) == {"accuracy", "accuracy/count", "chance/count", "chance/overall"}
    run = fake_run(("count",))
    run.task.kind = "vit"
    with pytest.raises(ValueError, match="probe 'question_kinds' needs a VLM on data 'image_questions'"):
        technique_probes.question_kinds(run)
