"""A small byte-level decoder at a long context, trained on text with hidden passkeys: the model on which
`eval.sparse_quality` swaps in every dynamic sparse system of attn.sparse (quality against density).

Trains a 2-layer, d_model 128 causal transformer (softmax attention with RoPE, 4 heads of 32) on the bytes of the
Python standard library (train.data "text_passkey": half the training rows carry a 5-digit passkey at a random depth,
asked for at the end of the row; the validation split is held-out text):

    python -m train --config configs/sparse_long.py --workdir runs/sparse_long
    python -m eval.sparse_quality --workdir runs/sparse_long

Hardware: CPU (2 cores shared with other jobs). Context length SEQ_LEN bytes (see the constant's comment for the
choice between 2048 and 1024); 400 steps of 4 rows (0.86 CPU-s each, measured) take ~6 CPU-minutes,
~17-20 minutes of wall time on a quiet 2-core machine.
Measured (CPU, 2 cores shared with other jobs at load ~25: 4-12 s of wall time per step): the committed grid
(benchmarks/results/sparse_quality_cpu.json) used the checkpoint of step 221, the run stopped with SIGTERM to leave
the machine to the grid: eval loss 2.049 nats/byte at step 200 (next-byte accuracy 0.476); at that point the model
had not learned the passkey (0 of 8 keys, digits at chance).

Presets (`--config configs/sparse_long.py:<preset>`):
  smoke  a few steps of a 2-layer d_model 32 model at 128 bytes (tests, CI).
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from configs import common

PRESETS = ("", "smoke")
# 1024, not 2048: a training step of 4 rows measured 2.79 CPU-s at 2048 (10.8 s wall at load 10) and 0.86 CPU-s at
# 1024 (2.6 s wall), both above the ~0.5 s that would fit 2048 into the ~8 minutes of CPU the run may take.
SEQ_LEN = 1024


def get_config(arg: str | None = None) -> ConfigDict:
    """The sparse_long config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("sparse_long", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 400  # optimizer steps
    config.batch_size = 4  # 4 rows of SEQ_LEN bytes per step
    config.seq_len = SEQ_LEN  # bytes per row
    config.log_every = 20  # steps between train-metric logs
    config.eval_every = 200  # two evaluations
    config.checkpoint_every = 100  # a restart loses at most 100 steps
    config.keep_checkpoints = 1  # the evaluator reads the latest

    model = common.decoder_model(config)
    model.num_layers = 2  # transformer blocks
    model.d_model = 128  # residual width
    model.num_heads = 4  # 32-wide heads
    model.mlp_dim = 384  # SwiGLU hidden width
    model.vocab_size = 256  # bytes

    config.data.name = "text_passkey"  # stdlib bytes, passkeys in half the training rows
    config.data.path = config_dict.placeholder(str)  # None = the Python standard library sources
    config.data.passkey_rate = 0.5  # share of training rows with a passkey
    config.data.num_digits = 5  # digits of a passkey

    config.optimizer.learning_rate = 3e-3  # as configs/lm_tiny.py
    config.optimizer.warmup_steps = 40  # 10% of the run
    config.optimizer.weight_decay = 0.1  # AdamW decay on matrices

    config.eval.num_batches = 2  # 2 x 4 x SEQ_LEN validation bytes per evaluation
    config.eval.stats_batch_size = 1  # one row for attention entropy / first-key mass

    if preset == "smoke":
        config.total_steps = 2
        config.batch_size = 8  # divisible by the 8 fake CPU devices of the tests
        config.seq_len = 128  # the shortest row that holds a 5-digit needle and query (103 bytes)
        config.log_every = 1
        config.eval_every = 2
        config.checkpoint_every = 2
        model.d_model = 32
        model.num_heads = 2
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 1
    return config
