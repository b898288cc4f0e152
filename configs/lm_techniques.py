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
  passkey          the passkey task (train.data "passkey": 5 digits hidden at a random depth of 64 tokens, asked
                   for at the end; eval accuracy is the digit accuracy), a learning rate of 3e-3 with warmup, no
                   technique
  softmax_only     the softmax-only model of Jha & Reagen 2025: no norms (model.norm="none"), a linear FFN
                   (model.mlp="linear"), 4 layers, learning rate 1e-3 with warmup and clipping, no technique
  softmax_only_entropy_reg   the same with the entropy regulariser (weight 1e-4, tolerance 0.2), for
                   `python -m eval.techniques --config configs/lm_techniques.py
                   --presets softmax_only,softmax_only_entropy_reg`
  meap_passkey     the same as passkey with MEAP masking (ratio 0.15, mask id 64: one id more than the task's 64), for
                   `python -m eval.techniques --config configs/lm_techniques.py --presets passkey,meap_passkey`

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

PRESETS = ("", "baseline", "entropy_reg", "meap", "passkey", "meap_passkey", "softmax_only", "softmax_only_entropy_reg")


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
    elif preset in ("passkey", "meap_passkey"):
        config.total_steps = 600
        config.eval_every = 100  # passkey digit accuracy on the validation stream
        config.checkpoint_every = 600
        config.data.name = "passkey"  # synthetic: filler, "the passkey is" d1..d5, ..., "what is the passkey?"
        config.data.vocab_size = 64  # 10 digits, 2 markers, 52 fillers
        config.data.num_digits = 5
        model.vocab_size = 64
        config.optimizer.learning_rate = 3e-3
        config.optimizer.warmup_steps = 50
        config.optimizer.schedule = "cosine"
        config.optimizer.clip_norm = 1.0
        config.techniques = []
        if preset == "meap_passkey":
            model.vocab_size = 65  # one id more than the task: 64 is the mask token
            config.techniques = [{"name": "meap", "ratio": 0.15, "mask_token": 64}]
    elif preset in ("softmax_only", "softmax_only_entropy_reg"):
        config.total_steps = 300
        config.checkpoint_every = 300
        model.num_layers = 4  # early and deep layers: entropic overload vs entropy collapse
        model.norm = "none"  # no LayerNorm/RMSNorm anywhere (the final norm included)
        model.mlp = "linear"  # FFN without its GELU: attention's softmax is the only non-linearity
        config.optimizer.learning_rate = 1e-3
        config.optimizer.warmup_steps = 30
        config.optimizer.schedule = "cosine"
        config.optimizer.clip_norm = 1.0
        config.techniques = []
        if preset == "softmax_only_entropy_reg":
            # official λ 1e-5 sums over batch x queries of larger runs; 16 x 64 rows here, hence 1e-4
            config.techniques = [{"name": "entropy_reg", "weight": 1e-4, "tolerance": 0.2}]
    return config
