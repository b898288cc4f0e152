"""The decoder the steering systems are measured on (`python -m eval.steer`): emphasised-sentence recall.

Each row lists 6 three-token sentences `id flag pair(key, value)` and asks 4 questions: which (marked) sentence holds
a key (two sentences hold it in conflict rows, the marked one is meant) or the value of a key (never a conflicting one
in training). At evaluation the last value question asks about a conflicting key, so only steering toward the marked
sentence (PASTA with the given span, or AutoPASTA with the span the model names itself) can decide it (train.data
"emphasis_qa"):

    python -m train --config configs/steer_emphasis.py --workdir runs/steer_emphasis

Hardware: CPU (2 cores) or any accelerator. Expected (measured once on 2 CPU cores shared with other jobs): 1500
steps in 2.6 CPU-minutes (11 minutes wall under that load); eval accuracy 0.97 at the last step (value questions
1.0, which-sentence questions about 0.9).

Presets (`--config configs/steer_emphasis.py:<preset>`):
  smoke  a few steps of a toy model (tests, CI).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The emphasis_qa config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("steer_emphasis", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 1500  # enough for both question formats to be answered
    config.batch_size = 128  # rows per step
    config.seq_len = 29  # 6 sentences of 3 tokens + 4 questions of 3 tokens, less the last answer
    config.log_every = 100
    config.eval_every = 500
    config.checkpoint_every = 500
    config.keep_checkpoints = 1

    model = common.decoder_model(config)
    model.num_layers = 2  # a recall circuit needs two layers
    model.d_model = 64  # width
    model.num_heads = 4  # heads per layer, the units the steering systems select
    model.mlp_dim = 128  # feed-forward width
    model.vocab_size = 90  # 4 specials + 6 ids + 8 keys + 8 values + 64 pairs; must equal the source's vocab
    model.attention_options = {"position": "rope"}  # positions by RoPE (the task needs order)

    config.data.name = "emphasis_qa"  # emphasised-sentence recall (train/data/emphasis.py)
    config.data.num_sentences = 6  # sentences per row (seq_len = 4 x sentences + 2)
    config.data.num_symbols = 8  # keys and values are drawn from 8 symbols each
    config.data.num_questions = 4  # teacher-forced questions per row (the last one is about the key sentence)
    config.data.format = "mixed"  # training: which-sentence rows with a conflict, value rows without

    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.1

    config.eval.num_batches = 4  # 4 x 128 rows per evaluation

    if preset == "smoke":
        config.total_steps = 4
        config.batch_size = 8
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        model.d_model = 32
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 1
    return config
