"""Byte-level decoder LM on the local text corpus: the quick end-to-end check of the whole stack.

Trains a 4-layer, d_model 128 causal transformer (softmax attention with RoPE, 0.89M parameters) on the
bytes of the Python standard library's source files (train.data "text" source, no download), 500 steps
of 16 x 128 bytes.

    python -m train --config configs/lm_tiny.py --workdir runs/lm_tiny
    python -m eval.lm --workdir runs/lm_tiny          # validation loss at 1x, 2x, 4x the training length

Hardware: CPU (2 cores is enough). Expected runtime: under 5 minutes including compilation — a train step
costs 0.48 CPU-seconds (measured), so 500 steps take at most ~4.3 minutes even on a single free core.
Expected result (measured): the training loss falls from 5.5 nats (uniform over 256 bytes) to 4.1 by
step 25 and 1.43 at step 500; the final validation loss is 1.52 nats/byte (perplexity 4.6, next-byte
accuracy 0.60), far below the 3.25-nat unigram entropy of the corpus's bytes. eval.lm at 2x / 4x the
training length: 1.77 / 2.29 nats (RoPE without extension degrades beyond the trained length).
Rerunning the command resumes from the latest checkpoint in the workdir.

Presets (`--config configs/lm_tiny.py:<preset>`):
  smoke  a few steps of a 2-layer d_model 32 model with frequent logs/evals/checkpoints (tests, CI).
  context4  the same model with context parallelism 4: mesh (data = devices / 4, context = 4), each softmax layer's
         sequence split by ring attention (attn.core.context_parallel); on the 8 fake CPU devices of the tests the
         losses equal the data-parallel run's (tests/train/test_context_parallel_training.py).
Any registered causal mechanism: `--config.model.attention=<name>`.
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from configs import common

PRESETS = ("", "smoke", "context4")


def get_config(arg: str | None = None) -> ConfigDict:
    """The lm_tiny config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("lm_tiny", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 500  # <= 4.3 minutes even on ONE core (0.48 CPU-s per step, measured)
    config.batch_size = 16  # 16 x 128 = 2048 tokens per step
    config.seq_len = 128  # bytes per example
    config.log_every = 25  # a smooth-enough loss curve without slowing the loop
    config.eval_every = 250  # two evaluations (250, 500)
    config.checkpoint_every = 250  # a restart loses at most 250 steps (~1-2 minutes)
    config.keep_checkpoints = 2  # the latest two

    model = common.decoder_model(config)
    model.num_layers = 4  # transformer blocks
    model.d_model = 128  # residual width
    model.num_heads = 4  # 32-wide heads
    model.mlp_dim = 384  # SwiGLU hidden width (3x d_model: SwiGLU has three matrices)
    model.vocab_size = 256  # bytes

    config.data.name = "text"  # bytes of local text files
    config.data.path = config_dict.placeholder(str)  # None = the Python standard library sources

    config.optimizer.learning_rate = 3e-3  # small model, short run: a high peak rate
    config.optimizer.warmup_steps = 50  # 10% of the run
    config.optimizer.weight_decay = 0.1  # AdamW decay on matrices

    config.eval.num_batches = 16  # 16 x 16 x 128 = 32k validation bytes per evaluation

    if preset == "smoke":
        config.total_steps = 6  # enough to see a log, an eval and two checkpoints
        config.batch_size = 8  # divisible by 8 fake CPU devices
        config.seq_len = 32
        config.log_every = 2
        config.eval_every = 3
        config.checkpoint_every = 3
        config.keep_checkpoints = 2
        model.num_layers = 2
        model.d_model = 32
        model.num_heads = 2
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 2
        config.eval.num_batches = 2
        config.eval.stats_batch_size = 2
    if preset == "context4":
        config.mesh.shape = (-1, 4)  # data parallel over the rest, 4-way context parallel
        config.mesh.axes = ("data", "context")
        model.attention_options = {"context_parallel": "ring"}  # "ulysses" needs num_heads % 4 == 0
    return config
