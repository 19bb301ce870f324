"""SHINE (Ramzi et al., ICLR 2022): the backward pass from the inverse-Jacobian estimate
that the forward quasi-Newton solve built anyway."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float, Int

from ._adjoint import AbstractEquilibriumAdjoint, adjoint_operator
from ._solvers._anderson import Anderson
from ._solvers._broyden import Broyden, _inverse_rmv
from ._solvers._linear import solve_normalised
from ._solvers._small_linalg import solve_spd


class _BroydenEstimate(eqx.Module):
    """Broyden's B = −I + Σ uᵢ vᵢᵀ ≈ (∂f/∂z − I)⁻¹, so (I − ∂f/∂z)⁻ᵀ c ≈ −Bᵀ c."""

    us: Float[Array, "m n"]
    vs: Float[Array, "m n"]

    def adjoint_guess(self, cotangent: Float[Array, " n"]) -> Float[Array, " n"]:
        return -_inverse_rmv(self.us, self.vs, cotangent)


class _AndersonEstimate(eqx.Module):
    """Anderson (type II) is the multisecant method whose inverse-Jacobian estimate of
    g(z) = f(z) − z is H = −I + ΔF (ΔGᵀΔG)⁻¹ ΔGᵀ, built from the differences ΔF of the
    images f(zᵢ) and ΔG of the residuals gᵢ in its history (H ΔG = ΔZ). Then
    (I − ∂f/∂z)⁻ᵀ c ≈ −Hᵀ c = c − ΔG (ΔGᵀΔG)⁻¹ ΔFᵀ c."""

    images: Float[Array, "m n"]
    residuals: Float[Array, "m n"]
    count: Int[Array, ""]
    ridge: float

    def adjoint_guess(self, cotangent: Float[Array, " n"]) -> Float[Array, " n"]:
        history = self.images.shape[0]
        latest = (self.count - 1) % history
        slots = jnp.arange(history)
        usable = (slots < jnp.minimum(self.count, history)) & (slots != latest)
        weight = usable.astype(cotangent.dtype)[:, None]
        d_images = (self.images - self.images[latest][None, :]) * weight
        d_residuals = (self.residuals - self.residuals[latest][None, :]) * weight
        gram = d_residuals @ d_residuals.T
        scale = jnp.max(jnp.diagonal(gram)) + jnp.finfo(cotangent.dtype).tiny
        eye = jnp.eye(history, dtype=cotangent.dtype)
        pair = usable[:, None] & usable[None, :]
        regularised = jnp.where(pair, gram + self.ridge * scale * eye, eye)
        coefficients = solve_spd(regularised, d_images @ cotangent)
        return cotangent - coefficients @ d_residuals


def check_shine_solver(solver) -> None:
    """A clear error for a forward solver that keeps no inverse-Jacobian estimate."""
    if not isinstance(solver, (Anderson, Broyden)):
        raise TypeError(
            "ShineAdjoint reuses a quasi-Newton solver's inverse-Jacobian estimate: the "
            f"forward solver must be Broyden or Anderson, got {type(solver).__name__}."
        )


def inverse_jacobian_estimate(solver: Anderson | Broyden, state) -> eqx.Module:
    """What the forward solve learnt about (∂f/∂z − I)⁻¹, from its final state."""
    if isinstance(solver, Broyden):
        return _BroydenEstimate(state.us, state.vs)
    return _AndersonEstimate(state.images, state.residuals, state.count, solver.ridge)


class ShineAdjoint(AbstractEquilibriumAdjoint):
    """SHINE: the adjoint solution λ = (I − ∂f/∂z)⁻ᵀ ∂L/∂z* estimated from the forward
    solver's own inverse-Jacobian approximation (Broyden's low-rank inverse, or the
    multisecant inverse behind Anderson's history), at no extra evaluation of f.

    Three uses, by cost:

    - `ShineAdjoint()`: the estimate is the whole backward pass: backward NFE 1 (the
      final λᵀ ∂f/∂θ). Inexact: how close it comes depends on how much of the Jacobian
      the forward solve explored (measured in docs/performance.md).
    - `ShineAdjoint(refine_steps=k)`: k fixed-point refinement steps
      λ ← (∂f/∂z)ᵀ λ + ∂L/∂z* from the estimate (k more VJPs), each shrinking the error
      by the contraction factor of f.
    - `ShineAdjoint(linear_solver=EarlyExitGMRES(...))`: the estimate is the initial
      guess of a lineax solve of the exact adjoint system, which then stops early
      when the guess is good (one more VJP for its residual).

    The forward solver must be `Broyden` or `Anderson` (a clear error otherwise).

    **Arguments:**

    - `refine_steps`: fixed-point refinement steps after the estimate (default 0).
    - `linear_solver`: a lineax solver started from the estimate; excludes `refine_steps`.
    """

    refine_steps: int = eqx.field(default=0, static=True)
    linear_solver: lx.AbstractLinearSolver | None = None

    def __check_init__(self):
        if self.refine_steps < 0:
            raise ValueError(
                f"ShineAdjoint: refine_steps must be non-negative, got {self.refine_steps}."
            )
        if self.linear_solver is not None and self.refine_steps:
            raise ValueError(
                "ShineAdjoint: give refine_steps or linear_solver, not both "
                f"(got refine_steps={self.refine_steps} and a linear_solver)."
            )
        if self.linear_solver is not None and not isinstance(
            self.linear_solver, lx.AbstractLinearSolver
        ):
            raise TypeError(
                "ShineAdjoint: linear_solver must be a lineax linear solver, got "
                f"{type(self.linear_solver).__name__}."
            )

    def forward(self, fn, solver, z0, args, max_steps):
        check_shine_solver(solver)
        sol, state = solver.solve_with_state(fn, z0, args, max_steps=max_steps)
        return sol, inverse_jacobian_estimate(solver, state)

    def solve_adjoint(self, vjp_z, cotangent, estimate):
        flat, unravel = jax.flatten_util.ravel_pytree(cotangent)
        lam = unravel(estimate.adjoint_guess(flat).astype(flat.dtype))
        if self.linear_solver is not None:
            operator = adjoint_operator(vjp_z, cotangent)
            return solve_normalised(operator, cotangent, self.linear_solver, initial_guess=lam)
        for _ in range(self.refine_steps):
            lam = jax.tree_util.tree_map(jnp.add, vjp_z(lam), cotangent)
        return lam, self.refine_steps
