"""`python -m eval.video_frames`: video-question accuracy against the number of frames, one line per cross-attention.

    python -m eval.video_frames                                   # video_ccam and softmax at 2, 4, 8, 16 frames
    python -m eval.video_frames --frames 2,4,8,16 --mechanisms video_ccam,softmax --seeds 0 \\
        --workdir-root runs/h3_video_frames --output benchmarks/results/video_frames_cpu.json      # 1500 steps each
    python -m eval.video_frames --frames 16,8,4 --mechanisms video_ccam,softmax,softmax_sincos2d --seeds 0 \\
        --workdir-root runs/h3_video_frames --output benchmarks/results/video_frames_sincos2d_cpu.json
    python -m eval.video_frames --frames 8,16 --mechanisms crosslmm --seeds 0 --workdir-root runs/h3_video_frames \\
        --output benchmarks/results/video_frames_crosslmm_cpu.json
    python -m eval.video_frames --config configs/video_timing.py:smoke --frames 2 --steps 2 \\
        --workdir-root /tmp/video_frames_smoke --output /tmp/video_frames_smoke.json           # a quick check
    python -m eval.video_frames --from-json benchmarks/results/video_frames_cpu.json   # table + PNG again, no run

Every run is configs/video_timing.py (train.data "video_clips": "what colour is the shape in frame <k>", chance
0.25) with `data.num_frames = F` and the decoder's cross-attention set per mechanism:

    video_ccam        cross_attention="video_ccam", cross_attention_options={"num_frames": F} (frame-causal mask)
    softmax           cross_attention="softmax" (plain cross-attention, the baseline)
    softmax_sincos2d  softmax, and the image encoder's patch positions fixed 2-D sine-cosine instead of a learned
                      table (model.vision_position_embedding="sincos2d": a stronger position signal in the image
                      tokens, which is what plain cross-attention has to find frame k by)
    video_ccam_sincos2d  video_ccam with the same fixed 2-D sine-cosine patch positions
    crosslmm          CrossLMM's dual cross-attention: the decoder's sequence starts with the image tokens
                      average-pooled in pairs (model.visual_prefix_pool=2: 2 pooled tokens per frame, 2F in all),
                      which re-attend their own frame's tokens (V2V); the text attends all image tokens (T2V)

The clip of F frames of 8x8 pixels is one [8F, 8, 3] image, so the ViT gives 4F frame-major image tokens (4 per
frame with 4x4 patches); everything else (model size, optimiser, data noise) is the config's. The same overrides by
hand, for one run:

    python -m train --config configs/video_timing.py --workdir runs/video_f8 \\
        --config.data.num_frames=8 --config.model.cross_attention_options.num_frames=8

Each run trains in `<workdir-root>/<mechanism>_f<F>_s<seed>` through the trainer (an interrupted sweep resumes, a
finished run is read back, not retrained); every config is built (trainer checks, model traced) before anything
trains. The report (eval.results.write_report: JSON + PNG + Markdown table) holds eval.machine.machine_record(), the
load average before and after, and per run the final eval accuracy on `eval.num_batches * batch_size` held-out
questions with two standard errors, the accuracy at every evaluation, the final losses, steps, wall time and median
train-step time; the PNG plots accuracy against frames (mean over seeds, bars of 2 SE) with the chance level. It is
rewritten after every run, so a long sweep keeps what it has.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ml_collections import ConfigDict

from .claims import two_se
from .machine import load_average, machine_record
from .results import rerender_report, write_report
from .run_metrics import last_metrics, read_metric_rows
from .sweep import set_field, split_assignment
from .trainer_api import build_run, load_config_file, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/video_timing.py"
RESULT = os.path.join(REPO, "benchmarks", "results", "video_frames_cpu.json")
CHANCE = 0.25  # four colours (train.data.video_clips.PALETTE)


def _video_ccam(config: Any, frames: int) -> None:
    config.model.cross_attention = "video_ccam"
    config.model.cross_attention_options = ConfigDict({"num_frames": frames})


def _softmax(config: Any, frames: int) -> None:
    config.model.cross_attention = "softmax"
    config.model.cross_attention_options = ConfigDict()


def _softmax_sincos2d(config: Any, frames: int) -> None:
    _softmax(config, frames)
    config.model.vision_position_embedding = "sincos2d"


def _video_ccam_sincos2d(config: Any, frames: int) -> None:
    _video_ccam(config, frames)
    config.model.vision_position_embedding = "sincos2d"


def _crosslmm(config: Any, frames: int) -> None:
    tokens = config.data.frame_size // config.model.patch_size  # patch tokens per frame side
    config.model.cross_attention = "crosslmm"
    config.model.visual_prefix_pool = 2  # 2 pooled visual tokens per frame of 4 patch tokens
    pooled = frames * tokens * tokens // 2
    config.model.cross_attention_options = ConfigDict({"visual_tokens": pooled, "num_frames": frames})


# mechanism -> sets config.model's cross-attention fields for a clip of `frames` frames
MECHANISMS: dict[str, Callable[[Any, int], None]] = {
    "video_ccam": _video_ccam,
    "softmax": _softmax,
    "softmax_sincos2d": _softmax_sincos2d,
    "video_ccam_sincos2d": _video_ccam_sincos2d,
    "crosslmm": _crosslmm,
}


def frames_config(base: Any, mechanism: str, frames: int, seed: int) -> Any:
    """A copy of `base` (a video_timing config) for clips of `frames` frames, cross-attention `mechanism` and `seed`.
    ValueError for an unknown mechanism or a frame count below 1."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r} is not one of {sorted(MECHANISMS)}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames={frames!r} must be an int >= 1")
    config = base.copy_and_resolve_references()
    config.data.num_frames = frames
    config.seed = seed
    MECHANISMS[mechanism](config, frames)
    return config


def run_name(mechanism: str, frames: int, seed: int) -> str:
    return f"{mechanism}_f{frames}_s{seed}"


def plan(base: Any, mechanisms: Sequence[str], frames: Sequence[int], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """[{"mechanism", "frames", "seed", "config"}] in run order (frames outermost, so a cut-short sweep still has
    every mechanism at its first frame counts)."""
    return [
        {"mechanism": m, "frames": f, "seed": s, "config": frames_config(base, m, f, s)}
        for f in frames
        for s in seeds
        for m in mechanisms
    ]


def check_plan(runs: Sequence[Mapping[str, Any]], workdir_root: str) -> list[str]:
    """One line per run whose config the trainer cannot build (checks, data, model traced; nothing compiled)."""
    problems = []
    for run in runs:
        name = run_name(run["mechanism"], run["frames"], run["seed"])
        try:
            build_run(run["config"], os.path.join(workdir_root, name))
        except (ValueError, KeyError, TypeError) as error:
            problems.append(f"{name}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    return problems


def run_one(run: Mapping[str, Any], workdir: str) -> dict[str, Any]:
    """Trains (or resumes / reads back) one run; its record: final eval accuracy with 2 SE over the eval questions,
    the eval accuracy at every evaluation, losses, steps, wall time of this invocation and the median train-step
    time in the run's log."""
    config = run["config"]
    record: dict[str, Any] = {
        "mechanism": run["mechanism"],
        "frames": run["frames"],
        "seed": run["seed"],
        "cross_attention_options": config.model.cross_attention_options.to_dict(),
        "vision_position_embedding": config.model.vision_position_embedding,
        "image_tokens": run["frames"] * (config.data.frame_size // config.model.patch_size) ** 2,
        "workdir": workdir,
    }
    start = time.perf_counter()
    try:
        result = train(config, workdir)
        record["steps"], record["start_step"] = result.step, result.start_step
    except Exception as error:  # noqa: BLE001 - recorded; one broken run must not end the sweep
        record["error"] = f"{type(error).__name__}: {error}"
    record["wall_s"] = round(time.perf_counter() - start, 2)  # ~0 for a finished run read back
    eval_metrics, train_metrics = last_metrics(workdir)
    accuracy = eval_metrics.get("eval/accuracy")
    n = config.eval.num_batches * config.batch_size
    rows = read_metric_rows(workdir)
    step_times = sorted(r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r)
    record.update(
        # the median train-step time the trainer logged (no compilation, evaluation or checkpoints)
        seconds_per_step=round(step_times[len(step_times) // 2], 4) if step_times else None,
        accuracy_by_step={int(r["step"]): r["eval/accuracy"] for r in rows if "eval/accuracy" in r},
        eval_step=eval_metrics.get("step"),
        accuracy=accuracy,
        accuracy_2se=None if accuracy is None else two_se(accuracy, n, 0.0, 1),  # the second term is 0
        eval_questions=n,
        eval_loss=eval_metrics.get("eval/loss"),
        train_loss=train_metrics.get("train/loss"),
    )
    return record


def curves(report: Mapping[str, Any]) -> dict[str, dict[int, list[float]]]:
    """mechanism -> frames -> the final accuracies of its seeds (runs without an accuracy left out)."""
    out: dict[str, dict[int, list[float]]] = {}
    for r in report["records"]:
        if r.get("accuracy") is not None:
            out.setdefault(r["mechanism"], {}).setdefault(int(r["frames"]), []).append(r["accuracy"])
    return out


def table(report: Mapping[str, Any]) -> str:
    """Markdown: one row per run (accuracy ± 2 SE, losses, steps, s/step)."""
    lines = [
        "| cross-attention | frames | image tokens | seed | eval accuracy (± 2 SE) | eval loss | steps | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["records"]:
        acc = "—" if r.get("accuracy") is None else f"{r['accuracy']:.3f} ± {r['accuracy_2se']:.3f}"
        loss = "—" if r.get("eval_loss") is None else f"{r['eval_loss']:.3f}"
        sps = "—" if r.get("seconds_per_step") is None else f"{r['seconds_per_step']:.3f}"
        name = r["mechanism"] + (f" — {r['error']}" if "error" in r else "")
        cells = [name, str(r["frames"]), str(r["image_tokens"]), str(r["seed"]), acc, loss, str(r.get("steps")), sps]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nchance level: {report['chance']:.2f}")
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str) -> None:
    """Eval accuracy against the number of frames (log2 axis), one line per mechanism (mean over seeds, error bars
    of 2 SE of one run), chance as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mechanism, by_frames in curves(report).items():
        frames = sorted(by_frames)
        means = [sum(by_frames[f]) / len(by_frames[f]) for f in frames]
        n = report["eval_questions"]
        bars = [two_se(p, n, 0.0, 1) for p in means]
        ax.errorbar(frames, means, yerr=bars, marker="o", capsize=3, label=mechanism)
    ax.axhline(report["chance"], color="gray", linestyle="--", label=f"chance {report['chance']:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["frames"], [str(f) for f in report["frames"]])
    ax.set(xlabel="frames per clip", ylabel="eval accuracy", ylim=(0, 1.05))
    seeds = ("seed " if len(report["seeds"]) == 1 else "seeds ") + ",".join(str(s) for s in report["seeds"])
    ax.set_title(f"video questions, {report['steps']} steps, {seeds} ({report['machine']['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers, e.g. 2,4,8,16") from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the sweep (or redraws `--from-json`) and returns the report. SystemExit(2) naming every run whose config
    cannot be built, before any training; SystemExit(1) after the report is written when a run failed."""
    parser = argparse.ArgumentParser(prog="python -m eval.video_frames", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG, help="the video config file[:preset]")
    parser.add_argument("--frames", default="2,4,8,16", help="comma-separated frame counts (1..16)")
    parser.add_argument("--mechanisms", default="video_ccam,softmax", help=f"comma-separated, of {list(MECHANISMS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=None, help="total_steps of every run (default: the config's)")
    parser.add_argument("--set", action="append", default=[], help="config override for every run: a.b=value")
    parser.add_argument("--workdir-root", default="runs/video_frames", help="one run directory per run under it")
    parser.add_argument("--output", default=RESULT, help="JSON report path (the PNG goes next to it)")
    parser.add_argument("--from-json", help="print the table of (and redraw the PNG of) an existing report")
    args = parser.parse_args(argv)
    if args.from_json:
        return rerender_report(args.from_json, plot=plot, table=table)

    try:
        frames, seeds = _ints(args.frames, "--frames"), _ints(args.seeds, "--seeds")
        mechanisms = [name.strip() for name in args.mechanisms.split(",") if name.strip()]
        base = load_config_file(args.config)
        for arg in args.set:
            set_field(base, *split_assignment(arg, "--set"))
        if args.steps is not None:
            if args.steps < 1:
                raise ValueError(f"--steps {args.steps}: expected a positive int")
            base.total_steps = args.steps
            base.checkpoint_every = args.steps
            base.eval_every = min(base.eval_every, args.steps)
        runs = plan(base, mechanisms, frames, seeds)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    problems = check_plan(runs, args.workdir_root)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"nothing trained: fix the {len(problems)} run(s) above", file=sys.stderr)
        raise SystemExit(2)

    report: dict[str, Any] = {
        "tool": "eval.video_frames",
        "command": "python -m eval.video_frames " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": args.config,
        "overrides": list(args.set),
        "steps": base.total_steps,
        "frames": frames,
        "mechanisms": mechanisms,
        "seeds": seeds,
        "chance": CHANCE,
        "eval_questions": base.eval.num_batches * base.batch_size,
        "machine": machine_record(),
        "load_average_before": load_average(),
        "records": [],
    }
    for run in runs:
        workdir = os.path.join(args.workdir_root, run_name(run["mechanism"], run["frames"], run["seed"]))
        report["records"].append(run_one(run, workdir))
        report["load_average_after"] = load_average()
        write_report(report, args.output)  # rewritten after every run: a cut-short sweep keeps what it has
    write_report(report, args.output, plot=plot, table=table)
    failed = [run_name(r["mechanism"], r["frames"], r["seed"]) for r in report["records"] if "error" in r]
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; report in {args.output}", file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
