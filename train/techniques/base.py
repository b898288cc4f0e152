"""Training techniques: the protocol, the registry and the plan the train step runs.

A technique changes how a model is trained, not what its attention computes: a regulariser on captured attention
weights, a reparametrisation of the weights, a transformation of the batch. `config.techniques` lists them, each a
mapping {"name": <registry name>, <option>: <value>, ...}; none (the default) leaves the train step exactly as it
is without techniques, and so do techniques whose options make them no-ops (`active` False: weight 0, ratio 0).

The hooks a technique may implement, in the order the train step calls them:

    transform_batch(batch, rng, step) -> batch                  before the forward (masking tokens, noise)
    transform_batch_with_params(batch, rng, step, params,       the same, for techniques that read the current
        variables) -> batch                                      parameters (a teacher model's forward); default:
                                                                 transform_batch
    init_variables(rng, params) -> variables                     once, at init: extra variables of the technique,
                                                                 stored in the train state under
                                                                 params["techniques"][name] (checkpointed, sharded
                                                                 replicated, resumed like every parameter)
    transform_params(params, variables) -> (params, updates)     before every forward (train, eval, statistics):
                                                                 the parameters the model sees; `updates` replaces
                                                                 the technique's non-trainable variables after the
                                                                 optimizer step (train step only)
    loss(logits, collections, batch, variables)                  after the forward: an auxiliary loss (already
        -> (scalar, metrics)                                     weighted) and float32 scalars for TensorBoard
    forward_loss(forward, params, logits, batch, rng)            the same, for techniques that run the model again
        -> (scalar, metrics)                                     (adversarial perturbations): forward(params, batch)
                                                                 is the train forward (same dropout), params the full
                                                                 differentiable parameter tree; called only when
                                                                 `uses_forward` is True

A technique's variables are trainable (their gradients reach the optimizer; AdamW's decay_mask decays leaves of
two or more axes, so keep them scalars and vectors unless decay is meant) except those named in `state_variables`,
which are read under `stop_gradient` and overwritten by `updates` after each step (their optimizer moments stay
zero). Keeping them in the parameter tree means the checkpoint, the shardings and the resume guarantees of the
trainer cover them without a second state tree.

Each technique records its `fidelity` ("paper", "official-code", "peer", "reconstructed") and `reference`, the
model kinds it applies to, and its options (default, validator from attn.core.validation, one line of doc).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attn import attention_stats
from attn.core.validation import OptionValidator

from .. import tasks

FIDELITIES = ("paper", "official-code", "peer", "reconstructed")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a technique: its default, the validator of its values and one line of documentation."""

    default: Any
    validator: OptionValidator
    doc: str


class Technique:
    """Base class of the training techniques; subclasses set the class attributes and override the hooks they use.

    Class attributes:
      name: registry name (snake case).
      fidelity: one of FIDELITIES; reference: what the implementation was checked against (paper section, file
        of the official code).
      model_kinds: the `config.model.kind`s it applies to.
      options: option name -> Option; "name" is reserved.
      collections: flax collections the train forward must make mutable for `loss` (e.g. "intermediates").
      state_variables: names of the top-level entries of its variables that are not trained (see module doc).
      needs_attention_weights: the model's mechanism must expose a probability matrix (config check).
      uses_forward: the technique runs the model again in `forward_loss` (the train step then passes it the forward).
    """

    name: ClassVar[str] = ""
    fidelity: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    model_kinds: ClassVar[tuple[str, ...]] = tasks.MODEL_KINDS
    options: ClassVar[Mapping[str, Option]] = {}
    collections: ClassVar[tuple[str, ...]] = ()
    state_variables: ClassVar[tuple[str, ...]] = ()
    needs_attention_weights: ClassVar[bool] = False
    uses_forward: ClassVar[bool] = False

    def __init__(self, **values: Any) -> None:
        for key in values:
            if key not in self.options:
                raise ValueError(unknown_name_message(f"technique {self.name!r} option", key, self.options))
        self.values = {key: option.default for key, option in self.options.items()} | dict(values)
        for key, value in self.values.items():
            self.options[key].validator(f"techniques[{self.name}].{key}", value)

    def __getattr__(self, key: str) -> Any:
        values = self.__dict__.get("values", {})
        if key in values:
            return values[key]
        raise AttributeError(key)

    @property
    def active(self) -> bool:
        """False when the options make the technique a no-op (weight 0, probability 0): the plan skips it, so the
        train step is the baseline's bit for bit."""
        return True

    def bind_model(self, model_config: Mapping[str, Any]) -> None:
        """Reads what the technique needs from `model_config` (config.model as a dict: sizes, vocabulary) and
        raises ValueError when it cannot train that model (beyond its kind, which the plan checks)."""

    # --- hooks -----------------------------------------------------------------------------------------------

    def transform_batch(self, batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
        """The batch the forward sees (same keys and shapes, e.g. inputs [B, T] with tokens replaced); `rng` is
        this step's key for the technique, `step` the int32 [] optimizer step."""
        return batch

    def transform_batch_with_params(
        self, batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array, params: Any, variables: Mapping[str, Any]
    ) -> dict[str, jax.Array]:
        """`transform_batch` with the train state's model parameters `params` (without params["techniques"]) and
        the technique's own `variables`, both constants here (no gradient flows into them); it may add batch keys
        for `loss` (e.g. a teacher's outputs). Default: transform_batch(batch, rng, step)."""
        return self.transform_batch(batch, rng, step)

    def init_variables(self, rng: jax.Array, params: Any) -> dict[str, Any]:
        """Extra variables from the model's (boxed or plain) initial parameters; {} for none."""
        return {}

    def transform_params(self, params: Any, variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(the model parameters the forward uses, same tree and shapes; {state variable name: new value}) from
        the model parameters and the technique's variables (state variables already under stop_gradient)."""
        return params, {}

    def loss(
        self,
        logits: jax.Array,
        collections: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        variables: Mapping[str, Any],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(weighted auxiliary loss, scalars) from the forward's outputs: logits, the mutable `collections`, the
        (transformed) batch and the technique's own variables (trainable ones differentiable)."""
        return jnp.float32(0.0), {}

    def variable_metrics(self, variables: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Float32 scalars of its variables after the step (e.g. the learned scales); {} for none."""
        return {}

    def layer_weights(self, collections: Mapping[str, Any]) -> dict[int, jax.Array]:
        """{layer: captured attention weights [B, H, Tq, Tk]} of every layer 0..num_layers-1 (`bind_model` sets
        num_layers); ValueError naming the layers found when one is missing."""
        by_layer = attention_stats.attention_weights_by_layer(collections.get("intermediates", {}))
        if sorted(by_layer) != list(range(self.num_layers)):
            raise ValueError(
                f"{self.name} found attention weights for layers {sorted(by_layer)}, expected 0..{self.num_layers - 1}"
            )
        return by_layer

    def forward_loss(
        self, forward: Any, params: Any, logits: Any, batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(weighted auxiliary loss, scalars) from further forwards `forward(params, batch) -> logits` of the model
        (the train forward: same dropout key, techniques' parameter transforms applied), the full parameter tree
        `params` (differentiable), the clean forward's `logits` and `batch`; `rng` is this step's key for it."""
        return jnp.float32(0.0), {}


# --- registry -------------------------------------------------------------------------------------------------

TECHNIQUES: dict[str, type[Technique]] = {}


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: adds `cls` to TECHNIQUES under `cls.name` (checks the fidelity record and options)."""
    if not cls.name or cls.name in TECHNIQUES:
        raise ValueError(f"technique name {cls.name!r} is empty or already registered")
    if cls.fidelity not in FIDELITIES or not cls.reference:
        raise ValueError(f"technique {cls.name!r} needs fidelity in {FIDELITIES} and a reference")
    if "name" in cls.options:
        raise ValueError(f"technique {cls.name!r}: 'name' is reserved and cannot be an option")
    TECHNIQUES[cls.name] = cls
    return cls


def unknown_name_message(what: str, name: Any, valid: Sequence[str] | Mapping[str, Any]) -> str:
    """ "<what> 'x' is unknown; did you mean 'y'? (valid: ...)" — one line."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"{what} {name!r} is unknown{hint} (valid: {', '.join(valid) or 'none'})"


def get(name: str) -> type[Technique]:
    """The technique class registered as `name`; KeyError naming the closest names."""
    if name not in TECHNIQUES:
        raise KeyError(unknown_name_message("technique", name, TECHNIQUES))
    return TECHNIQUES[name]


def _entry_dict(entry: Any) -> dict[str, Any]:
    return dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)


def build_techniques(entries: Any) -> list[Technique]:
    """Technique instances of `config.techniques` (a list of {name, options...}); ValueError naming the entry."""
    if entries is None:
        return []
    if isinstance(entries, str | bytes) or not isinstance(entries, Sequence):
        raise ValueError(f"techniques={entries!r} must be a list of {{'name': ..., <option>: ...}} mappings")
    built: list[Technique] = []
    for index, entry in enumerate(entries):
        if not (isinstance(entry, Mapping) or hasattr(entry, "to_dict")):
            raise ValueError(f"techniques[{index}]={entry!r} must be a mapping with a 'name' and options")
        values = _entry_dict(entry)
        name = values.pop("name", None)
        if name is None:
            raise ValueError(f"techniques[{index}]={values!r} has no 'name' (one of {sorted(TECHNIQUES)})")
        try:
            cls = get(name)
        except KeyError as error:
            raise ValueError(f"techniques[{index}]: {error.args[0]}") from None
        if any(other.name == name for other in built):
            raise ValueError(f"techniques[{index}]: {name!r} is listed twice; give it once with all its options")
        built.append(cls(**values))
    return built


def check_techniques(config: Mapping[str, Any]) -> None:
    """ValueError (one line) for a config whose techniques are unknown, badly set, or do not fit its model."""
    import attn  # the registry of mechanisms, for the captures a technique needs

    model = config["model"]
    for technique in build_techniques(config.get("techniques")):
        kind = model["kind"]
        if kind not in technique.model_kinds:
            raise ValueError(
                f"technique {technique.name!r} trains model kinds {technique.model_kinds}; "
                f"model.kind={kind!r} is not one of them"
            )
        if technique.needs_attention_weights and technique.active:
            names = [model["attention"]] if isinstance(model["attention"], str) else list(model["attention"])
            for mechanism in names:
                if mechanism is not None and not attn.get(mechanism).has_attention_weights:
                    with_weights = [n for n in attn.list_mechanisms() if attn.get(n).has_attention_weights]
                    raise ValueError(
                        f"technique {technique.name!r} regularises the attention probabilities, but "
                        f"model.attention={mechanism!r} computes no probability matrix; mechanisms with one: "
                        f"{', '.join(with_weights[:12])}, ..."
                    )
        technique.bind_model(model)


# --- the plan: the active techniques of one run, as the train step calls them -----------------------------------

TECHNIQUE_PARAMS = "techniques"  # params[TECHNIQUE_PARAMS][name] holds a technique's variables


@dataclasses.dataclass(frozen=True)
class TechniquePlan:
    """The active techniques of a run, composed: batch transforms in list order, parameter transforms in list
    order (each sees the previous one's output), losses summed."""

    techniques: tuple[Technique, ...]

    @property
    def collections(self) -> tuple[str, ...]:
        wanted = [c for t in self.techniques for c in t.collections]
        if any(t.state_variables for t in self.techniques):  # the forward returns their updated values
            wanted.append(TECHNIQUE_PARAMS)
        return tuple(dict.fromkeys(wanted))

    def transform_batch(
        self, batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array, params: Mapping[str, Any] | None = None
    ) -> dict[str, jax.Array]:
        """The batch after every technique's batch hook; with the full parameter tree `params` (the train state's),
        each technique's `transform_batch_with_params` sees the model parameters and its own variables."""
        if params is not None:
            params = jax.lax.stop_gradient(dict(params))
            variables = params.pop(TECHNIQUE_PARAMS, {})
        for index, technique in enumerate(self.techniques):
            key = jax.random.fold_in(rng, index)
            if params is None:
                batch = technique.transform_batch(batch, key, step)
            else:
                own = variables.get(technique.name, {})
                batch = technique.transform_batch_with_params(batch, key, step, params, own)
        return batch

    def init_variables(self, rng: jax.Array, params: Any) -> dict[str, Any]:
        out = {}
        for index, technique in enumerate(self.techniques):
            variables = technique.init_variables(jax.random.fold_in(rng, index), params)
            if variables:
                out[technique.name] = variables
        return out

    def transform_params(self, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(model parameters, {technique name: updated state variables}) from the full parameter tree."""
        params = dict(params)
        variables = params.pop(TECHNIQUE_PARAMS, {})
        updates = {}
        for technique in self.techniques:
            own = variables.get(technique.name, {})
            frozen = {k: jax.lax.stop_gradient(v) if k in technique.state_variables else v for k, v in own.items()}
            params, changed = technique.transform_params(params, frozen)
            if changed:
                updates[technique.name] = changed
        return params, updates

    def variable_metrics(self, params: Mapping[str, Any]) -> dict[str, jax.Array]:
        """ "technique/<name>/<scalar>" of every technique's `variable_metrics` on the updated parameters."""
        variables = params.get(TECHNIQUE_PARAMS, {})
        return {
            f"technique/{t.name}/{key}": value
            for t in self.techniques
            if t.name in variables
            for key, value in t.variable_metrics(variables[t.name]).items()
        }

    def write_state(self, params: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
        """`params` with the techniques' state variables replaced by `updates` (after the optimizer step)."""
        if not updates:
            return params
        variables = dict(params[TECHNIQUE_PARAMS])
        for name, changed in updates.items():
            variables[name] = {**variables[name], **changed}
        return {**params, TECHNIQUE_PARAMS: variables}

    @property
    def uses_forward(self) -> bool:
        """Whether a technique runs further forwards of the model (the train step then passes `forward` to loss)."""
        return any(t.uses_forward for t in self.techniques)

    def loss(
        self,
        params: Mapping[str, Any],
        logits: jax.Array,
        collections: Mapping[str, Any],
        batch: Mapping[str, Any],
        forward: Any = None,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The summed auxiliary losses and every technique's scalars as "technique/<name>/<scalar>"; `params` is
        the full parameter tree (the techniques' variables under "techniques"); `forward(params, batch) -> logits`
        and `rng` are given to the techniques that use further forwards."""
        total, metrics = jnp.float32(0.0), {}
        variables = params.get(TECHNIQUE_PARAMS, {})
        for index, technique in enumerate(self.techniques):
            own = variables.get(technique.name, {})
            own = {k: jax.lax.stop_gradient(v) if k in technique.state_variables else v for k, v in own.items()}
            value, scalars = technique.loss(logits, collections, batch, own)
            if technique.uses_forward:
                if forward is None or rng is None:
                    raise ValueError(f"technique {technique.name!r} runs the model again: pass forward= and rng=")
                more, extra = technique.forward_loss(forward, params, logits, batch, jax.random.fold_in(rng, index))
                value, scalars = value + more, {**scalars, **extra}
            total = total + value
            metrics.update({f"technique/{technique.name}/{key}": v for key, v in scalars.items()})
        return total, metrics


def make_plan(entries: Any, model_config: Mapping[str, Any]) -> TechniquePlan | None:
    """The plan of `config.techniques` for the model `model_config`, or None when no technique is active (the
    baseline train step). Assumes `check_techniques` passed."""
    active = tuple(t for t in build_techniques(entries) if t.active)
    model = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
    for technique in active:
        technique.bind_model(model)
    return TechniquePlan(active) if active else None


@dataclasses.dataclass(frozen=True)
class TechniqueTask(tasks.Task):
    """A Task whose parameters carry the techniques' variables and whose forward sees the transformed parameters.

    `init` adds params["techniques"]; `apply` strips them, applies the parameter transforms and, when the mutable
    collections include "techniques", returns the updated state variables under that key.
    """

    plan: TechniquePlan | None = None

    def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> Any:
        variables = super().init(rng, batch)
        extra = self.plan.init_variables(jax.random.fold_in(rng, 0x7EC), variables["params"])
        if not extra:
            return variables
        return {**variables, "params": {**variables["params"], TECHNIQUE_PARAMS: extra}}

    def apply(
        self,
        variables: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        mutable: Any = False,
    ) -> Any:
        params, updates = self.plan.transform_params(variables["params"])
        inner = mutable
        wants_updates = isinstance(mutable, list | tuple) and TECHNIQUE_PARAMS in mutable
        if wants_updates:
            inner = [name for name in mutable if name != TECHNIQUE_PARAMS]
        out = super().apply({**variables, "params": params}, batch, deterministic=deterministic, rng=rng, mutable=inner)
        if not wants_updates:
            return out
        logits, collections = out
        return logits, {**collections, TECHNIQUE_PARAMS: updates}


def effective_params(task: tasks.Task, params: Mapping[str, Any]) -> Any:
    """The parameters `task.model` computes with: for a run trained with techniques, the model parameters after
    their transforms (σReparam's γ/σ(W)·W) without params["techniques"]; else `params` itself. Use it wherever the
    model is applied directly (decoding with a cache, interventions) instead of through `task.apply`."""
    if isinstance(task, TechniqueTask):
        return task.plan.transform_params(params)[0]
    return params


def with_techniques(task: tasks.Task, plan: TechniquePlan | None) -> tasks.Task:
    """`task` itself when `plan` is None, else the TechniqueTask running `plan` around it."""
    if plan is None:
        return task
    return TechniqueTask(kind=task.kind, model=task.model, head=task.head, plan=plan)
