"""The solver interfaces.

Every imex-deq solver is an `AbstractSolver`: it offers the DEQ solve
`solve(fn, z0, args, *, max_steps, differentiable) -> Solution` that `fixed_point` and the
layers call. The discrete solvers are also optimistix solvers (`AbstractFixedPointSolver`,
`AbstractRootFinder`): they implement optimistix's `init` / `step`, keep a `Progress` in
their state, and inherit `terminate`, `postprocess` and `solve` from here, so that
`optx.fixed_point` / `optx.root_find` run them directly and the DEQ solve is one call of
`optx.fixed_point`.
"""

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._custom_types import Args, FixedPointFn, State, Termination
from .._solution import (
    RESULTS,
    Solution,
    check_termination,
    is_converged,
    residual_dtype,
    residual_norm,
    scaled_residual,
    tree_norm,
)
from ._buffered_loop import buffered_solve

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

    def converged(self, residual: Float[Array, ""]) -> Bool[Array, ""]:
        """Whether `residual` meets this solver's termination rule."""
        return is_converged(residual, self.termination, self.rtol, self.atol)


def verdict(
    solver: AbstractSolver,
    residual: Float[Array, ""],
    first_residual: Float[Array, ""],
    started: Any,
) -> tuple[Bool[Array, ""], RESULTS]:
    """`(stop, result)` for a residual: converged, non-finite, diverged, or keep going."""
    nonfinite = started & ~jnp.isfinite(residual)
    diverged = started & (residual > DIVERGENCE_RATIO * first_residual)
    result = RESULTS.where(
        nonfinite,
        RESULTS.nonfinite,
        RESULTS.where(diverged, RESULTS.nonlinear_divergence, RESULTS.successful),
    )
    return solver.converged(residual) | nonfinite | diverged, result


def tree_where(pred: Bool[Array, ""], new: PyTree, old: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


class Progress(eqx.Module):
    """The part of a discrete solver's state that imex-deq reads: the iterate the solve
    will return, and the counts. Start it with `solver.start(...)` in `init`, update it
    with `solver.record(...)` once per step, and keep it in the state's `progress` field.

    **Fields:**

    - `value`: what the solve returns for the kept iterate z: f(z) for a fixed-point
      solver, z itself for a root finder.
    - `aux`: the auxiliary output of `fn` at z.
    - `residual`: the residual of z (see `Termination`).
    - `best_step`: the step (counted from 1) that evaluated z.
    - `latest`, `first`: the residuals of the latest and of the first iterate.
    - `steps`, `nfe`: steps taken and function evaluations spent.
    """

    value: PyTree[Array]
    aux: PyTree[Any]
    residual: Float[Array, ""]
    best_step: Int[Array, ""]
    latest: Float[Array, ""]
    first: Float[Array, ""]
    steps: Int[Array, ""]
    nfe: Int[Array, ""]

    def record(self, value, aux, residual, nfe, *, keep_best: bool) -> "Progress":
        """After one step: the newest iterate's `value`, `aux` and `residual`, and the
        evaluations the step cost. With `keep_best` the newest iterate is kept only if
        its residual is the lowest so far (the first one always is)."""
        residual = residual.astype(self.latest.dtype)
        first = jnp.where(self.steps == 0, residual, self.first)
        steps = self.steps + 1
        if keep_best:
            better = (residual < self.residual) | (self.steps == 0)
            value = tree_where(better, value, self.value)
            aux = tree_where(better, aux, self.aux)
            kept = jnp.where(better, residual, self.residual)
            best_step = jnp.where(better, steps, self.best_step)
        else:
            kept, best_step = residual, steps
        nfe = self.nfe + jnp.asarray(nfe, self.nfe.dtype)
        return Progress(value, aux, kept, best_step, residual, first, steps, nfe)


class _WithValue(eqx.Module):
    """`fn(z, args) -> (f(z), f(z))`: the map with its value as auxiliary output."""

    fn: Callable

    def __call__(self, z, args):
        fz = self.fn(z, args)
        return fz, fz


class _NoAux(eqx.Module):
    """`fn(z, args) -> (f(z), None)`, as optimistix calls f without auxiliary output."""

    fn: Callable

    def __call__(self, z, args):
        return self.fn(z, args), None


class _RootFn(eqx.Module):
    """`(f(z) − z, f(z))` from f: the root problem optimistix makes of a fixed point."""

    fn: Callable

    def __call__(self, z, args):
        fz = jax.tree_util.tree_map(jnp.asarray, self.fn(z, args))
        return jax.tree_util.tree_map(jnp.subtract, fz, z), fz


_OWN_STATS = ("num_steps", "max_steps", "nfe", "residual")


class _AbstractDiscreteSolver(AbstractSolver):
    """What imex-deq's optimistix solvers share: the stopping rule, the statistics and
    the DEQ solve."""

    returns_best: ClassVar[bool] = False
    """Whether the solve returns the lowest-residual iterate rather than the last one
    (they differ only when the solve stops without converging)."""

    history_fields: ClassVar[tuple[str, ...]] = ()
    """Fields of the solver's state that hold a per-step history, read with `x[...]` and
    written one row per step with `x.at[i].set(row)`. When there are any, the
    non-differentiable solve runs `buffered_solve` with them as in-place buffers (under
    vmap a step then writes one row instead of selecting every sample's whole history)."""

    def _buffered(self, fn, z0, args, max_steps) -> optx.Solution:
        return buffered_solve(
            self,
            fn,
            z0,
            args,
            max_steps=max_steps,
            buffers=lambda state: tuple(getattr(state, name) for name in self.history_fields),
        )

    @property
    def norm(self) -> Callable[[PyTree], Array]:
        """The norm of every residual (the two-norm of the whole PyTree)."""
        return tree_norm

    def start(self, y: PyTree[Array], aux_struct: PyTree[jax.ShapeDtypeStruct]) -> Progress:
        """The `Progress` before the first step (for `init`)."""
        inf = jnp.array(jnp.inf, residual_dtype(y))
        aux = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_struct)
        zero = jnp.array(0)
        return Progress(y, aux, inf, zero, inf, inf, zero, zero)

    def record(self, progress: Progress, value, aux, residual, nfe) -> Progress:
        """`progress` after one step (for `step`); see `Progress.record`."""
        return progress.record(value, aux, residual, nfe, keep_best=self.returns_best)

    def fixed_point_residual(self, fz: PyTree[Array], y: PyTree[Array]) -> Float[Array, ""]:
        """The residual of y from f(y) (fixed-point form)."""
        return residual_norm(fz, y, self.termination)

    def root_residual(self, g: PyTree[Array], y: PyTree[Array]) -> Float[Array, ""]:
        """The residual of y from g(y) = f(y) − y (root form): ‖g(y)‖, relative to
        ‖y + g(y)‖ (that is, ‖f(y)‖) when `termination="rel"`. For a root problem that is
        not a fixed-point problem in disguise, use `termination="abs"`."""
        if self.termination == "abs":
            return tree_norm(g)
        return scaled_residual(g, jax.tree_util.tree_map(jnp.add, y, g), self.termination)

    def terminate(self, fn, y, args, options, state, tags):
        progress = state.progress
        return verdict(self, progress.latest, progress.first, progress.steps > 0)

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        progress = state.progress
        stats = {"nfe": progress.nfe, "residual": progress.residual}
        stats["best_step"] = progress.best_step
        return progress.value, progress.aux, stats

    @abc.abstractmethod
    def _solve_keeping_state(self, fn, z0, args, max_steps, differentiable):
        """`(Solution, the solver's final optimistix state)`."""

    def solve(self, fn, z0, args, *, max_steps, differentiable):
        return self._solve_keeping_state(fn, z0, args, max_steps, differentiable)[0]

    def solve_with_state(
        self, fn: FixedPointFn, z0: State, args: Args, *, max_steps: int
    ) -> tuple[Solution, PyTree]:
        """The DEQ solve (not differentiable) and the solver's final state, for a backward
        pass that reuses what the solve learnt (`ShineAdjoint`)."""
        return self._solve_keeping_state(fn, z0, args, max_steps, False)

    def _optimistix_solve(self, fn, z0, args, has_aux, max_steps, differentiable):
        adjoint = optx.RecursiveCheckpointAdjoint() if differentiable else optx.ImplicitAdjoint()
        return optx.fixed_point(
            fn,
            self,
            z0,
            args,
            has_aux=has_aux,
            max_steps=max_steps,
            adjoint=adjoint,
            throw=False,
        )


def _solution(sol: optx.Solution, value: PyTree[Array]) -> Solution:
    return Solution(
        value=value,
        result=sol.result,
        num_steps=sol.stats["num_steps"],
        nfe=sol.stats["nfe"],
        residual=sol.stats["residual"],
        stats={k: v for k, v in sol.stats.items() if k not in _OWN_STATS},
    )


class AbstractFixedPointSolver(_AbstractDiscreteSolver, optx.AbstractFixedPointSolver):
    """An imex-deq solver that is also an `optimistix.AbstractFixedPointSolver`: `fn(y,
    args)` returns `(f(y), aux)` and `optx.fixed_point(fn, solver, y0)` runs it directly.
    The solution's `value` is f at the returned iterate, `stats` carries `nfe`,
    `residual` and `best_step`.

    To write one, implement optimistix's `init` (returning a state whose `progress`
    field is `self.start(y, aux_struct)`) and `step` (evaluate `fn` once or more, and
    update the progress with `self.record(progress, f(y), aux, self.fixed_point_residual(
    f(y), y), nfe)`); `terminate`, `postprocess` and the DEQ `solve` come from here.
    """

    def _solve_keeping_state(self, fn, z0, args, max_steps, differentiable):
        if self.history_fields and not differentiable:
            sol = self._buffered(_NoAux(fn), z0, args, max_steps)
        else:
            sol = self._optimistix_solve(fn, z0, args, False, max_steps, differentiable)
        return _solution(sol, sol.value), sol.state


class AbstractRootFinder(_AbstractDiscreteSolver, optx.AbstractRootFinder):
    """An imex-deq solver that is also an `optimistix.AbstractRootFinder`: `fn(y, args)`
    returns `(g(y), aux)` and `optx.root_find(fn, solver, y0)` runs it directly;
    `optx.fixed_point` runs it on g(y) = f(y) − y. The solution's `value` is the returned
    iterate, `stats` carries `nfe`, `residual` and `best_step`.

    To write one, implement `init` and `step` as for `AbstractFixedPointSolver`, recording
    `self.record(progress, y, aux, self.root_residual(g(y), y), nfe)`.
    """

    def _solve_keeping_state(self, fn, z0, args, max_steps, differentiable):
        # optx.fixed_point runs a root finder on f(z) − z; with f(z) as auxiliary output the
        # solve also hands back f at the iterate it returns.
        if self.history_fields and not differentiable:
            sol = self._buffered(_RootFn(fn), z0, args, max_steps)
        else:
            sol = self._optimistix_solve(_WithValue(fn), z0, args, True, max_steps, differentiable)
        return _solution(sol, sol.aux), sol.state
