"""Training techniques in the trainer: the registry and config errors, the no-op settings (bit for bit the baseline
train step), σReparam's math against numpy, and resume with a technique on."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.tiny_run import tiny_config
from train import config_checks, techniques, trainer
from train.checkpointing import Checkpointer, jsonable
from train.config_checks import ConfigError
from train.run import load_run
from train.techniques import sigma_reparam


def _config(*entries, **top):
    config = tiny_config()
    config.techniques = list(entries)
    for key, value in top.items():
        setattr(config, key, value)
    return config


def _train(config, steps=2, workdir="unused"):
    """(parameters after each step, metrics of each step), numpy, for `steps` train steps from a fresh init."""
    s = trainer.setup(config, workdir)
    layout = trainer.layout_state(s)
    rng_init, rng = jax.random.split(jax.random.key(config.seed))
    state = trainer.init_state(s, layout, rng_init)
    step, _ = trainer.make_train_step(s, layout)
    params, metrics = [], []
    with trainer.tracing_context(s):
        for _ in range(steps):
            batch = trainer.mesh_lib.shard_batch(s.train_source.next_batch(), s.mesh)
            state, m = step(state, batch, rng)
            params.append(jax.device_get(state.params))
            metrics.append(jax.device_get(m))
    return params, metrics


def _assert_trees_equal(a, b):
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# --- registry and config errors ---------------------------------------------------------------------------


def test_unknown_technique_names_the_closest():
    with pytest.raises(ConfigError, match=r"'sigma_reparm' is unknown; did you mean 'sigma_reparam'"):
        config_checks.check_config(_config({"name": "sigma_reparm"}))


def test_unknown_option_and_bad_value_are_named():
    with pytest.raises(ConfigError, match=r"option 'gamma' is unknown; did you mean 'gamma_init'"):
        config_checks.check_config(_config({"name": "sigma_reparam", "gamma": "one"}))
    with pytest.raises(ConfigError, match=r"gamma_init='two' must be one of \('sigma', 'one'\)"):
        config_checks.check_config(_config({"name": "sigma_reparam", "gamma_init": "two"}))


def test_entries_must_be_named_mappings_listed_once():
    with pytest.raises(ConfigError, match=r"techniques\[0\].*no 'name'"):
        config_checks.check_config(_config({"gamma_init": "one"}))
    with pytest.raises(ConfigError, match="listed twice"):
        config_checks.check_config(_config({"name": "sigma_reparam"}, {"name": "sigma_reparam"}))
    config = _config().to_dict()
    config["techniques"] = "sigma_reparam"  # a ConfigDict would refuse the type; a plain dict config can hold it
    with pytest.raises(ConfigError, match="must be a list"):
        config_checks.check_config(config)


def test_technique_on_an_unsupported_model_kind_is_refused():
    from configs import cnn_tiny

    config = cnn_tiny.get_config()
    config.techniques = [{"name": "sigma_reparam"}]
    with pytest.raises(ConfigError, match=r"'sigma_reparam' trains model kinds .* model.kind='cnn'"):
        config_checks.check_config(config)


def test_sown_loss_weight_must_be_non_negative():
    config = _config()
    config.loss_weights.losses = -1.0
    with pytest.raises(ConfigError, match=r"loss_weights.losses=-1.0 must be a number >= 0"):
        config_checks.check_config(config)


def test_a_checkpoint_config_without_the_technique_fields_resumes():
    saved = jsonable(tiny_config().to_dict())  # as the trainer saves and compares configs
    del saved["techniques"], saved["loss_weights"]
    current = jsonable(tiny_config().to_dict())
    assert config_checks.resume_drift(saved, current, step=1, where="ckpt/1") == []
    current["techniques"] = [{"name": "sigma_reparam"}]
    with pytest.raises(ConfigError, match="techniques"):
        config_checks.resume_drift(saved, current, step=1, where="ckpt/1")


# --- no-op settings -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_run():
    """Two steps of a config predating config.techniques / config.loss_weights: the baseline train step."""
    old = _config()
    del old["techniques"], old["loss_weights"]
    return _train(old)


@pytest.mark.parametrize(
    "entries",
    [(), ({"name": "entropy_reg", "weight": 0.0},), ({"name": "meap", "ratio": 0.0},)],
    ids=["defaults", "entropy_reg_weight_0", "meap_ratio_0"],
)
def test_no_op_settings_train_exactly_as_the_baseline(baseline_run, entries):
    params, metrics = _train(_config(*entries))
    _assert_trees_equal(baseline_run[0][-1], params[-1])
    assert [m["loss"] for m in metrics] == [m["loss"] for m in baseline_run[1]]


@pytest.mark.slow
def test_sown_loss_weight_scales_the_mechanisms_losses():
    def moh(weight):
        config = _config()
        config.model.attention = "moh"
        config.model.attention_options = {"shared_heads": 1, "top_k": 1}
        config.loss_weights.losses = weight
        return _train(config, steps=1)[1][0]["aux_loss"]

    one, three = moh(1.0), moh(3.0)
    assert one > 0
    np.testing.assert_allclose(three, 3.0 * one, rtol=1e-6)


# --- σReparam ---------------------------------------------------------------------------------------------------


def _numpy_power_step(matrix, u):
    """One power-iteration step, the equations of the paper / official code, in float64 numpy."""
    matrix = np.asarray(matrix, np.float64)
    v = matrix @ u
    v = v / max(np.linalg.norm(v), 1e-12)
    u_next = matrix.T @ v
    u_next = u_next / max(np.linalg.norm(u_next), 1e-12)
    return float(v @ matrix @ u_next), u_next


def test_sigma_reparam_transform_matches_numpy():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(6, 5)).astype(np.float32)
    heads = rng.normal(size=(6, 2, 3)).astype(np.float32)  # q/k/v [E, H, D] -> [6, 6]
    out = rng.normal(size=(2, 3, 6)).astype(np.float32)  # output [H, Dv, E] -> [6, 6] (u of length E)
    params = {"mlp": {"kernel": dense}, "attention": {"query": {"kernel": heads}, "out": {"kernel": out}}}
    params["norm"] = {"scale": np.ones(6, np.float32)}  # not a kernel: untouched
    u = {
        "mlp": {"kernel": rng.normal(size=5)},
        "attention": {"query": {"kernel": rng.normal(size=6)}, "out": {"kernel": rng.normal(size=6)}},
    }
    u = jax.tree.map(lambda x: (x / np.linalg.norm(x)).astype(np.float32), u)
    gamma = {"mlp": {"kernel": 1.5}, "attention": {"query": {"kernel": 0.5}, "out": {"kernel": 2.0}}}
    gamma = jax.tree.map(np.float32, gamma)
    technique = techniques.get("sigma_reparam")()
    got, updates = technique.transform_params(params, {"u": u, "gamma": gamma})
    for keys, matrix in (
        (("mlp", "kernel"), dense),
        (("attention", "query", "kernel"), heads.reshape(6, 6)),
        (("attention", "out", "kernel"), out.reshape(6, 6)),
    ):
        node_u, node_g, node_p, node_w, node_new = u, gamma, params, got, updates["u"]
        for key in keys:
            node_u, node_g, node_p = node_u[key], node_g[key], node_p[key]
            node_w, node_new = node_w[key], node_new[key]
        sigma, u_next = _numpy_power_step(matrix, node_u)
        np.testing.assert_allclose(node_w, node_g / sigma * node_p, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(node_new, u_next, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["norm"]["scale"], params["norm"]["scale"])


def test_sigma_reparam_init_is_the_svd_and_leaves_the_model_function_unchanged():
    """u = the top right singular vector, γ = σ(W_init): at step 0 Ŵ = W, so the logits are the baseline's."""
    plain = trainer.setup(_config(), "unused")
    reparam = trainer.setup(_config({"name": "sigma_reparam"}), "unused")
    batch = plain.train_source.batch_at(0)
    variables = reparam.task.init(jax.random.key(0), batch)
    params = jax.tree.map(np.asarray, __import__("flax").linen.unbox(variables["params"]))
    own = params["techniques"]["sigma_reparam"]
    kernels = sigma_reparam._kernel_paths({k: v for k, v in params.items() if k != "techniques"})
    assert len(kernels) >= 6  # q, k, v, out, and the MLP matrices of the one layer
    for keys, kernel in kernels:
        u, gamma = sigma_reparam._get(own["u"], keys), sigma_reparam._get(own["gamma"], keys)
        matrix = np.asarray(kernel, np.float64).reshape(-1, u.shape[0])
        singular = np.linalg.svd(matrix, compute_uv=False)
        np.testing.assert_allclose(gamma, singular[0], rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(matrix @ u), singular[0], rtol=1e-5)  # u is the top vector
    model_params = {k: v for k, v in params.items() if k != "techniques"}
    base_logits = plain.task.apply({"params": model_params}, batch)
    reparam_logits = reparam.task.apply({"params": params}, batch)
    np.testing.assert_allclose(reparam_logits, base_logits, rtol=2e-5, atol=2e-5)
    # the model applied directly (as decoding does) with the effective parameters computes what the task computes
    effective = techniques.effective_params(reparam.task, params)
    assert "techniques" not in effective
    direct = reparam.task.model.apply({"params": effective}, batch["inputs"])
    np.testing.assert_array_equal(direct, reparam_logits)


@pytest.fixture(scope="module")
def reparam_run():
    return _train(_config({"name": "sigma_reparam"}), steps=2)


def test_sigma_reparam_train_step_stores_the_power_step_and_trains_gamma(reparam_run):
    (before, after), metrics = reparam_run
    own_before, own_after = before["techniques"]["sigma_reparam"], after["techniques"]["sigma_reparam"]
    for keys, kernel in sigma_reparam._kernel_paths({k: v for k, v in before.items() if k != "techniques"}):
        u = sigma_reparam._get(own_before["u"], keys)
        _, expected = _numpy_power_step(np.asarray(kernel).reshape(-1, u.shape[0]), u)
        np.testing.assert_allclose(sigma_reparam._get(own_after["u"], keys), expected, rtol=1e-4, atol=1e-5)
    gammas_before = np.array(jax.tree.leaves(own_before["gamma"]))
    gammas_after = np.array(jax.tree.leaves(own_after["gamma"]))
    assert not np.array_equal(gammas_before, gammas_after)  # γ receives gradients
    assert metrics[-1]["technique/sigma_reparam/gamma_mean"] == pytest.approx(gammas_after.mean(), rel=1e-6)


def _restore_params(workdir, config, step):
    s = trainer.setup(config, workdir)
    layout = trainer.layout_state(s)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=5, save_every=1)
    try:
        state, _, _, _ = checkpointer.restore(step, abstract_state=layout.abstract_state)
    finally:
        checkpointer.close()
    return jax.device_get(state.params)


@pytest.mark.slow
def test_resume_with_sigma_reparam_is_bit_exact(tmp_path):
    def config():
        c = _config({"name": "sigma_reparam"})
        c.total_steps, c.checkpoint_every, c.keep_checkpoints = 4, 2, 3
        return c

    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    trainer.run(config(), straight)
    trainer.run(config(), split, stop_at_step=2)
    resumed = trainer.run(config(), split)
    assert resumed.start_step == 2
    a, b = _restore_params(straight, config(), 4), _restore_params(split, config(), 4)
    assert "sigma_reparam" in a["techniques"]
    _assert_trees_equal(a, b)
    # The run API hands tools that apply the bare model the transformed parameters: same logits as the task's forward.
    run = load_run(straight)
    batch = run.data("valid", per_process=False).next_batch()
    with run.tracing():
        through_task = run.task.apply({"params": run.params}, batch)
        direct = run.task.model.apply({"params": run.model_params}, jnp.asarray(batch["inputs"]))
    assert "techniques" not in run.model_params
    np.testing.assert_allclose(np.asarray(direct), np.asarray(through_task), rtol=1e-6, atol=1e-6)


def test_sigma_reparam_variables_are_unit_vectors_and_scalars(reparam_run):
    params = reparam_run[0][-1]
    u_leaves = jax.tree.leaves(params["techniques"]["sigma_reparam"]["u"])
    assert all(np.ndim(u) == 1 and np.linalg.norm(u) == pytest.approx(1.0, rel=1e-5) for u in u_leaves)
    assert jnp.ndim(jax.tree.leaves(params["techniques"]["sigma_reparam"]["gamma"])[0]) == 0


# --- entropy_reg ------------------------------------------------------------------------------------------------


def test_entropy_reg_needs_a_mechanism_with_attention_weights_and_a_decoder():
    config = _config({"name": "entropy_reg"})
    config.model.attention = "hedgehog"
    with pytest.raises(ConfigError, match=r"'entropy_reg' regularises the attention probabilities.*'hedgehog'"):
        config_checks.check_config(config)
    config.techniques = [{"name": "entropy_reg", "weight": 0.0}]  # off: nothing to capture, nothing refused
    config_checks.check_config(config)
    with pytest.raises(ConfigError, match=r"tolerance=1.5 must be a number in \[0.0, 1.0\]"):
        config_checks.check_config(_config({"name": "entropy_reg", "tolerance": 1.5}))


def _numpy_entropy_loss(layers, thresholds, tolerance, weight):
    """The regulariser with explicit loops over layers, heads, rows and queries (float64)."""
    total = 0.0
    for index, probs in enumerate(layers):
        batch, heads, queries, keys = probs.shape
        max_entropy = np.log(keys)
        layer = 0.0
        for h in range(heads):
            for b in range(batch):
                for i in range(queries):
                    row = probs[b, h, i].astype(np.float64)
                    entropy = -sum(p * np.log(p + 1e-9) for p in row)
                    deviation = entropy - thresholds[index, h] * max_entropy
                    if abs(deviation) > tolerance * max_entropy:
                        layer += deviation**2
        total += layer / heads
    return weight * total / len(layers)


def test_entropy_reg_loss_matches_numpy():
    rng = np.random.default_rng(1)
    layers = []
    for sharpness in (0.3, 4.0):  # one high-entropy layer, one sharp layer
        logits = sharpness * rng.normal(size=(2, 3, 5, 6))
        logits[..., 3:] -= np.triu(np.full((5, 3), 50.0), k=1)[None, None, :, :]  # some near-zero weights
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        layers.append(probs.astype(np.float32))
    thresholds = np.array([[0.9, 0.5, 0.2], [0.1, 0.95, 0.6]], np.float32)
    technique = techniques.get("entropy_reg")(weight=0.01, tolerance=0.1)
    technique.bind_model({"num_layers": 2, "num_heads": 3})
    intermediates = {
        f"layers_{i}": {"attention": {"attention_weights": (jnp.asarray(p),)}} for i, p in enumerate(layers)
    }
    loss, metrics = technique.loss(
        None,
        {"intermediates": intermediates},
        {},
        {"thresholds": {f"layer_{i}": jnp.asarray(t) for i, t in enumerate(thresholds)}},
    )
    expected = _numpy_entropy_loss(layers, thresholds, 0.1, 0.01)
    assert expected > 0
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["loss"]) == float(loss)
    wide = techniques.get("entropy_reg")(weight=0.01, tolerance=1.0)  # every deviation is inside the margin
    wide.bind_model({"num_layers": 2, "num_heads": 3})
    loss_inside, _ = wide.loss(
        None,
        {"intermediates": intermediates},
        {},
        {"thresholds": {f"layer_{i}": jnp.asarray(t) for i, t in enumerate(thresholds)}},
    )
    assert _numpy_entropy_loss(layers, thresholds, 1.0, 0.01) == float(loss_inside) == 0.0


def test_entropy_reg_trains_the_thresholds_and_reports_its_scalars(baseline_run):
    params, metrics = _train(_config({"name": "entropy_reg", "weight": 0.05, "tolerance": 0.0}))
    thresholds = params[-1]["techniques"]["entropy_reg"]["thresholds"]
    assert list(thresholds) == ["layer_0"] and thresholds["layer_0"].shape == (2,)  # the smoke model's 1 layer, 2 heads
    thresholds = thresholds["layer_0"]
    assert not np.allclose(thresholds, 0.5)  # the thresholds receive gradients
    assert metrics[0]["technique/entropy_reg/loss"] > 0
    assert 0 < metrics[0]["technique/entropy_reg/entropy_fraction/layer_0"] <= 1
    assert metrics[0]["loss"] == baseline_run[1][0]["loss"]  # the same forward at step 1: the task loss is equal
    query = params[-1]["layers_0"]["attention"]["query"]["kernel"]  # the regulariser's gradient reaches q/k
    assert not np.array_equal(query, baseline_run[0][-1]["layers_0"]["attention"]["query"]["kernel"])


# --- meap --------------------------------------------------------------------------------------------------------


def test_meap_masks_the_official_count_of_positions_and_keeps_the_targets():
    technique = techniques.get("meap")(ratio=0.15)
    technique.bind_model({"vocab_size": 300})
    inputs = np.arange(3 * 40, dtype=np.int32).reshape(3, 40) % 250
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(inputs + 1), "weights": jnp.ones((3, 40))}
    seen = set()
    for seed in range(30):
        out = technique.transform_batch(batch, jax.random.key(seed), jnp.int32(0))
        changed = np.asarray(out["inputs"]) != inputs
        columns = np.flatnonzero(changed[0])
        assert len(columns) == max(1, int(40 * 0.15)) == 6
        assert (changed == changed[0]).all()  # the same positions in every row
        assert (np.asarray(out["inputs"])[changed] == 299).all()  # vocab_size - 1
        assert columns.max() <= 38  # the last input position is never masked
        np.testing.assert_array_equal(out["targets"], batch["targets"])
        np.testing.assert_array_equal(out["weights"], batch["weights"])
        seen.update(columns.tolist())
    assert len(seen) > 30  # positions are redrawn per key, over the whole range


def test_meap_mask_token_must_be_in_the_vocabulary():
    with pytest.raises(ConfigError, match=r"mask_token=256 must be a token id below model.vocab_size=256"):
        config_checks.check_config(_config({"name": "meap", "mask_token": 256}))
    with pytest.raises(ConfigError, match=r"ratio=1.0 must be a number in \[0.0, 1.0\)"):
        config_checks.check_config(_config({"name": "meap", "ratio": 1.0}))


def test_meap_step_sees_masked_inputs(baseline_run):
    _, metrics = _train(_config({"name": "meap", "ratio": 0.25}), steps=1)
    assert np.isfinite(metrics[0]["loss"])
    assert metrics[0]["loss"] != baseline_run[1][0]["loss"]  # same parameters, different inputs
