"""imex-deq's discrete solvers as a lineax linear solver."""

import equinox as eqx
import jax
import lineax as lx
import optimistix as optx

from ._solvers._base import AbstractFixedPointSolver, AbstractRootFinder
from ._solvers._linear import linear_solve_matvecs


class _Iteration(eqx.Module):
    """x ↦ x − A x + b: its fixed point solves A x = b."""

    operator: lx.AbstractLinearOperator

    def __call__(self, x, b):
        return jax.tree_util.tree_map(lambda xi, axi, bi: xi - axi + bi, x, self.operator.mv(x), b)


class AbstractSquareSolver(lx.AbstractLinearSolver):
    """What imex-deq's matrix-free lineax solvers share: a square operator kept as the
    state, and its transpose and conjugate for lineax's own transposed solves."""

    def init(self, operator, options):
        if eqx.tree_equal(operator.in_structure(), operator.out_structure()) is not True:
            raise ValueError(f"{type(self).__name__} needs a square operator.")
        return operator

    def transpose(self, state, options):
        return state.transpose(), options

    def conj(self, state, options):
        return lx.conj(state), options

    def assume_full_rank(self):
        return True


class FixedPointLinearSolver(AbstractSquareSolver):
    """A lineax linear solver that solves A x = b by running an imex-deq solver on the
    fixed-point iteration x ← x − A x + b = (I − A) x + b, from x = b.

    In the implicit adjoint A = I − (∂f/∂z)ᵀ, so the iteration is λ ← (∂f/∂z)ᵀ λ + g,
    one vector–Jacobian product per evaluation: it converges where the forward
    fixed-point iteration does (spectral radius of ∂f/∂z below 1), and Anderson or
    Broyden accelerate it. It never calls LAPACK, which makes it the choice on several
    sharded CPU devices (where batched LAPACK calls can deadlock XLA's CPU thread pool).

    `stats` reports `num_steps` and `nfe` (operator products).

    **Arguments:**

    - `solver`: a discrete imex-deq solver (`FixedPointIteration`, `Anderson`,
      `Broyden`, `NewtonKrylov`); its tolerances apply to the iteration.
    - `max_steps`: its step cap.
    """

    solver: AbstractFixedPointSolver | AbstractRootFinder
    max_steps: int = eqx.field(default=50, static=True)

    def __check_init__(self):
        if not isinstance(self.solver, (AbstractFixedPointSolver, AbstractRootFinder)):
            raise TypeError(
                "FixedPointLinearSolver: solver must be a discrete imex-deq solver "
                f"(FixedPointIteration, Anderson, Broyden, NewtonKrylov), got "
                f"{type(self.solver).__name__}."
            )
        if self.max_steps < 1:
            raise ValueError(
                f"FixedPointLinearSolver: max_steps must be at least 1, got {self.max_steps}."
            )

    def compute(self, state, vector, options):
        x0 = options.get("y0", vector)
        sol = self.solver.solve(
            _Iteration(state), x0, vector, max_steps=self.max_steps, differentiable=False
        )
        result = lx.RESULTS.where(
            sol.result == optx.RESULTS.successful,
            lx.RESULTS.successful,
            lx.RESULTS.where(
                sol.result == optx.RESULTS.nonlinear_max_steps_reached,
                lx.RESULTS.max_steps_reached,
                lx.RESULTS.breakdown,
            ),
        )
        stats = {"num_steps": sol.num_steps, "max_steps": self.max_steps, "nfe": sol.nfe}
        return sol.value, result, stats


@linear_solve_matvecs.register
def _(solver: FixedPointLinearSolver, stats, size):
    return stats["nfe"]
