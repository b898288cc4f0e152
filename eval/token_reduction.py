"""`python -m eval.token_reduction`: image tokens kept against accuracy for the visual token-reduction systems
(attn.steer: vtc_cls, zipvl, g_search, vmtc_cmai) next to random and uniform-stride keeping.

    python -m eval.token_reduction [--workdir runs/token_reduction]
        [--output benchmarks/results/token_reduction_cpu.json]

The model is the prefix VLM of configs/token_reduction.py (64 image tokens, a class token in the image encoder),
trained on image_questions into --workdir when it holds no checkpoint (eval.steer's recipe). On held-out questions,
for each keep budget (--budgets, shares of the 64 image tokens):

  random        k = ceil(budget * N) image tokens chosen uniformly at random enter the decoder
  stride        every (N / k)-th image token in raster order (spatial down-sampling)
  vtc_cls       the top-k by the encoder's [CLS] attention
  vmtc          k tokens: the top half by [CLS] attention kept, the rest merged by k-means (VMTC alone)
  vmtc_cmai     VMTC and CMAI (--inhibit of each text query's image keys masked by focus score)
  g_search      P-Sigmoid per-layer keep ratios with mean = budget (steepness picked on calibration rows); the
                G-Search schedule (fewest tokens within --tolerance of the unpruned calibration accuracy) is one
                more point
  zipvl         tau in --taus; its kept share is whatever the attention distribution gives (a point per tau)

"kept" is the share of the image tokens each decoder layer reads, averaged over layers and rows. Controls: accuracy
with the image tokens zeroed, with the first image token only, and with another row's image. Output: the JSON and a
PNG with the same stem. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.steer import GSearch, VmtcCmai, VtcCls, ZipVL
from attn.steer import g_search as g_lib
from attn.steer import visual_tokens as vt

from .analysis.evaluator import pyplot
from .results import write_report
from .steer_harness import DEVICE, answer_accuracy, check_rows, measured, system_records, trained_model
from .steer_harness import question_rows as questions

CONFIG = "configs/token_reduction.py"
SYSTEMS = ("random", "stride", "vtc_cls", "vmtc", "vmtc_cmai", "g_search", "zipvl")


def accuracy(model: Any, params: Any, reduction: vt.Reduction, batch: dict[str, np.ndarray]) -> float:
    """The share of answers (the last position's argmax) equal to the target."""
    return answer_accuracy(vt.reduced_logits(model, params, reduction, jnp.asarray(batch["inputs"])), batch)


def kept_prefix(model: Any, params: Any, images: jax.Array, indices: jax.Array) -> vt.Reduction:
    """The Reduction feeding the decoder the image tokens at indices int [B, k]."""
    prefix = vt.image_tokens(model, params, images)
    kept = jnp.full((prefix.shape[0], model.num_layers), indices.shape[1] / prefix.shape[1], jnp.float32)
    return vt.Reduction(vt.gather_tokens(prefix, indices), kept)


def random_indices(batch: int, n: int, k: int, seed: int) -> jax.Array:
    """k distinct image tokens per row, uniformly at random, in position order: int32 [B, k]."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.sort(np.stack([rng.permutation(n)[:k] for _ in range(batch)]), axis=1), jnp.int32)


def stride_indices(batch: int, n: int, k: int) -> jax.Array:
    """Tokens floor(i n / k), i = 0..k-1 (uniform stride in raster order): int32 [B, k]."""
    return jnp.broadcast_to(jnp.asarray([i * n // k for i in range(k)], jnp.int32), (batch, k))


def point(model: Any, params: Any, reduction: vt.Reduction, batch: dict[str, np.ndarray], **extra: Any) -> dict:
    return {"kept": float(jnp.mean(reduction.kept)), "accuracy": accuracy(model, params, reduction, batch), **extra}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    model, params, info = trained_model(args.workdir, args.config)
    data = info["config_data"]
    vt.check_prefix_vlm(model)
    calib = questions(data, args.calibration_rows, args.seed)
    test = questions(data, args.rows, args.seed + 1)
    images = jnp.asarray(test["images"])
    n = vt.image_tokens(model, params, images[:1]).shape[1]
    result: dict[str, Any] = {"tool": "token_reduction", "device": DEVICE, "model": info, "options": vars(args)}
    result["image_tokens"] = int(n)
    result["systems"] = system_records(("vtc_cls", "zipvl", "g_search", "vmtc_cmai"))
    curves: dict[str, list[dict[str, Any]]] = {name: [] for name in SYSTEMS}
    rows = images.shape[0]

    def reduce(system: Any, batch: dict[str, np.ndarray]) -> vt.Reduction:
        return system.reduce(model, params, jnp.asarray(batch["images"]), jnp.asarray(batch["inputs"]))

    for budget in args.budgets:
        k = vt.keep_count(budget, n)
        baselines = {"random": random_indices(rows, n, k, args.seed), "stride": stride_indices(rows, n, k)}
        for name, indices in baselines.items():
            curves[name].append(point(model, params, kept_prefix(model, params, images, indices), test))
        curves["vtc_cls"].append(point(model, params, reduce(VtcCls(budget), test), test))
        curves["vmtc"].append(point(model, params, reduce(VmtcCmai(budget), test), test))
        curves["vmtc_cmai"].append(point(model, params, reduce(VmtcCmai(budget, inhibit=args.inhibit), test), test))
        # P-Sigmoid: the steepness with the best calibration accuracy at this budget
        sweep = {}
        for steepness in args.steepness:
            ratios = g_lib.p_sigmoid(model.num_layers, budget, steepness)
            sweep[steepness] = accuracy(model, params, reduce(GSearch(ratios), calib), calib)
        best = max(sweep, key=lambda s: (sweep[s], -s))
        ratios = g_lib.p_sigmoid(model.num_layers, budget, best)
        curves["g_search"].append(
            point(model, params, reduce(GSearch(ratios), test), test, steepness=best, ratios=list(ratios))
        )
    for tau in args.taus:
        reduction = reduce(ZipVL(tau), test)
        per_layer = np.asarray(jnp.mean(reduction.kept, axis=0)).round(4).tolist()
        curves["zipvl"].append(point(model, params, reduction, test, tau=tau, kept_per_layer=per_layer))

    def calibration_score(ratios: tuple[float, ...]) -> float:
        return accuracy(model, params, reduce(GSearch(ratios), calib), calib)

    ratios, trials = g_lib.g_search(calibration_score, model.num_layers, tolerance=args.tolerance)
    result["g_search_schedule"] = {
        **point(model, params, reduce(GSearch(ratios), test), test),
        "ratios": list(ratios),
        "calibration_trials": trials,
    }
    result["curves"] = curves
    # Does the answer need the image, and how much of it does one token carry (the encoder mixes every patch into
    # every token, so a single image token can hold what the question needs)?
    prefix = vt.image_tokens(model, params, images)
    result["controls"] = {
        "image_tokens_zeroed": accuracy(
            model, params, vt.Reduction(jnp.zeros_like(prefix), jnp.zeros((rows, 1))), test
        ),
        "first_image_token_only": point(
            model, params, kept_prefix(model, params, images, jnp.zeros((rows, 1), jnp.int32)), test
        )["accuracy"],
        "images_of_other_rows": accuracy(
            model, params, vt.Reduction(jnp.roll(prefix, 1, axis=0), jnp.ones((rows, 1))), test
        ),
    }
    result["unreduced_accuracy"] = curves["vtc_cls"][0]["accuracy"] if args.budgets[0] == 1.0 else None
    return result


# ---------------------------------------------------------------------------------------------------- output
def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy against the kept share of image tokens, one line per system."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"random": ("grey", "--"), "stride": ("black", ":")}
    for i, (name, points) in enumerate(result["curves"].items()):
        ordered = sorted(points, key=lambda p: p["kept"])
        color, line = styles.get(name, (f"C{i}", "-"))
        ax.plot([p["kept"] for p in ordered], [p["accuracy"] for p in ordered], line, marker="o", color=color,
                label=name)  # fmt: skip
    schedule = result["g_search_schedule"]
    ax.plot(schedule["kept"], schedule["accuracy"], "*", markersize=14, color="C5", label="G-Search schedule")
    ax.axhline(0.25, color="grey", linewidth=0.6)
    ax.text(0.0, 0.26, "chance", fontsize=7, color="grey")
    zeroed = result.get("controls", {}).get("image_tokens_zeroed")
    if zeroed is not None:
        ax.axhline(zeroed, color="C3", linewidth=0.6, linestyle="--")
        ax.text(0.0, zeroed - 0.04, "image tokens zeroed", fontsize=7, color="C3")
    ax.set(xlabel="share of the image tokens each decoder layer reads", ylabel="accuracy", ylim=(0, 1), xlim=(0, 1.02))
    ax.legend(fontsize=8)
    ax.set_title(f"visual token reduction, prefix VLM on image_questions ({result['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.token_reduction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/token_reduction", help="trained run (trained here when empty)")
    parser.add_argument("--config", default=CONFIG, help="config file[:preset] used to train an empty workdir")
    parser.add_argument("--output", default="benchmarks/results/token_reduction_cpu.json", help="JSON path (+ PNG)")
    parser.add_argument("--rows", type=int, default=512, help="questions measured")
    parser.add_argument("--calibration-rows", type=int, default=256, help="questions for G-Search and P-Sigmoid")
    parser.add_argument("--seed", type=int, default=1, help="seed of the calibration rows (measured rows: seed + 1)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1], help="shares kept")
    parser.add_argument("--taus", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.75, 0.5], help="ZipVL tau")
    parser.add_argument("--inhibit", type=float, default=0.25, help="CMAI: share of image keys masked per query")
    parser.add_argument("--steepness", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0], help="P-Sigmoid sweep")
    parser.add_argument("--tolerance", type=float, default=0.01, help="G-Search: accuracy drop allowed")
    parser.add_argument("--no-plot", action="store_true", help="write only the JSON")
    args = parser.parse_args(argv)
    check_rows(args, ("rows", "calibration_rows"))
    for budget in args.budgets:
        vt.check_ratio("--budgets", budget)
    for tau in args.taus:
        vt.check_ratio("--taus", tau)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, result = measured(argv, parse, measure)
    summary = {name: [round(p["accuracy"], 3) for p in points] for name, points in result["curves"].items()}
    line = f"eval.token_reduction: accuracy per budget {summary}"
    return write_report(result, args.output, plot=None if args.no_plot else plot, table=lambda _: line)


if __name__ == "__main__":
    main()
