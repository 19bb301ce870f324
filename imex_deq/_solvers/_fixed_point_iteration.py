"""Damped fixed-point (Picard) iteration."""

import jax.numpy as jnp

from .._custom_types import Termination
from ._base import AbstractIterativeSolver


class FixedPointIteration(AbstractIterativeSolver):
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

    def init(self, z):
        return None

    def update(self, fn, z, state):
        fz = fn(z)
        z_next = fz if self.damp == 0.0 else (1 - self.damp) * fz + self.damp * z
        return fz, z_next, state, jnp.array(1)
