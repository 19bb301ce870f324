"""Newton's method with a matrix-free GMRES linear solve (Newton–Krylov)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

from .._custom_types import Termination
from .._solution import tree_norm
from ._base import AbstractIterativeSolver


def gmres_matvecs(solver: lx.GMRES, num_steps) -> jax.Array:
    """Matrix-vector products lineax's GMRES spent: a first residual product, then per
    restart cycle up to `restart` Arnoldi products and one residual product (an upper bound,
    reached unless the Krylov space breaks down early)."""
    return 1 + jnp.maximum(num_steps - 1, 0) * (solver.restart + 1)


def solve_normalised(operator: lx.AbstractLinearOperator, rhs, solver: lx.GMRES):
    """Solve `operator x = rhs` on a unit-norm right-hand side, so the solver's tolerances
    are relative whatever the scale of `rhs`. Returns `(x, matvecs)`."""
    scale = jnp.maximum(tree_norm(rhs), float(jnp.finfo(jnp.float32).tiny)).astype(
        jax.tree_util.tree_leaves(rhs)[0].dtype
    )
    unit = jax.tree_util.tree_map(lambda leaf: leaf / scale, rhs)
    sol = lx.linear_solve(operator, unit, solver, throw=False)
    x = jax.tree_util.tree_map(lambda leaf: leaf * scale, sol.value)
    return x, gmres_matvecs(solver, sol.stats["num_steps"])


class NewtonKrylov(AbstractIterativeSolver):
    """Newton's method on g(z) = f(z) − z, each Newton system (I − ∂f/∂z) d = f(z) − z solved
    inexactly by lineax's GMRES on Jacobian-vector products.

    NFE per step: one linearisation of f plus one per GMRES product.

    **Arguments:**

    - `rtol`, `atol`, `termination`: the stopping rule (see `Termination`).
    - `linear_solver`: a `lineax.GMRES`; its tolerances are relative to ‖f(z) − z‖.
    """

    rtol: float = 1e-3
    atol: float = 1e-6
    termination: Termination = "rel"
    linear_solver: lx.GMRES = eqx.field(
        default_factory=lambda: lx.GMRES(rtol=1e-2, atol=1e-4, restart=8, max_steps=3)
    )

    def __check_init__(self):
        if not isinstance(self.linear_solver, lx.GMRES):
            raise TypeError(
                "NewtonKrylov: linear_solver must be a lineax.GMRES, "
                f"got {type(self.linear_solver).__name__}."
            )

    def init(self, z):
        return None

    def update(self, fn, z, state):
        fz, jvp = jax.linearize(fn, z)
        operator = lx.FunctionLinearOperator(
            lambda v: v - jvp(v), jax.ShapeDtypeStruct(z.shape, z.dtype)
        )
        step, matvecs = solve_normalised(operator, fz - z, self.linear_solver)
        return fz, z + step, state, 1 + matvecs

    def solve(self, fn, z0, args, *, max_steps, differentiable):
        if differentiable:
            raise ValueError(
                "NewtonKrylov cannot be unrolled (UnrolledAdjoint): lineax "
                "differentiates each GMRES solve by a further solve that must converge exactly. "
                "Use ImplicitAdjoint or PhantomAdjoint, or unroll FixedPointIteration/Anderson."
            )
        return super().solve(fn, z0, args, max_steps=max_steps, differentiable=False)
