"""How gradients reach f's parameters from a fixed point: the adjoint strategies.

Each adjoint wraps a whole forward solve. Only `UnrolledAdjoint` differentiates through
solver steps; the others use the equilibrium alone.
"""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from ._custom_types import Args, FixedPointFn, State
from ._early_exit_gmres import EarlyExitGMRES
from ._linear_solve import FixedPointLinearSolver
from ._solution import Solution, tree_norm
from ._solvers._base import AbstractFixedPointSolver, AbstractRootFinder, AbstractSolver
from ._solvers._linear import solve_normalised


class AbstractAdjoint(eqx.Module):
    """A strategy for the backward pass of a fixed-point solve."""

    @abc.abstractmethod
    def apply(
        self,
        fn: FixedPointFn,
        solver: AbstractSolver,
        z0: State,
        args: Args,
        *,
        max_steps: int,
        backward_counter: Float[Array, ""],
    ) -> Solution:
        """Solve forwards; make `backward_counter`'s gradient the backward NFE."""


@eqx.filter_custom_vjp
def _tally(value_and_counter, nfe):
    value, _ = value_and_counter
    return value


@_tally.def_fwd
def _tally_fwd(perturbed, value_and_counter, nfe):
    del perturbed
    return value_and_counter[0], None


@_tally.def_bwd
def _tally_bwd(residuals, grad_value, perturbed, value_and_counter, nfe):
    del residuals, perturbed
    value, counter = value_and_counter
    return _materialise(grad_value, value), _per_sample(nfe, value, counter.dtype)


def _per_sample(nfe, value: State, dtype) -> Array:
    """`nfe` as a `dtype` scalar that depends on `value`. Under vmap it is then batched like
    the sample, so JAX sums it into an unbatched counter over the batch; a constant `nfe`
    (PhantomAdjoint's steps, a fixed depth) would otherwise be counted once per batch."""
    anchor = jnp.reshape(jax.tree_util.tree_leaves(value)[0], (-1,))[:1]
    return jnp.where(jnp.all(jnp.isnan(anchor)), nfe, nfe).astype(dtype)


def tally_backward_nfe(value: State, counter: Float[Array, ""], nfe) -> State:
    """Identity on `value`; in the backward pass, `counter` receives gradient `nfe`."""
    return _tally((value, counter), nfe)


class UnrolledAdjoint(AbstractAdjoint):
    """Plain backpropagation through every solver step (for tests and pretraining).

    Backward NFE equals forward NFE. Memory grows with the steps taken.
    """

    def apply(self, fn, solver, z0, args, *, max_steps, backward_counter):
        sol = solver.solve(fn, z0, args, max_steps=max_steps, differentiable=True)
        value = tally_backward_nfe(sol.value, backward_counter, sol.nfe)
        return eqx.tree_at(lambda s: s.value, sol, value)


class PhantomAdjoint(AbstractAdjoint):
    """Inexact "phantom" gradient: solve without gradient, then take `steps` damped steps
    z ← (1 − damp)·f(z) + damp·z from the equilibrium with plain backprop.
    `steps=1, damp=0` is the one-step (Jacobian-free) gradient. torchdeq's τ is 1 − damp.

    **Arguments:**

    - `steps`: unrolled steps at the equilibrium (also added to the forward NFE).
    - `damp`: fraction of the old iterate kept per step, in [0, 1).
    """

    steps: int = eqx.field(default=1, static=True)
    damp: float = 0.0

    def __check_init__(self):
        if self.steps < 1:
            raise ValueError(f"PhantomAdjoint: steps must be at least 1, got {self.steps}.")
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"PhantomAdjoint: damp must lie in [0, 1), got {self.damp}.")

    def apply(self, fn, solver, z0, args, *, max_steps, backward_counter):
        frozen_fn, frozen_args = stop_gradient_arrays((fn, args))
        sol = solver.solve(frozen_fn, z0, frozen_args, max_steps=max_steps, differentiable=False)
        z = jax.lax.stop_gradient(sol.value)
        for _ in range(self.steps):
            z = jax.tree_util.tree_map(
                lambda new, old: (1 - self.damp) * new + self.damp * old, fn(z, args), z
            )
        value = tally_backward_nfe(z, backward_counter, self.steps)
        return eqx.tree_at(lambda s: (s.value, s.nfe), sol, (value, sol.nfe + self.steps))


class AbstractEquilibriumAdjoint(AbstractAdjoint):
    """An adjoint that differentiates the equilibrium alone: the forward solve runs
    without gradient; the backward pass finds λ ≈ (I − ∂f/∂z)⁻ᵀ ∂L/∂z* at z* with
    vector–Jacobian products of f and returns λᵀ ∂f/∂θ (one more VJP).

    Subclasses say how λ is found (`solve_adjoint`) and may keep something from the
    forward solve for it (`forward`)."""

    def forward(self, fn, solver, z0, args, max_steps) -> tuple[Solution, Any]:
        """The forward solve, and what the backward pass keeps from it (default: nothing)."""
        return solver.solve(fn, z0, args, max_steps=max_steps, differentiable=False), None

    @abc.abstractmethod
    def solve_adjoint(self, vjp_z, cotangent: State, memory: Any) -> tuple[State, Array]:
        """λ with λ ≈ vjp_z(λ) + cotangent, and the VJPs it cost; `memory` is what
        `forward` kept."""

    def apply(self, fn, solver, z0, args, *, max_steps, backward_counter):
        return _equilibrium_solve(
            (fn, args, backward_counter), solver, jax.lax.stop_gradient(z0), max_steps, self
        )


def restarted_gmres() -> lx.GMRES:
    """lineax's GMRES at relative residual 1e-3 (on the normalised right-hand side),
    restart 4, at most 4 cycles: 7–17 VJPs. The default before `EarlyExitGMRES`."""
    return lx.GMRES(rtol=0.0, atol=1e-3, norm=tree_norm, restart=4, max_steps=4)


def adjoint_operator(vjp_z, cotangent: State) -> lx.FunctionLinearOperator:
    """λ ↦ λ − vjp_z(λ): the transposed operator I − (∂f/∂z)ᵀ of the adjoint system."""
    return lx.FunctionLinearOperator(
        lambda v: jax.tree_util.tree_map(jnp.subtract, v, vjp_z(v)),
        jax.eval_shape(lambda: cotangent),
    )


class ImplicitAdjoint(AbstractEquilibriumAdjoint):
    """Exact gradient by the implicit function theorem, matrix-free.

    Solves (I − ∂f/∂z)ᵀ λ = ∂L/∂z* at z* with any lineax linear solver on
    vector–Jacobian products, then returns λᵀ ∂f/∂θ. The right-hand side is normalised to
    unit norm first, so the solver's tolerances are relative to the incoming cotangent's
    size.

    Backward NFE counts every VJP: one for λᵀ ∂f/∂θ, plus the linear solve's operator
    products (`linear_solve_matvecs`: exact for `EarlyExitGMRES`, `FixedPointLinearSolver`,
    `lineax.BiCGStab` and `lineax.CG`; for `lineax.GMRES` an upper bound,
    1 + (num_steps − 1)·(restart + 1), reached unless a Krylov space breaks down early;
    NaN for a solver whose cost is not registered there).

    **Arguments:**

    - `linear_solver`: a lineax solver for the square system. The default is
      `EarlyExitGMRES(rtol=1e-3, max_steps=20)`: it stops at the first Arnoldi step whose
      residual is below 1e-3 relative (on the MNIST-dense DEQ 3–8 VJPs where lineax's
      GMRES at the same tolerance spends 13–17, same test accuracy:
      `scripts/train_backward.py`, docs/performance.md). Other choices: `lineax.GMRES`
      (`restarted_gmres()`, the earlier default), `lineax.BiCGStab` (two VJPs per step; it can break down in float32),
      `lineax.Normal(lineax.CG(...))` (CG on the normal equations: each step one VJP and
      one JVP, and the condition number squared), or `FixedPointLinearSolver(solver)`,
      which iterates λ ← (∂f/∂z)ᵀλ + ∂L/∂z* with a discrete imex-deq solver and never calls
      LAPACK (the choice on several sharded CPU devices). A bare discrete imex-deq solver
      (`FixedPointIteration`, `Anderson`, `Broyden`, `NewtonKrylov`) is wrapped in
      `FixedPointLinearSolver(solver, max_steps)` for you.
    - `max_steps`: the step cap of that wrapper, for a bare imex-deq solver.
    """

    linear_solver: lx.AbstractLinearSolver

    def __init__(
        self,
        linear_solver: lx.AbstractLinearSolver
        | AbstractFixedPointSolver
        | AbstractRootFinder
        | None = None,
        max_steps: int = 50,
    ):
        if linear_solver is None:
            linear_solver = EarlyExitGMRES(rtol=1e-3, max_steps=20)
        elif isinstance(linear_solver, (AbstractFixedPointSolver, AbstractRootFinder)):
            linear_solver = FixedPointLinearSolver(linear_solver, max_steps=max_steps)
        self.linear_solver = linear_solver

    def __check_init__(self):
        if not isinstance(self.linear_solver, lx.AbstractLinearSolver):
            raise TypeError(
                "ImplicitAdjoint: linear_solver must be a lineax linear solver or a discrete "
                f"imex-deq solver, got {type(self.linear_solver).__name__}."
            )

    def solve_adjoint(self, vjp_z, cotangent, memory):
        del memory
        operator = adjoint_operator(vjp_z, cotangent)
        return solve_normalised(operator, cotangent, self.linear_solver)


def _materialise(grad: State | None, like: State) -> State:
    """Zeros where a cotangent is symbolically zero (None)."""
    if grad is None:
        return jax.tree_util.tree_map(jnp.zeros_like, like)
    return jax.tree_util.tree_map(
        lambda g, z: jnp.zeros_like(z) if g is None else g,
        grad,
        like,
        is_leaf=lambda g: g is None,
    )


def stop_gradient_arrays(tree):
    """`lax.stop_gradient` on every array leaf of a PyTree that may hold functions."""
    return jax.tree_util.tree_map(
        lambda leaf: jax.lax.stop_gradient(leaf) if eqx.is_array(leaf) else leaf, tree
    )


@eqx.filter_custom_vjp
def _equilibrium_solve(fn_args_counter, solver, z0, max_steps, adjoint):
    fn, args, _ = fn_args_counter
    return adjoint.forward(fn, solver, z0, args, max_steps)[0]


@_equilibrium_solve.def_fwd
def _equilibrium_solve_fwd(perturbed, fn_args_counter, solver, z0, max_steps, adjoint):
    del perturbed
    fn, args, _ = fn_args_counter
    sol, memory = adjoint.forward(fn, solver, z0, args, max_steps)
    return sol, (sol.value, memory)


@_equilibrium_solve.def_bwd
def _equilibrium_solve_bwd(
    residuals, grad_sol, perturbed, fn_args_counter, solver, z0, max_steps, adjoint
):
    del perturbed, solver, z0, max_steps
    z_star, memory = residuals
    fn, args, counter = fn_args_counter
    cotangent = _materialise(grad_sol.value, z_star)
    _, vjp_z = jax.vjp(lambda z: fn(z, args), z_star)
    lam, nfe = adjoint.solve_adjoint(lambda v: vjp_z(v)[0], cotangent, memory)
    _, vjp_fn_args = eqx.filter_vjp(lambda fa: fa[0](z_star, fa[1]), (fn, args))
    (grad_fn, grad_args) = vjp_fn_args(lam)[0]
    return grad_fn, grad_args, _per_sample(nfe + 1, z_star, counter.dtype)
