"""Click-through-rate prediction on synthetic user-behaviour sequences, with the target attention chosen by preset.

Each user has 2 planted interest categories (of 8; 64 items, item i in category i mod 8); 60% of their 64 behaviours
come from those categories, the rest are uniform noise items. The target item is clicked (label 1, half the
examples) exactly when its category is one of the interests (train.data "user_behavior"). The model
(attn.models.ctr.CTRModel, model.kind "ctr") embeds the items, lets the target attend over the behaviours and feeds
[e_t ; o ; e_t * o] to an MLP; evaluation reports eval/auc (ROC AUC over all 512 validation examples) and accuracy.

    python -m train --config configs/recsys_tiny.py:softmax --workdir runs/recsys_softmax

Presets (`--config configs/recsys_tiny.py:<preset>`):
  softmax  (default) DIN-style target attention with q/k/v projections over one shared embedding table
  dare     DARE ([209]): decoupled attention / representation tables, no projections (attention "dare")
  mqsa     MQSA ([45]): the target is appended to the behaviours; causal multi-query self-attention read at the
           target (long query = mean of the last 4 items, short = the target alone, mixed 0.5 / 0.5)
  sdim     SDIM ([201]): the behaviours whose 32 SimHash signatures of 3 bits collide with the target's, weighted by
           their l2-normalised collision counts (one head over the whole embedding, no projections)
  smoke    the softmax preset, a few steps of a smaller model (tests, CI); smoke_dare, smoke_mqsa likewise

Hardware: CPU. Measured (2 cores shared with other jobs, jax 0.10.2): ~40 s per preset including compilation (600
steps of 64 users, 10k parameters); final eval AUC, mean of seeds 0-2: softmax 0.986, dare 0.955, mqsa 0.986,
sdim 0.982 (seeds 0/1/2: 0.992, 0.978, 0.975; added with --presets softmax,sdim).
Side by side: benchmarks/results/recsys_cpu.json and .png, from
    python -m eval.techniques --config configs/recsys_tiny.py --presets softmax,dare,mqsa --name recsys_cpu
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

MECHANISMS = ("softmax", "dare", "mqsa", "sdim")
PRESETS = ("", *MECHANISMS, "smoke", *(f"smoke_{name}" for name in MECHANISMS[1:]))


def get_config(arg: str | None = None) -> ConfigDict:
    """The recsys_tiny config; `arg` picks a preset (see the module docstring)."""
    preset = common.check_preset("recsys_tiny", arg, PRESETS)
    smoke = preset.startswith("smoke")
    mechanism = preset.removeprefix("smoke").removeprefix("_") or "softmax"
    config = common.base_config()
    config.total_steps = 600  # 600 x 64 = 38k users
    config.batch_size = 64
    config.seq_len = 64  # behaviours per user
    config.log_every = 50
    config.eval_every = 200
    config.checkpoint_every = 600
    config.keep_checkpoints = 1

    model = config.model
    model.kind = "ctr"  # attn.models.ctr.CTRModel
    model.num_items = 64  # = data.num_items
    model.embedding = "shared"  # one item table (DIN); "decoupled" = DARE's attention + representation tables
    model.d_model = 32  # shared table width
    model.attention_dim = 16  # decoupled: attention table width (= num_heads * head_dim)
    model.representation_dim = 16  # decoupled: representation table width
    model.attention = "softmax"  # target-attention mechanism
    model.attention_options = {"position": "none"}  # behaviours are a set here: no positional encoding
    model.query = "cross"  # the target is the query, the behaviours the keys and values
    model.num_heads = 2
    model.head_dim = None  # d_model / num_heads (shared) or attention_dim / num_heads (decoupled)
    model.mlp_dim = 64  # interest MLP width

    config.data.name = "user_behavior"
    config.data.num_items = 64
    config.data.num_categories = 8
    config.data.num_interests = 2  # planted interest categories per user
    config.data.interest_rate = 0.6  # share of behaviours from the interests; the rest are noise items
    config.data.positive_fraction = 0.5  # balanced clicks

    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 30
    config.optimizer.weight_decay = 1e-4

    config.eval.num_batches = 8  # 512 validation users per evaluation
    config.eval.stats_batch_size = 0  # one query per example: no [B, H, Tq, Tk] statistics to summarise

    if mechanism == "dare":
        model.embedding = "decoupled"
        model.attention = "dare"
        model.attention_options = {}
    elif mechanism == "mqsa":
        model.attention = "mqsa"
        model.attention_options = {"long_window": 4, "short_window": 1, "long_weight": 0.5}
        model.query = "last"
    elif mechanism == "sdim":
        model.attention = "sdim"  # SDIM ([201]): SimHash collisions gather the behaviours, no projections
        model.attention_options = {"num_hashes": 32, "hash_bits": 3, "weighting": "l2"}
        model.num_heads = 1  # the whole item embedding is hashed, as in the paper
    if smoke:
        config.total_steps = 4
        config.batch_size = 8
        config.seq_len = 8
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 4
        model.d_model = 16
        model.attention_dim = 8
        model.representation_dim = 8
        model.mlp_dim = 16
        config.optimizer.warmup_steps = 2
        config.eval.num_batches = 1
    return config
