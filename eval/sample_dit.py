"""Sampling images from a trained text-to-image DiT (configs/dit_shapes.py) with Euler steps of its flow.

    python -m eval.sample_dit --workdir runs/dit_shapes --prompt "red circle left blue square" --out x.png
        [--num 4] [--steps 30] [--guidance 3.0] [--seed 0] [--step N]

Loads the latest (or `--step`) checkpoint of the workdir (`train.run.load_run`), encodes the prompt with the data
source's caption vocabulary, draws `--num` noise images from `--seed` and integrates the learned velocity from t = 1
to t = 0 in `--steps` Euler steps (`attn.models.dit.euler_sample`), with classifier-free guidance `--guidance` (1: no
guidance; the null caption is all padding). Writes a PNG row of the samples.

From Python: `sample(model, params, captions, noise, steps=..., guidance=...)` returns images in [0, 1].
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.models import dit

from .trainer_api import Run, load_run, source_class


def check_run(run: Run) -> None:
    """ValueError unless `run` trained a DiT on captioned images (a source with `encode_caption`)."""
    if run.task.kind != "dit":
        raise ValueError(
            f"workdir: eval.sample_dit samples DiT runs (model.kind='dit'); this run has {run.task.kind!r}"
        )
    if not hasattr(source_class(run.config.data.name), "encode_caption"):
        raise ValueError(f"workdir: data.name={run.config.data.name!r} has no caption vocabulary (encode_caption)")


def encode_prompts(run: Run, prompts: Sequence[str]) -> jax.Array:
    """int32 [len(prompts), L] captions of `prompts` in the vocabulary of the run's data source."""
    encode = source_class(run.config.data.name).encode_caption
    return jnp.asarray(np.stack([encode(prompt) for prompt in prompts]))


def sample(
    model: dit.DiT,
    params: Any,
    captions: jax.Array,
    noise: jax.Array,
    *,
    steps: int = 30,
    guidance: float = 1.0,
    latent_update: Callable[[jax.Array, jax.Array, int], jax.Array] | None = None,
) -> jax.Array:
    """Images float32 [B, H, W, C] in [0, 1] for captions int [B, L] from noise [B, H, W, C] (Euler, `steps`)."""
    velocity = jax.jit(dit.guided_velocity(model, {"params": params}, captions, guidance))
    return dit.from_model_range(dit.euler_sample(velocity, noise, steps, latent_update=latent_update))


def save_row(images: np.ndarray, path: str, *, titles: Sequence[str] | None = None) -> None:
    """A PNG of images [N, H, W, C] in [0, 1] side by side (nearest-neighbour upscaled), optional titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(images)
    fig, axes = plt.subplots(1, count, figsize=(1.6 * count, 1.9), squeeze=False)
    for i, axis in enumerate(axes[0]):
        axis.imshow(np.clip(np.asarray(images[i]), 0, 1), interpolation="nearest")
        axis.set_axis_off()
        if titles is not None:
            axis.set_title(titles[i], fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.sample_dit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="run directory of a DiT training run")
    parser.add_argument("--prompt", required=True, help='caption, e.g. "red circle left blue square"')
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--num", type=int, default=4, help="images to sample")
    parser.add_argument("--steps", type=int, default=30, help="Euler steps from t=1 to t=0")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    if args.num < 1 or args.steps < 1:
        parser.error(f"--num={args.num} and --steps={args.steps} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> np.ndarray:
    args = parse(argv)
    run = load_run(args.workdir, args.step)
    check_run(run)
    captions = encode_prompts(run, [args.prompt] * args.num)
    size = run.config.data.image_size
    noise = jax.random.normal(jax.random.key(args.seed), (args.num, size, size, run.task.model.channels))
    with run.tracing():
        images = np.asarray(
            sample(run.task.model, run.model_params, captions, noise, steps=args.steps, guidance=args.guidance)
        )
    save_row(images, args.out, titles=[args.prompt] * args.num)
    print(f"wrote {args.num} samples of {args.prompt!r} to {args.out}")
    return images


if __name__ == "__main__":
    main()
