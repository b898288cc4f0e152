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

Every tool but `report` is an `Evaluator` (eval.analysis.evaluator): a frozen dataclass of options with
`evaluate(model, params, batches) -> dict` and `write(result, output)`, usable from Python on any model of this
project. `TOOLS` maps command names to their classes.
"""

from eval.analysis.arank import ARank
from eval.analysis.attention_distance import AttentionDistance
from eval.analysis.evaluator import Evaluator
from eval.analysis.head_ablation import HeadAblation
from eval.analysis.head_patching import HeadPatching
from eval.analysis.logit_attribution import LogitAttribution
from eval.analysis.qk_score import QKScore
from eval.analysis.retrieval_heads import RetrievalHeads
from eval.analysis.sink_rate import SinkRate
from eval.analysis.successor_heads import SuccessorHeads
from eval.analysis.waad_fai import WaadFai

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
    )
}

__all__ = [
    "TOOLS",
    "ARank",
    "AttentionDistance",
    "Evaluator",
    "HeadAblation",
    "HeadPatching",
    "LogitAttribution",
    "QKScore",
    "RetrievalHeads",
    "SinkRate",
    "SuccessorHeads",
    "WaadFai",
]
