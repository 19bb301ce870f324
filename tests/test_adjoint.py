"""Gradients through fixed-point solves, in float64: the implicit adjoint against central
finite differences for every solver, against backprop through a converged solve, with
iterative linear solvers; the phantom gradient's convergence; backward NFE counts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import (
    SOLVER_NAMES,
    CountedVJP,
    N,
    affine_fn,
    affine_system,
    central_difference_grad,
    enable_x64,
    make_solver,
    relative_error,
    tight_gmres,
    tiny_cell,
)

import imex_deq
from imex_deq import RESULTS

TIGHT = {"rtol": 1e-12, "atol": 1e-12}
PROBLEMS = ["affine", "module"]


@pytest.fixture(scope="module", autouse=True)
def x64():
    with enable_x64():
        yield


def tight_solver(name: str) -> imex_deq.AbstractSolver:
    return make_solver(name, **TIGHT, gmres=tight_gmres())


def implicit() -> imex_deq.ImplicitAdjoint:
    return imex_deq.ImplicitAdjoint(linear_solver=tight_gmres())


def _inputs(problem: str):
    """The differentiated parameters and the fixed input of a problem (float64)."""
    if problem == "affine":
        a, b = affine_system()
        return (jnp.asarray(a), jnp.asarray(b)), None
    cell = tiny_cell(jax.random.key(1), dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(3).standard_normal(N))
    return cell, x


def _solve(problem, params, x, solver, adjoint, counter):
    """affine: z = A z + b with params (A, b); module: z = cell(z, x) with params cell."""
    fn, args = (affine_fn, params) if problem == "affine" else (params, x)
    return imex_deq.fixed_point(
        fn, solver, jnp.zeros(N), args, adjoint=adjoint, max_steps=2000, backward_counter=counter
    )


def _loss_of(z):
    weights = jnp.linspace(-1.0, 1.0, N)
    return jnp.sum(weights * z) + 0.5 * jnp.sum(jnp.sin(z) ** 2)


@eqx.filter_jit
def gradients(problem, params, x, solver, adjoint):
    """(d loss / d params, backward NFE, forward Solution)."""

    def loss(params, counter):
        sol = _solve(problem, params, x, solver, adjoint, counter)
        return _loss_of(sol.value), sol

    (grad, backward_nfe), sol = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, jnp.zeros(()))
    return grad, backward_nfe, sol


@pytest.fixture(scope="module")
def finite_differences(x64):
    """Central differences of the loss, the forward solve a tight fixed-point iteration."""
    solver = imex_deq.FixedPointIteration(rtol=1e-14, atol=1e-14, termination="abs")
    references = {}
    for problem in PROBLEMS:
        params, x = _inputs(problem)

        def loss(params, problem=problem, x=x):
            sol = _solve(problem, params, x, solver, imex_deq.ImplicitAdjoint(), jnp.zeros(()))
            return _loss_of(sol.value)

        references[problem] = central_difference_grad(loss, params, eps=1e-5)
    return references


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_implicit_gradient_matches_finite_differences(name, problem, finite_differences):
    params, x = _inputs(problem)
    grad, backward_nfe, sol = gradients(problem, params, x, tight_solver(name), implicit())
    assert sol.result == RESULTS.successful
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(params)
    assert relative_error(grad, finite_differences[problem]) < 1e-5
    # One VJP to start, then the GMRES products.
    assert float(backward_nfe) >= 2
    assert float(backward_nfe) == int(float(backward_nfe))


@pytest.mark.parametrize("name", [n for n in SOLVER_NAMES if n != "NewtonKrylov"])
def test_unrolled_gradient_matches_implicit(name, finite_differences):
    params, x = _inputs("module")
    # A short Anderson history keeps the unrolled (checkpointed) graph small to compile.
    options = {"history": 2} if name == "Anderson" else {}
    solver = make_solver(name, **TIGHT, **options)
    unrolled, unrolled_backward, sol = gradients(
        "module", params, x, solver, imex_deq.UnrolledAdjoint()
    )
    # The implicit gradient at the same (tightly converged) equilibrium.
    exact, _, _ = gradients("module", params, x, tight_solver("FixedPointIteration"), implicit())
    assert sol.result == RESULTS.successful
    assert relative_error(unrolled, exact) < 1e-7
    assert relative_error(unrolled, finite_differences["module"]) < 1e-5
    # Backprop through every step: the backward pass costs one VJP per forward evaluation.
    assert int(sol.nfe) >= int(sol.num_steps) >= 2
    assert float(unrolled_backward) == int(sol.nfe)


def test_newton_krylov_cannot_be_unrolled():
    params, x = _inputs("affine")
    solver = tight_solver("NewtonKrylov")
    with pytest.raises(ValueError, match="NewtonKrylov cannot be unrolled.*UnrolledAdjoint"):
        _solve("affine", params, x, solver, imex_deq.UnrolledAdjoint(), jnp.zeros(()))


@pytest.mark.parametrize("linear_solver", ["FixedPointIteration", "Anderson"])
def test_iterative_linear_solver_matches_gmres(linear_solver):
    params, x = _inputs("module")
    solver = tight_solver("Broyden")
    options = {"history": 3} if linear_solver == "Anderson" else {}
    adjoint = imex_deq.ImplicitAdjoint(
        linear_solver=make_solver(linear_solver, **TIGHT, **options), max_steps=500
    )
    grad, backward_nfe, sol = gradients("module", params, x, solver, adjoint)
    reference, _, _ = gradients("module", params, x, solver, implicit())
    assert sol.result == RESULTS.successful
    assert relative_error(grad, reference) < 1e-9
    # One VJP at the start plus one per linear-solver step, at least a few of them.
    assert 3 <= float(backward_nfe) <= 501


def test_phantom_gradient_approaches_implicit():
    params, x = _inputs("module")
    solver = tight_solver("FixedPointIteration")
    exact, _, exact_sol = gradients("module", params, x, solver, implicit())
    errors = {}
    for steps, damp in ((1, 0.0), (12, 0.0), (12, 0.2)):
        grad, backward_nfe, sol = gradients(
            "module", params, x, solver, imex_deq.PhantomAdjoint(steps=steps, damp=damp)
        )
        errors[steps, damp] = relative_error(grad, exact)
        assert float(backward_nfe) == steps
        assert int(sol.nfe) == int(exact_sol.nfe) + steps  # the forward pays for them too
    # ‖∂f/∂z‖ ≤ 0.5: the undamped error shrinks at least like 0.5^steps, the damped one
    # (damp = 0.2) like (0.8 · 0.5 + 0.2)^steps, towards the same implicit gradient.
    assert errors[12, 0.0] < 0.5**12
    assert errors[12, 0.2] < 0.6**12
    assert errors[1, 0.0] > 1e-2
    assert errors[1, 0.0] > 1e3 * errors[12, 0.0]
    assert errors[1, 0.0] > 10 * errors[12, 0.2]


# ------------------------------------------------------------ any lineax linear solver

LINEAR_SOLVERS = {
    "BiCGStab": lambda: lx.BiCGStab(rtol=1e-12, atol=1e-12, max_steps=200),
    "EarlyExitGMRES": lambda: imex_deq.EarlyExitGMRES(rtol=1e-12, max_steps=N),
    "Normal(CG)": lambda: lx.Normal(lx.CG(rtol=1e-12, atol=1e-12, max_steps=200)),
    "FixedPointLinearSolver(Anderson)": lambda: imex_deq.FixedPointLinearSolver(
        imex_deq.Anderson(**TIGHT, history=3), max_steps=500
    ),
}


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("linear_solver", sorted(LINEAR_SOLVERS))
def test_lineax_linear_solvers_match_finite_differences(linear_solver, problem, finite_differences):
    """float64: lineax's BiCGStab broke down on a DEQ adjoint in float32 (STACK_NOTES)."""
    params, x = _inputs(problem)
    adjoint = imex_deq.ImplicitAdjoint(linear_solver=LINEAR_SOLVERS[linear_solver]())
    grad, backward_nfe, sol = gradients(problem, params, x, tight_solver("Broyden"), adjoint)
    assert sol.result == RESULTS.successful
    assert relative_error(grad, finite_differences[problem]) < 1e-5
    assert float(backward_nfe) >= 3


COUNTED_LINEAR_SOLVERS = {
    "default GMRES": lambda: None,
    "GMRES(restart=2)": lambda: lx.GMRES(rtol=1e-10, atol=1e-10, restart=2, max_steps=30),
    "BiCGStab": LINEAR_SOLVERS["BiCGStab"],
    "EarlyExitGMRES": LINEAR_SOLVERS["EarlyExitGMRES"],
    "CG(stabilise_every=3) on Normal": lambda: lx.Normal(
        lx.CG(rtol=1e-10, atol=1e-10, max_steps=200, stabilise_every=3)
    ),
    "FixedPointLinearSolver(Anderson)": LINEAR_SOLVERS["FixedPointLinearSolver(Anderson)"],
    "bare FixedPointIteration": lambda: imex_deq.FixedPointIteration(**TIGHT),
}


@pytest.mark.parametrize("linear_solver", sorted(COUNTED_LINEAR_SOLVERS))
def test_backward_nfe_counts_every_vjp(linear_solver):
    """The backward NFE (derived from each lineax solver's `num_steps`) equals the VJPs a
    counting callback sees. The systems here are generic and larger than GMRES's restart,
    so its Krylov spaces never break down early and its bound is reached."""
    counted = CountedVJP(affine_fn)
    params, _ = _inputs("affine")
    made = COUNTED_LINEAR_SOLVERS[linear_solver]()
    adjoint = imex_deq.ImplicitAdjoint() if made is None else imex_deq.ImplicitAdjoint(made)

    @eqx.filter_jit
    def backward_nfe(params):
        def loss(params, counter):
            sol = imex_deq.fixed_point(
                counted,
                tight_solver("FixedPointIteration"),
                jnp.zeros(N),
                params,
                adjoint=adjoint,
                max_steps=2000,
                backward_counter=counter,
            )
            return _loss_of(sol.value)

        return jax.grad(loss, argnums=1)(params, jnp.zeros(()))

    nfe = float(backward_nfe(params))
    if linear_solver.endswith("on Normal"):
        # CG on the normal equations: one product with Aᵀ for the right-hand side, then
        # per CG product one with A (a VJP) and one with Aᵀ, its transpose, which the
        # callback does not see. It counts the VJPs: the final one and the A products.
        assert (nfe - 2) % 2 == 0
        assert 1 + (nfe - 2) / 2 == counted.read()
    else:
        assert nfe == counted.read()
    assert nfe >= 3
