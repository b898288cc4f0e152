"""`python -m eval.analysis <tool> (--workdir W | --checkpoint HF_DIR) [--output O] [--step S] [--batch-size N]
[--num-batches K] [--seq-len T] [--no-plot] [tool options]`: run one analysis tool on a trained run or on a Hugging
Face checkpoint directory (see eval/analysis/__init__.py for the tools).

The run's checkpoint (latest, or `--step`) is loaded with the config saved in it (`train.run.load_run`); the tool sees
the first `--num-batches` batches of `--batch-size` rows of the config's validation split (the same rows for every run
of the same data). A `--checkpoint` directory is loaded by attn.pretrained and read as eval.analysis.checkpoint_batches
describes (text: the standard library sources tokenised by the checkpoint's tokenizer, rows of `--seq-len` tokens; ViT:
procedural images, attention_distance on the patch grid); a tool that cannot run on the checkpoint's kind says so in one
line. Output: `--output` (default W/analysis/<tool>.json; required with --checkpoint) and its PNG. Tool options are the
evaluator's fields (`--epsilon 0.3`, `--grid 14x14`, `--layers 0,2`, ...). `report` keeps its own flags, and `python -m
eval.analysis --workdir ...` without a tool name runs `report`. A tool with `standalone = True` (e.g. icl_regression)
trains its own model: its `standalone_run()` replaces the workdir, and `--output` is required. Bad input ends with one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import TOOLS, report
from .evaluator import Evaluator

_TYPES = {"int": int, "float": float, "str": str}


def _option_type(field: dataclasses.Field) -> Any:
    """The argparse type of an evaluator field: its metadata "parse", else the annotation's int/float/str."""
    if "parse" in field.metadata:
        return field.metadata["parse"]
    base = str(field.type).split("|")[0].strip()
    if base not in _TYPES:
        raise TypeError(f"evaluator option {field.name} of type {field.type} needs metadata['parse']")
    return _TYPES[base]


def parser_for(tool: type[Evaluator]) -> argparse.ArgumentParser:
    """The command line of `tool`: the common flags plus one flag per option field."""
    summary = (sys.modules[tool.__module__].__doc__ or "").split("\n\n")[0].strip()
    parser = argparse.ArgumentParser(
        prog=f"python -m eval.analysis {tool.name}", description=f"{summary} {tool.__doc__}"
    )
    standalone = getattr(tool, "standalone", False)  # a tool that trains its own model (e.g. icl_regression)
    parser.add_argument("--workdir", default=None, help="a trained run" + (" (unused)" if standalone else ""))
    parser.add_argument("--checkpoint", default=None, help="a Hugging Face model directory (attn.pretrained.load)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row of a --checkpoint's text batches")
    parser.add_argument("--output", default=None, help="JSON path (default: <workdir>/analysis/<tool>.json)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--batch-size", type=int, default=8, help="validation rows per batch")
    parser.add_argument("--num-batches", type=int, default=1, help="validation batches")
    parser.add_argument("--no-plot", action="store_true", help="write only the JSON")
    for field in dataclasses.fields(tool):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, dest=field.name, type=_option_type(field), default=field.default)
    return parser


def run_tool(name: str, argv: Sequence[str]) -> dict[str, Any]:
    """Runs tool `name` with flags `argv` on a workdir; returns the result written."""
    from ..trainer_api import load_run

    tool_class = TOOLS[name]
    args = parser_for(tool_class).parse_args(argv)
    if args.batch_size < 1 or args.num_batches < 1:
        raise ValueError(f"--batch-size={args.batch_size} and --num-batches={args.num_batches} must be >= 1")
    tool = tool_class(**{field.name: getattr(args, field.name) for field in dataclasses.fields(tool_class)})
    if getattr(tool_class, "standalone", False):
        if args.checkpoint is not None:
            raise ValueError(f"{name} trains its own model; it takes no --checkpoint (give --output only)")
        if args.output is None:
            raise ValueError(f"{name} trains its own model: give --output (a JSON path)")
        result = tool.standalone_run()
        paths = tool.write(result, args.output, plot=not args.no_plot)
        print(f"{name}: wrote " + " and ".join(paths))
        return result
    if (args.workdir is None) == (args.checkpoint is None):
        raise ValueError(f"{name} needs exactly one of --workdir W (a trained run) or --checkpoint HF_DIR")
    if args.checkpoint is not None:
        return _run_on_checkpoint(tool_class, tool, args)
    if not os.path.isdir(args.workdir):
        raise ValueError(f"--workdir={args.workdir!r} is not a directory")
    run = load_run(args.workdir, args.step)
    if args.batch_size % run.batch_divisor:
        raise ValueError(f"--batch-size={args.batch_size} must be a multiple of {run.batch_divisor} (the run's mesh)")
    source = run.data("valid", batch_size=args.batch_size, per_process=False)
    batches = [source.next_batch() for _ in range(args.num_batches)]
    with run.tracing():
        result = tool.evaluate(run.task, run.params, batches)
    result.update(workdir=os.path.abspath(args.workdir), step=run.step, attention=run.config.model.attention)
    output = args.output or os.path.join(args.workdir, "analysis", f"{name}.json")
    paths = tool.write(result, output, plot=not args.no_plot)
    print(f"{name}: wrote " + " and ".join(paths))
    return result


def _run_on_checkpoint(tool_class: type[Evaluator], tool: Evaluator, args: argparse.Namespace) -> dict[str, Any]:
    """`tool` on the --checkpoint directory (see eval.analysis.checkpoint_batches); --output is required."""
    from .checkpoint_batches import VISION, checkpoint_inputs, vision_grid

    if args.output is None:
        raise ValueError(f"--checkpoint={args.checkpoint!r} is not a run directory: give --output (a JSON path)")
    model, params, batches, kind, hf_config = checkpoint_inputs(
        args.checkpoint, tool_class, batch_size=args.batch_size, num_batches=args.num_batches, length=args.seq_len
    )
    if kind == VISION and tool_class.name == "attention_distance" and tool.grid is None:
        tool = dataclasses.replace(tool, **vision_grid(hf_config))
    result = tool.evaluate(model, params, batches)
    result.update(
        checkpoint=os.path.abspath(args.checkpoint),
        architecture=hf_config["architectures"][0] if hf_config.get("architectures") else hf_config["model_type"],
        kind=kind,
        batch_shape=list(batches[0]["inputs"].shape),
    )
    paths = tool.write(result, args.output, plot=not args.no_plot)
    print(f"{tool_class.name}: wrote " + " and ".join(paths))
    return result


def main(argv: Sequence[str] | None = None) -> Any:
    """Dispatch `python -m eval.analysis [tool] ...`; bad input -> one line on stderr, SystemExit(2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ("report", *TOOLS)
    if not argv or argv[0] in ("-h", "--help"):
        usage = "usage: python -m eval.analysis <tool> (--workdir W | --checkpoint HF_DIR) [options]"
        print(f"{usage}; tools: {', '.join(names)}")
        return None
    tool, rest = (argv[0], argv[1:]) if not argv[0].startswith("-") else ("report", argv)
    if tool not in names:
        raise SystemExit(f"error: {tool!r} is not an analysis tool; expected one of {', '.join(names)}")
    try:
        return report.main(rest) if tool == "report" else run_tool(tool, rest)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
