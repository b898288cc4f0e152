"""GPT-2-small-sized byte-level decoder LM: 12 layers, d_model 768, 12 heads, 1024-byte context, bf16.

About 85M parameters (GPT-2 small's 124M minus its 38M-parameter 50k-token embedding: this model reads
bytes, vocabulary 256). Trains on the local text corpus (the Python standard library sources, ~100 MB
of bytes, or --config.data.path=<your text>) with AdamW, warmup + cosine, bf16 compute, float32 params.

    python -m train --config configs/lm_125m.py --workdir runs/lm_125m
    python -m eval.lm --workdir runs/lm_125m

Hardware: one GPU (H100/A100 80 GB) or one TPU host (v4-8 / v5e-8); batch 32 x 1024 tokens per step.
Expected runtime: 20k steps ~ 6-8 hours on one H100 (estimated from 6 N tokens FLOPs at ~40% MFU,
not measured here); final validation loss ~0.9-1.0 nats/byte (estimated).
For several devices keep the defaults (data parallel over all of them) or shard parameters too, e.g.
--config.mesh.shape="(-1, 2)" --config.mesh.axes="('fsdp', 'tensor')".

Presets (`--config configs/lm_125m.py:<preset>`):
  tiny   same code path at toy size (2 layers, d_model 64, seq 64) for tests and CPU smoke runs.
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from configs import common

PRESETS = ("", "tiny")


def get_config(arg: str | None = None) -> ConfigDict:
    """The lm_125m config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("lm_125m", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 20_000  # 20k x 32 x 1024 = 655M bytes seen (~6 epochs of the stdlib corpus)
    config.batch_size = 32  # sequences per step (global)
    config.seq_len = 1024  # bytes per sequence
    config.log_every = 100  # train metrics every 100 steps
    config.eval_every = 1000  # validation + attention statistics every 1000 steps
    config.checkpoint_every = 1000  # a preemption loses at most 1000 steps
    config.keep_checkpoints = 3  # newest three

    model = common.decoder_model(config)
    model.num_layers = 12  # GPT-2 small
    model.d_model = 768  # GPT-2 small
    model.num_heads = 12  # 64-wide heads
    model.mlp_dim = 2048  # SwiGLU: 3 x 768 x 2048 ~ GPT-2's 2 x 768 x 3072 parameters
    model.vocab_size = 256  # bytes

    config.data.name = "text"  # bytes of local text files
    config.data.path = config_dict.placeholder(str)  # None = the Python standard library sources

    config.optimizer.learning_rate = 6e-4  # GPT-2/3 small recipe
    config.optimizer.warmup_steps = 1000  # 5% of the run
    config.optimizer.min_lr_ratio = 0.1  # cosine to 6e-5
    config.optimizer.weight_decay = 0.1  # AdamW on matrices
    config.optimizer.b2 = 0.95  # GPT-3 setting, steadier at large batch

    config.precision.compute_dtype = "bfloat16"  # matmuls/activations in bf16; params and Adam in float32

    config.eval.num_batches = 32  # 32 x 32 x 1024 = 1M validation bytes per evaluation
    config.eval.stats_batch_size = 4  # probe batch for attention entropy / first-key mass

    if preset == "tiny":
        config.total_steps = 4  # a couple of steps: the code path, not the result
        config.batch_size = 8  # divisible by 8 fake CPU devices
        config.seq_len = 64
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        model.num_layers = 2
        model.d_model = 64
        model.num_heads = 4
        model.mlp_dim = 128
        config.optimizer.warmup_steps = 1
        config.precision.compute_dtype = "float32"  # CPU: bf16 matmuls are slow there
        config.eval.num_batches = 2
        config.eval.stats_batch_size = 2
    return config
