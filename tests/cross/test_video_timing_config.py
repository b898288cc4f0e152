"""configs/video_timing.py: every preset passes the trainer's checks and its model initialises on the batches of
its data source, with the frame count of the data equal to the cross-attention's."""

import jax
import jax.numpy as jnp
import pytest

from configs import video_timing
from train import config_checks, tasks
from train.data import make_source


@pytest.mark.parametrize("preset", video_timing.PRESETS)
def test_preset_passes_the_checks_and_builds_on_its_batches(preset):
    config = video_timing.get_config(preset)
    config_checks.check_config(config)
    options = dict(config.data)
    name = options.pop("name")
    source = make_source(name, split="train", batch_size=2, seed=0, **options)
    batch = {key: jax.ShapeDtypeStruct(shape, dtype) for key, (shape, dtype) in source.element_spec.items()}
    task = tasks.build_task(config.model, config.precision.compute_dtype)
    variables = jax.eval_shape(lambda rng: task.init(rng, batch), jax.random.key(0))
    assert "params" in variables and source.vocab_size == config.model.vocab_size
    if config.model.cross_attention == "video_ccam":
        assert config.model.cross_attention_options.num_frames == config.data.num_frames
    logits = jax.eval_shape(task.apply, variables, batch)
    assert logits.shape == (2, batch["inputs"].shape[1], config.model.vocab_size) and logits.dtype == jnp.float32
