"""The vision-language model the VLM steering systems are measured on (`python -m eval.steer --vlm`): a prefix VLM.

A LLaVA-style tiny model: a 2-layer ViT encoder (fixed 2-D sin-cos patch positions) turns each 16x16 image into 16
image tokens (4x4 patches), which are the prefix of a 2-layer causal text decoder (fusion="prefix", prefix-LM mask),
as the steering papers assume (image tokens are positions 0..15 of the decoder's sequence). The task is train.data
"image_questions" with left/right questions: "what colour is the shape at the <left|right>?" over two target squares
(4x4 pixels, the size of a patch) among distractors, answered with one of four colours (chance 0.25; 0.5 for knowing
which two colours are present but not where).

    python -m train --config configs/steer_vlm.py --workdir runs/steer_vlm

Hardware: CPU (2 cores) or any accelerator. Measured (2 CPU cores shared with other jobs, load average ~12,
jax 0.10.2): 600 steps at 0.7-1.4 s/step (about 12 minutes wall); eval accuracy 0.965 at step 300, 0.988 at 600.
What it takes to learn WHERE (same command with --config overrides, eval accuracy at step 300): the earlier
defaults (learned position table, 2x2-pixel targets, d_model 64, 1200 steps) ended at 0.47-0.55; sincos2d with 4x4
targets at d_model 64: 0.477 (0.496 at 600; --config.seed=1: train accuracy 0.49 at 300); d_model 128 as here: 0.965
(seed 0). `python -m eval.steer --vlm` trains it into an empty workdir.

Presets (`--config configs/steer_vlm.py:<preset>`):
  smoke  a few steps of a toy model (tests, CI).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The steer_vlm config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("steer_vlm", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 600  # examples seen: 600 x 64
    config.batch_size = 64  # image-question pairs per step
    config.seq_len = 1  # unused (the question has a fixed length of 10 tokens)
    config.log_every = 100
    config.eval_every = 300
    config.checkpoint_every = 300
    config.keep_checkpoints = 1

    model = common.vlm_model(config)
    model.fusion = "prefix"  # image tokens are the decoder's prefix (LLaVA-style), as the steering papers assume
    model.num_layers = 2  # text decoder blocks
    model.d_model = 128  # width (at 64 with the same data the runs measured stayed at 0.5)
    model.num_heads = 4  # heads per layer, the units the steering systems select
    model.mlp_dim = 256  # feed-forward width
    model.vocab_size = 17  # the question words and colour answers (train.data.image_questions.WORDS)
    model.patch_size = 4  # 16 / 4 = 4x4 patch grid: 16 image tokens
    model.vision_layers = 2  # ViT encoder blocks
    model.vision_position_embedding = "sincos2d"  # fixed 2-D sin-cos positions: the learned table stays at 0.5

    config.data.name = "image_questions"  # procedural squares with a question about one of them
    config.data.image_size = 16  # pixels per side
    config.data.directions = 2  # questions about left and right
    config.data.num_distractors = 2  # squares of other colours
    config.data.noise_std = 0.05  # Gaussian pixel noise
    config.data.square_size = 4  # = patch_size: a target fills a patch (the default 16 // 8 = 2 stays at 0.5)

    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.weight_decay = 0.05
    config.optimizer.b2 = 0.999

    config.eval.num_batches = 4  # 256 held-out questions per evaluation

    if preset == "smoke":
        config.total_steps = 20
        config.batch_size = 8
        config.log_every = 10
        config.eval_every = 20
        config.checkpoint_every = 20
        model.num_layers = 1
        model.vision_layers = 1
        model.d_model = 32
        model.num_heads = 2
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 5
        config.eval.num_batches = 1
        config.eval.stats_batch_size = 2
    return config
