"""Inference-time steering and calibration of attention, built on `attn.interventions` (no parameter changes):

    pasta       PASTA (Zhang et al. 2023): scale attention to the non-emphasised prompt tokens by alpha in chosen heads
    autopasta   [161] AutoPASTA: the model names the key sentence itself, then PASTA steers toward it
    act         [61] ACT: hidden attention sinks found on the input are scaled down and their mass redistributed
    soft_injection  [58] task embeddings (mean head outputs of task prompts) mixed into the last token's heads
    a_star      [66] A-STAR: gradient steps on a DiT's latent against cross-attention overlap and forgetting of concepts
    uniform_maps  [127] uniform cross-attention maps in a DiT's inversion and reconstruction
    dgq         [168] DGQ: prompt-specific log quantizer of attention weights, grouped activation quantization
    float       [186] FloAt: self-attention maps blended with a reference sample's maps warped by a flow
    hd_painter  [170] HD-Painter: PAIntA (self-attention rescaled by prompt similarity) and RASG inpainting on a DiT
    vtc_cls     [191] VTC-CLS: the image encoder's [CLS] attention ranks the image tokens of a prefix VLM; the top ones
                enter the decoder (visual token reduction: attn.steer.visual_tokens, `python -m eval.token_reduction`)
    zipvl       [166] ZipVL: per decoder layer, the fewest image tokens covering a share tau of the attention mass
    g_search    [169] G-Search / P-Sigmoid: non-increasing per-layer keep ratios, tokens ranked by the text's attention
    vmtc_cmai   [87] VMTC + CMAI: primary image tokens kept, the rest merged by k-means; low-focus text-image pairs
                masked
    var         [35] VAR: attention on visual sink tokens recycled to the other image tokens in image-centric rows
    vhr         [39] VHR: the heads whose output depends most on the image (VHD) are scaled up
    damro       [95] DAMRO: contrastive decoding against a pass that sees only the encoder's outlier image tokens
    imbalance_fix  [38] selected image tokens boosted per head by visual sensitivity, more in deeper layers
    carve       [43] CARVE: task vs general query attention contrast; low-contrast image patches masked
                (the prefix-VLM systems share attn.steer.vision; `python -m eval.steer --vlm` measures them)

Each system's `rules(...)` returns rules for `attn.intervene`; `STEERERS[name]` records its paper, fidelity and
exact no-op setting. `python -m eval.steer` measures their effects on a decoder trained on the emphasis_qa task.

    steer = Pasta(head_config={1: [0, 2]}, alpha=0.01)
    with attn.intervene(*steer.rules(model, spans=[(4, 8), (12, 16)], seq_len=26)):
        logits = model.apply(variables, tokens)
"""

from attn.steer.a_star import AStar
from attn.steer.act import Act
from attn.steer.autopasta import AutoPasta
from attn.steer.carve import Carve
from attn.steer.damro import Damro
from attn.steer.dgq import Dgq
from attn.steer.float_warp import FloAt
from attn.steer.g_search import GSearch
from attn.steer.hd_painter import HdPainter
from attn.steer.imbalance_fix import ImbalanceFix
from attn.steer.pasta import Pasta
from attn.steer.registry import STEERERS, SteererSpec, register
from attn.steer.soft_injection import SoftInjection
from attn.steer.uniform_maps import UniformMaps
from attn.steer.var import Var
from attn.steer.vhr import Vhr
from attn.steer.vmtc_cmai import VmtcCmai
from attn.steer.vtc_cls import VtcCls
from attn.steer.zipvl import ZipVL

__all__ = [
    "STEERERS",
    "AStar",
    "Act",
    "AutoPasta",
    "Carve",
    "Damro",
    "Dgq",
    "FloAt",
    "GSearch",
    "HdPainter",
    "ImbalanceFix",
    "Pasta",
    "SoftInjection",
    "SteererSpec",
    "UniformMaps",
    "Var",
    "Vhr",
    "VmtcCmai",
    "VtcCls",
    "ZipVL",
    "register",
]
