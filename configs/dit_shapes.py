"""A tiny DiT text-to-image model (attn.models.DiT) trained by flow matching on captioned coloured shapes.

16x16 RGB images of one or two shapes (circle, square, triangle in red, green, blue, yellow) with captions such as
"red circle left blue square" (train.data "shape_captions" source; 10% of the captions are dropped to the null
caption for classifier-free guidance). 2x2 patches -> 64 patch tokens, 3 DiT blocks of d_model 64 with adaLN-zero
conditioning on the time and pooled caption, and cross-attention from the patches to the caption tokens.

    python -m train --config configs/dit_shapes.py --workdir runs/dit_shapes
    python -m eval.sample_dit --workdir runs/dit_shapes --prompt "red circle left blue square" --out x.png
    python -m train --config configs/dit_shapes.py --workdir runs/dit_<name> --config.model.cross_attention=<name>

Hardware: CPU (2 cores) or any accelerator. Measured (CPU, 2 cores shared with other jobs, load average ~20): the
default preset (0.35M parameters) reached eval loss 0.103 (velocity MSE; 1.85 at step 4, 0.185 at step 500, 0.121 at
1000) after its 1500 steps in 40 min wall clock at 1-2 s/step; on idle cores the steps are several times faster.

Presets (`--config configs/dit_shapes.py:<preset>`):
  smoke  a few steps of a toy model (tests, CI).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The dit_shapes config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("dit_shapes", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 1500  # examples seen: 1500 x 64 = 96k
    config.batch_size = 64  # images per step
    config.seq_len = 1  # unused: the caption length is fixed by the data source
    config.log_every = 100
    config.eval_every = 500
    config.checkpoint_every = 500
    config.keep_checkpoints = 2

    model = common.trunk_fields(config.model)
    model.kind = "dit"  # attn.models.DiT (see model.kind in base_config)
    model.num_layers = 3  # DiT blocks
    model.d_model = 64  # patch-token width
    model.num_heads = 4  # heads of the self- and cross-attention
    model.mlp_dim = 256  # GELU MLP, 4x width as in DiT
    model.norm = "layernorm"  # DiT's choice
    model.mlp = "gelu"
    model.vocab_size = 9  # caption words; must be >= the data source's vocabulary (9)
    model.patch_size = 2  # 16 / 2 = 8x8 patch grid
    model.channels = 3  # RGB
    model.max_caption_len = 8  # rows of the caption position table (captions have 5 tokens)
    model.caption_layers = 1  # self-attention blocks of the caption encoder
    model.cross_attention = "softmax"  # patches -> caption tokens; None conditions only through adaLN
    model.cross_attention_options = ConfigDict()  # attn.build options of cross_attention

    config.data.name = "shape_captions"  # procedural captioned shapes with flow-matching noise and times
    config.data.image_size = 16  # pixels per side
    config.data.two_shape_fraction = 0.75  # share of images with two shapes (left and right)
    config.data.caption_dropout = 0.1  # share of null captions, for classifier-free guidance

    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.0  # as DiT
    config.optimizer.b2 = 0.999

    config.eval.num_batches = 4  # 256 validation images per evaluation (same noise and times each time)
    config.eval.stats_batch_size = 0  # no attention-statistics probe

    if preset == "smoke":
        config.total_steps = 4
        config.batch_size = 8
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        model.num_layers = 1
        model.d_model = 32
        model.num_heads = 2
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 1
    return config
