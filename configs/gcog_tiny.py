"""Tiny vision-language model on gCOG ([47], train.data "gcog"): task trees about objects on a 10x10 grid.

The stimulus is the grid as 100 categorical tokens (one-hot colour and shape per cell, patch_size=1: one image token
per cell, as in the paper); the instruction is the task tree's tokens and the answer is one token (true/false, a
colour, a shape or a location). With generalization="all" one run trains on the distribution that all four
out-of-distribution tests share, and `python -m eval.gcog --workdir W` then reports the in-distribution accuracy and
each test's (distractor, systematic, systematic_tree, productive).

    python -m train --config configs/gcog_tiny.py --workdir runs/gcog_cross
    python -m train --config configs/gcog_tiny.py --workdir runs/gcog_prefix --config.model.fusion=prefix
    python -m eval.gcog --workdir runs/gcog_cross runs/gcog_prefix

fusion="cross" is the paper's cross-attention model (the instruction attends to the stimulus tokens); fusion="prefix"
is its single-stream transformer (stimulus and instruction tokens in one self-attention).

Hardware: CPU (2 cores) or any accelerator. Expected (measured on 2 shared CPU cores, load average ~20, jax 0.10.2):
the default run (600 steps of batch 32) takes ~8 minutes and reaches in-distribution accuracy 0.31 (fusion="cross")
or 0.35 (fusion="prefix") against 0.30 for the commonest answer: at this budget the models have learned answer
priors, not the task (benchmarks/results/gcog_cpu.json). Presets: smoke (2 steps of a toy model: tests, CI).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The gcog_tiny config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("gcog_tiny", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 600  # examples seen: 600 x 32 = 19k
    config.batch_size = 32  # questions per step
    config.seq_len = 1  # unused (the instruction length follows the deepest tree of the source)
    config.log_every = 50
    config.eval_every = 300
    config.checkpoint_every = 300
    config.keep_checkpoints = 1

    model = common.vlm_model(config)
    model.num_layers = 2  # instruction decoder blocks
    model.d_model = 64
    model.num_heads = 4
    model.mlp_dim = 128
    model.vocab_size = 150  # train.data.gcog.WORDS: operators, colours, shapes, true/false, 100 locations
    model.patch_size = 1  # one image token per grid cell (100 stimulus tokens)
    model.vision_layers = 1  # stimulus encoder blocks

    config.data.name = "gcog"
    config.data.generalization = "all"  # train once, test distractor / systematic / systematic_tree / productive
    config.data.num_features = 10  # colours and shapes in use (the official demos' nfeatures)
    config.data.max_distractors = 5  # training rows have 1-5 distractors
    config.data.test_distractors = 40  # the distractor test's count
    config.data.test_depth = 5  # the productive test's tree depth

    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.weight_decay = 0.05

    config.eval.num_batches = 4  # 128 held-out in-distribution questions per evaluation

    if preset == "smoke":
        config.total_steps = 2
        config.batch_size = 8
        config.log_every = 1
        config.eval_every = 2
        config.checkpoint_every = 2
        model.num_layers = 1
        model.d_model = 16
        model.num_heads = 2
        model.mlp_dim = 32
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 1
        config.eval.stats_batch_size = 2
    return config
