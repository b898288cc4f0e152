"""The smallest training config for end-to-end tests of the run harness (checkpoints, resume, metrics)."""

from configs import lm_tiny


def tiny_config():
    """lm_tiny:smoke with one layer, a checkpoint and a log row every step, no evaluation before the end."""
    config = lm_tiny.get_config("smoke")
    config.model.num_layers = 1
    config.total_steps = 2
    config.checkpoint_every = 1
    config.log_every = 1
    config.eval_every = 0
    config.eval.stats_batch_size = 0
    config.eval.num_batches = 1
    return config
