"""Fields every training config shares, with their defaults; each experiment file overrides what it needs.

Not a config itself: `configs/lm_tiny.py` and the others call `base_config()` and one of the model
helpers, then set their own values. The trainer (train/config_checks.py) rejects any field not listed
here or in the model helpers, naming the closest valid one, so a typo never trains silently.

Optional fields are `placeholder(type)` (value None) so that `--config.x.y=value` can still set them.
Durations are in steps. The batch size is global (all processes and devices together).
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from attn.core.sharding import DEFAULT_RULES


def base_config() -> ConfigDict:
    """The run-level fields shared by all experiments (model and data are filled in by each file)."""
    config = ConfigDict()
    config.seed = 0  # seeds parameter init, dropout and the data order; same seed -> same run
    config.total_steps = 1000  # optimizer steps to train for (the schedule decays over these)
    config.batch_size = 16  # global examples per step, over all processes; divisible by data x fsdp
    config.seq_len = 128  # tokens per example (sequence tasks); ignored by image tasks
    config.log_every = 50  # steps between train-metric logs (TensorBoard, metrics.jsonl, console)
    config.eval_every = 500  # steps between evaluations (also at the last step); 0 = only at the end
    config.checkpoint_every = 500  # steps between checkpoints (also at the last step and on SIGTERM)
    config.keep_checkpoints = 3  # most recent checkpoints kept on disk; older ones are deleted
    # Resuming refuses a config that differs from the checkpoint's in model, data or optimization; list the
    # dotted fields to accept deliberately, e.g. --config.allow_changes=total_steps,optimizer.learning_rate
    config.allow_changes = ""
    # Training techniques (train/techniques): a tuple or list of {"name": ..., <option>: ...}, applied in this
    # order; e.g. [{"name": "sigma_reparam"}]. Empty: the plain train step.
    config.techniques = ()
    config.loss_weights = ConfigDict()  # weights of the auxiliary losses in the objective
    config.loss_weights.losses = 1.0  # the "losses" collection the mechanisms sow (their own coefficients x this)
    # Analysis tools run during training (eval.analysis.train_with_evals passes them in; `python -m train` cannot
    # import eval): a tuple of {"tool": ..., "every": N, "options": {...}}; results in <workdir>/evals.jsonl.
    config.evals = ()
    # Start from a checkpoint when the workdir has none of its own (a resume always wins): a Hugging Face model
    # directory (attn.pretrained.load; config.model must describe its model) or another run's workdir (its latest
    # checkpoint's parameters, with a fresh optimizer). Parameters it lacks keep their init. "" = from scratch.
    config.init_from = ""
    # Regexes (re.search) over parameter paths such as "layers_0/attention/query/kernel": with any given, only the
    # parameters matching one train; the frozen ones match a `frozen` regex and get no update. A regex that matches
    # no parameter is an error.
    config.trainable = ()  # regexes of the parameters that train (empty: all)
    config.frozen = ()  # regexes of the parameters held fixed (applied after `trainable`)
    # With a Hugging Face init_from: also write the trained parameters as a Hugging Face directory <workdir>/hf at
    # the end of training (config.json, safetensors, tokenizer.json), loadable by attn.pretrained.load.
    config.save_hf = False

    config.model = ConfigDict()  # the network: kind, size, attention mechanism
    config.model.kind = "decoder"  # "decoder" (causal LM), "encoder" (mlm / classification) or "vit"
    config.model.attention = "softmax"  # registry name (attn.list_mechanisms()) used in every layer
    # Extra attn.build options of the mechanism, e.g. --config.model.attention_options="{'window': (64, 0)}"
    config.model.attention_options = ConfigDict()

    config.data = ConfigDict()  # train.data source and its options
    config.data.name = "text"  # train.data source name (train.data.list_sources()); other fields = options

    config.optimizer = ConfigDict()  # AdamW + warmup/decay schedule (train/optim.py)
    config.optimizer.learning_rate = 1e-3  # peak learning rate, reached after warmup
    config.optimizer.warmup_steps = 100  # linear warmup from 0 to learning_rate
    config.optimizer.schedule = "cosine"  # decay after warmup: "cosine", "linear" or "constant"
    config.optimizer.min_lr_ratio = 0.1  # the decay ends at learning_rate * min_lr_ratio at total_steps
    config.optimizer.weight_decay = 0.1  # AdamW decoupled decay (matrices only, not norms/embeddings)
    config.optimizer.b1 = 0.9  # Adam first-moment decay
    config.optimizer.b2 = 0.95  # Adam second-moment decay
    config.optimizer.eps = 1e-8  # Adam denominator epsilon
    config.optimizer.clip_norm = 1.0  # global gradient-norm clipping; 0 disables it
    config.optimizer.grad_accum_steps = 1  # micro-batches per optimizer update (optax.MultiSteps when > 1)

    config.precision = ConfigDict()  # mixed precision
    # Activations/matmuls run in this dtype; parameters and optimizer state stay float32.
    config.precision.compute_dtype = "float32"  # "float32" or "bfloat16"

    config.mesh = ConfigDict()  # device mesh and logical-axis sharding rules (train/mesh.py)
    config.mesh.shape = (-1,)  # devices per mesh axis; one -1 takes all remaining devices
    config.mesh.axes = ("data",)  # names of the mesh axes, from ("data", "fsdp", "tensor", "context")
    # Logical axis -> mesh axes, in precedence order. Parameters and activations carry logical names; the
    # defaults (attn.core.sharding.DEFAULT_RULES) give data parallelism over ("data", "fsdp"), ZeRO-3 style
    # sharding of "embed" over "fsdp", Megatron-style tensor parallelism of heads/mlp/vocab over "tensor"
    # and sequence parallelism of "length" over "context". Axes absent from the mesh are ignored.
    config.mesh.rules = DEFAULT_RULES

    config.eval = ConfigDict()  # evaluation on the valid split
    config.eval.num_batches = 8  # validation batches per evaluation (same batches every time)
    config.eval.stats_batch_size = 4  # examples in the probe batch for attention entropy / first-key mass

    config.distributed = ConfigDict()  # multi-process / multi-host start-up (train/distributed.py)
    config.distributed.initialize = False  # call jax.distributed.initialize() (multi-host / multi-process)
    # Coordinator "host:port"; None lets JAX auto-detect it (TPU pods, SLURM, Kubernetes)
    config.distributed.coordinator_address = config_dict.placeholder(str)
    config.distributed.num_processes = config_dict.placeholder(int)  # None = auto-detect
    config.distributed.process_id = config_dict.placeholder(int)  # None = auto-detect
    return config


def trunk_fields(model: ConfigDict) -> ConfigDict:
    """Adds the transformer-trunk fields every model kind shares to `model` (defaults: a tiny model)."""
    model.num_layers = 4  # transformer blocks
    model.d_model = 128  # residual stream width
    model.num_heads = 4  # query heads per layer
    model.num_kv_heads = config_dict.placeholder(int)  # key/value heads (GQA/MQA); None = num_heads
    model.head_dim = config_dict.placeholder(int)  # per-head width; None = d_model // num_heads
    model.mlp_dim = 512  # hidden width of the feed-forward block
    model.norm = "rmsnorm"  # "rmsnorm" or "layernorm"
    model.mlp = "swiglu"  # "swiglu" or "gelu"
    model.dropout_rate = 0.0  # dropout on embeddings, sublayer outputs and attention
    return model


def sequence_model_fields(model: ConfigDict) -> ConfigDict:
    """Adds the token-model fields (decoder and encoder) to `model`: vocabulary and positions."""
    model.vocab_size = 256  # token vocabulary; must match the data source's
    model.tie_embeddings = True  # output head reuses the token embedding (transposed)
    model.position_embedding = "none"  # "none" (mechanism handles positions, e.g. RoPE) or "learned"
    model.max_len = 2048  # rows of the learned position table (unused with "none")
    return model


def decoder_model(config: ConfigDict) -> ConfigDict:
    """Makes `config.model` a causal decoder LM (attn.models.DecoderLM) with tiny defaults."""
    config.model.kind = "decoder"  # see model.kind in base_config
    sequence_model_fields(trunk_fields(config.model))
    return config.model


def encoder_model(config: ConfigDict) -> ConfigDict:
    """Makes `config.model` a bidirectional encoder (attn.models.Encoder) with tiny defaults."""
    config.model.kind = "encoder"  # see model.kind in base_config
    sequence_model_fields(trunk_fields(config.model))
    config.model.head = "mlm"  # "mlm" (per-token vocab logits) or "classification" (pooled)
    config.model.num_classes = config_dict.placeholder(int)  # classes of the classification head
    config.model.pool = "mean"  # classification pooling: "mean" or a "pooling" mechanism (attentive_pooling)
    config.model.pool_options = ConfigDict()  # attn.build options of that pooling mechanism
    return config.model


def vit_model(config: ConfigDict) -> ConfigDict:
    """Makes `config.model` a Vision Transformer classifier (attn.models.ViT) with tiny defaults."""
    config.model.kind = "vit"  # see model.kind in base_config
    trunk_fields(config.model)
    config.model.num_classes = 10  # classes; must match the image source's num_classes
    config.model.patch_size = 4  # square patch side in pixels; image_size must be a multiple
    config.model.pool = "cls"  # "cls" (class token), "mean" (mean over patches) or a "pooling" mechanism
    config.model.pool_options = ConfigDict()  # attn.build options of that pooling mechanism
    return config.model


def check_preset(name: str, arg: str | None, presets: tuple[str, ...]) -> str:
    """Returns the preset named by `--config file.py:arg` ("" when none), or a ValueError listing them."""
    arg = arg or ""
    if arg not in presets:
        raise ValueError(f"unknown preset {arg!r} for configs/{name}.py; expected one of {presets}")
    return arg


def cnn_model(config: ConfigDict) -> ConfigDict:
    """Makes `config.model` a residual CNN classifier with channel attention (attn.models.CNN), tiny defaults."""
    config.model.kind = "cnn"  # see model.kind in base_config
    config.model.attention = "eca"  # a "channels" mechanism (attn/channel/) in every residual block
    config.model.num_classes = 4  # classes; must match the image source's num_classes
    config.model.widths = (16, 32, 64)  # channels of each stage; stages after the first halve H and W
    config.model.blocks_per_stage = 1  # residual blocks per stage
    config.model.norm_groups = 8  # GroupNorm groups; must divide every width
    return config.model


def encoder_decoder_model(config: ConfigDict) -> ConfigDict:
    """Makes `config.model` an encoder-decoder (attn.models.EncoderDecoder) with tiny defaults."""
    config.model.kind = "encoder_decoder"  # see model.kind in base_config
    sequence_model_fields(trunk_fields(config.model))  # num_layers counts the decoder's blocks
    config.model.source_vocab_size = config_dict.placeholder(int)  # encoder vocabulary; None = vocab_size
    config.model.encoder_layers = config_dict.placeholder(int)  # encoder blocks; None = num_layers
    config.model.encoder_attention = "softmax"  # the encoder's (bidirectional) self-attention mechanism
    config.model.encoder_attention_options = ConfigDict()  # attn.build options of encoder_attention
    config.model.cross_attention = "softmax"  # the decoder's cross-attention to the encoder output
    config.model.cross_attention_options = ConfigDict()  # attn.build options of cross_attention
    return config.model


def vlm_model(config: ConfigDict) -> ConfigDict:
    """Makes `config.model` a vision-language model (attn.models.VisionLanguageModel) with tiny defaults."""
    config.model.kind = "vlm"  # see model.kind in base_config
    sequence_model_fields(trunk_fields(config.model))  # the text decoder's fields
    config.model.fusion = "cross"  # "cross" (cross-attention to the image tokens) or "prefix" (prefix-LM)
    config.model.cross_attention = "softmax"  # the decoder's cross-attention mechanism (fusion="cross")
    config.model.cross_attention_options = ConfigDict()  # attn.build options of cross_attention
    config.model.visual_prefix_pool = 0  # fusion="cross": > 0 prepends image tokens pooled by this factor (CrossLMM)
    config.model.patch_size = 4  # square patch side in pixels; image_size must be a multiple
    config.model.vision_layers = 2  # image encoder (ViT) blocks
    config.model.vision_d_model = config_dict.placeholder(int)  # image encoder width; None = d_model
    config.model.vision_num_heads = config_dict.placeholder(int)  # image encoder heads; None = num_heads
    config.model.vision_mlp_dim = config_dict.placeholder(int)  # image encoder MLP width; None = mlp_dim
    config.model.vision_attention = "softmax"  # image encoder mechanism ("sequence" or "spatial")
    config.model.vision_attention_options = ConfigDict()  # attn.build options of vision_attention
    config.model.vision_position_embedding = "learned"  # image encoder positions: "learned" table or "sincos2d"
    return config.model
