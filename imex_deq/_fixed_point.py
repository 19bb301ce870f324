"""The functional core: `fixed_point(fn, solver, z0, args)`."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._adjoint import AbstractAdjoint, ImplicitAdjoint
from ._custom_types import Args, FixedPointFn, State
from ._solution import RESULTS, Solution
from ._solvers._base import AbstractSolver

_RESIDUAL_DECADES = range(-12, 13)
_STEP_BUCKETS = 101


def describe_tree(tree) -> str:
    """`float32[128]`, or a tuple of such, for error messages."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    shapes = [f"{jnp.dtype(leaf.dtype).name}{list(leaf.shape)}" for leaf in leaves]
    if treedef == jax.tree_util.tree_structure(0):
        return shapes[0]
    return f"{treedef.unflatten(shapes)}"


def check_state(fn: FixedPointFn, z0: State, args: Args) -> None:
    """Trace-time check that `fn` maps a state like `z0` to a state like `z0`."""
    for leaf in jax.tree_util.tree_leaves(z0):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"the DEQ state must be floating point, got z0 = {describe_tree(z0)}.")
    out = jax.eval_shape(fn, z0, args)
    expected = jax.eval_shape(lambda: z0)
    if eqx.tree_equal(out, expected) is not True:
        raise ValueError(
            f"f(z, x) must return a state of the same structure, shape and dtype as z; "
            f"z0 is {describe_tree(expected)} but f(z0, x) is {describe_tree(out)}."
        )


def fixed_point(
    fn: FixedPointFn,
    solver: AbstractSolver,
    z0: State,
    args: Args = None,
    *,
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
    max_steps: int = 50,
    throw: bool = False,
    backward_counter: Float[Array, ""] | None = None,
) -> Solution:
    """Find z* = fn(z*, args), differentiable with respect to `args` and `fn`'s parameters.

    **Arguments:**

    - `fn`: `fn(z, args) -> z` on PyTrees; a function or an Equinox module.
    - `solver`: any imex-deq solver (`Anderson`, `SteadyStateODE`, ...).
    - `z0`: the initial guess; no gradient flows into it.
    - `args`: everything else `fn` depends on (e.g. the layer input x).
    - `adjoint`: how gradients are computed (default `ImplicitAdjoint()`).
    - `max_steps`: the solver's step cap (for `SteadyStateODE`, ODE steps).
    - `throw`: raise `equinox.EquinoxRuntimeError` (a `RuntimeError`), eagerly or inside
      `eqx.filter_jit` alike, naming the solver, the steps and the residual if the solve
      fails (under plain `jax.jit`, JAX wraps it in its own runtime error). Under `vmap`
      one failed sample raises. Default: report the failure in `result` only.
    - `backward_counter`: a scalar array; differentiate with respect to it to read the
      backward NFE of this solve (summed over a vmapped batch).

    **Returns:**

    A `Solution` with `value`, `result`, `num_steps`, `nfe` and `residual`.

    **Example:**

    ```python
    sol = fixed_point(lambda z, x: 0.5 * jnp.tanh(z) + x, Anderson(), jnp.zeros(3), x)
    ```
    """
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"solver must be an imex-deq solver, got {type(solver).__name__}.")
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(f"adjoint must be an imex-deq adjoint, got {type(adjoint).__name__}.")
    if not (isinstance(max_steps, int) and max_steps >= 1):
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}.")
    check_state(fn, z0, args)
    if backward_counter is None:
        backward_counter = jnp.zeros((), jax.tree_util.tree_leaves(z0)[0].dtype)
    sol = adjoint.apply(
        fn, solver, z0, args, max_steps=max_steps, backward_counter=backward_counter
    )
    if throw:
        sol = raise_if_failed(sol, solver, max_steps)
    return sol


def _describe_solver(solver: AbstractSolver) -> str:
    return (
        f"{type(solver).__name__}(rtol={solver.rtol}, atol={solver.atol}, "
        f"termination={solver.termination!r})"
    )


def raise_if_failed(sol: Solution, solver: AbstractSolver, max_steps: int) -> Solution:
    """`sol` unchanged, or an `equinox.EquinoxRuntimeError` if it did not converge.

    One path for eager and jitted solves: `eqx.branched_error_if`, whose messages are fixed
    when the solve is traced, so they carry the step count (exact up to 100) and the
    residual's decade.
    """
    messages, index = _failure_messages(sol, _describe_solver(solver), max_steps)
    failed = sol.result != RESULTS.successful
    value = eqx.branched_error_if(sol.value, failed, index, messages)
    return eqx.tree_at(lambda s: s.value, sol, value)


def _failure_messages(sol: Solution, name: str, max_steps: int):
    """Compile-time messages for every (failure, steps or residual) bucket, and the runtime
    index choosing one."""
    messages = []
    for code in (RESULTS.nonfinite, RESULTS.nonlinear_divergence):
        reason = RESULTS[code].strip() or "failed"
        for steps in range(_STEP_BUCKETS):
            shown = f"{steps}" if steps < _STEP_BUCKETS - 1 else f"{steps} or more"
            messages.append(f"{name} failed after {shown} steps: {reason}")
    for decade in _RESIDUAL_DECADES:
        messages.append(
            f"{name} did not converge after {max_steps} steps (max_steps={max_steps}); "
            f"residual ~1e{decade} (between 1e{decade} and 1e{decade + 1})"
        )
    step_bucket = jnp.minimum(sol.num_steps, _STEP_BUCKETS - 1)
    decade = jnp.clip(
        jnp.floor(jnp.log10(jnp.where(sol.residual > 0, sol.residual, 1e-12))),
        _RESIDUAL_DECADES.start,
        _RESIDUAL_DECADES.stop - 1,
    ).astype(jnp.int32)
    index = jnp.where(
        sol.result == RESULTS.nonfinite,
        step_bucket,
        jnp.where(
            sol.result == RESULTS.nonlinear_divergence,
            _STEP_BUCKETS + step_bucket,
            2 * _STEP_BUCKETS + decade - _RESIDUAL_DECADES.start,
        ),
    )
    return messages, index
