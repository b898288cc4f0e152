"""Attention analysis tools: `python -m eval.analysis <tool> --workdir W [options]` writes a JSON and a PNG.

    report              per-layer sink mass, entropy and activation outliers of one or more runs (eval.analysis.report)
    sink_rate           [156] sink metric per layer and head and the epsilon-threshold sink rate
    attention_distance  [197] mean attention distance per head against depth (ViT's analysis; grid or sequence)
    head_ablation       [231] ablate heads one by one; change of the loss or KL of the output distribution
    logit_attribution   [218] direct logit attribution per head through W_O, the linearised final norm and unembedding
    arank               [13]  rank of the attention maps per layer (gamma-MoD's ARank)
    retrieval_heads     [37]  copy-paste retrieval score per head on needle tasks; accuracy with the top heads masked
    head_patching       [31]  activation patching of each head between clean and corrupted inputs; circuits, overlap
    successor_heads     [80]  succession score of each head's OV circuit on ordinal tokens (digits, letters)
    waad_fai            [40]  windowed average attention distance and future attention influence; preplan / anchor
    qk_score            [179] QK-score / attention score of option tokens per head for multiple-choice rows
    icl_regression      [50]  in-context linear regression: trains one multi-head softmax layer; debiased GD, patterns
    softmax_regression_icl [177] one softmax-regression GD step against a trained single layer's in-context output
    stiffness           [96]  stiffness ratio of each block's residual dynamics (eigenvalues of its Jacobian)
    head_attribution    [78]  arithmetic heads: patching from counterfactual operands, ablation, attention to operands
    attn_vs_attribution [194] rank agreement (Kendall, Spearman, top-1) of attention and gradient/occlusion attributions
    assoc_capacity      [51]  Hebbian (linear-attention) memory: retrieval against the O(sqrt(d_k)) / O(d_k) capacity
    graph_attention_probe [23] attention between nodes of serialised graphs against adjacency and graph distance
    xattn_saliency      [32]  encoder-decoder cross-attention against occlusion saliency (Pearson per layer/head)
    deconstruct_suite   [33]  controlled variants relaxing attention's design principles (all layers / hybrid), trained

Every tool but `report` is an `Evaluator` (eval.analysis.evaluator): a frozen dataclass of options with
`evaluate(model, params, batches) -> dict` and `write(result, output)`, usable from Python on any model of this
project. `TOOLS` maps command names to their classes. `train_with_evals(config, workdir)` trains with the
config.evals entries ([{tool, every, options}]) run at their cadence (`cadence_evaluators()`; train never imports
eval, so they are passed in); `python -m eval.train --config C --workdir W` does the same from the command line.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from .arank import ARank
from .assoc_capacity import AssocCapacity
from .attention_distance import AttentionDistance
from .attn_vs_attribution import AttnVsAttribution
from .deconstruct_suite import DeconstructSuite
from .evaluator import Evaluator
from .graph_attention_probe import GraphAttentionProbe
from .head_ablation import HeadAblation
from .head_attribution import HeadAttribution
from .head_patching import HeadPatching
from .icl_regression import ICLRegression
from .logit_attribution import LogitAttribution
from .qk_score import QKScore
from .retrieval_heads import RetrievalHeads
from .sink_rate import SinkRate
from .softmax_regression_icl import SoftmaxRegressionICL
from .stiffness import Stiffness
from .successor_heads import SuccessorHeads
from .waad_fai import WaadFai
from .xattn_saliency import XAttnSaliency

TOOLS: dict[str, type[Evaluator]] = {
    tool.name: tool
    for tool in (
        SinkRate,
        AttentionDistance,
        HeadAblation,
        LogitAttribution,
        ARank,
        RetrievalHeads,
        SuccessorHeads,
        HeadPatching,
        QKScore,
        WaadFai,
        ICLRegression,
        SoftmaxRegressionICL,
        Stiffness,
        HeadAttribution,
        AttnVsAttribution,
        AssocCapacity,
        GraphAttentionProbe,
        XAttnSaliency,
        DeconstructSuite,
    )
}


def _scalars(result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of `result`'s nested dicts ("options" and lists left out), names joined by "/"."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if key == "options":
            continue
        if isinstance(value, Mapping):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def cadence_evaluators() -> dict[str, Any]:
    """{tool: evaluator(task, params, batches, options) -> (result, scalars)} for every tool that reads a trained
    model (standalone tools such as icl_regression train their own and are left out): what train.run.train's
    `evaluators` takes for config.evals. String options go through the tool's command-line parser."""

    def runner(tool: type[Evaluator]) -> Any:
        def evaluate(task: Any, params: Any, batches: list, options: Mapping[str, Any]) -> tuple[dict, dict]:
            fields = {field.name: field for field in dataclasses.fields(tool)}
            unknown = sorted(set(options) - set(fields))
            if unknown:
                raise ValueError(f"{tool.name} has no options {unknown}; valid: {', '.join(fields)}")
            parsed = {
                name: fields[name].metadata["parse"](value)
                if isinstance(value, str) and "parse" in fields[name].metadata
                else value
                for name, value in options.items()
            }
            result = tool(**parsed).evaluate(task, params, batches)
            return result, _scalars(result)

        return evaluate

    return {name: runner(tool) for name, tool in TOOLS.items() if not getattr(tool, "standalone", False)}


def train_with_evals(config: Any, workdir: str, **kwargs: Any) -> Any:
    """train.run.train(config, workdir, evaluators=cadence_evaluators(), **kwargs): a training run whose
    config.evals ([{tool, every, options, batch_size, num_batches}]) run at their cadence, results appended to
    <workdir>/evals.jsonl and scalars logged to TensorBoard as evals/<tool>/<name>."""
    from ..trainer_api import train

    return train(config, workdir, evaluators=cadence_evaluators(), **kwargs)


__all__ = [
    "TOOLS",
    "ARank",
    "AssocCapacity",
    "AttentionDistance",
    "AttnVsAttribution",
    "DeconstructSuite",
    "Evaluator",
    "GraphAttentionProbe",
    "HeadAblation",
    "HeadAttribution",
    "HeadPatching",
    "ICLRegression",
    "LogitAttribution",
    "QKScore",
    "RetrievalHeads",
    "SinkRate",
    "SoftmaxRegressionICL",
    "Stiffness",
    "SuccessorHeads",
    "WaadFai",
    "XAttnSaliency",
    "cadence_evaluators",
    "train_with_evals",
]
