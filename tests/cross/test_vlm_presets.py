"""configs/vlm_tiny.py presets of the cross-modal mechanisms: each trains eight steps on one batch, its loss falls,
and the mechanism's own parameters move; with qa_modality_mutual the question reaches the image tokens."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import vlm_tiny
from train import tasks
from train.data import make_source

# preset -> (sublayer of block 0 of the decoder, or of the image encoder with "image_encoder/", one of the
# mechanism's own parameters); modality_mutual has none (its mask is the mechanism: tested below)
PRESETS = {
    "moda_smoke": ("attention", "modality_ratio"),
    "concept_centric_smoke": ("cross_attention", "slot_init"),
    "qa_moda_smoke": ("attention", "modality_ratio"),
    "qa_concept_centric_smoke": ("cross_attention", "slot_init"),
    "qa_adem_smoke": ("cross_attention", "value_offset"),
    "qa_tcpa_smoke": ("image_encoder/attention", "image_prompts"),
    "qa_modality_mutual_smoke": None,
}


def smoke_batch(config):
    options = {key: value for key, value in config.data.to_dict().items() if key != "name" and value is not None}
    source = make_source(config.data.name, batch_size=config.batch_size, seq_len=config.seq_len, **options)
    return {key: jnp.asarray(value) for key, value in source.next_batch().items()}


@pytest.mark.slow  # a jitted init and eight training steps of a VLM per preset
@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_trains_and_moves_the_mechanism(preset):
    config = vlm_tiny.get_config(preset)
    if config.model.attention == "moda":
        assert config.model.attention_options.image_tokens == (config.data.image_size // config.model.patch_size) ** 2
    batch = smoke_batch(config)
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
    if PRESETS[preset] is None:
        return
    sublayer, name = PRESETS[preset]
    stack, _, sublayer = sublayer.rpartition("/")
    before = params[stack or "decoder"]["layers_0"][sublayer][name]
    after = trained[stack or "decoder"]["layers_0"][sublayer][name]
    assert float(jnp.abs(after - before).max()) > 0


@pytest.mark.slow  # a jitted init and two forwards of a two-layer VLM per case (20-60 s on the shared cores)
@pytest.mark.parametrize("preset, reaches", [("qa_modality_mutual_smoke", True), ("qa_prefix_smoke", False)])
def test_with_modality_mutual_the_question_reaches_the_image_tokens(preset, reaches):
    # Two decoder layers: the first text position sees only the image tokens and itself, so its logits change with a
    # later question word only if the image tokens read the question in layer 1 (AKI's mask), never under the
    # prefix-LM mask alone.
    config = vlm_tiny.get_config(preset)
    config.model.num_layers = 2
    batch = smoke_batch(config)
    task = tasks.build_task(config.model, config.precision.compute_dtype)
    variables = task.init(jax.random.key(0), batch)
    changed = {**batch, "inputs": batch["inputs"].at[:, -2].set((batch["inputs"][:, -2] + 1) % 13)}
    apply = jax.jit(task.apply)
    moved = float(jnp.abs(apply(variables, changed)[:, 0] - apply(variables, batch)[:, 0]).max())
    assert (moved > 1e-5) == reaches, moved
