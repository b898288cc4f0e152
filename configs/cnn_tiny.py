"""Tiny residual CNN with a channel attention module in every block, on the procedural relation images.

32x32 RGB images with a red and a blue square among distractors (train.data "images" source); the label is
whether the blue square is right of the red one (2 classes, chance 0.5). Three stages (16, 32, 64 channels), one
residual block each, the attention module (registry name, input kind "channels": eca, ela, ulsam, polarized, lka,
dual_attention, class_semantic) on each residual branch. (cape is conditioned on PDE parameters, which this image
task does not have: it refuses to run without a condition.)

    python -m train --config configs/cnn_tiny.py --workdir runs/cnn_tiny
    python -m train --config configs/cnn_tiny.py --workdir runs/cnn_<name> --config.model.attention=<name>
    python -m eval.sweep --config configs/cnn_tiny.py:sweep --mechanisms eca,ela,ulsam \\
        --workdir-root runs/sweep_cnn --output benchmarks/results/cnn_channel_cpu.json

Hardware: CPU (2 cores) or any accelerator. Expected (measured on 2 shared CPU cores, load average ~9, jax 0.10.2,
model.attention=eca): the default run takes ~130 s (600 steps) and reaches eval/accuracy 1.0 (eval/loss 0.005;
chance 0.5). The task is easy for a CNN, so the sweep preset uses the 4-class quadrant task instead.

Presets (`--config configs/cnn_tiny.py:<preset>`):
  smoke  a few steps of a toy model on 16x16 images (tests, CI).
  sweep  200 steps on the 4-class quadrant task (chance 0.25), for comparing channel mechanisms side by side
         with eval.sweep (not measured here beyond 10-step runs of eca and ela, which both complete).
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from configs import common

PRESETS = ("", "smoke", "sweep")


def get_config(arg: str | None = None) -> ConfigDict:
    """The cnn_tiny config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("cnn_tiny", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 600  # examples seen: 600 x 32 = 19k
    config.batch_size = 32  # images per step
    config.seq_len = 1  # unused by image tasks
    config.log_every = 50
    config.eval_every = 300
    config.checkpoint_every = 300
    config.keep_checkpoints = 2

    model = common.cnn_model(config)
    model.attention = "eca"  # ECA-Net's 1-D convolution over pooled channels
    model.num_classes = 2  # must equal data.num_classes
    model.widths = (16, 32, 64)
    model.norm_groups = 8

    config.data.name = "images"  # procedural relation images
    config.data.image_size = 32  # pixels per side
    config.data.num_classes = 2  # is the blue square right of the red one?
    # Your own images instead: --config.data.name=npz --config.data.path=file.npz (arrays images, labels)
    config.data.path = config_dict.placeholder(str)

    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.weight_decay = 0.01

    config.eval.num_batches = 8  # 256 validation images per evaluation
    config.eval.stats_batch_size = 0  # channel attention sows no [B, H, Tq, Tk] probabilities to summarise

    if preset == "smoke":
        config.total_steps = 30
        config.batch_size = 16
        config.log_every = 10
        config.eval_every = 30
        config.checkpoint_every = 30
        config.data.image_size = 16
        model.widths = (16, 32)  # ela's GroupNorm (16 groups) needs 16 channels
        config.optimizer.warmup_steps = 5
        config.eval.num_batches = 2
    if preset == "sweep":
        config.total_steps = 200
        config.log_every = 50
        config.eval_every = 200
        config.checkpoint_every = 200
        config.eval.num_batches = 4
        config.data.num_classes = 4  # quadrant of blue relative to red: harder than left/right
        model.num_classes = 4
    return config
