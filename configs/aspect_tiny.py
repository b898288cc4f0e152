"""Tiny encoder classifier on the procedural aspect-sentiment task, with and without PSS attention supervision.

Each row is [query aspect, SEP, sentence]: the sentence holds two aspect mentions, each followed within 3 positions by
2 opinion words of its own polarity; the label is the polarity tied to the queried aspect (train.data
"aspect_sentiment", 2 classes, vocabulary 58). A 2-layer bidirectional encoder (attn.models.Encoder, head
"classification", mean pooling) classifies the row.

    python -m train --config configs/aspect_tiny.py --workdir runs/aspect_tiny
    python -m train --config configs/aspect_tiny.py:pss --workdir runs/aspect_pss

Presets (`--config configs/aspect_tiny.py:<preset>`):
  ""      the encoder classifier, no technique
  pss     + progressive self-supervised attention learning (pss, [223]; weight 0.1, supervision from step 200)
  smoke   a few steps of a smaller model (tests, CI)

Hardware: CPU (2 cores) or any accelerator. Expected: about 1 minute (baseline) and 3 minutes (pss) on 2 shared
CPU cores for the 600 steps (measured). Chance is 0.5; counting opinion words over the whole sentence gives 0.75,
where both runs still were after 2000 steps (eval accuracy 0.71-0.78), so this tiny model does not yet learn the
aspect binding: PSS's measured effect is on the attention (README, "Training techniques").
Measured (benchmarks/results/pss_aspect_tiny.json, 2 CPU cores shared with other jobs; 2000 steps, 311 s baseline
and 441 s pss; 512 validation rows):
    python -m eval.techniques --config configs/aspect_tiny.py:pss --steps 2000 --probe pss_attention \
        --name pss_aspect_tiny
accuracy 0.740 -> 0.746 with pss; the aspect's last-layer attention on the planted evidence 0.078 -> 0.408, and the
most attended context word is evidence in 4.9 % -> 50.0 % of the rows.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "pss", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The aspect_tiny config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("aspect_tiny", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 600  # 600 x 32 = 19.2k rows
    config.batch_size = 32  # rows per step
    config.seq_len = 24  # query aspect + SEP + 22 sentence tokens
    config.log_every = 50  # console / TensorBoard cadence, steps
    config.eval_every = 200  # validation cadence, steps
    config.checkpoint_every = 600  # one checkpoint, at the end
    config.keep_checkpoints = 1  # checkpoints kept

    model = common.encoder_model(config)
    model.num_layers = 2  # encoder blocks
    model.d_model = 32  # width
    model.num_heads = 2  # heads of every block
    model.mlp_dim = 64  # MLP width, 2x d_model
    model.vocab_size = 58  # 2 + aspects 8 + opinion words 2 x 8 + fillers 32; must cover the source's vocabulary
    model.head = "classification"  # pooled logits
    model.num_classes = 2  # negative / positive
    model.pool = "mean"  # masked mean over the tokens

    config.data.name = "aspect_sentiment"  # train.data.aspect_sentiment
    config.data.num_aspects = 8  # aspect ids
    config.data.num_opinion_words = 8  # opinion words per polarity
    config.data.num_fillers = 32  # neutral filler words
    config.data.num_mentions = 2  # aspect mentions per sentence (the first one is queried)
    config.data.window = 3  # opinion words follow their mention within this many positions
    config.data.evidence_words = 2  # opinion words per mention

    config.optimizer.learning_rate = 3e-3  # peak AdamW learning rate
    config.optimizer.warmup_steps = 50  # linear warmup, then cosine
    config.optimizer.weight_decay = 1e-4  # AdamW decay on matrices

    config.eval.num_batches = 8  # 256 validation rows per evaluation

    if preset == "pss":
        # supervision from step 200 on, so the erasing forwards read a model that already classifies
        config.techniques = [{"name": "pss", "weight": 0.1, "start_step": 200}]
    elif preset == "smoke":
        config.total_steps = 4
        config.batch_size = 8
        config.seq_len = 12
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        model.num_layers = 1
        model.d_model = 16
        model.mlp_dim = 32
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 1
        config.eval.stats_batch_size = 2
    return config
