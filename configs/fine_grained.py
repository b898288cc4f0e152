"""Tiny ViT on the procedural fine-grained task: classes differ only in the colour and place of a small part.

32x32 RGB images (train.data "fine_grained" source): one shared body per image at a random place, a 4x4 coloured mark
at one of 2 corners of the body in one of 4 colours (8 classes, chance 0.125), dark decoy marks at the other corners,
2 same-palette clutter marks off the body and pixel noise. 4x4 patches -> 64 patch tokens plus a class token, 2 layers,
d_model 64, classified from the class token (DCAL's rollout starts from it). Learned positions only (position="none"
in every mechanism, so softmax, dcal and tcpa differ only in what the paper adds).

    python -m train --config configs/fine_grained.py --workdir runs/fg_softmax              # the ViT baseline
    python -m train --config configs/fine_grained.py:dcal --workdir runs/fg_dcal            # DCAL (GLCA + PWCA)
    python -m train --config configs/fine_grained.py:tcpa --workdir runs/fg_tcpa            # TCPA prompts
    python -m eval.sweep --config configs/fine_grained.py --mechanisms softmax,dcal,tcpa \\
        --workdir-root /tmp/fg_sweep --output benchmarks/results/fine_grained_cpu.json    # side by side

Hardware: CPU (2 cores) or any accelerator.
Expected: above chance (0.125) after 400 steps. Measured (eval.sweep above, 2 CPU cores shared with other jobs, 256
validation images at step 400; seed 0 -> benchmarks/results/fine_grained_cpu.json, --set seed=1 ->
fine_grained_seed1_cpu.json): softmax 0.828 / 0.777, dcal 0.824 / 0.738, tcpa 0.211 / 0.145 eval accuracy; wall
time of the whole run 392 / 257 s softmax, 510 / 410 s dcal (the PWCA pass runs every block again over twice the keys).

Presets (`--config configs/fine_grained.py:<preset>`):
  smoke  a few steps of a toy model on 16x16 images (tests, CI).
  dcal   attention="dcal": GLCA over the top 10% patches by attention rollout + PWCA in training (the paper's FGVC R).
  tcpa   attention="tcpa": token-coordinated prompts (4 CLS + 4 image prompts, top-2 each).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "smoke", "dcal", "tcpa")


def get_config(arg: str | None = None) -> ConfigDict:
    """The fine_grained config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("fine_grained", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 400  # examples seen: 400 x 32 = 12.8k
    config.batch_size = 32  # images per step
    config.seq_len = 1  # unused by image tasks (the patch count follows from image and patch size)
    config.log_every = 50
    config.eval_every = 200
    config.checkpoint_every = 200
    config.keep_checkpoints = 1

    model = common.vit_model(config)
    model.num_layers = 2
    model.d_model = 64
    model.num_heads = 4
    model.mlp_dim = 128  # GELU MLP, 2x width
    model.norm = "layernorm"  # the ViT paper's choice
    model.mlp = "gelu"
    model.num_classes = 8  # must equal data.num_colors * data.num_slots
    model.patch_size = 4  # 32 / 4 = 8x8 patch grid
    model.pool = "cls"  # class token (DCAL's rollout and TCPA's CLS prompts need it)
    model.attention = "softmax"  # the baseline; presets dcal / tcpa
    model.attention_options.position = "none"  # learned ViT positions only, in every mechanism

    config.data.name = "fine_grained"  # procedural fine-grained images (train/data/fine_grained.py)
    config.data.image_size = 32  # pixels per side
    config.data.num_colors = 4  # part colours
    config.data.num_slots = 2  # part places on the body
    config.data.part_size = 4  # part side in pixels (one patch when aligned)
    config.data.num_distractors = 2  # clutter marks (palette colours) off the body
    config.data.noise_std = 0.05  # pixel noise

    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 30
    config.optimizer.weight_decay = 0.05
    config.optimizer.b2 = 0.999  # the usual ViT setting

    config.eval.num_batches = 8  # 256 validation images per evaluation

    if preset == "smoke":
        config.total_steps = 4
        config.batch_size = 8
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        config.data.image_size = 16
        config.data.part_size = 2
        model.d_model = 32
        model.num_heads = 2
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 2
        config.eval.stats_batch_size = 2
    if preset == "dcal":
        model.attention = "dcal"
        model.attention_options.local_ratio = 0.1  # GLCA queries: the top 10% patches (paper, FGVC)
        model.attention_options.pair = True  # PWCA branch in training
    if preset == "tcpa":
        model.attention = "tcpa"
        model.attention_options.cls_prompts = 4  # CLS prompt pool
        model.attention_options.image_prompts = 4  # image-token prompt pool
    return config
