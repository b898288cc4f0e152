"""Fine-tuning from a checkpoint: config.init_from (a Hugging Face directory or a workdir), config.trainable /
config.frozen, config.save_hf, the tokenized_text source and configs/finetune.py.

Fast tests check the pieces (grafting, masks, config checks, model agreement); the slow ones train the tiny Llama
fixture through the trainer: step-0 parameters equal the checkpoint's bit for bit, frozen parameters stay bit-equal
while the others move, a resume stays bit-exact, save_hf writes what was trained, a workdir serves as init_from."""

import os

import jax
import numpy as np
import optax
import pytest
from tokenizers import Tokenizer

from attn import pretrained
from configs import finetune
from train import config_checks, optim, trainer
from train import run as run_api
from train.checkpointing import Checkpointer
from train.config_checks import ConfigError
from train.data import load_corpus, make_source
from train.state import graft_params

LLAMA = finetune.DEFAULT_CHECKPOINT
RNG = np.random.default_rng(0)


def _tree(shapes):
    return {name: {"kernel": RNG.standard_normal(shape).astype(np.float32)} for name, shape in shapes.items()}


# --- pieces -------------------------------------------------------------------------------------------------------


def test_graft_copies_the_checkpoint_bit_for_bit_and_lists_what_it_lacks():
    fresh = _tree({"a": (3, 2), "b": (4,), "extra": (2, 2)})
    loaded = _tree({"a": (3, 2), "b": (4,), "unused": (5,)})
    grafted, missing, unused = graft_params(fresh, loaded)
    assert np.array_equal(grafted["a"]["kernel"], loaded["a"]["kernel"])
    assert np.array_equal(grafted["b"]["kernel"], loaded["b"]["kernel"])
    assert grafted["extra"]["kernel"] is fresh["extra"]["kernel"]  # kept as initialised
    assert missing == ["extra/kernel"] and unused == ["unused/kernel"]


def test_graft_refuses_a_shape_mismatch_naming_the_path_and_both_shapes():
    with pytest.raises(ValueError, match=r"a/kernel has shape \(2, 3\) but the model's is \(3, 2\)"):
        graft_params(_tree({"a": (3, 2)}), _tree({"a": (2, 3)}))


def test_frozen_parameters_get_no_update_while_the_others_move():
    params = {"layer": {"feature_map": {"kernel": np.ones((2, 3), np.float32)}, "query": {"kernel": np.ones((3,))}}}
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    tx, _ = optim.make_optimizer({"learning_rate": 0.1, "weight_decay": 0.1, "clip_norm": 1.0}, 10)
    tx = optim.freeze_parameters(tx, trainable=("feature_map",))

    @jax.jit
    def step(current, state, grads):
        updates, state = tx.update(grads, state, current)
        return optax.apply_updates(current, updates), state

    current, state = params, tx.init(params)
    for _ in range(3):
        current, state = step(current, state, jax.tree.map(lambda x: RNG.standard_normal(x.shape), params))
    assert np.array_equal(current["layer"]["query"]["kernel"], params["layer"]["query"]["kernel"])
    assert not np.allclose(current["layer"]["feature_map"]["kernel"], params["layer"]["feature_map"]["kernel"])
    # `frozen` removes what `trainable` selects; no pattern leaves the optimizer untouched.
    mask = optim.trainable_mask(params, trainable=("layer",), frozen=("query",))
    assert mask == {"layer": {"feature_map": {"kernel": True}, "query": {"kernel": False}}}
    assert optim.freeze_parameters(tx) is tx


@pytest.mark.parametrize(
    ("trainable", "frozen", "message"),
    [
        (("feature_mapp",), (), r"trainable pattern 'feature_mapp' matches no parameter path"),
        ((), ("[",), r"frozen pattern '\[' is no valid regular expression"),
        ((), ("kernel",), r"leave no parameter to train"),
    ],
)
def test_bad_patterns_are_named(trainable, frozen, message):
    params = {"feature_map": {"kernel": np.zeros((2, 2))}, "query": {"kernel": np.zeros((2,))}}
    with pytest.raises(ValueError, match=message):
        optim.check_freeze_patterns(params, trainable, frozen)
    assert optim.check_freeze_patterns(params, ("feature_map",)) == (1, 2)  # 1 array of 2 scalars frozen


def test_config_checks_name_a_bad_init_from_and_save_hf(tmp_path):
    with pytest.raises(ConfigError, match="init_from=.*nowhere.* is neither a Hugging Face model directory"):
        trainer.init_source_kind(str(tmp_path / "nowhere"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert trainer.init_source_kind(LLAMA) == "hf" and trainer.init_source_kind(str(tmp_path / "run")) == "workdir"
    with pytest.raises(ConfigError, match="save_hf=True needs a Hugging Face init_from"):
        trainer.init_source_kind(str(tmp_path / "run"), save_hf=True)
    config = finetune.get_config("smoke")
    config.init_from = ""
    with pytest.raises(ConfigError, match="save_hf=True needs init_from"):
        config_checks.check_config(config)
    config = {**finetune.get_config("smoke").to_dict(), "trainable": "feature_map"}
    with pytest.raises(ConfigError, match="trainable='feature_map' must be a list of regexes"):
        config_checks.check_config(config)


def test_model_differences_from_the_checkpoint_are_named():
    from train import tasks

    hf_model, _, _, _ = pretrained.load(LLAMA)
    config = finetune.get_config("swap")
    swapped = tasks.build_task(config.model).model
    assert trainer.hf_model_differences(swapped, hf_model) == []  # swapping attention is allowed
    assert trainer.hf_model_differences(swapped, hf_model, attention=True) == [
        "attention[1]='hedgehog' (checkpoint: 'softmax')"
    ]
    config.model.mlp_dim = 96
    config.model.attention_options.rope_base = 500.0
    differences = trainer.hf_model_differences(tasks.build_task(config.model).model, hf_model)
    assert differences[0] == "mlp_dim=96 (checkpoint: 80)"
    assert differences[1].startswith("attention_options[0]={'position': 'rope', 'rope_base': 500.0}")


def test_finetune_presets_and_arguments():
    swap = finetune.get_config("swap")
    assert tuple(swap.model.attention) == ("softmax", "hedgehog") and swap.init_from == LLAMA
    hedgehog = finetune.get_config("smoke,hedgehog,path=" + LLAMA)
    assert hedgehog.model.attention == "hedgehog" and hedgehog.model.attention_options.distill
    assert tuple(hedgehog.trainable) == ("feature_map",) and not hedgehog.save_hf and hedgehog.seq_len == 16
    assert hedgehog.data.name == "tokenized_text" and hedgehog.model.vocab_size == 320
    with pytest.raises(ValueError, match="unknown preset 'linear'"):
        finetune.get_config("linear")
    with pytest.raises(ValueError, match="names two presets"):
        finetune.get_config("swap,hedgehog")


def test_tokenized_text_is_the_tokenizers_encoding_of_the_corpus():
    source = make_source(
        "tokenized_text", split="valid", batch_size=2, seq_len=8, tokenizer=LLAMA, max_bytes=4096, seed=0
    )
    batch = source.next_batch()
    data = bytes(load_corpus(None).valid[:4096])
    first_file = data.split(b"\x00")[0].decode("utf-8", errors="replace")
    expected = Tokenizer.from_file(os.path.join(LLAMA, "tokenizer.json")).encode(first_file).ids[:17]
    assert source.vocab_size == 320
    assert batch["inputs"].tolist() == [expected[0:8], expected[8:16]]
    assert batch["targets"].tolist() == [expected[1:9], expected[9:17]]
    with pytest.raises(ValueError, match="needs data.tokenizer"):
        make_source("tokenized_text", split="valid", batch_size=2, seq_len=8)


# --- through the trainer (slow: each compiles the model) ------------------------------------------------------------


def _config(preset, **changes):
    config = finetune.get_config(preset + ",smoke")
    config.total_steps = 4
    config.checkpoint_every = 2
    config.log_every = 2
    config.eval_every = 0
    config.eval.stats_batch_size = 0
    config.eval.num_batches = 1
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _step0_params(config, workdir):
    """The train state's parameters after restore_or_init (no train step compiled)."""
    s = trainer.setup(config, workdir)
    layout = trainer.layout_state(s)
    with Checkpointer(os.path.join(s.workdir, "checkpoints"), keep=1, save_every=1) as checkpointer:
        state, _, _ = trainer.restore_or_init(s, layout, checkpointer)
    return jax.device_get(state.params)


def _equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


@pytest.mark.slow
def test_init_from_gives_the_checkpoint_parameters_at_step_0(tmp_path):
    _, loaded, _, _ = pretrained.load(LLAMA)
    assert _equal(_step0_params(_config(""), str(tmp_path / "a")), jax.device_get(loaded))
    config = _config("")
    config.model.mlp_dim = 96
    with pytest.raises(ConfigError, match=r"config.model differs from the checkpoint's model: mlp_dim=96"):
        _step0_params(config, str(tmp_path / "b"))


@pytest.mark.slow
def test_frozen_stay_bit_equal_resume_is_bit_exact_and_save_hf_reloads(tmp_path):
    _, loaded, _, _ = pretrained.load(LLAMA)
    loaded = jax.device_get(loaded)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_api.train(_config("hedgehog"), straight)
    run_api.train(_config("hedgehog"), split, stop_at_step=2)
    run_api.train(_config("hedgehog"), split)  # resumes at 2: its own checkpoint wins over init_from
    trained = jax.device_get(run_api.load_run(straight).params)
    assert _equal(trained, jax.device_get(run_api.load_run(split).params))
    for i in range(2):
        layer, start = trained[f"layers_{i}"]["attention"], loaded[f"layers_{i}"]["attention"]
        for name in ("query", "key", "value", "out"):
            assert np.array_equal(layer[name]["kernel"], start[name]["kernel"])
        assert not np.allclose(layer["query_feature_map"]["kernel"], np.eye(12))
    assert _equal(
        {k: v for k, v in trained.items() if not k.startswith("layers")},
        {k: v for k, v in loaded.items() if not k.startswith("layers")},
    )

    full = str(tmp_path / "full")
    run_api.train(_config(""), full)
    finished = jax.device_get(run_api.load_run(full).params)
    _, reloaded, _, _ = pretrained.load(os.path.join(full, "hf"))
    assert _equal(jax.device_get(reloaded), finished)
    assert not np.array_equal(finished["lm_head"]["kernel"], loaded["lm_head"]["kernel"])
    # Another run's workdir as init_from: its latest parameters, bit for bit.
    assert _equal(_step0_params(_config("", init_from=full, save_hf=False), str(tmp_path / "again")), finished)
