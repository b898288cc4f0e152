"""Effects of the diffusion attention systems on a trained text-to-image DiT (configs/dit_shapes.py):

  a_star        both-concepts-present rate of two-concept prompts ("red circle left blue square"), with and without
                A-STAR's test-time latent updates, scored by a concept classifier trained here (eval.shape_classifier),
                and the shape-blind rate of both colours present (pixels near each caption colour)
  uniform_maps  reconstruction error of real (procedural) images after flow inversion (t: 0 -> 1) and reconstruction
                (t: 1 -> 0) with the image's caption, with and without uniform cross-attention maps

    python -m eval.diffusion_steer --workdir runs/dit_shapes --out benchmarks/results/diffusion_steer_cpu
        [--prompts 16] [--samples 4] [--steps 20] [--guidance 3] [--a_star_step 1,10] [--a_star_max_steps 10]
        [--recon_images 32] [--classifier_steps 400] [--seed 0]

Writes <out>.json (every number, the settings and the classifier's own accuracy) and <out>.png (samples without and
with A-STAR on the same noise; originals and reconstructions without and with uniform maps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.models import dit
from attn.steer import AStar, UniformMaps
from eval.sample_dit import check_run, encode_prompts, sample
from eval.shape_classifier import concepts_present, train_classifier
from train.run import load_run, make_source, source_class

# Caption positions of the two concepts of "<colour> <shape> left <colour> <shape>".
CONCEPT_POSITIONS = ((0, 1), (3, 4))


def two_concept_prompts(count: int, seed: int, colors: Sequence[str], shapes: Sequence[str]) -> list[str]:
    """`count` prompts "<c1> <s1> left <c2> <s2>" with two different (colour, shape) concepts, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    concepts = [(c, s) for c in colors for s in shapes]
    prompts = []
    for _ in range(count):
        first, second = rng.choice(len(concepts), size=2, replace=False)
        (c1, s1), (c2, s2) = concepts[first], concepts[second]
        prompts.append(f"{c1} {s1} left {c2} {s2}")
    return prompts


def both_present_rate(present: np.ndarray, wanted: np.ndarray) -> dict[str, float]:
    """present bool [N, K] (classifier), wanted int [N, 2] concept indices -> rates of both / first / second."""
    first = present[np.arange(len(wanted)), wanted[:, 0]]
    second = present[np.arange(len(wanted)), wanted[:, 1]]
    return {
        "both_present": float(np.mean(first & second)),
        "first_present": float(np.mean(first)),
        "second_present": float(np.mean(second)),
    }


def colors_present(images: np.ndarray, colors: np.ndarray, *, tolerance: float = 0.2, pixels: int = 4) -> np.ndarray:
    """bool [N, K]: at least `pixels` pixels of images [N, H, W, 3] lie within `tolerance` (max over channels) of
    each colour of colors [K, 3] (a shape-blind check of the colour part of each concept)."""
    close = np.max(np.abs(images[:, None, :, :, :] - colors[None, :, None, None, :]), axis=-1) <= tolerance
    return np.sum(close, axis=(2, 3)) >= pixels


def measure_a_star(run: Any, classifier: Any, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    source = source_class(run.config.data.name)
    prompts = two_concept_prompts(args.prompts, args.seed, source.COLORS, source.SHAPES)
    texts = [p for p in prompts for _ in range(args.samples)]
    captions = encode_prompts(run, texts)
    wanted = np.array([source.caption_concepts(text) for text in texts])
    wanted_colors = wanted // len(source.SHAPES)  # concept index = colour * len(SHAPES) + shape
    palette = np.stack([source.PALETTE[name] for name in source.COLORS])
    size, channels = run.config.data.image_size, run.task.model.channels
    noise = jax.random.normal(jax.random.key(args.seed + 1), (len(texts), size, size, channels))
    model, params = run.task.model, run.model_params
    out: dict[str, Any] = {"prompts": prompts, "samples_per_prompt": args.samples}
    images = {}
    runs = [("without", None)] + [
        (f"with_step_{step:g}", AStar(step, args.a_star_max_steps)) for step in args.a_star_step
    ]
    for label, steerer in runs:
        started = time.perf_counter()
        update = None if steerer is None else steerer.latent_update(model, params, captions, CONCEPT_POSITIONS)
        with run.tracing():
            images[label] = np.asarray(
                sample(model, params, captions, noise, steps=args.steps, guidance=args.guidance, latent_update=update)
            )
        rates = both_present_rate(concepts_present(*classifier, images[label]), wanted)
        colors = colors_present(images[label], palette)
        rates["both_colors_present"] = float(np.mean(colors[np.arange(len(texts))[:, None], wanted_colors].all(axis=1)))
        out[label] = {**rates, "seconds": round(time.perf_counter() - started, 1)}
        print(f"a_star {label}: {rates}")
    return out, {"texts": texts, **images}


def invert_and_reconstruct(model: Any, params: Any, x0: jax.Array, captions: jax.Array, steps: int) -> jax.Array:
    """x0 [B, H, W, C] in [-1, 1] -> Euler inversion to t = 1 with the captions -> Euler reconstruction to t = 0."""
    velocity = jax.jit(dit.guided_velocity(model, {"params": params}, captions))
    noise = dit.euler_sample(velocity, x0, steps, start=0.0, stop=1.0)
    return dit.euler_sample(velocity, noise, steps)


def measure_uniform_maps(run: Any, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    data = run.config.data
    source = make_source(  # the run's valid images, every one with its caption (no caption dropout)
        data.name,
        split="valid",
        batch_size=args.recon_images,
        seed=run.config.seed,
        image_size=data.image_size,
        caption_dropout=0.0,
    )
    batch = source.batch_at(0)
    x0 = dit.to_model_range(jnp.asarray(batch["images"]))
    captions = jnp.asarray(batch["captions"])
    model, params = run.task.model, run.model_params
    out: dict[str, Any] = {"images": int(x0.shape[0]), "steps_each_way": args.steps}
    images = {"original": np.asarray(batch["images"])}
    for label, rules in (("without", ()), ("with", UniformMaps().rules(model))):
        with run.tracing(), attn.intervene(*rules):
            recon = invert_and_reconstruct(model, params, x0, captions, args.steps)
        pixels = np.asarray(dit.from_model_range(recon))
        mse = float(np.mean((pixels - images["original"]) ** 2))
        out[label] = {"mse": mse, "psnr_db": float(10 * np.log10(1.0 / max(mse, 1e-12)))}
        images[label] = pixels
        print(f"uniform_maps {label}: {out[label]}")
    return out, images


def save_figure(path: str, a_star: dict[str, Any], recon: dict[str, Any], show: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        ("no A-STAR", a_star["without"][:show]),
        *(
            (label.replace("with_step_", "A-STAR "), images[:show])
            for label, images in a_star.items()
            if label.startswith("with_step_")
        ),
        ("original", recon["original"][:show]),
        ("recon", recon["without"][:show]),
        ("recon, uniform", recon["with"][:show]),
    ]
    fig, axes = plt.subplots(len(rows), show, figsize=(1.5 * show, 1.6 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(show):
            axis = axes[r, c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(images):
                axis.imshow(np.clip(images[c], 0, 1), interpolation="nearest")
            if c == 0:
                axis.set_ylabel(label, fontsize=7)
            if r == 0 and c < len(a_star["texts"]):
                axis.set_title(a_star["texts"][c], fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.diffusion_steer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="run directory of a DiT run (configs/dit_shapes.py)")
    parser.add_argument("--out", default="benchmarks/results/diffusion_steer_cpu", help="path prefix for .json/.png")
    parser.add_argument("--prompts", type=int, default=16, help="two-concept prompts")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps (each way for the reconstruction)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance of the samples")
    parser.add_argument(
        "--a_star_step",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[1.0, 10.0],
        help="A-STAR step sizes on the latent, comma-separated (each is one measured setting)",
    )
    parser.add_argument("--a_star_max_steps", type=int, default=10, help="first steps that get an A-STAR update")
    parser.add_argument("--recon_images", type=int, default=32, help="images inverted and reconstructed")
    parser.add_argument("--classifier_steps", type=int, default=400, help="training steps of the concept classifier")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    started = time.perf_counter()
    run = load_run(args.workdir)
    check_run(run)
    model, params, accuracy = train_classifier(
        image_size=run.config.data.image_size, steps=args.classifier_steps, seed=args.seed
    )
    print(f"concept classifier: exact concept-set accuracy {accuracy:.3f} on valid images")
    a_star, a_star_images = measure_a_star(run, (model, params), args)
    recon, recon_images = measure_uniform_maps(run, args)
    result = {
        "command": "python -m eval.diffusion_steer " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})",
        "jax": jax.__version__,
        "workdir": args.workdir,
        "checkpoint_step": run.step,
        "settings": vars(args),
        "classifier_valid_accuracy": accuracy,
        "a_star": a_star,
        "uniform_maps": recon,
        "seconds": round(time.perf_counter() - started, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    save_figure(args.out + ".png", a_star_images, recon_images)
    print(f"wrote {args.out}.json and {args.out}.png")
    return result


if __name__ == "__main__":
    main()
