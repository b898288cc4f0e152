"""Training techniques selected by `config.techniques` (see base.py for the protocol and the hooks).

    config.techniques = [{"name": "sigma_reparam"}]                  # options default
    config.techniques = [{"name": "sigma_reparam", "gamma_init": "one"}]

Registered: sigma_reparam (σReparam, [159]), entropy_reg (entropy regularisation, [126]), meap (masked inputs in
next-token training, [158]); for attention-MIL models (model.kind "mil"): aem (attention entropy maximisation, [88]),
acmil (multi-branch attention losses, [142]), mhim (masked hard instance mining with a momentum teacher, [165]).
For softmax models (decoder, encoder, vit): attention_at (adversarial perturbations of the attention logits, [16]),
attention_vat (virtual adversarial perturbations of them, [92]), and their interpretable variants attention_iat,
attention_ivat (perturbations in the span of the batch's attention differences). For ViTs: adl_tap (the attention
diversification loss, [148]). For encoder classifiers: pss (progressive self-supervised attention learning, [223]).
"""

from . import (  # noqa: F401  (registers)
    acmil,
    adl_tap,
    aem,
    attention_at,
    attention_vat,
    entropy_reg,
    meap,
    mhim,
    pss,
    sigma_reparam,
)
from .base import (
    TECHNIQUE_PARAMS,
    TECHNIQUES,
    Option,
    Technique,
    TechniquePlan,
    TechniqueTask,
    build_techniques,
    check_techniques,
    effective_params,
    get,
    make_plan,
    register,
    with_techniques,
)

__all__ = [
    "TECHNIQUES",
    "TECHNIQUE_PARAMS",
    "Option",
    "Technique",
    "TechniquePlan",
    "TechniqueTask",
    "build_techniques",
    "check_techniques",
    "effective_params",
    "get",
    "make_plan",
    "register",
    "with_techniques",
]
