"""Attention-based multiple-instance learning (ABMIL, gated attention pooling) on synthetic bags.

Each bag holds 16 to 32 instance feature vectors (16-D) drawn around 4 negative prototypes; a positive bag hides 1
or 2 instances from a positive prototype among them (train.data "mil_bags"). The model (attn.models.mil) embeds each
instance, pools with gated attention a = softmax(w^T (tanh(V h) * sigmoid(U h))) and classifies the bag. Besides
bag accuracy, evaluation reports how well the attention localises the positive instances: eval/instance_auc
(within-bag AUC of the attention against the instance labels), eval/top1_hit and eval/positive_mass.

    python -m train --config configs/mil_tiny.py --workdir runs/mil_tiny
    python -m train --config configs/mil_tiny.py:acmil --workdir runs/mil_acmil
    python -m eval.techniques --config configs/mil_tiny.py:aem --name techniques_mil_aem

Presets (`--config configs/mil_tiny.py:<preset>`):
  ""      ABMIL, no technique
  aem     + attention entropy maximisation ({"name": "aem", "weight": 0.1}, [88])
  acmil   ACMIL: 5 attention branches, stochastic top-k instance masking (top 4, drop 0.5) + the acmil technique
          (branch and diversity losses, [142])
  mhim    + masked hard instance mining with a momentum teacher ({"name": "mhim"}, [165])
  smoke   a few steps of a smaller model (tests, CI)

Hardware: CPU. Measured (2 cores shared with other jobs, jax 0.10.2): 30-80 s per run including compilation (400
steps of 32 bags, 2k parameters); ABMIL ends at eval/accuracy 0.70, instance_auc 0.89, top1_hit 0.63 (chance 0.5).
Every preset side by side: benchmarks/results/techniques_mil_cpu.json and .png, from
    python -m eval.techniques --config configs/mil_tiny.py --presets ,aem,acmil,mhim --name techniques_mil_cpu
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

PRESETS = ("", "aem", "acmil", "mhim", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    """The mil_tiny config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("mil_tiny", arg, PRESETS)
    config = common.base_config()
    config.total_steps = 400  # 400 x 32 = 12.8k bags
    config.batch_size = 32  # bags per step
    config.seq_len = 32  # instances per bag (the largest bag; shorter ones are padded)
    config.log_every = 25
    config.eval_every = 100
    config.checkpoint_every = 400
    config.keep_checkpoints = 1

    model = config.model
    model.kind = "mil"  # attn.models.mil.AttentionMIL
    model.num_classes = 2  # negative / positive bag
    model.d_model = 32  # instance embedding width L
    model.attention_dim = 16  # width D of the gated attention network
    model.gated = True  # tanh(V h) * sigmoid(U h) (ABMIL's gated attention)
    model.branches = 1  # attention branches (1 = ABMIL; ACMIL uses several)
    model.mask_top_k = 0  # ACMIL's stochastic top-k instance masking: instances considered (0 = off)
    model.mask_drop = 0.0  # ... and the fraction of them masked in each branch while training
    model.num_layers = 0  # transformer blocks over the instances before pooling (0 = ABMIL)
    model.num_heads = 2  # heads of those blocks
    model.mlp_dim = 64  # MLP width of those blocks
    model.attention = "softmax"  # mechanism of those blocks (any registered sequence mechanism)
    model.attention_options = {}  # its options

    config.data.name = "mil_bags"
    config.data.feature_dim = 16  # instance features F
    config.data.num_clusters = 4  # negative prototypes
    config.data.max_positives = 2  # a positive bag holds 1 or 2 positive instances
    config.data.min_instances = 16  # bag sizes are uniform in [16, seq_len]
    config.data.signal = 2.0  # prototype norm: how far the positive instances are from the negatives
    config.data.noise = 1.0  # instance noise std

    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 20
    config.optimizer.weight_decay = 1e-4

    config.eval.num_batches = 8  # 256 validation bags per evaluation
    config.eval.stats_batch_size = 0  # the MIL pooling sows no [B, H, Tq, Tk] probabilities to summarise

    if preset == "aem":
        config.techniques = [{"name": "aem", "weight": 0.1}]
    elif preset == "acmil":
        model.branches = 5  # ACMIL's n_token
        model.mask_top_k = 4  # of the top 4 instances of each branch ...
        model.mask_drop = 0.5  # ... 2 are masked at random (ACMIL: top 10, drop 0.6 of bags of thousands)
        config.techniques = [{"name": "acmil"}]
    elif preset == "mhim":
        config.techniques = [{"name": "mhim"}]
    elif preset == "smoke":
        config.total_steps = 6
        config.batch_size = 8
        config.seq_len = 8
        config.log_every = 2
        config.eval_every = 6
        config.checkpoint_every = 6
        config.data.min_instances = 4
        config.data.feature_dim = 8
        model.d_model = 16
        model.attention_dim = 8
        config.optimizer.warmup_steps = 2
        config.eval.num_batches = 1
    return config
