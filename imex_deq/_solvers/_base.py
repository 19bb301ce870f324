"""The solver interface, and the optimistix loop that drives every discrete solver."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, Int, PyTree

from .._custom_types import Args, FixedPointFn, State, Termination
from .._solution import (
    RESULTS,
    Solution,
    at_least_float32,
    check_termination,
    is_converged,
    residual_norm,
    tree_norm,
)

DIVERGENCE_RATIO = 1e6
"""A solve is reported diverged once its residual exceeds this multiple of the first one."""


class AbstractSolver(eqx.Module):
    """A forward solver: finds z* = fn(z*, args) from an initial guess.

    Every solver stops by the same rule (see `termination`) and reports honest NFE.
    """

    rtol: eqx.AbstractVar[float]
    atol: eqx.AbstractVar[float]
    termination: eqx.AbstractVar[Termination]

    def __check_init__(self):
        check_termination(self.termination, self.rtol, self.atol)

    @abc.abstractmethod
    def solve(
        self, fn: FixedPointFn, z0: State, args: Args, *, max_steps: int, differentiable: bool
    ) -> Solution:
        """Run the solve. With `differentiable=True` plain backprop through the steps works."""

    def converged(self, residual: Float[Array, ""]):
        """Whether `residual` meets this solver's termination rule."""
        return is_converged(residual, self.termination, self.rtol, self.atol)


class AbstractIterativeSolver(AbstractSolver):
    """A discrete solver defined by one update rule; optimistix runs the loop.

    Subclasses implement `init` (method state from the initial guess, as a flat vector)
    and `update` (one step: evaluate f, return f(z), the next iterate, the new state and
    the number of f evaluations it cost).
    """

    @abc.abstractmethod
    def init(self, z: Float[Array, " n"]) -> PyTree:
        """The update rule's state before the first step."""

    @abc.abstractmethod
    def update(
        self, fn: Callable[[Array], Array], z: Float[Array, " n"], state: PyTree
    ) -> tuple[Array, Array, PyTree, Int[Array, ""] | int]:
        """One step from `z`: returns `(f(z), z_next, new_state, nfe)`."""

    def solve(self, fn, z0, args, *, max_steps, differentiable):
        adjoint = optx.RecursiveCheckpointAdjoint() if differentiable else optx.ImplicitAdjoint()
        sol = optx.fixed_point(
            fn,
            _OptimistixDriver(self, self.rtol, self.atol),
            z0,
            args,
            max_steps=max_steps,
            adjoint=adjoint,
            throw=False,
        )
        return Solution(
            value=sol.value,
            result=sol.result,
            num_steps=sol.stats["num_steps"],
            nfe=sol.state.nfe,
            residual=sol.state.residual,
        )


class _LoopState(eqx.Module):
    method_state: PyTree
    last_fz: State
    residual: Float[Array, ""]
    first_residual: Float[Array, ""]
    nfe: Int[Array, ""]


def residual_dtype(z: State):
    """float32, or wider when the state is wider: residuals never run in bfloat16."""
    return jnp.result_type(*(at_least_float32(leaf.dtype) for leaf in jax.tree_util.tree_leaves(z)))


class _OptimistixDriver(optx.AbstractFixedPointSolver):
    """Adapts an `AbstractIterativeSolver` to optimistix's init/step/terminate protocol."""

    method: AbstractIterativeSolver
    rtol: float
    atol: float
    norm: Callable = tree_norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        flat, _ = jax.flatten_util.ravel_pytree(y)
        inf = jnp.array(jnp.inf, residual_dtype(y))
        return _LoopState(self.method.init(flat), y, inf, inf, jnp.array(0))

    def step(self, fn, y, args, options, state: _LoopState, tags):
        flat, unravel = jax.flatten_util.ravel_pytree(y)

        def flat_fn(v):
            out, _ = fn(unravel(v), args)
            return jax.flatten_util.ravel_pytree(out)[0]

        flat_fz, flat_next, method_state, nfe = self.method.update(
            flat_fn, flat, state.method_state
        )
        fz = unravel(flat_fz)
        residual = residual_norm(fz, y, self.method.termination).astype(state.residual.dtype)
        first = jnp.where(state.nfe == 0, residual, state.first_residual)
        new_state = _LoopState(method_state, fz, residual, first, state.nfe + nfe)
        return unravel(flat_next), new_state, None

    def terminate(self, fn, y, args, options, state: _LoopState, tags):
        return loop_verdict(self.method, state.residual, state.first_residual, state.nfe > 0)

    def postprocess(self, fn, y, aux, args, options, state: _LoopState, tags, result):
        return state.last_fz, aux, {}


def loop_verdict(
    solver: AbstractSolver,
    residual: Float[Array, ""],
    first_residual: Float[Array, ""],
    started: Any,
) -> tuple[Any, RESULTS]:
    """`(stop, result)` for a residual: converged, non-finite, diverged, or keep going."""
    nonfinite = started & ~jnp.isfinite(residual)
    diverged = started & (residual > DIVERGENCE_RATIO * first_residual)
    result = RESULTS.where(
        nonfinite,
        RESULTS.nonfinite,
        RESULTS.where(diverged, RESULTS.nonlinear_divergence, RESULTS.successful),
    )
    return solver.converged(residual) | nonfinite | diverged, result
