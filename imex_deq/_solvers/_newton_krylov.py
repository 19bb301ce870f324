"""Newton's method with a matrix-free GMRES linear solve (Newton–Krylov)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

from .._custom_types import Termination
from ._base import AbstractRootFinder, Progress
from ._linear import has_known_cost, solve_normalised


class _NewtonKrylovState(eqx.Module):
    progress: Progress


class NewtonKrylov(AbstractRootFinder):
    """Newton's method on g(z), each Newton system −∂g/∂z d = g(z) solved inexactly by a
    matrix-free lineax solver on Jacobian-vector products. For a fixed point g(z) = f(z) − z
    and the system is (I − ∂f/∂z) d = f(z) − z.

    NFE per step: one linearisation of g plus one per linear-solver product (for GMRES an
    upper bound, see `linear_solve_matvecs`).

    **Arguments:**

    - `rtol`, `atol`, `termination`: the stopping rule (see `Termination`).
    - `linear_solver`: a matrix-free lineax solver (default `lineax.GMRES`); its
      tolerances are relative to ‖g(z)‖.
    """

    rtol: float = 1e-3
    atol: float = 1e-6
    termination: Termination = "rel"
    linear_solver: lx.AbstractLinearSolver = eqx.field(
        default_factory=lambda: lx.GMRES(rtol=1e-2, atol=1e-4, restart=8, max_steps=3)
    )

    def __check_init__(self):
        known = isinstance(self.linear_solver, lx.AbstractLinearSolver) and has_known_cost(
            self.linear_solver
        )
        if not known:
            raise TypeError(
                "NewtonKrylov: linear_solver must be a lineax solver whose cost in products "
                f"is known (GMRES, BiCGStab, Normal(CG)), got {type(self.linear_solver).__name__}."
            )

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return _NewtonKrylovState(self.start(y, aux_struct))

    def step(self, fn, y, args, options, state, tags):
        g, jvp, aux = jax.linearize(lambda v: fn(v, args), y, has_aux=True)
        residual = self.root_residual(g, y)
        operator = lx.FunctionLinearOperator(
            lambda v: jax.tree_util.tree_map(jnp.negative, jvp(v)), jax.eval_shape(lambda: y)
        )
        step, matvecs = solve_normalised(operator, g, self.linear_solver)
        progress = self.record(state.progress, y, aux, residual, 1 + matvecs)
        y_next = jax.tree_util.tree_map(jnp.add, y, step)
        return y_next, _NewtonKrylovState(progress), aux

    def solve(self, fn, z0, args, *, max_steps, differentiable):
        if differentiable:
            raise ValueError(
                "NewtonKrylov cannot be unrolled (UnrolledAdjoint): lineax "
                "differentiates each GMRES solve by a further solve that must converge exactly. "
                "Use ImplicitAdjoint or PhantomAdjoint, or unroll FixedPointIteration/Anderson."
            )
        return super().solve(fn, z0, args, max_steps=max_steps, differentiable=False)
