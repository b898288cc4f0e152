"""configs/dit_shapes.py trains, eval.sample_dit samples from the run, eval.diffusion_steer measures on it, and the
concept classifier learns the shapes (all slow: each trains or compiles a model)."""

import json
import os

import numpy as np
import pytest

from configs import dit_shapes
from eval import diffusion_steer, sample_dit
from eval.shape_classifier import concepts_present, train_classifier
from train.run import make_source, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 4-step dit_shapes:smoke run."""
    path = str(tmp_path_factory.mktemp("dit"))
    train(dit_shapes.get_config("smoke"), path)
    return path


def test_sample_dit_writes_images_of_the_prompt(workdir, tmp_path):
    out = str(tmp_path / "x.png")
    images = sample_dit.main(
        ["--workdir", workdir, "--prompt", "red circle", "--out", out, "--num", "2", "--steps", "2"]
    )
    assert images.shape == (2, 16, 16, 3) and np.all((images >= 0) & (images <= 1)) and os.path.getsize(out) > 0
    with pytest.raises(ValueError, match="caption='purple circle'"):
        sample_dit.main(["--workdir", workdir, "--prompt", "purple circle", "--out", out])


def test_diffusion_steer_writes_json_and_png(workdir, tmp_path):
    out = str(tmp_path / "steer")
    args = ["--workdir", workdir, "--out", out, "--prompts", "2", "--samples", "1", "--steps", "2"]
    args += [
        "--systems",
        "a_star,uniform_maps,hd_painter,dgq,float",
        "--quant_prompts",
        "1",
        "--dgq_bits",
        "4",
        "--float_prompts",
        "2",
        "--inpaint_images",
        "2",
    ]
    result = diffusion_steer.main([*args, "--recon_images", "2", "--classifier_steps", "2", "--a_star_step", "1"])
    saved = json.load(open(out + ".json"))
    assert saved["a_star"]["with_step_1"]["both_present"] == result["a_star"]["with_step_1"]["both_present"]
    assert set(saved["uniform_maps"]) >= {"with", "without"} and os.path.getsize(out + ".png") > 0
    assert "w4_a4_log" in saved["dgq"]
    assert set(saved["float"]) >= {"weight_1", "weight_0.5", "weight_0"}
    # PAIntA + RASG compiles on the 8-device test mesh with 2 images (hd_painter.row_median) and keeps the source
    assert all(saved["hd_painter"][k]["known_region_max_abs_diff"] < 1e-5 for k in ("blend", "painta", "painta_rasg"))


def test_concept_classifier_learns_the_shapes():
    model, params, accuracy = train_classifier(steps=300)
    assert accuracy > 0.5  # exact concept sets of 12 concepts; chance is far below
    batch = make_source("shape_captions", split="valid", batch_size=8, seed=5).batch_at(0)
    present = concepts_present(model, params, batch["images"])
    assert present.shape == batch["concepts"].shape
