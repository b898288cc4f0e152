"""Effects of the diffusion attention systems on a trained text-to-image DiT (configs/dit_shapes.py):

  a_star        both-concepts-present rate of two-concept prompts ("red circle left blue square"), with and without
                A-STAR's test-time latent updates, scored by a concept classifier trained here (eval.shape_classifier),
                and the shape-blind rate of both colours present (pixels near each caption colour)
  uniform_maps  reconstruction error of real (procedural) images after flow inversion (t: 0 -> 1) and reconstruction
                (t: 1 -> 0) with the image's caption, with and without uniform cross-attention maps
  hd_painter    inpainting the right half of two-shape images with a changed second concept: the classifier's rate of
                the new concept on the inpainted half alone, with plain blending, PAIntA, and PAIntA + RASG
  dgq           samples with DGQ-quantized attention weights (log or uniform codes) and activations at 8/6/4 bits:
                MSE to the full-precision sample from the same noise, and the both-concepts-present rate
  float         a second frame whose self-attention is blended with a reference sample's maps warped one patch to
                the right: MSE to the warped reference in the warped region, for FloAt weights 1, 0.5, 0

    python -m eval.diffusion_steer --workdir runs/dit_shapes --out benchmarks/results/diffusion_steer_cpu
        [--prompts 16] [--samples 4] [--steps 20] [--guidance 3] [--a_star_step 1,10] [--a_star_max_steps 10]
        [--recon_images 32] [--classifier_steps 400] [--seed 0] [--systems a_star,uniform_maps,hd_painter,dgq,float]
        [--inpaint_images 32] [--rasg_eta 0.5] [--quant_prompts 16] [--dgq_bits 8,6,4] [--float_prompts 32]
        [--float_weight 1,0.5,0]

Writes <out>.json (every number, the settings and the classifier's own accuracy) and <out>.png (samples without and
with A-STAR on the same noise; originals and reconstructions without and with uniform maps; with a subset of
--systems, a grid of each measured system's images).
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
from attn.steer import AStar, Dgq, FloAt, HdPainter, UniformMaps
from attn.steer.dgq import calibrate
from attn.steer.float_warp import warp_image, warped_region

from .sample_dit import check_run, encode_prompts, sample
from .shape_classifier import concepts_present, train_classifier
from .trainer_api import load_run, make_source, source_class

SYSTEMS = ("a_star", "uniform_maps", "hd_painter", "dgq", "float")
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


# ------------------------------------------------------------------------------------------ hd_painter, dgq, float
def two_shape_batch(run: Any, count: int, split: str = "valid") -> dict[str, np.ndarray]:
    """`count` two-shape images of the run's data source with their captions (no caption dropout)."""
    data = run.config.data
    source = make_source(
        data.name,
        split=split,
        batch_size=4 * count,
        seed=run.config.seed,
        image_size=data.image_size,
        two_shape_fraction=1.0,
        caption_dropout=0.0,
    )
    batch = source.batch_at(0)
    return {key: value[:count] for key, value in batch.items()}


def measure_hd_painter(run: Any, classifier: Any, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inpaint the right half of two-shape images with a caption whose second concept is changed; score whether the
    classifier finds the new concept on the inpainted half alone (left half blacked out), with plain blending,
    PAIntA, and PAIntA + RASG."""
    source = source_class(run.config.data.name)
    batch = two_shape_batch(run, args.inpaint_images)
    rng = np.random.default_rng(args.seed + 2)
    texts, wanted, old = [], [], []
    for caption in batch["captions"]:
        words = [source.WORDS[int(i)] for i in caption]
        first, second = source.caption_concepts(" ".join(words))
        choices = [c for c in range(source.NUM_CONCEPTS) if c not in (first, second)]
        concept = int(rng.choice(choices))
        color, shape = divmod(concept, len(source.SHAPES))
        texts.append(f"{words[0]} {words[1]} left {source.COLORS[color]} {source.SHAPES[shape]}")
        wanted.append(concept)
        old.append(second)
    captions = encode_prompts(run, texts)
    images = jnp.asarray(batch["images"])
    size = images.shape[1]
    mask = np.zeros((size, size), bool)
    mask[:, size // 2 :] = True  # the right half, where the second shape is
    noise = jax.random.normal(jax.random.key(args.seed + 3), images.shape)
    model, params = run.task.model, run.model_params
    settings = {
        "blend": HdPainter(painta=False),
        "painta": HdPainter(tokens=(3, 4)),
        "painta_rasg": HdPainter(tokens=(3, 4), rasg_eta=args.rasg_eta),
    }
    out: dict[str, Any] = {"images": len(texts), "mask": "right half", "tokens": [3, 4], "rasg_eta": args.rasg_eta}
    pictures = {"texts": texts, "source": np.asarray(images)}
    rows = np.arange(len(texts))
    for label, steerer in settings.items():
        started = time.perf_counter()
        with run.tracing():
            x = steerer.inpaint(
                model,
                params,
                captions,
                dit.to_model_range(images),
                mask,
                noise,
                steps=args.steps,
                guidance=args.guidance,
            )
        pixels = np.asarray(dit.from_model_range(x))
        crop = pixels * mask[None, :, :, None]
        present = concepts_present(*classifier, crop)
        out[label] = {
            "new_concept_in_mask": float(np.mean(present[rows, wanted])),
            "old_concept_in_mask": float(np.mean(present[rows, old])),
            "known_region_max_abs_diff": float(np.abs(pixels - np.asarray(images))[:, :, : size // 2].max()),
            "seconds": round(time.perf_counter() - started, 1),
        }
        pictures[label] = pixels
        print(f"hd_painter {label}: {out[label]}")
    return out, pictures


def quantization_batches(run: Any, count: int, batches: int) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """Calibration inputs (x_t, t, captions) of the run's train split: flow-interpolated images at random times."""
    data = run.config.data
    source = make_source(data.name, split="train", batch_size=count, seed=run.config.seed, image_size=data.image_size)
    out = []
    for index in range(batches):
        batch = source.batch_at(index)
        x0 = dit.to_model_range(jnp.asarray(batch["images"]))
        times = jnp.asarray(batch["times"])
        out.append(
            (dit.flow_interpolate(x0, jnp.asarray(batch["noise"]), times), times, jnp.asarray(batch["captions"]))
        )
    return out


def measure_dgq(run: Any, classifier: Any, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample two-concept prompts in full precision and with DGQ at each bit width (attention weights log or
    uniform; activations grouped), on the same noise: MSE to the full-precision sample and both-concepts rate."""
    source = source_class(run.config.data.name)
    prompts = two_concept_prompts(args.quant_prompts, args.seed + 4, source.COLORS, source.SHAPES)
    texts = [p for p in prompts for _ in range(2)]
    captions = encode_prompts(run, texts)
    wanted = np.array([source.caption_concepts(text) for text in texts])
    size = run.config.data.image_size
    noise = jax.random.normal(jax.random.key(args.seed + 5), (len(texts), size, size, run.task.model.channels))
    model, params = run.task.model, run.model_params
    with run.tracing():
        calibration = calibrate(model, params, quantization_batches(run, 64, 4))
    out: dict[str, Any] = {"samples": len(texts), "groups": 8, "calibration": "4 x 64 train images at random times"}
    pictures: dict[str, Any] = {"texts": texts}

    def sample_with(rules: tuple[Any, ...]) -> np.ndarray:
        with run.tracing(), attn.intervene(*rules):
            return np.asarray(sample(model, params, captions, noise, steps=args.steps, guidance=args.guidance))

    reference = sample_with(())
    pictures["fp32"] = reference
    out["fp32"] = both_present_rate(concepts_present(*classifier, reference), wanted)
    for bits in args.dgq_bits:
        for label, steerer in (
            (f"w{bits}_a{bits}_log", Dgq(bits=bits, attention_bits=bits, log_quantizer=True)),
            (f"w{bits}_a{bits}_uniform", Dgq(bits=bits, attention_bits=bits, log_quantizer=False)),
            (f"w{bits}_log_only", Dgq(bits=None, attention_bits=bits, log_quantizer=True)),
            (f"w{bits}_uniform_only", Dgq(bits=None, attention_bits=bits, log_quantizer=False)),
        ):
            images = sample_with(steerer.rules(model, calibration))
            rates = both_present_rate(concepts_present(*classifier, images), wanted)
            out[label] = {"mse_to_fp32": float(np.mean((images - reference) ** 2)), **rates}
            pictures[label] = images
            print(f"dgq {label}: {out[label]}")
    return out, pictures


def measure_float(run: Any, classifier: Any, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample a reference and a second frame (other noise, same prompt) whose self-attention is blended with the
    reference's maps warped one patch to the right; MSE between the frame and the warped reference in the warped
    region, for FloAt weights 1 (no blending), 0.5 and 0."""
    source = source_class(run.config.data.name)
    prompts = two_concept_prompts(args.float_prompts, args.seed + 6, source.COLORS, source.SHAPES)
    captions = encode_prompts(run, prompts)
    wanted = np.array([source.caption_concepts(text) for text in prompts])
    model, params = run.task.model, run.model_params
    size, patch = run.config.data.image_size, model.patch_size
    shape = (len(prompts), size, size, model.channels)
    reference_noise = jax.random.normal(jax.random.key(args.seed + 7), shape)
    noise = jax.random.normal(jax.random.key(args.seed + 8), shape)
    grid = (size // patch, size // patch)
    flow = np.zeros((*grid, 2), np.int32)
    flow[..., 1] = 1  # one patch to the right
    region = warped_region(flow, len(prompts), grid, patch)[..., None]
    out: dict[str, Any] = {"prompts": len(prompts), "flow": f"{patch} pixels (one patch) to the right"}
    pictures: dict[str, Any] = {"texts": prompts}
    for weight in args.float_weight:
        with run.tracing():
            reference, frame = FloAt(weight=weight).sample_pair(
                model, params, captions, reference_noise, noise, flow, steps=args.steps, guidance=args.guidance
            )
        reference = np.asarray(dit.from_model_range(reference))
        frame = np.asarray(dit.from_model_range(frame))
        target = warp_image(reference, flow, patch)
        mse = float(np.sum(((frame - target) * region) ** 2) / (np.sum(region) * frame.shape[-1]))
        label = f"weight_{weight:g}"
        out[label] = {"mse_warped_region": mse, **both_present_rate(concepts_present(*classifier, frame), wanted)}
        pictures["reference"], pictures["warped_reference"], pictures[label] = reference, target, frame
        print(f"float {label}: {out[label]}")
    return out, pictures


def save_rows(path: str, rows: Sequence[tuple[str, np.ndarray]], titles: Sequence[str], show: int = 6) -> None:
    """A PNG grid: one labelled row per (label, images [N, H, W, 3]), the first `show` images of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), show, figsize=(1.5 * show, 1.5 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(show):
            axis = axes[r, c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(images):
                axis.imshow(np.clip(images[c], 0, 1), interpolation="nearest")
            if c == 0:
                axis.set_ylabel(label, fontsize=6)
            if r == 0 and c < len(titles):
                axis.set_title(titles[c], fontsize=5)
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
    parser.add_argument(
        "--systems",
        type=lambda text: text.split(","),
        default=list(SYSTEMS),
        help=f"comma-separated systems to measure, of {','.join(SYSTEMS)}",
    )
    parser.add_argument("--inpaint_images", type=int, default=32, help="hd_painter: two-shape images inpainted")
    parser.add_argument("--rasg_eta", type=float, default=0.5, help="hd_painter: RASG's eta")
    parser.add_argument("--quant_prompts", type=int, default=16, help="dgq: two-concept prompts (2 samples each)")
    parser.add_argument(
        "--dgq_bits", type=lambda text: [int(v) for v in text.split(",")], default=[8, 6, 4], help="dgq: bit widths"
    )
    parser.add_argument("--float_prompts", type=int, default=32, help="float: reference/frame pairs")
    parser.add_argument(
        "--float_weight",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[1.0, 0.5, 0.0],
        help="float: weights of the frame's own self-attention map",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.systems if name not in SYSTEMS]
    if unknown:
        parser.error(f"--systems has {unknown}; choose from {list(SYSTEMS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    started = time.perf_counter()
    run = load_run(args.workdir)
    check_run(run)
    model, params, accuracy = train_classifier(
        image_size=run.config.data.image_size, steps=args.classifier_steps, seed=args.seed
    )
    print(f"concept classifier: exact concept-set accuracy {accuracy:.3f} on valid images")
    measures = {"a_star": measure_a_star, "hd_painter": measure_hd_painter, "dgq": measure_dgq, "float": measure_float}
    measured, pictures = {}, {}
    for name in args.systems:
        if name == "uniform_maps":
            measured[name], pictures[name] = measure_uniform_maps(run, args)
        else:
            measured[name], pictures[name] = measures[name](run, (model, params), args)
    result = {
        "command": "python -m eval.diffusion_steer " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})",
        "jax": jax.__version__,
        "workdir": args.workdir,
        "checkpoint_step": run.step,
        "settings": vars(args),
        "classifier_valid_accuracy": accuracy,
        **measured,
        "seconds": round(time.perf_counter() - started, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    if "a_star" in pictures and "uniform_maps" in pictures:
        save_figure(args.out + ".png", pictures["a_star"], pictures["uniform_maps"])
    else:
        rows = [
            (f"{name} {label}", images)
            for name in args.systems
            for label, images in pictures[name].items()
            if label != "texts" and isinstance(images, np.ndarray)
        ]
        save_rows(args.out + ".png", rows, pictures[args.systems[0]]["texts"])
    print(f"wrote {args.out}.json and {args.out}.png")
    return result


if __name__ == "__main__":
    main()
