"""Tiny vision-language model on procedural image questions (train.data "image_questions").

Each 32x32 image holds a red and a blue square among distractor squares; the question is "what colour is the
shape at the <left|right|top|bottom>?" and the answer token is "red" or "blue" (chance 0.5). A 2-layer ViT encoder
(4x4 patches, 64 image tokens) feeds a 2-layer text decoder that cross-attends to the image tokens (fusion="cross")
or reads them as a prefix-LM prefix (--config.model.fusion=prefix). Loss and accuracy count the answer only.

    python -m train --config configs/vlm_tiny.py --workdir runs/vlm_tiny
    python -m train --config configs/vlm_tiny.py --workdir runs/vlm_<name> --config.model.cross_attention=<name>
    (--config.model.vision_attention=<name> swaps the image encoder's mechanism, e.g. a spatial one)

Hardware: CPU (2 cores) or any accelerator. Expected (measured on 2 shared CPU cores, load average ~12, jax 0.10.2):
the default run (fusion="cross") takes ~7 minutes (1000 steps) and reaches eval/accuracy 0.49 (chance 0.25); 3000
steps (~14 minutes) give 0.51. That is what knowing which two colours are in the image gives (0.5): at this size
and length the model has not learned which colour lies where. (A 600-step fusion="prefix" run with constant-rate
AdamW stayed at chance.) The smoke preset runs in ~30 s.

Presets (`--config configs/vlm_tiny.py:<preset>`):
  smoke  a few steps of a toy model on 16x16 images (tests, CI).
  moda   fusion="prefix" with `moda` self-attention in the decoder (the image tokens are its visual tokens 0..N-1);
         moda_smoke is the smoke model with it.
  concept_centric  fusion="cross" with `concept_centric` cross-attention (text reads 8 concept slots written from
         the image tokens); concept_centric_smoke is the smoke model with it.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "smoke", "moda", "moda_smoke", "concept_centric", "concept_centric_smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The vlm_tiny config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("vlm_tiny", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 1000  # examples seen: 1000 x 32 = 32k
    config.batch_size = 32  # image-question pairs per step
    config.seq_len = 1  # unused (the question has a fixed length of 10 tokens)
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 500
    config.keep_checkpoints = 2

    model = common.vlm_model(config)
    model.num_layers = 2  # text decoder blocks
    model.d_model = 64
    model.num_heads = 4
    model.mlp_dim = 128
    model.vocab_size = 17  # the question words and colour answers (train.data.image_questions.WORDS)
    model.patch_size = 4  # 32 / 4 = 8x8 patch grid
    model.vision_layers = 2  # ViT encoder blocks

    config.data.name = "image_questions"  # procedural relation images with a question
    config.data.image_size = 32  # pixels per side
    config.data.directions = 4  # questions about left, right, top and bottom
    config.data.num_distractors = 4  # squares of other colours
    config.data.noise_std = 0.1  # Gaussian pixel noise

    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.weight_decay = 0.05
    config.optimizer.b2 = 0.999  # the usual ViT setting

    config.eval.num_batches = 8  # 256 held-out questions per evaluation

    if preset in ("smoke", "moda_smoke", "concept_centric_smoke"):
        config.total_steps = 30
        config.batch_size = 16
        config.log_every = 10
        config.eval_every = 30
        config.checkpoint_every = 30
        config.data.image_size = 16
        config.data.directions = 2
        model.num_layers = 1
        model.vision_layers = 1
        model.d_model = 32
        model.num_heads = 2
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 5
        config.eval.num_batches = 2
        config.eval.stats_batch_size = 2
    if preset in ("moda", "moda_smoke"):
        model.fusion = "prefix"  # MODA mixes visual and text tokens in one self-attention
        model.attention = "moda"  # the decoder's self-attention
        image_tokens = (config.data.image_size // model.patch_size) ** 2  # the prefix: decoder positions 0..N-1
        model.attention_options = ConfigDict(dict(image_start=0, image_tokens=image_tokens))  # moda's visual tokens
    if preset in ("concept_centric", "concept_centric_smoke"):
        model.cross_attention = "concept_centric"  # the decoder's cross-attention reads a concept workspace
        model.cross_attention_options = ConfigDict(dict(num_concepts=8, slot_iterations=3))  # slots, slot rounds
    return config
