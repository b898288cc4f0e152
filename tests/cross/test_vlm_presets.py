"""configs/vlm_tiny.py presets of the cross-modal mechanisms: each trains eight steps on one batch, its loss falls,
and the mechanism's own parameters move."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import vlm_tiny
from train import tasks
from train.data import make_source

# preset -> (sublayer of decoder block 0, one of the mechanism's own parameters)
PRESETS = {
    "moda_smoke": ("attention", "modality_ratio"),
    "concept_centric_smoke": ("cross_attention", "slot_init"),
}


@pytest.mark.slow  # a jitted init and eight training steps of a VLM per preset
@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_trains_and_moves_the_mechanism(preset):
    config = vlm_tiny.get_config(preset)
    if config.model.attention == "moda":
        assert config.model.attention_options.image_tokens == (config.data.image_size // config.model.patch_size) ** 2
    options = {key: value for key, value in config.data.to_dict().items() if key != "name" and value is not None}
    source = make_source(config.data.name, batch_size=config.batch_size, seq_len=config.seq_len, **options)
    batch = {key: jnp.asarray(value) for key, value in source.next_batch().items()}
    task = tasks.build_task(config.model, config.precision.compute_dtype)
    optimizer = optax.adam(3e-3)

    def loss_fn(params):
        sums = task.loss_sums(task.apply({"params": params}, batch), batch)
        return sums["loss_sum"] / sums["weight"]

    @jax.jit
    def train(rng):
        params = nn.unbox(task.init(rng, batch)["params"])

        def step(carry, _):
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (trained, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=8)
        return losses, loss_fn(trained), params, trained

    losses, final, params, trained = train(jax.random.key(0))
    assert np.isfinite(np.asarray(losses)).all() and float(final) < 0.9 * float(losses[0])
    sublayer, name = PRESETS[preset]
    before = params["decoder"]["layers_0"][sublayer][name]
    after = trained["decoder"]["layers_0"][sublayer][name]
    assert float(jnp.abs(after - before).max()) > 0
