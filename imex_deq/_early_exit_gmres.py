"""GMRES that stops at the first Arnoldi step that meets its tolerance."""

from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from ._linear_solve import AbstractSquareSolver
from ._solvers._linear import linear_solve_matvecs


def _givens(a, b):
    """(c, s) with [c s; −s c] [a; b] = [r; 0]."""
    r = jnp.hypot(a, b)
    safe = jnp.where(r > 0, r, 1)
    return jnp.where(r > 0, a / safe, 1), jnp.where(r > 0, b / safe, 0)


def _back_substitute(upper: Float[Array, "m m"], rhs: Float[Array, " m"], size) -> Array:
    """Solve the leading `size` × `size` block of an upper-triangular system (the rest of
    the solution is zero); no LAPACK call (see `_small_linalg`)."""
    m = upper.shape[0]

    def body(i, x):
        k = m - 1 - i
        diagonal = jnp.where(upper[k, k] != 0, upper[k, k], 1)
        value = (rhs[k] - upper[k] @ x) / diagonal
        return x.at[k].set(jnp.where(k < size, value, 0))

    return jax.lax.fori_loop(0, m, body, jnp.zeros_like(rhs))


class EarlyExitGMRES(AbstractSquareSolver):
    """GMRES without restarts that checks its residual after every Arnoldi step and stops
    as soon as ‖b − A x‖ ≤ max(atol, rtol·‖b‖), so an easy system costs one or two
    operator products (lineax's GMRES spends at least two restart cycles).

    Each step is one product with the operator (in the implicit adjoint: one VJP); a
    nonzero initial guess (`options["y0"]`) adds one for its residual. `stats` reports
    `num_steps` (Arnoldi steps) and `matvecs` (all products), which
    `imex_deq.linear_solve_matvecs` returns exactly. Memory: `max_steps + 1` vectors.

    **Arguments:**

    - `rtol`, `atol`: the stopping rule on the two-norm of the residual.
    - `max_steps`: the most Arnoldi steps (the Krylov dimension).
    """

    rtol: float = 1e-3
    atol: float = 0.0
    max_steps: int = eqx.field(default=20, static=True)

    def __check_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"EarlyExitGMRES: max_steps must be at least 1, got {self.max_steps}.")
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(
                f"EarlyExitGMRES: tolerances must be non-negative, got rtol={self.rtol}, "
                f"atol={self.atol}."
            )

    def compute(self, state, vector, options: dict[str, Any]):
        operator = state
        b, unravel = jax.flatten_util.ravel_pytree(vector)

        def mv(v):
            return jax.flatten_util.ravel_pytree(operator.mv(unravel(v)))[0]

        y0 = options.get("y0")
        if y0 is None:
            x0, r0, initial_products = jnp.zeros_like(b), b, 0
        else:
            x0 = jax.flatten_util.ravel_pytree(y0)[0].astype(b.dtype)
            r0, initial_products = b - mv(x0), 1
        m = self.max_steps
        beta = jnp.linalg.norm(r0)
        tolerance = jnp.maximum(self.atol, self.rtol * jnp.linalg.norm(b))
        basis = jnp.zeros((m + 1, b.size), b.dtype).at[0].set(r0 / jnp.where(beta > 0, beta, 1))
        upper = jnp.zeros((m, m), b.dtype)  # transposed: row k is column k of R
        # The product of the Givens rotations so far: rotations @ (β e₁) is the rotated
        # right-hand side, whose entry k is the residual norm after k steps.
        rotations = jnp.eye(m + 1, dtype=b.dtype)

        def residual_after(k, rotations):
            return jnp.abs(beta * rotations[k, 0])

        def keep_going(carry):
            k, _, _, rotations = carry
            return (k < m) & (residual_after(k, rotations) > tolerance)

        def arnoldi_step(carry):
            k, basis, upper, rotations = carry
            # `x[...]` reads and `.at[i].set` writes: the arrays are in-place buffers of the
            # loop, so that under vmap a step writes one row instead of selecting the whole
            # basis per sample.
            w = mv(basis[k])
            earlier = (jnp.arange(m + 1) <= k).astype(b.dtype)
            h = (basis[...] @ w) * earlier
            w = w - h @ basis[...]
            correction = (basis[...] @ w) * earlier  # one reorthogonalisation pass
            w = w - correction @ basis[...]
            h = h + correction
            norm = jnp.linalg.norm(w)
            basis = basis.at[k + 1].set(w / jnp.where(norm > 0, norm, 1))
            column = rotations[...] @ h.at[k + 1].set(norm)
            c, s = _givens(column[k], column[k + 1])
            upper = upper.at[k].set(column.at[k].set(c * column[k] + s * column[k + 1])[:m])
            top, bottom = rotations[k], rotations[k + 1]
            rotations = (
                rotations.at[k].set(c * top + s * bottom).at[k + 1].set(c * bottom - s * top)
            )
            return k + 1, basis, upper, rotations

        carry = (jnp.array(0), basis, upper, rotations)
        steps, basis, upper, rotations = eqxi.while_loop(
            keep_going,
            arnoldi_step,
            carry,
            max_steps=m,
            buffers=lambda carry: carry[1:],
            kind="lax",
        )
        rotated_rhs = beta * rotations[:m, 0]
        coefficients = _back_substitute(upper.T, rotated_rhs, steps)
        x = x0 + coefficients @ basis[:m]
        converged = residual_after(steps, rotations) <= tolerance
        result = lx.RESULTS.where(converged, lx.RESULTS.successful, lx.RESULTS.max_steps_reached)
        stats = {"num_steps": steps, "max_steps": m, "matvecs": steps + initial_products}
        return unravel(x), result, stats


@linear_solve_matvecs.register
def _(solver: EarlyExitGMRES, stats, size):
    return stats["matvecs"]
