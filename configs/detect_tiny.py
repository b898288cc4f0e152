"""Tiny dense detector on procedural scenes: find the centres and classes of 1-3 coloured squares on clutter.

32x32 RGB images (train.data "detection_scenes": 3 classes by colour, squares of side 4 to 10 pixels, clutter squares of
other colours, pixel noise); 4x4 patches -> an 8x8 grid of 64 tokens, 2 encoder layers of d_model 64, and a per-token
head that predicts background / class and the centre's offset inside the patch (attn.models.Detector). Metric: the share
of objects whose centre a token of the right class predicts within model.hit_radius = 2 pixels (`accuracy`: mean per
image; `hit_rate`, `precision`, `f1` over all objects). Chance (a random token per object, right class 1 in 3) is far
below 0.05.

    python -m train --config configs/detect_tiny.py --workdir runs/detect_softmax
    python -m train --config configs/detect_tiny.py:focus --workdir runs/detect_focus
    python -m train --config configs/detect_tiny.py:focus --workdir runs/detect_focus_25 \\
        --config.model.attention_options.keep_ratio=0.25

Presets (`--config configs/detect_tiny.py:<preset>`):
  ""     softmax self-attention in every layer (the baseline), 600 steps of 32 images.
  focus  `focus_detr` in every layer: the top keep_ratio = 0.5 of the tokens (by the learned foreground score) are
         the layer's queries, and the top 4 of those also self-attend (dual attention); other tokens pass unchanged.
  smoke  a few steps of a toy model on 16x16 images (tests, CI).

Hardware: CPU (2 cores) or any accelerator. Measured (CPU, 2 cores shared with other jobs; eval at step 600 on 256
images): softmax hit_rate 0.936, precision 0.570, f1 0.709 (245 s); focus keep_ratio 0.5 hit_rate 0.934, precision
0.526, f1 0.673 (444 s); other keep ratios in the README.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "focus", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The detect_tiny config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("detect_tiny", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 600
    config.batch_size = 32  # images per step
    config.seq_len = 1  # unused by image tasks (the patch count follows from image and patch size)
    config.log_every = 50
    config.eval_every = 300
    config.checkpoint_every = 300
    config.keep_checkpoints = 1

    model = config.model
    model.kind = "detector"  # attn.models.Detector: a per-token objectness/class + centre-offset head on a ViT
    common.trunk_fields(model)
    model.num_layers = 2
    model.d_model = 64
    model.num_heads = 4
    model.mlp_dim = 128
    model.norm = "layernorm"
    model.mlp = "gelu"
    model.num_classes = 3  # object classes; must equal data.num_classes
    model.patch_size = 4  # 32 / 4 = 8x8 patch tokens
    model.hit_radius = 2.0  # pixels: a predicted centre this close to an object of its class hits it
    model.attention = "softmax"
    model.attention_options = ConfigDict({"position": "none"})  # learned patch positions, as in the ViT

    config.data.name = "detection_scenes"
    config.data.image_size = 32
    config.data.num_classes = 3
    config.data.min_objects = 1
    config.data.max_objects = 3
    config.data.object_size = 4  # smallest side in pixels (one patch)
    config.data.max_object_size = 10  # largest side: up to 3x3 patches, so a centre needs the neighbouring patches

    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 40
    config.optimizer.weight_decay = 0.05
    config.optimizer.b2 = 0.999

    config.eval.num_batches = 8  # 256 validation images per evaluation

    if preset == "focus":
        model.attention = "focus_detr"
        model.attention_options = ConfigDict(
            {"position": "none", "keep_ratio": 0.5, "object_tokens": 4, "object_classes": 3, "scorer_hidden": 32}
        )
    if preset == "smoke":
        config.total_steps = 4
        config.batch_size = 8
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        config.data.image_size = 16
        config.data.max_object_size = 4
        model.d_model = 32
        model.num_heads = 2
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 2
        config.eval.stats_batch_size = 2
    return config
