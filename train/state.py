"""The training state: one pytree holding everything the optimizer loop updates and checkpoints save.

    TrainState(step int32 [], params (float32 tree), opt_state (optax state))

The step counts optimizer calls (one per batch). The RNG is not part of it: dropout keys are derived from
the run's base key and the step, so the state stays a pure function of (config, data, step).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
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
