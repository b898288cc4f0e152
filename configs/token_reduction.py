"""The prefix vision-language model the token-reduction systems are measured on (`python -m eval.token_reduction`).

A LLaVA-style tiny VLM: a 2-layer ViT encoder with a class token (its attention row ranks the image tokens for
vtc_cls and vmtc_cmai) over 4x4 patches of 32x32 images (64 image tokens), projected and read by a 2-layer causal
decoder as a prefix-LM prefix (fusion="prefix"). Task: "what colour is the shape at the <left|right>?" about two
coloured squares among distractors (train.data "image_questions", directions=2; 4 colours, chance 0.25).

    python -m train --config configs/token_reduction.py --workdir runs/token_reduction

Hardware: CPU (2 cores) or any accelerator. Expected (measured once on 2 CPU cores shared with other jobs, load
average ~20, jax 0.10.2): 800 steps in 21 minutes wall (about 4 minutes on idle cores by the first steps' rate);
eval/accuracy 0.50 (chance 0.25): the model knows which two colours are in the image, not yet which lies where (as
configs/vlm_tiny.py's runs). `python -m eval.token_reduction` trains it into an empty --workdir.

Presets (`--config configs/token_reduction.py:<preset>`):
  smoke  a few steps of a toy model on 16x16 images (tests, CI).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The token_reduction config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("token_reduction", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 800  # examples seen: 800 x 64 = 51k
    config.batch_size = 64  # image-question pairs per step
    config.seq_len = 1  # unused (the question has a fixed length of 10 tokens)
    config.log_every = 50  # console / TensorBoard cadence in steps
    config.eval_every = 400  # held-out accuracy cadence
    config.checkpoint_every = 400  # checkpoint cadence
    config.keep_checkpoints = 1  # eval.token_reduction reads the latest

    model = common.vlm_model(config)
    model.fusion = "prefix"  # image tokens are the decoder's prefix (LLaVA-style), so they can be dropped or merged
    model.vision_cls_token = True  # a class token in the image encoder (never enters the decoder)
    model.num_layers = 2  # text decoder blocks
    model.d_model = 64  # decoder width (the image encoder takes the same)
    model.num_heads = 4  # heads per layer, decoder and encoder
    model.mlp_dim = 128  # MLP width
    model.vocab_size = 17  # the question words and colour answers (train.data.image_questions.WORDS)
    model.patch_size = 4  # 32 / 4 = 8x8 patch grid: 64 image tokens
    model.vision_layers = 2  # ViT encoder blocks

    config.data.name = "image_questions"  # procedural relation images with a question
    config.data.image_size = 32  # pixels per side
    config.data.directions = 2  # questions about left and right
    config.data.num_distractors = 4  # squares of other colours
    config.data.noise_std = 0.1  # Gaussian pixel noise

    config.optimizer.learning_rate = 2e-3  # peak AdamW rate (vlm_tiny's)
    config.optimizer.warmup_steps = 50  # then cosine decay to the last step
    config.optimizer.weight_decay = 0.05  # decoupled weight decay
    config.optimizer.b2 = 0.999  # the usual ViT setting

    config.eval.num_batches = 4  # 256 held-out questions per evaluation

    if preset == "smoke":  # tiny sizes, a few steps: exercises the whole path in seconds
        config.total_steps = 4
        config.batch_size = 8
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        config.data.image_size = 16
        model.num_layers = 1
        model.vision_layers = 1
        model.d_model = 32
        model.num_heads = 2
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 1
        config.eval.stats_batch_size = 2
    return config
