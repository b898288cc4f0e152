"""The training state: one pytree holding everything the optimizer loop updates and checkpoints save.

    TrainState(step int32 [], params (float32 tree), opt_state (optax state))

The step counts optimizer calls (one per batch). The RNG is not part of it: dropout keys are derived from
the run's base key and the step, so the state stays a pure function of (config, data, step).

`graft_params` puts a checkpoint's parameters into a freshly initialised tree (fine-tuning from a checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
    """Step, parameters and optimizer state (a pytree; shard and checkpoint it as a whole)."""

    step: jax.Array
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> TrainState:
        """Step 0 with `params` (unboxed) and `tx.init(params)`."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def apply_gradients(self, grads: Any, tx: optax.GradientTransformation) -> TrainState:
        """One optimizer update: params <- params + tx.update(grads); step + 1."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)


def _flat(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(key, "key", key)) for key in path): leaf for path, leaf in leaves}


def graft_params(fresh: Any, loaded: Mapping[str, Any]) -> tuple[Any, list[str], list[str]]:
    """(`fresh` with every leaf that `loaded` holds at the same path replaced by it (cast to the fresh leaf's dtype),
    paths of the fresh leaves `loaded` lacks (kept as initialised), paths of `loaded` leaves `fresh` has no place
    for). Both are plain (unboxed) parameter trees of nested dicts; paths are "/"-joined ("layers_0/attention/
    query/kernel"). A loaded jax.Array is kept on its devices with its sharding (no host copy); other leaves become
    numpy. ValueError naming the path and both shapes when a leaf's shape differs."""
    source = _flat(loaded)
    missing: list[str] = []

    def one(path: tuple, leaf: Any) -> Any:
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        if name not in source:
            missing.append(name)
            return leaf
        value = source[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(
                f"init_from parameter {name} has shape {tuple(value.shape)} but the model's is {tuple(leaf.shape)}"
            )
        if isinstance(value, jax.Array):  # stays where it is (e.g. sharded as loaded), cast on its devices
            return value if value.dtype == leaf.dtype else value.astype(leaf.dtype)
        return np.asarray(value).astype(leaf.dtype, copy=False)

    grafted = jax.tree_util.tree_map_with_path(one, fresh)
    unused = sorted(set(source) - set(_flat(fresh)))
    return grafted, missing, unused
