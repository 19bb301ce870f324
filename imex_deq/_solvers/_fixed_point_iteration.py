"""Damped fixed-point (Picard) iteration."""

import equinox as eqx
import jax

from .._custom_types import Termination
from ._base import AbstractFixedPointSolver, Progress


class _FixedPointIterationState(eqx.Module):
    progress: Progress


class FixedPointIteration(AbstractFixedPointSolver):
    """z ← (1 − damp)·f(z) + damp·z. One f evaluation per step.

    **Arguments:**

    - `rtol`, `atol`, `termination`: the stopping rule (see `Termination`).
    - `damp`: fraction of the old iterate kept, in [0, 1).
    """

    rtol: float = 1e-3
    atol: float = 1e-6
    termination: Termination = "rel"
    damp: float = 0.0

    def __check_init__(self):
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"FixedPointIteration: damp must lie in [0, 1), got {self.damp}.")

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return _FixedPointIterationState(self.start(y, aux_struct))

    def step(self, fn, y, args, options, state, tags):
        fz, aux = fn(y, args)
        residual = self.fixed_point_residual(fz, y)
        progress = self.record(state.progress, fz, aux, residual, 1)
        if self.damp == 0.0:
            y_next = fz
        else:
            y_next = jax.tree_util.tree_map(
                lambda new, old: (1 - self.damp) * new + self.damp * old, fz, y
            )
        return y_next, _FixedPointIterationState(progress), aux
