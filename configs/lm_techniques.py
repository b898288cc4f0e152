"""A tiny byte-level decoder trained at a high learning rate with no warmup, with a training technique switched on:
the setting of the σReparam experiment (does the attention entropy collapse, with and without the technique?).

    python -m train --config configs/lm_techniques.py --workdir runs/lm_techniques
    python -m train --config configs/lm_techniques.py:baseline --workdir runs/lm_techniques_base   # no technique
    python -m eval.techniques --config configs/lm_techniques.py                # both, side by side: JSON + PNG

Presets (`--config configs/lm_techniques.py:<preset>`):
  ""               σReparam ({"name": "sigma_reparam"}) on every kernel
  baseline         the same run without techniques
  entropy_reg      the entropy regulariser instead (a decoder whose mechanism exposes attention weights)
  meap             MEAP input masking instead (mask id 256: the model has one id more than the 256 bytes)

The model: 2 layers, d_model 64, 4 heads, RMSNorm, SwiGLU, softmax attention with RoPE, 64-byte sequences; AdamW at
a constant 3e-2 from step 0 (no warmup), no gradient clipping. Attention entropy per layer is measured every
`eval_every` steps on the probe batch.

Hardware: CPU. Expected runtime: about a minute per run (200 steps, 0.12M parameters) on a free core.
Expected result (measured, benchmarks/results/techniques_sigma_reparam.json): the baseline's mean attention
entropy falls below 0.1 nats in both layers by step 200, σReparam's stays above 1 nat, and σReparam ends with the
lower validation loss. At learning rate 1e-2 the baseline's second layer still falls to ~0.4 nats.
Any technique: `--config.techniques="[{'name': 'entropy_reg', 'weight': 1e-3}]"`.
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from configs import common

PRESETS = ("", "baseline", "entropy_reg", "meap")


def get_config(arg: str | None = None) -> ConfigDict:
    """The lm_techniques config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("lm_techniques", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 200  # about a minute on one CPU core
    config.batch_size = 16  # 16 x 64 = 1024 bytes per step
    config.seq_len = 64  # bytes per example
    config.log_every = 10  # train loss every 10 steps
    config.eval_every = 10  # attention entropy per layer every 10 steps (probe batch)
    config.checkpoint_every = 200  # only at the end
    config.keep_checkpoints = 1  # the last one

    model = common.decoder_model(config)
    model.num_layers = 2  # transformer blocks
    model.d_model = 64  # residual width
    model.num_heads = 4  # 16-wide heads
    model.mlp_dim = 192  # SwiGLU hidden width
    model.vocab_size = 256  # bytes

    config.data.name = "text"  # bytes of local text files
    config.data.path = config_dict.placeholder(str)  # None = the Python standard library sources

    config.optimizer.learning_rate = 3e-2  # high: the baseline's attention entropy collapses (measured)
    config.optimizer.warmup_steps = 0  # no warmup
    config.optimizer.schedule = "constant"  # no decay either
    config.optimizer.clip_norm = 0.0  # no clipping: nothing hides an unstable step

    config.eval.num_batches = 4  # 4 x 16 x 64 validation bytes per evaluation
    config.eval.stats_batch_size = 8  # probe rows for the per-layer attention entropy

    config.techniques = [{"name": "sigma_reparam"}]  # the technique under test (see the presets)
    if preset == "baseline":
        config.techniques = []
    elif preset == "entropy_reg":
        config.techniques = [{"name": "entropy_reg", "weight": 1e-3}]
    elif preset == "meap":
        model.vocab_size = 257  # one id more than the bytes: 256 is the mask token
        config.techniques = [{"name": "meap", "ratio": 0.15, "mask_token": 256}]
    return config
