"""`residual_trace`: the residual after every step of a discrete solver, for diagnosis."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._custom_types import Args, FixedPointFn, State
from ._fixed_point import check_state
from ._solvers._base import AbstractFixedPointSolver, AbstractRootFinder


def residual_trace(
    fn: FixedPointFn,
    solver: AbstractFixedPointSolver | AbstractRootFinder,
    z0: State,
    args: Args = None,
    *,
    steps: int,
) -> tuple[Float[Array, " steps"], Int[Array, " steps"]]:
    """The residual after each of `steps` iterations of a discrete solver, with stopping
    switched off: the first thing to plot when a solve does not converge.

    It runs the solver's own optimistix `init` and `step` (the ones `fixed_point`
    drives) in a `jax.lax.scan`, so the trace is what `fixed_point` would see, step for
    step, except that it never stops early. Entry `k` of the trace belongs to iterate
    `k` (the initial guess is iterate 0); `fixed_point` reports the entry at index
    `num_steps - 1` as its `residual`. Works under `jit` and `vmap`.

    **Arguments:**

    - `fn`, `z0`, `args`: as for `fixed_point`.
    - `solver`: a discrete solver (`FixedPointIteration`, `Anderson`, `Broyden`,
      `NewtonKrylov` or your own `AbstractFixedPointSolver` / `AbstractRootFinder`). `SteadyStateODE` has no
      step-by-step rule of this kind.
    - `steps`: how many iterations to run.

    **Returns:**

    `(residuals, nfe)`, two arrays of length `steps`: the residual ‖f(z) − z‖ of each
    iterate (relative to ‖f(z)‖ when the solver's termination is `"rel"`) and the
    cumulative number of evaluations of `fn` spent once that residual is known.

    **Example:**

    ```python
    residuals, nfe = residual_trace(f, Anderson(), jnp.zeros(3), x, steps=30)
    plt.semilogy(nfe, residuals)
    ```
    """
    if not isinstance(solver, (AbstractFixedPointSolver, AbstractRootFinder)):
        raise TypeError(
            "residual_trace needs a discrete solver (FixedPointIteration, Anderson, Broyden, "
            f"NewtonKrylov or your own optimistix-style imex-deq solver), got "
            f"{type(solver).__name__}."
        )
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}.")
    check_state(fn, z0, args)
    if isinstance(solver, AbstractRootFinder):
        # As `fixed_point` runs a root finder: on g(z) = f(z) - z, with f(z) as aux.
        def step_fn(z, a):
            fz = fn(z, a)
            return jax.tree_util.tree_map(jnp.subtract, fz, z), fz
    else:

        def step_fn(z, a):
            return fn(z, a), None

    f_struct, aux_struct = jax.eval_shape(step_fn, z0, args)
    state = solver.init(step_fn, z0, args, {}, f_struct, aux_struct, frozenset())

    def body(carry, _):
        z, state = carry
        z, state, _ = solver.step(step_fn, z, args, {}, state, frozenset())
        return (z, state), (state.progress.latest, state.progress.nfe)

    _, (residuals, nfe) = jax.lax.scan(body, (z0, state), length=steps)
    return residuals, nfe
