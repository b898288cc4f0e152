"""Tiny vision-language model on procedural image questions (train.data "image_questions").

Each 32x32 image holds two target squares of two of four colours among distractor squares; the question is "what
colour is the shape at the <left|right|top|bottom>?" and the answer is a colour (chance 0.25; 0.5 for knowing which
two colours are present). The qa presets (below) mix in questions about counts and colours. A 2-layer ViT encoder
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

Image question answering about counts, colours and positions (issue 17; data.questions = ("position", "count",
"colour"), one kind per row, vocabulary 38; 16x16 images (16 image tokens) so that seven systems train side by side
on CPU; question-only chance 0.283: position 0.25, count 0.225, colour 0.375):
  qa                  the default model (fusion="cross", softmax cross-attention) on the mixed questions: the
                      baseline of the cross-attention systems.
  qa_prefix           fusion="prefix" with softmax: the baseline of the prefix (self-attention) systems.
  qa_modality_mutual  qa_prefix with `modality_mutual` self-attention (AKI): the 16 image tokens also read the
                      10 question tokens (image_start=0, image_tokens=16, prompt_tokens=10) on top of the prefix-LM
                      mask.
  qa_moda             qa_prefix with `moda` self-attention (the image tokens are its visual tokens 0..15).
  qa_adem             qa with `adem` cross-attention (parameter-free SiLU kernel; drop_ratio 0.1, per-position
                      offsets over the 16 image tokens).
  qa_tcpa             qa whose image encoder uses `tcpa` (a class token, 4 CLS + 4 image prompts, top-2 each).
  qa_concept_centric  qa with `concept_centric` cross-attention (8 concept slots, 3 slot rounds).
  qa_crosslmm         qa with `crosslmm`: the 16 image tokens average-pooled by 4 (model.visual_prefix_pool) are
                      prepended to the question, re-attend the image tokens (V2V) while the text attends them (T2V).
  Each has a `<name>_smoke` variant (the smoke model on the mixed questions).
  Side by side (one seed each; per-kind accuracy on 512 held-out questions from the question_kinds probe):
    python -m eval.techniques --config configs/vlm_tiny.py --probe question_kinds --name vlm_qa_cpu \
        --presets qa,qa_prefix,qa_modality_mutual,qa_moda,qa_adem,qa_tcpa,qa_concept_centric \
        --steps 1200 --set eval_every=400
  Measured (2 CPU cores shared with four other jobs, load average 10-14, jax 0.10.2; one seed, 800 steps each,
  0.05-0.2 s/step, 4-6 minutes per preset with compilation; benchmarks/results/vlm_qa_cpu.json, tcpa from
  vlm_qa_tcpa_cpu.json after its NaN fix): eval accuracy qa 0.691, qa_prefix 0.453, qa_modality_mutual 0.527,
  qa_moda 0.445, qa_adem 0.641, qa_tcpa 0.285 (chance: it did not train), qa_concept_centric 0.590,
  qa_crosslmm 0.660 (vlm_qa_crosslmm_cpu.json, load ~5). No run learned
  where a colour lies (position 0.42-0.51 of 512 questions); colour presence 0.57-0.94 and counts 0.39-0.57 are
  above their question-only chance except tcpa's.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

QA_SYSTEMS = (
    "qa",
    "qa_prefix",
    "qa_modality_mutual",
    "qa_moda",
    "qa_adem",
    "qa_tcpa",
    "qa_concept_centric",
    "qa_crosslmm",
)
PRESETS = (
    "",
    "smoke",
    "moda",
    "moda_smoke",
    "concept_centric",
    "concept_centric_smoke",
    *QA_SYSTEMS,
    *(f"{name}_smoke" for name in QA_SYSTEMS),
)


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

    if preset.endswith("smoke"):
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
    system = preset.removesuffix("_smoke")
    if system in QA_SYSTEMS:
        qa_system(config, system)
    return config


def qa_system(config: ConfigDict, system: str) -> None:
    """Puts `config` on the mixed image questions and plugs in the mechanism of `system` (a QA_SYSTEMS name)."""
    model = config.model
    config.data.questions = ("position", "count", "colour")  # one question kind per row
    config.data.max_count = 4  # the most squares a count or colour scene holds
    config.data.image_size = min(config.data.image_size, 16)  # 16x16: 16 image tokens, a CPU-sized sweep
    config.data.square_size = config.data.image_size // 4  # squares as large as a patch: the tokens see them
    model.vision_position_embedding = "sincos2d"  # fixed 2-D sine-cosine patch positions (big_vision's ViT)
    model.vocab_size = 38  # every kind's words and answers (train.data.image_questions.WORDS)
    image_tokens = (config.data.image_size // model.patch_size) ** 2  # the image tokens (prefix: positions 0..N-1)
    if system in ("qa_prefix", "qa_modality_mutual", "qa_moda"):
        model.fusion = "prefix"  # image tokens as the decoder's prefix
    if system == "qa_modality_mutual":
        model.attention = "modality_mutual"  # AKI: image rows may also attend the question after them
        model.attention_options = ConfigDict(dict(image_start=0, image_tokens=image_tokens, prompt_tokens=10))
    if system == "qa_moda":
        model.attention = "moda"  # visual keys aligned onto the text basis, modality-pair mask
        model.attention_options = ConfigDict(dict(image_start=0, image_tokens=image_tokens))
    if system == "qa_adem":
        model.cross_attention = "adem"  # parameter-free SiLU-kernel cross-attention with adaptive dropping
        model.cross_attention_options = ConfigDict(dict(drop_ratio=0.1, context_length=image_tokens))
    if system == "qa_tcpa":
        model.vision_cls_token = True  # TCPA's CLS pool matches the class token
        model.vision_attention = "tcpa"  # the image encoder's attention with CLS / image prompt pools
        model.vision_attention_options = ConfigDict(
            dict(num_cls_tokens=1, cls_prompts=4, image_prompts=4, cls_top_k=2, image_top_k=2)
        )
    if system == "qa_concept_centric":
        model.cross_attention = "concept_centric"  # text reads a workspace of concept slots
        model.cross_attention_options = ConfigDict(dict(num_concepts=8, slot_iterations=3))  # slots, slot rounds
    if system == "qa_crosslmm":
        model.visual_prefix_pool = 4  # CrossLMM's pooled visual tokens (16 / 4 = 4) prepended to the question
        model.cross_attention = "crosslmm"  # pooled tokens re-attend the image tokens (V2V), the text attends them
        model.cross_attention_options = ConfigDict(dict(visual_tokens=image_tokens // 4, num_frames=1))
