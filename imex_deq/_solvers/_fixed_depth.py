"""A fixed number of applications of f: the "solver" of fixed-depth pretraining."""

import equinox as eqx
import jax.numpy as jnp

from .._custom_types import Termination
from .._solution import RESULTS, Solution, residual_dtype, residual_norm
from ._base import AbstractSolver


class FixedDepth(AbstractSolver):
    """Applies f exactly `depth` times from z0, whatever the residual (and whatever
    `max_steps`), and reports the residual of the last application: `successful` if it
    meets the stopping rule, `nonlinear_max_steps_reached` if not, `nonfinite` if it is
    not finite. NFE = steps = `depth`.

    With `UnrolledAdjoint` (plain backprop through the applications) this is fixed-depth
    pretraining; `with_fixed_depth` switches DEQ layers to it.

    **Arguments:**

    - `depth`: the number of applications of f, at least 1.
    - `rtol`, `atol`, `termination`: the rule the result code reports against (see
      `Termination`); it never stops the applications early.
    """

    depth: int = eqx.field(static=True)
    rtol: float = 1e-3
    atol: float = 1e-6
    termination: Termination = "rel"

    def __check_init__(self):
        if not (isinstance(self.depth, int) and self.depth >= 1):
            raise ValueError(f"FixedDepth: depth must be an int of at least 1, got {self.depth}.")

    def solve(self, fn, z0, args, *, max_steps, differentiable):
        del max_steps, differentiable

        # A Python loop, not lax.scan: XLA CPU runs convolution weight gradients inside
        # loop bodies on a generic path, ~7x slower (the depth is small and static).
        before_last, z_last = z0, fn(z0, args)
        for _ in range(self.depth - 1):
            before_last, z_last = z_last, fn(z_last, args)
        residual = residual_norm(z_last, before_last, self.termination)
        residual = residual.astype(residual_dtype(z0))
        result = RESULTS.where(
            ~jnp.isfinite(residual),
            RESULTS.nonfinite,
            RESULTS.where(
                self.converged(residual),
                RESULTS.successful,
                RESULTS.nonlinear_max_steps_reached,
            ),
        )
        depth = jnp.array(self.depth)
        return Solution(z_last, result, depth, depth, residual)
