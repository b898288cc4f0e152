"""A tiny decoder that retrieves from far back in its context: the model `eval.kv` compresses the KV cache of.

Multi-query associative recall (train.data "mqar") at 512 tokens: 16 key-value pairs at the start, then every key
queried once at random places in the remaining ~480 tokens; the loss and accuracy count only the queries. Recalling
a value needs the pair's entries in the cache however long ago they came, which is what a cache policy may evict:

    python -m train --config configs/kv_retrieval.py --workdir runs/kv_retrieval
    python -m eval.kv --workdir runs/kv_retrieval --policies h2o,streaming,tova,snapkv,kivi --budgets 1.0,0.5,0.25,0.1

Hardware: CPU (2 cores). The model is trained at the context eval.kv runs at (RoPE does not extrapolate beyond it);
contexts of 2K-4K train and decode too slowly on 2 CPU cores (the grid decodes every token through every policy).
Expected (measured, on 2 cores shared with other jobs): 600 steps in 4m11s of CPU time (29 minutes wall at load ~16);
eval recall accuracy 0.088 (chance 1/128) and loss 4.03 nats (4.85 uniform over the values): the recall circuit only
partly forms in this budget, but the recalled values' perplexity (54.7 with the full cache) still separates policies
that keep the pairs from those that evict them (benchmarks/results/kv_grid_cpu.json).

Presets (`--config configs/kv_retrieval.py:<preset>`):
  smoke  a few steps of a toy model at 64 tokens (tests).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The kv_retrieval config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("kv_retrieval", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 600  # ~4 CPU-minutes; recall only partly forms (see Expected above)
    config.batch_size = 16  # sequences per step
    config.seq_len = 512  # the context eval.kv decodes at
    config.log_every = 50  # steps between train-metric logs
    config.eval_every = 300  # two evaluations
    config.checkpoint_every = 300  # a restart loses at most 300 steps
    config.keep_checkpoints = 1  # eval.kv reads the latest

    model = common.decoder_model(config)
    model.num_layers = 2  # Zoology's MQAR models are 2 layers
    model.d_model = 64  # residual width
    model.num_heads = 2  # 32-wide heads (KIVI's group of 32 channels fits one head)
    model.mlp_dim = 128  # SwiGLU hidden width
    model.vocab_size = 256  # must equal data.vocab_size

    config.data.name = "mqar"  # multi-query associative recall
    config.data.num_kv_pairs = 16  # 32 tokens of pairs, then 16 queries spread over the remaining 480
    config.data.vocab_size = 256  # keys from [1, 128), values from [128, 256)

    config.optimizer.learning_rate = 3e-3  # as configs/mqar.py
    config.optimizer.warmup_steps = 60  # 10% of the run
    config.optimizer.weight_decay = 0.1  # AdamW decay on matrices

    config.eval.num_batches = 4  # 4 x 16 sequences x 16 queries = 1024 recalls per evaluation

    if preset == "smoke":
        config.total_steps = 4
        config.batch_size = 8
        config.seq_len = 64
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        config.data.num_kv_pairs = 4
        model.d_model = 32
        model.num_heads = 1
        model.mlp_dim = 64
        config.optimizer.warmup_steps = 1
        config.eval.num_batches = 1
        config.eval.stats_batch_size = 2
    return config
