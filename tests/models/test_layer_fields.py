"""Per-layer fields: mechanisms that declare `layer_fields` get their layer's index and the stack depth from every
model that builds attention by name (lightning's TNL decay schedule and first-layer LRPE as the example)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.linear.lightning import LightningAttention
from attn.models import CNN, DecoderLM, Encoder, EncoderDecoder, VisionLanguageModel, ViT
from attn.models.fields import with_layer_fields

KEY = jax.random.key(0)


def tnl_decays(num_heads: int, num_layers: int) -> np.ndarray:
    """TransNormerLLM's decay per (layer, head), from the released code's formula written out here:
    slope_h = (2^(-8 / H))^h for h = 1..H (H a power of two), lambda_{l,h} = exp(-slope_h (1 - l / (L - 1) + 1e-5))."""
    start = 2.0 ** (-8.0 / num_heads)
    slopes = np.array([start**h for h in range(1, num_heads + 1)])
    return np.array([np.exp(-slopes * (1.0 - layer / (num_layers - 1) + 1e-5)) for layer in range(num_layers)])


def recorded_decays(model: nn.Module, *args, **kwargs) -> tuple[dict[str, np.ndarray], dict]:
    """({module path: the decay its lightning layer used}, parameter shapes) of tracing model.init(args)."""
    decays: dict[str, np.ndarray] = {}

    def record(next_fun, call_args, call_kwargs, context):
        if not (isinstance(context.module, LightningAttention) and context.method_name == "decay_rates"):
            return next_fun(*call_args, **call_kwargs)
        with jax.ensure_compile_time_eval():  # the decay is a constant of the layer: evaluate it, not trace it
            out = next_fun(*call_args, **call_kwargs)
        decays["/".join(context.module.path)] = np.asarray(out)
        return out

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: model.init(KEY, *args, **kwargs))
    return decays, nn.unbox(shapes["params"])


def test_four_layer_decoder_from_one_options_dict_gets_the_tnl_decay_of_each_layer():
    model = DecoderLM(
        vocab_size=16,
        num_layers=4,
        d_model=32,
        num_heads=4,
        mlp_dim=32,
        attention="lightning",
        attention_options={"chunk_size": 4},
    )
    decays, params = recorded_decays(model, jnp.zeros((1, 8), jnp.int32))
    want = tnl_decays(4, 4)
    assert sorted(decays) == [f"layers_{i}/attention" for i in range(4)]
    for i in range(4):
        np.testing.assert_allclose(decays[f"layers_{i}/attention"], want[i], rtol=1e-6)
    assert len({tuple(d) for d in decays.values()}) == 4, "every layer has its own decay"
    # LRPE in the first layer only, as in the paper.
    assert ["lrpe" in params[f"layers_{i}"]["attention"] for i in range(4)] == [True, False, False, False]


def test_explicit_values_win_and_per_layer_lists_still_get_the_missing_field():
    options = [{"layer_index": 0, "num_layers": 2}, {}, {"num_layers": 5}]
    model = DecoderLM(
        vocab_size=16,
        num_layers=3,
        d_model=16,
        num_heads=2,
        mlp_dim=16,
        attention="lightning",
        attention_options=options,
    )
    decays, params = recorded_decays(model, jnp.zeros((1, 4), jnp.int32))
    np.testing.assert_allclose(decays["layers_0/attention"], tnl_decays(2, 2)[0], rtol=1e-6)
    np.testing.assert_allclose(decays["layers_1/attention"], tnl_decays(2, 3)[1], rtol=1e-6)
    np.testing.assert_allclose(decays["layers_2/attention"], tnl_decays(2, 5)[2], rtol=1e-6)
    forced = DecoderLM(
        vocab_size=16,
        num_layers=2,
        d_model=16,
        num_heads=2,
        mlp_dim=16,
        attention="lightning",
        attention_options={"lrpe": True},
    )
    _, params = recorded_decays(forced, jnp.zeros((1, 4), jnp.int32))
    assert all("lrpe" in params[f"layers_{i}"]["attention"] for i in range(2))


def test_every_stack_counts_its_own_layers():
    """Encoder, ViT, both stacks of an encoder-decoder (self- and cross-attention) and of a VLM fill the fields
    per layer, each stack counting its own blocks."""
    sizes = dict(d_model=16, num_heads=2, mlp_dim=16)
    encoder = Encoder(vocab_size=16, num_layers=3, num_classes=2, attention="lightning", **sizes)
    decays, _ = recorded_decays(encoder, jnp.zeros((1, 4), jnp.int32))
    for i in range(3):
        np.testing.assert_allclose(decays[f"layers_{i}/attention"], tnl_decays(2, 3)[i], rtol=1e-6)

    vit = ViT(num_classes=2, patch_size=2, num_layers=2, attention="lightning", **sizes)
    decays, _ = recorded_decays(vit, jnp.zeros((1, 4, 4, 3)))
    for i in range(2):
        np.testing.assert_allclose(decays[f"layers_{i}/attention"], tnl_decays(2, 2)[i], rtol=1e-6)

    seq2seq = EncoderDecoder(
        vocab_size=16,
        num_layers=2,
        encoder_layers=3,
        attention="lightning",
        encoder_attention="lightning",
        cross_attention="lightning",
        **sizes,
    )
    decays, _ = recorded_decays(seq2seq, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))
    for i in range(3):
        np.testing.assert_allclose(decays[f"encoder/layers_{i}/attention"], tnl_decays(2, 3)[i], rtol=1e-6)
    for i in range(2):
        for sublayer in ("attention", "cross_attention"):
            np.testing.assert_allclose(decays[f"decoder/layers_{i}/{sublayer}"], tnl_decays(2, 2)[i], rtol=1e-6)
    vlm = VisionLanguageModel(
        vocab_size=16,
        num_layers=2,
        patch_size=2,
        vision_layers=3,
        vision_attention="lightning",
        attention="lightning",
        **sizes,
    )
    decays, _ = recorded_decays(vlm, jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4), jnp.int32))
    for i in range(3):
        np.testing.assert_allclose(decays[f"image_encoder/layers_{i}/attention"], tnl_decays(2, 3)[i], rtol=1e-6)
    for i in range(2):
        np.testing.assert_allclose(decays[f"decoder/layers_{i}/attention"], tnl_decays(2, 2)[i], rtol=1e-6)


def test_with_layer_fields_fills_only_declared_fields():
    assert attn.get("lightning").layer_fields == ("layer_index", "num_layers")
    assert attn.get("softmax").layer_fields == ()
    assert with_layer_fields("softmax", {"position": "rope"}, layer_index=2, num_layers=4) == {"position": "rope"}
    filled = with_layer_fields("lightning", {"num_layers": 9}, layer_index=2, num_layers=4)
    assert filled == {"layer_index": 2, "num_layers": 9}
    with pytest.raises(ValueError, match="layer_index=4 must lie in \\[0, num_layers=4\\)"):
        with_layer_fields("lightning", {}, layer_index=4, num_layers=4)
    assert "filled per layer by the models: layer_index, num_layers" in str(attn.get("lightning"))


def test_cnn_counts_the_residual_blocks_of_all_stages(monkeypatch):
    """The CNN fills the fields too, counting residual blocks across stages (no channel mechanism declares any
    today, so the fill is observed through the helper the CNN calls)."""
    import attn.models.cnn as cnn

    calls = []

    def spy(name, options, *, layer_index, num_layers):
        calls.append((name, layer_index, num_layers))
        return with_layer_fields(name, options, layer_index=layer_index, num_layers=num_layers)

    monkeypatch.setattr(cnn, "with_layer_fields", spy)
    model = CNN(num_classes=2, widths=(8, 8), blocks_per_stage=(2, 1), attention=("eca", None))
    jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 8, 8, 3))))
    assert calls == [("eca", 0, 3), ("eca", 1, 3)]


def test_register_rejects_unknown_or_missing_layer_fields():
    class NoFields(nn.Module):
        width: int = 1

    with pytest.raises(ValueError, match="layer_fields=\\('depth',\\) of mechanism 'probe' names \\['depth'\\]"):
        attn.registry.register(
            "probe",
            family="linear",
            paper="p",
            catalog=None,
            input_kind="sequence",
            supports_causal=False,
            supports_decode=False,
            summary="s",
            layer_fields=("depth",),
        )
    decorator = attn.registry.register(
        "probe",
        family="linear",
        paper="p",
        catalog=None,
        input_kind="sequence",
        supports_causal=False,
        supports_decode=False,
        summary="s",
        option_docs={"width": "w"},
        layer_fields=("layer_index",),
    )
    with pytest.raises(ValueError, match="names \\['layer_index'\\], not option\\(s\\) of NoFields"):
        decorator(NoFields)
    assert "probe" not in attn.list_mechanisms()
