"""Tiny Vision Transformer on the procedural "where is the blue square?" image task.

32x32 RGB images with a red and a blue square among distractors; the label is the quadrant of the blue
square relative to the red one (train.data "images" source, 4 classes), so the model must relate two
distant patches. 4x4 patches -> an 8x8 grid of 64 patch tokens (no class token), 4 layers, d_model 128,
classified from the mean over the patches (big_vision's "gap"), so spatial mechanisms attend over the patch grid.

    python -m train --config configs/vit_tiny.py --workdir runs/vit_tiny
    python -m train --config configs/vit_tiny.py --workdir runs/vit_<name> --config.model.attention=<name>
    python -m train --config configs/vit_tiny.py --workdir runs/vit_mine --config.data.name=npz \\
        --config.data.path=mine.npz --config.data.image_size=<side> --config.data.num_classes=<n> \\
        --config.model.num_classes=<n>         # your own images: arrays images [N, H, W, C], labels [N]

--config.model.pool=cls uses a class token instead (sequence mechanisms only), --config.model.pool=attentive_pooling
an attentive probe.

Hardware: CPU (2 cores) or any accelerator. Expected: about 10 minutes on 2 CPU cores (not measured; the chance
level is 0.25). Measured for the smaller `sweep` preset (benchmarks/results/vit_spatial_cpu.json, 2 CPU cores shared
with other jobs): softmax reaches 0.914 eval accuracy after its 400 steps (329 s), neighborhood 0.973.

Presets (`--config configs/vit_tiny.py:<preset>`):
  smoke  a few steps of a toy model on 16x16 images (tests, CI).
  sweep  400 steps of a 2-layer d_model 64 model with mean pooling, for comparing mechanisms side by side
         (`python -m eval.sweep --config configs/vit_tiny.py:sweep --mechanisms softmax,neighborhood,...`).
  tap_adl  sweep with TAP + ADL as Guo et al. 2023 train them: token-aware average pooling before every block's
         attention (model.token_pooling="tap", 4 dilations) and the attention diversification loss (adl_tap,
         weight 1, threshold 2); side by side with `sweep` on patch corruption:
         `python -m eval.techniques --config configs/vit_tiny.py --presets sweep,tap_adl --probe patch_corruption`.
  adl    sweep with ADL alone (adl_tap, weight 1, threshold 2, the official), no TAP; side by side with `sweep`:
         `python -m eval.techniques --config configs/vit_tiny.py --presets sweep,adl --steps 300 \
         --probe patch_corruption --name adl_vit_tiny`.
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from configs import common

PRESETS = ("", "smoke", "sweep", "tap_adl", "adl")


def get_config(arg: str | None = None) -> ConfigDict:
    """The vit_tiny config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("vit_tiny", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 2000  # examples seen: 2000 x 64 = 128k
    config.batch_size = 64  # images per step
    config.seq_len = 1  # unused by image tasks (the patch count follows from image and patch size)
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 500
    config.keep_checkpoints = 2

    model = common.vit_model(config)
    model.num_layers = 4
    model.d_model = 128
    model.num_heads = 4
    model.mlp_dim = 256  # GELU MLP, 2x width
    model.norm = "layernorm"  # the ViT paper's choice
    model.mlp = "gelu"
    model.num_classes = 4  # must equal data.num_classes
    model.patch_size = 4  # 32 / 4 = 8x8 patch grid
    model.pool = "mean"  # mean over patches (a class token has no place on the grid of spatial mechanisms)
    model.token_pooling = config_dict.placeholder(str)  # "tap": token-aware average pooling before attention
    model.token_pooling_scales = 4  # TAP's dilations 0..3 (official --num-scales 4)

    config.data.name = "images"  # procedural relation images
    config.data.image_size = 32  # pixels per side
    config.data.num_classes = 4  # quadrant of blue relative to red
    # Your own images instead: --config.data.name=npz --config.data.path=file.npz (arrays images, labels)
    config.data.path = config_dict.placeholder(str)

    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.05
    config.optimizer.b2 = 0.999  # the usual ViT setting

    config.eval.num_batches = 8  # 512 validation images per evaluation

    if preset == "smoke":
        config.total_steps = 4
        config.batch_size = 8
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        config.data.image_size = 16
        model.num_layers = 2
        model.d_model = 32
        model.num_heads = 2
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 2
        config.eval.stats_batch_size = 2
    if preset in ("sweep", "tap_adl", "adl"):
        config.total_steps = 400
        config.batch_size = 32
        config.log_every = 50
        config.eval_every = 200
        config.checkpoint_every = 200
        model.num_layers = 2
        model.d_model = 64
        model.mlp_dim = 128
        config.optimizer.learning_rate = 2e-3
        config.optimizer.warmup_steps = 40
    if preset == "tap_adl":
        model.token_pooling = "tap"  # TAP before every block's attention (official 4 dilations)
        config.techniques = [{"name": "adl_tap", "weight": 1.0, "threshold": 2.0}]  # official --adloss 1, th 2
    if preset == "adl":
        config.techniques = [{"name": "adl_tap", "weight": 1.0, "threshold": 2.0}]  # ADL alone, without TAP
    return config
