"""Multi-query associative recall (MQAR, Zoology): a 2-layer decoder must recall the value of each key.

Each sequence lists 8 key-value pairs, then queries every key once; the loss and accuracy count only the
query positions (train.data "mqar" source). Softmax attention solves it with an induction-style circuit;
it is the standard probe of whether a sub-quadratic mechanism can do in-context recall:

    python -m train --config configs/mqar.py --workdir runs/mqar
    python -m train --config configs/mqar.py --workdir runs/mqar_<name> --config.model.attention=<name>

Hardware: CPU (2 cores) or any accelerator. Expected (estimated, not measured): ~5 minutes on 2 CPU cores;
softmax attention reaches eval/accuracy close to 1.0 (chance is 1/128); mechanisms with weak recall
plateau well below it.

Presets (`--config configs/mqar.py:<preset>`):
  smoke  a few steps of a toy model (tests, CI).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The MQAR config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("mqar", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 1500  # long enough for the recall circuit to form
    config.batch_size = 32  # sequences per step
    config.seq_len = 64  # 16 tokens of pairs + 48 with the queries
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 500
    config.keep_checkpoints = 2

    model = common.decoder_model(config)
    model.num_layers = 2  # Zoology's MQAR models are 2 layers
    model.d_model = 64  # Zoology's smallest width
    model.num_heads = 2
    model.mlp_dim = 128
    model.vocab_size = 256  # must equal data.vocab_size

    config.data.name = "mqar"  # multi-query associative recall
    config.data.num_kv_pairs = 8  # pairs to memorise per sequence (needs seq_len >= 4 x pairs)
    config.data.vocab_size = 256  # keys from [1, 128), values from [128, 256)

    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.1

    config.eval.num_batches = 8  # 8 x 32 sequences x 8 queries = 2048 recalls per evaluation

    if preset == "smoke":
        config.total_steps = 4
        config.batch_size = 8
        config.seq_len = 32
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        config.data.num_kv_pairs = 4
        model.d_model = 32
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 2
        config.eval.stats_batch_size = 2
    return config
