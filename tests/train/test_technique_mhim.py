"""mhim: masked hard instance mining with a momentum teacher — no-op setting, the masks and the consistency loss
against numpy, the teacher's EMA in the train state, bit-exact resume, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.test_mil import mil_baseline, mil_config
from tests.train.test_techniques import _assert_trees_equal, _restore_params, _train
from train import config_checks, trainer
from train.config_checks import ConfigError
from train.techniques import mhim


def test_mhim_off_trains_exactly_as_the_baseline():
    baseline = mil_baseline()
    off = {"name": "mhim", "weight": 0.0, "mask_ratio_h": 0.0, "mask_ratio": 0.0}
    params, metrics = _train(mil_config(off))
    _assert_trees_equal(baseline[0][-1], params[-1])
    assert [m["loss"] for m in metrics] == [m["loss"] for m in baseline[1]]


@pytest.mark.slow
def test_mhim_carries_an_ema_teacher_and_masks_the_student_bags():
    on, scalars = _train(mil_config({"name": "mhim", "momentum": 0.9, "mask_ratio_h": 0.25}))
    teacher = [p["techniques"]["mhim"]["teacher"] for p in on]
    students = [{k: v for k, v in p.items() if k != "techniques"} for p in on]
    # step 1 averages the initial student into the teacher initialised to it; step 2 reads the student after step 1
    expected = jax.tree.map(lambda t, s: 0.9 * t + 0.1 * s, teacher[0], students[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), teacher[1], expected)
    # bags of 4..8 valid instances lose ceil(n / 4) = 1 or 2 of them
    assert 2.0 <= scalars[0]["technique/mhim/kept_instances"] <= 7.0
    assert scalars[0]["technique/mhim/consistency"] > 0


def test_hard_instance_keep_masks_the_teacher_top_and_a_random_share():
    rng = np.random.default_rng(4)
    attention = rng.random((3, 10)).astype(np.float32)
    lengths = np.array([10, 7, 4])
    exact = mhim.hard_instance_keep(
        jax.random.key(0),
        jnp.asarray(attention),
        jnp.asarray(lengths),
        high_ratio=0.3,
        high_random_ratio=1.0,
        random_ratio=0.0,
    )
    for b, n in enumerate(lengths):
        top = np.argsort(-attention[b, :n])[: int(np.ceil(n * 0.3))]
        expected = np.zeros(10, bool)
        expected[:n] = True
        expected[top] = False
        np.testing.assert_array_equal(exact[b], expected)
    widened = mhim.hard_instance_keep(
        jax.random.key(1),
        jnp.asarray(attention),
        jnp.asarray(lengths),
        high_ratio=0.2,
        high_random_ratio=0.5,
        random_ratio=0.1,
    )
    for b, n in enumerate(lengths):
        dropped = set(range(n)) - set(np.flatnonzero(np.asarray(widened[b])))
        candidates = set(np.argsort(-attention[b, :n])[: int(np.ceil(n * 0.4))])  # ceil(n * 0.2 / 0.5)
        high = int(np.ceil(np.ceil(n * 0.4) * 0.5))
        random_count = int(np.ceil(n * 0.1))
        assert len(dropped & candidates) >= high - random_count  # the high mask lies in the candidates
        assert max(high, random_count) <= len(dropped) <= high + random_count
        assert not np.asarray(widened[b, n:]).any()


def test_soft_target_cross_entropy_matches_numpy():
    rng = np.random.default_rng(5)
    student, teacher = rng.standard_normal((2, 3, 6))
    target = np.exp(teacher / 0.1) / np.exp(teacher / 0.1).sum(-1, keepdims=True)
    log_probs = student / 2.0 - np.log(np.exp(student / 2.0).sum(-1, keepdims=True))
    expected = np.mean(np.sum(-target * log_probs, axis=-1))
    got = mhim.soft_target_cross_entropy(jnp.asarray(student), jnp.asarray(teacher), 2.0, 0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.slow
def test_resume_with_mhim_is_bit_exact(tmp_path):
    def config():
        c = mil_config({"name": "mhim", "mask_ratio": 0.2})
        c.total_steps, c.checkpoint_every, c.keep_checkpoints, c.eval_every = 4, 2, 3, 0
        return c

    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    trainer.run(config(), straight)
    trainer.run(config(), split, stop_at_step=2)
    assert trainer.run(config(), split).start_step == 2
    a, b = _restore_params(straight, config(), 4), _restore_params(split, config(), 4)
    assert "teacher" in a["techniques"]["mhim"]
    _assert_trees_equal(a, b)


def test_mhim_refuses_other_model_kinds_and_bad_options():
    from tests.train.tiny_run import tiny_config

    lm = tiny_config()
    lm.techniques = [{"name": "mhim"}]
    with pytest.raises(ConfigError, match=r"'mhim' trains model kinds \('mil',\); model.kind='decoder'"):
        config_checks.check_config(lm)
    with pytest.raises(ConfigError, match=r"momentum=1.5 must be"):
        config_checks.check_config(mil_config({"name": "mhim", "momentum": 1.5}))
    with pytest.raises(ConfigError, match=r"mask_ratio_hr=0.0 must be"):
        config_checks.check_config(mil_config({"name": "mhim", "mask_ratio_hr": 0.0}))
