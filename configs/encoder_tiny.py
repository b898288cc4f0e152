"""Tiny bidirectional encoder trained with masked language modelling on bytes of the local text corpus.

15% of the bytes are chosen for prediction (BERT's 80/10/10 mask/random/keep), loss and accuracy on those
only (train.data "masked_lm" source; mask id 256, vocabulary 257). 4 layers, d_model 128, 128-byte inputs.

    python -m train --config configs/encoder_tiny.py --workdir runs/encoder_tiny
    python -m train --config configs/encoder_tiny.py --workdir runs/enc_<name> --config.model.attention=<name>

Hardware: CPU (2 cores) or any accelerator. Expected: ~5 minutes on 2 CPU cores; masked-byte loss well below
the ~3.5-nat unigram entropy of bytes (estimate, not measured).

Presets (`--config configs/encoder_tiny.py:<preset>`):
  smoke  a few steps of a toy model (tests, CI).
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from configs import common

PRESETS = ("", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The encoder_tiny config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("encoder_tiny", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 800
    config.batch_size = 16
    config.seq_len = 128  # bytes per example
    config.log_every = 25
    config.eval_every = 400
    config.checkpoint_every = 400
    config.keep_checkpoints = 2

    model = common.encoder_model(config)
    model.num_layers = 4
    model.d_model = 128
    model.num_heads = 4
    model.mlp_dim = 384  # SwiGLU, 3x d_model
    model.vocab_size = 257  # 256 bytes + the mask id; must equal data.vocab_size
    model.head = "mlm"  # per-token vocabulary logits

    config.data.name = "masked_lm"  # BERT-style masked bytes
    config.data.path = config_dict.placeholder(str)  # None = the Python standard library sources
    config.data.mask_rate = 0.15  # fraction of bytes to predict

    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 50

    config.eval.num_batches = 16

    if preset == "smoke":
        config.total_steps = 4
        config.batch_size = 8
        config.seq_len = 32
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        model.num_layers = 2
        model.d_model = 32
        model.num_heads = 2
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 2
        config.eval.stats_batch_size = 2
    return config
