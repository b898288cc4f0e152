"""eval.kv on a run trained on "text_passkey" (configs/sparse_long.py): the "passkey" task is that run's own needle in
held-out text, scored on the five answer digits only; a short answer gives the prompt-compressing policies the rest
of their budget for the prompt."""

import dataclasses
import re

import jax
import pytest

from configs import sparse_long
from eval import kv
from train.run import build_run

CONTEXT = 128  # the smoke preset's row: needle and query take 103 bytes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The sparse_long:smoke run at its initial parameters (eval.kv reads a run's model and data, not its training)."""
    built = build_run(sparse_long.get_config("smoke"), str(tmp_path_factory.mktemp("kv_passkey")))
    return dataclasses.replace(built, params=built.init_state(jax.random.key(0)).params)


def test_passkey_rows_hide_the_key_and_weigh_only_its_digits(run):
    batches = kv.task_batches(run, "passkey", rows=2, context=CONTEXT, num_batches=2)
    assert len(batches) == 2
    keys = []
    for batch in batches:
        assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (2, CONTEXT)
        assert (batch["targets"][:, :-1] == batch["inputs"][:, 1:]).all()
        for row in range(2):
            text = bytes(batch["inputs"][row].astype("uint8")).decode("latin-1")
            needle = re.search(r"pass key is (\d{5})\. Remember it", text)
            assert needle is not None, text
            answer = bytes(batch["targets"][row, -5:].astype("uint8")).decode()
            assert answer == needle.group(1)
            assert batch["weights"][row, -5:].tolist() == [1.0] * 5 and batch["weights"][row, :-5].sum() == 0
            keys.append(answer)
    assert len(set(keys)) == 4  # every row its own key


def test_passkey_context_must_be_the_runs_length(run):
    with pytest.raises(ValueError, match="context=64"):
        kv.task_batches(run, "passkey", rows=1, context=64, num_batches=1)


def test_a_short_answer_leaves_the_budget_to_the_prompt():
    assert kv.policy_options("snapkv", 64, 123, 16)["budget"] == 32  # the default split: half and half
    assert kv.policy_options("snapkv", 64, 123, 16, decoded=100)["budget"] == 32
    five = kv.policy_options("snapkv", 64, 123, 16, decoded=5)
    assert (five["budget"], five["decode_budget"]) == (59, 5)


@pytest.mark.slow  # 15-30 s: two decoders compiled for 128 tokens
def test_grid_on_the_passkey_digits_decodes_only_the_answer(run):
    results = kv.run_grid(
        run, ["snapkv"], [0.5], ["passkey"], context=CONTEXT, prompt=CONTEXT - 5, rows=2, num_batches=1, log=len
    )
    full, snap = results
    assert full["task"] == snap["task"] == "passkey" and full["policy"] == "full"
    assert snap["options"]["decode_budget"] == 5 and snap["options"]["budget"] == 59
    assert 0.0 <= snap["accuracy"] <= 1.0 and snap["cache_ratio"] < 0.6
