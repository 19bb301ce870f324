"""The cheaper backward passes, in float64: `EarlyExitGMRES` (stops at its tolerance,
counts its products exactly) and `ShineAdjoint` (the forward solver's inverse-Jacobian
estimate, alone, refined, or as a Krylov initial guess), each against the exact implicit
gradient with the bound it can promise."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import CountedVJP, enable_x64, relative_error

import imex_deq
from imex_deq import RESULTS

N = 24
CONTRACTION = 0.7  # ‖W‖₂ of the test cell, so ‖∂f/∂z‖₂ ≤ 0.7


@pytest.fixture(scope="module", autouse=True)
def x64():
    with enable_x64():
        yield


def cell_params():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, N))
    w = CONTRACTION * w / np.linalg.norm(w, 2)
    return jnp.asarray(w), jnp.asarray(rng.standard_normal(N))


def cell(z, params):
    w, x = params
    return jnp.tanh(w @ z + x)


def loss_of(z):
    return jnp.sum(jnp.linspace(-1.0, 1.0, N) * z) + 0.5 * jnp.sum(jnp.sin(z) ** 2)


@eqx.filter_jit
def gradient(params, solver, adjoint, fn=cell):
    """(d loss / d params flattened, backward NFE, forward Solution)."""

    def loss(params, counter):
        sol = imex_deq.fixed_point(
            fn,
            solver,
            jnp.zeros(N),
            params,
            adjoint=adjoint,
            max_steps=200,
            backward_counter=counter,
        )
        return loss_of(sol.value), sol

    (grad, nfe), sol = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, jnp.zeros(()))
    return jax.flatten_util.ravel_pytree(grad)[0], nfe, sol


@pytest.fixture(scope="module")
def exact():
    adjoint = imex_deq.ImplicitAdjoint(lx.GMRES(rtol=1e-13, atol=1e-13, restart=N, max_steps=5))
    grad, _, sol = gradient(cell_params(), imex_deq.Anderson(rtol=1e-12), adjoint)
    assert sol.result == RESULTS.successful
    return grad


def cosine(a, b):
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


# ------------------------------------------------------------------- EarlyExitGMRES


def test_early_exit_gmres_solves_to_its_tolerance_and_stops_there():
    rng = np.random.default_rng(1)
    a = jnp.asarray(np.eye(N) + 0.3 * rng.standard_normal((N, N)) / np.sqrt(N))
    b = jnp.asarray(rng.standard_normal(N))
    operator = lx.MatrixLinearOperator(a)
    steps = {}
    for rtol in (1e-2, 1e-6, 1e-12):
        sol = lx.linear_solve(operator, b, imex_deq.EarlyExitGMRES(rtol=rtol, max_steps=N))
        residual = float(jnp.linalg.norm(a @ sol.value - b) / jnp.linalg.norm(b))
        assert residual <= rtol * 1.01
        steps[rtol] = int(sol.stats["num_steps"])
        assert int(sol.stats["matvecs"]) == steps[rtol]
    # A looser tolerance stops sooner; the tight one needs many more steps than the loose.
    assert steps[1e-2] < steps[1e-6] < steps[1e-12] <= N


def test_early_exit_gmres_reports_the_cap_and_uses_the_initial_guess():
    rng = np.random.default_rng(2)
    a = jnp.asarray(np.eye(N) + rng.standard_normal((N, N)) / np.sqrt(N))
    b = jnp.asarray(rng.standard_normal(N))
    operator = lx.MatrixLinearOperator(a)
    capped = lx.linear_solve(
        operator, b, imex_deq.EarlyExitGMRES(rtol=1e-12, max_steps=3), throw=False
    )
    assert capped.result == lx.RESULTS.max_steps_reached
    assert int(capped.stats["num_steps"]) == 3
    exact_x = jnp.linalg.solve(a, b)
    warm = lx.linear_solve(
        operator, b, imex_deq.EarlyExitGMRES(rtol=1e-6), options={"y0": exact_x + 1e-9}
    )
    # A guess already within tolerance costs its one residual product and no step.
    assert int(warm.stats["num_steps"]) == 0
    assert int(warm.stats["matvecs"]) == 1
    assert relative_error(warm.value, exact_x) < 1e-8


@pytest.mark.parametrize(
    "options, message",
    [({"max_steps": 0}, "max_steps must be at least 1"), ({"rtol": -1.0}, "non-negative")],
)
def test_early_exit_gmres_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        imex_deq.EarlyExitGMRES(**options)


def test_implicit_adjoint_with_early_exit_gmres(exact):
    for rtol, bound in ((1e-3, 1e-2), (1e-10, 1e-8)):
        adjoint = imex_deq.ImplicitAdjoint(imex_deq.EarlyExitGMRES(rtol=rtol, max_steps=N))
        grad, nfe, _ = gradient(cell_params(), imex_deq.Anderson(rtol=1e-12), adjoint)
        assert relative_error(grad, exact) < bound
    # The loose solve stops after a handful of VJPs, far below the Krylov dimension.
    loose = imex_deq.ImplicitAdjoint(imex_deq.EarlyExitGMRES(rtol=1e-3, max_steps=N))
    _, nfe, _ = gradient(cell_params(), imex_deq.Anderson(rtol=1e-12), loose)
    assert 2 <= float(nfe) <= 12


# ---------------------------------------------------------------------------- SHINE


@pytest.mark.parametrize("solver", [imex_deq.Broyden(rtol=1e-8), imex_deq.Anderson(rtol=1e-8)])
def test_shine_estimate_alone_costs_one_vjp_and_points_the_right_way(solver, exact):
    grad, nfe, sol = gradient(cell_params(), solver, imex_deq.ShineAdjoint())
    assert sol.result == RESULTS.successful
    assert float(nfe) == 1
    # Inexact: on this cell (‖∂f/∂z‖ ≤ 0.7) the estimate alone keeps the gradient's
    # direction to within ~30°, as Jacobian-free backprop (λ = ∂L/∂z*) does.
    assert cosine(grad, exact) > 0.85
    assert relative_error(grad, exact) < 0.6


@pytest.mark.parametrize("solver", [imex_deq.Broyden(rtol=1e-8), imex_deq.Anderson(rtol=1e-8)])
def test_shine_refinement_contracts_towards_the_exact_gradient(solver, exact):
    errors = {}
    for k in (0, 2, 6):
        grad, nfe, _ = gradient(cell_params(), solver, imex_deq.ShineAdjoint(refine_steps=k))
        assert float(nfe) == k + 1
        errors[k] = relative_error(grad, exact)
    # λₖ − λ* = (∂f/∂zᵀ)ᵏ (λ₀ − λ*): each step shrinks the error by ≤ ‖∂f/∂z‖ ≤ 0.7 (the
    # parameter gradient is a fixed linear map of λ, so up to its condition: factor 10).
    assert errors[2] < 10 * CONTRACTION**2 * errors[0]
    assert errors[6] < 10 * CONTRACTION**6 * errors[0]
    assert errors[6] < errors[2] < errors[0]


def test_shine_is_exact_on_an_affine_map_once_andersons_history_spans_the_state():
    """For f(z) = A z + b, Anderson's secant pairs satisfy ΔG = (A − I) ΔZ exactly; with
    as many independent pairs as dimensions the multisecant inverse is (A − I)⁻¹."""
    n = 4
    rng = np.random.default_rng(3)
    a = rng.standard_normal((n, n))
    params = (jnp.asarray(0.5 * a / np.linalg.norm(a, 2)), jnp.asarray(rng.standard_normal(n)))

    def affine(z, params):
        return params[0] @ z + params[1]

    def grad_with(adjoint):
        def loss(params):
            sol = imex_deq.fixed_point(
                affine,
                imex_deq.Anderson(rtol=1e-13, history=8, ridge=0.0),
                jnp.zeros(n),
                params,
                adjoint=adjoint,
                max_steps=n + 2,
            )
            return jnp.sum(jnp.arange(1.0, n + 1) * sol.value)

        return jax.grad(loss)(params)

    reference = grad_with(imex_deq.ImplicitAdjoint(lx.LU()))
    assert relative_error(grad_with(imex_deq.ShineAdjoint()), reference) < 1e-6


def test_shine_as_krylov_initial_guess_matches_the_exact_gradient(exact):
    adjoint = imex_deq.ShineAdjoint(linear_solver=imex_deq.EarlyExitGMRES(rtol=1e-10, max_steps=N))
    grad, nfe, _ = gradient(cell_params(), imex_deq.Broyden(rtol=1e-10), adjoint)
    assert relative_error(grad, exact) < 1e-8
    assert float(nfe) >= 3  # the final VJP, the guess's residual, the Arnoldi steps


@pytest.mark.parametrize("refine_steps", [0, 3])
def test_shine_backward_nfe_counts_every_vjp(refine_steps):
    counted = CountedVJP(cell)
    _, nfe, _ = gradient(
        cell_params(), imex_deq.Broyden(rtol=1e-8), imex_deq.ShineAdjoint(refine_steps), counted
    )
    assert float(nfe) == counted.read() == refine_steps + 1


@pytest.mark.parametrize(
    "solver", [imex_deq.FixedPointIteration(), imex_deq.SteadyStateODE(), imex_deq.NewtonKrylov()]
)
def test_shine_needs_a_quasi_newton_forward_solver(solver):
    with pytest.raises(TypeError, match=f"Broyden or Anderson, got {type(solver).__name__}"):
        gradient(cell_params(), solver, imex_deq.ShineAdjoint())


def test_shine_rejects_contradictory_options():
    with pytest.raises(ValueError, match="refine_steps or linear_solver, not both"):
        imex_deq.ShineAdjoint(refine_steps=2, linear_solver=imex_deq.EarlyExitGMRES())
    with pytest.raises(ValueError, match="refine_steps must be non-negative"):
        imex_deq.ShineAdjoint(refine_steps=-1)


def test_jacobian_free_backprop_is_the_one_step_phantom_gradient(exact):
    """JFB (Fung et al. 2022) differentiates one application of f at z*, i.e. λ = ∂L/∂z*."""
    params = cell_params()
    grad, nfe, sol = gradient(params, imex_deq.Anderson(rtol=1e-12), imex_deq.PhantomAdjoint(1))
    z_star = jax.lax.stop_gradient(sol.value)
    by_hand = jax.grad(lambda p: loss_of(cell(z_star, p)))(params)
    assert relative_error(grad, jax.flatten_util.ravel_pytree(by_hand)[0]) < 1e-10
    assert float(nfe) == 1
    assert cosine(grad, exact) > 0.8
