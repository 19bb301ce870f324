"""`residual_trace`: the residual after every step of a discrete solver, for diagnosis."""

import jax
import jax.flatten_util
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._custom_types import Args, FixedPointFn, State
from ._fixed_point import check_state
from ._solution import residual_norm
from ._solvers._base import AbstractIterativeSolver, residual_dtype


def residual_trace(
    fn: FixedPointFn,
    solver: AbstractIterativeSolver,
    z0: State,
    args: Args = None,
    *,
    steps: int,
) -> tuple[Float[Array, " steps"], Int[Array, " steps"]]:
    """The residual after each of `steps` iterations of a discrete solver, with stopping
    switched off: the first thing to plot when a solve does not converge.

    It runs the solver's own update rule (the `init` and `update` that `fixed_point`
    drives) in a `jax.lax.scan`, so the trace is what `fixed_point` would see, step for
    step, except that it never stops early. Entry `k` of the trace belongs to iterate
    `k` (the initial guess is iterate 0); `fixed_point` reports the entry at index
    `num_steps - 1` as its `residual`. Works under `jit` and `vmap`.

    **Arguments:**

    - `fn`, `z0`, `args`: as for `fixed_point`.
    - `solver`: a discrete solver (`FixedPointIteration`, `Anderson`, `Broyden`,
      `NewtonKrylov` or your own `AbstractIterativeSolver`). `SteadyStateODE` has no
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
    if not isinstance(solver, AbstractIterativeSolver):
        raise TypeError(
            "residual_trace needs a discrete solver (an AbstractIterativeSolver such as "
            f"Anderson), got {type(solver).__name__}."
        )
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}.")
    check_state(fn, z0, args)
    flat0, unravel = jax.flatten_util.ravel_pytree(z0)
    dtype = residual_dtype(z0)

    def flat_fn(v):
        return jax.flatten_util.ravel_pytree(fn(unravel(v), args))[0]

    def body(carry, _):
        z, state = carry
        fz, z_next, state, nfe = solver.update(flat_fn, z, state)
        residual = residual_norm(unravel(fz), unravel(z), solver.termination).astype(dtype)
        return (z_next, state), (residual, jnp.asarray(nfe))

    _, (residuals, nfe) = jax.lax.scan(body, (flat0, solver.init(flat0)), length=steps)
    return residuals, jnp.cumsum(nfe)
