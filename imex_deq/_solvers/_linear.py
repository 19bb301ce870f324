"""What a lineax linear solve costs in operator products, and the normalised solve that
Newton–Krylov and the implicit adjoint share."""

import functools

import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree

from .._solution import tree_norm


@functools.singledispatch
def linear_solve_matvecs(solver: lx.AbstractLinearSolver, stats: dict, size: int) -> Array:
    """Operator-vector products that one `lx.linear_solve` with `solver` spent, from the
    solve's `stats` and the operator's input size. NaN for a solver whose cost is not
    known here (register one with `linear_solve_matvecs.register`).

    The counts follow lineax's implementations (checked against lineax 0.1.1 by a counting
    callback in the tests).
    """
    del solver, stats, size
    return jnp.array(jnp.nan)


def has_known_cost(solver: lx.AbstractLinearSolver) -> bool:
    """Whether `linear_solve_matvecs` has a count for this solver's type."""
    return linear_solve_matvecs.dispatch(type(solver)) is not linear_solve_matvecs.dispatch(object)


@linear_solve_matvecs.register
def _(solver: lx.GMRES, stats, size):
    # lineax's GMRES counts restart cycles as steps. The first is a dummy cycle that only
    # forms the residual b - A y0 (one product); each later cycle spends up to
    # min(restart, size) Arnoldi products and one residual product. An upper bound: a
    # cycle stops early when its Krylov space breaks down.
    cycles = jnp.maximum(stats["num_steps"] - 1, 0)
    return 1 + cycles * (min(solver.restart, size) + 1)


@linear_solve_matvecs.register
def _(solver: lx.BiCGStab, stats, size):
    # One product for the initial residual, two per iteration.
    return 1 + 2 * stats["num_steps"]


@linear_solve_matvecs.register
def _(solver: lx.CG, stats, size):
    # One product for the initial residual, one per iteration, and one more every
    # `stabilise_every` iterations, where the residual is recomputed from scratch.
    steps = stats["num_steps"]
    if solver.stabilise_every is None:
        extra = 0
    elif solver.stabilise_every == 1:
        extra = steps
    else:
        extra = steps // solver.stabilise_every
    return 1 + steps + extra


@linear_solve_matvecs.register
def _(solver: lx.Normal, stats, size):
    # Square operators: one product with Aᵀ for the right-hand side Aᵀ b, then the inner
    # solver on AᵀA, whose every product is one with A and one with Aᵀ.
    return 1 + 2 * linear_solve_matvecs(solver.inner_solver, stats, size)


def solve_normalised(
    operator: lx.AbstractLinearOperator,
    rhs: PyTree[Array],
    solver: lx.AbstractLinearSolver,
    initial_guess: PyTree[Array] | None = None,
) -> tuple[PyTree[Array], Array]:
    """Solve `operator x = rhs` on a unit-norm right-hand side, so the solver's tolerances
    are relative whatever the scale of `rhs`, from `initial_guess` (scaled alike) where
    one is given. Returns `(x, operator products spent)`."""
    dtype = jax.tree_util.tree_leaves(rhs)[0].dtype
    scale = jnp.maximum(tree_norm(rhs), float(jnp.finfo(jnp.float32).tiny)).astype(dtype)
    unit = jax.tree_util.tree_map(lambda leaf: leaf / scale, rhs)
    options = {}
    if initial_guess is not None:
        options["y0"] = jax.tree_util.tree_map(lambda leaf: leaf / scale, initial_guess)
    sol = lx.linear_solve(operator, unit, solver, options=options, throw=False)
    x = jax.tree_util.tree_map(lambda leaf: leaf * scale, sol.value)
    return x, linear_solve_matvecs(solver, sol.stats, operator.in_size())
