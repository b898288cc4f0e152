"""Training techniques selected by `config.techniques` (see base.py for the protocol and the hooks).

    config.techniques = [{"name": "sigma_reparam"}]                  # options default
    config.techniques = [{"name": "sigma_reparam", "gamma_init": "one"}]

Registered: sigma_reparam (σReparam, [159]), entropy_reg (entropy regularisation, [126]), meap (masked inputs in
next-token training, [158]).
"""

from train.techniques import entropy_reg, meap, sigma_reparam  # noqa: F401  (registers)
from train.techniques.base import (
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
