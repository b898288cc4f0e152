"""Validation accuracy of a trained DCAL ViT's inference branches: SA alone, GLCA alone, and SA + GLCA (the default,
appendix A of Zhu et al. 2022), on the run's own validation batches (those its training evaluation used).

    python benchmarks/fine_grained_dcal_branches.py --workdirs /tmp/h3_fg_sweep/dcal /tmp/h3_fg_sweep1/dcal \\
        --output benchmarks/results/fine_grained_dcal_branches_cpu.json

Each workdir is a run of `configs/fine_grained.py` with attention="dcal" (e.g. one of eval.sweep's run directories).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.machine import machine_record  # noqa: E402
from eval.trainer_api import load_run  # noqa: E402


def branch_accuracies(workdir: str) -> dict[str, float]:
    """{"sa", "glca", "sa_plus_glca"} accuracies and the step, over the config's eval.num_batches valid batches."""
    run = load_run(workdir)
    model, config = run.task.model, run.config
    source = run.data("valid")
    apply = jax.jit(lambda p, images: model.apply({"params": p}, images, mutable=["intermediates"]))
    hits = {"sa": 0, "glca": 0, "sa_plus_glca": 0}
    count = 0
    for _ in range(config.eval.num_batches):
        batch = source.next_batch()
        combined, state = apply(run.model_params, batch["images"])
        sa, glca = np.asarray(state["intermediates"]["dcal_branch_logits"][0])
        labels = batch["labels"]
        hits["sa"] += int(np.sum(sa.argmax(-1) == labels))
        hits["glca"] += int(np.sum(glca.argmax(-1) == labels))
        hits["sa_plus_glca"] += int(np.sum(np.asarray(combined).argmax(-1) == labels))
        count += len(labels)
    return {"workdir": workdir, "seed": int(config.seed), "step": run.step, "examples": count} | {
        f"accuracy_{name}": value / count for name, value in hits.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdirs", nargs="+", required=True, help="DCAL run directories")
    parser.add_argument("--output", required=True, help="JSON file to write")
    args = parser.parse_args()
    records = [branch_accuracies(workdir) for workdir in args.workdirs]
    report = {"tool": "benchmarks/fine_grained_dcal_branches.py", **machine_record(), "records": records}
    with open(args.output, "w") as file:
        json.dump(report, file, indent=1)
    for record in records:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
