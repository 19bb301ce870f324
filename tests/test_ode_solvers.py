"""ODE solvers made for steady states: SteadyStateODE's evaluation counts for every ODE
solver (the steady-state test read from the solver's state), the variable-step
Adams–Bashforth 3 solver (order, steady state, batches, gradients) and pseudo-transient
continuation."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from helpers import (
    AFFINE_PROBLEMS,
    CountedFn,
    N,
    affine_fn,
    affine_system,
    central_difference_grad,
    enable_x64,
    relative_error,
    tiny_cell,
    tree_flat,
)

import imex_deq
from imex_deq import RESULTS, AdamsBashforth3, PseudoTransient, SteadyStateODE
from imex_deq.experiments._registry import ODE_SOLVERS, SOLVERS

ODE_SOLVER_CASES = {
    "Tsit5": dfx.Tsit5,
    "Dopri5": dfx.Dopri5,
    "Bosh3": dfx.Bosh3,
    "Heun": dfx.Heun,
    "AdamsBashforth3": AdamsBashforth3,
}
# Evaluations per attempted step, the steady-state test included.
PER_STEP = {"Tsit5": 6, "Dopri5": 6, "Bosh3": 3, "Heun": 3}


# ------------------------------------------------------------ SteadyStateODE's counts


@pytest.mark.parametrize("problem", AFFINE_PROBLEMS, ids=[p.name for p in AFFINE_PROBLEMS])
@pytest.mark.parametrize("name", list(ODE_SOLVER_CASES))
def test_nfe_is_exact(name, problem):
    """The reported NFE is what a counting callback sees; for first-same-as-last tableaux
    the steady-state test costs nothing (1 + stages per step), Heun pays one evaluation."""
    counted = CountedFn(problem.fn)
    solver = SteadyStateODE(rtol=1e-5, atol=1e-5, ode_solver=ODE_SOLVER_CASES[name]())
    sol = imex_deq.fixed_point(
        counted, solver, problem.z0(jnp.float32), problem.args(jnp.float32), max_steps=3000
    )
    assert sol.result == RESULTS.successful
    assert float(sol.residual) <= 1e-5
    assert relative_error(sol.value, problem.exact(jnp.float32)) <= 1e-4
    assert int(sol.nfe) == counted.read()
    steps = int(sol.num_steps)
    if name in PER_STEP:
        assert int(sol.nfe) == 1 + PER_STEP[name] * steps
    else:
        # One per Adams step, three per start-up attempt: on this problem the first
        # start-up attempts (dt = 1) are rejected, and the count still matches.
        startup_attempts = (int(sol.nfe) - 1 - steps) // 2
        assert int(sol.nfe) == 1 + steps + 2 * startup_attempts
        assert startup_attempts > 2


def test_converged_start_costs_one_evaluation():
    a, b = (jnp.asarray(x, jnp.float32) for x in affine_system())
    exact = jnp.asarray(np.linalg.solve(np.eye(N) - np.asarray(a), np.asarray(b)), jnp.float32)
    for make in ODE_SOLVER_CASES.values():
        counted = CountedFn(affine_fn)
        solver = SteadyStateODE(rtol=1e-4, ode_solver=make())
        sol = imex_deq.fixed_point(counted, solver, exact, (a, b), max_steps=10)
        assert sol.result == RESULTS.successful
        assert int(sol.num_steps) == 0
        assert int(sol.nfe) == counted.read() == 1


def _stiff_relaxation(rates, seed=0):
    """(A, b) such that dz/dt = A z + b − z relaxes at the given `rates` (the eigenvalues
    of A − I, a symmetric matrix): a stable flow whose fixed-point map need not contract."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(rates), len(rates))))
    a = q @ np.diag(1.0 + np.asarray(rates)) @ q.T
    return a, rng.standard_normal(len(rates))


def test_stall_tightening_reaches_a_stiff_steady_state():
    """Relaxation rates 1 and 10 (A has eigenvalue −9: plain iteration diverges). Under
    the loose default control alone Tsit5 holds its steps at the stability limit of the
    fast modes, whose residual the error estimate accepts above the stopping rule: the
    solve stalls at the step cap. Tightening the control on each accepted step that does
    not lower the residual reaches the exact fixed point, and the count stays exact."""
    a, b = _stiff_relaxation([-1.0] * 3 + [-10.0] * 3)
    exact = jnp.asarray(np.linalg.solve(np.eye(N) - a, b), jnp.float32)
    args = tuple(jnp.asarray(x, jnp.float32) for x in (a, b))
    z0 = jnp.zeros(N, jnp.float32)

    counted = CountedFn(affine_fn)
    sol = imex_deq.fixed_point(counted, SteadyStateODE(rtol=1e-3), z0, args, max_steps=200)
    assert sol.result == RESULTS.successful
    assert float(sol.residual) <= 1e-3
    assert relative_error(sol.value, exact) <= 1e-2
    assert int(sol.nfe) == counted.read() == 1 + 6 * int(sol.num_steps)

    untightened = SteadyStateODE(rtol=1e-3, ode_stall_factor=1.0)
    stalled = imex_deq.fixed_point(affine_fn, untightened, z0, args, max_steps=200)
    assert stalled.result == RESULTS.nonlinear_max_steps_reached
    assert float(stalled.residual) > 1e-3


@pytest.mark.parametrize("factor", [0.5, 0.0, float("nan")])
def test_stall_factor_below_one_is_an_error(factor):
    with pytest.raises(ValueError, match="ode_stall_factor"):
        SteadyStateODE(ode_stall_factor=factor)


def test_unknown_ode_solver_is_a_type_error():
    with pytest.raises(TypeError, match="Kvaerno5"):
        SteadyStateODE(ode_solver=dfx.Kvaerno5())
    with pytest.raises(TypeError, match="Euler"):
        SteadyStateODE(ode_solver=dfx.Euler())


def test_registry_names():
    assert set(ODE_SOLVERS) == {"tsit5", "bosh3", "heun", "adams3"}
    for make in ODE_SOLVERS.values():
        SteadyStateODE(ode_solver=make())
    assert SOLVERS["pseudo-transient"] is PseudoTransient


# ------------------------------------------------------------------ AdamsBashforth3


def _forced_decay(t, y, args):
    return -y + jnp.sin(t)


def _forced_decay_exact(t):
    return (np.sin(t) - np.cos(t)) / 2 + 1.5 * np.exp(-t)  # y(0) = 1


def test_adams_order_of_convergence():
    """Fixed steps, halved four times: the final error falls by ≈ 2³ each time."""
    with enable_x64():
        errors = []
        for n in (20, 40, 80, 160, 320):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(_forced_decay),
                AdamsBashforth3(),
                0.0,
                2.0,
                2.0 / n,
                jnp.array(1.0),
                stepsize_controller=dfx.ConstantStepSize(),
                max_steps=1000,
            )
            errors.append(abs(float(sol.ys[-1]) - _forced_decay_exact(2.0)))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((2.6 <= orders) & (orders <= 3.4)), orders


def test_adams_adaptive_steps_meet_tolerance():
    """Adaptive steps (varying every step) keep the global error near the tolerance, with
    fewer evaluations than Bogacki–Shampine, whose steps cost three."""
    with enable_x64():
        term = dfx.ODETerm(_forced_decay)
        results = {}
        for solver in (AdamsBashforth3(), dfx.Bosh3()):
            sol = dfx.diffeqsolve(
                term,
                solver,
                0.0,
                10.0,
                0.1,
                jnp.array(1.0),
                stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
                max_steps=10_000,
            )
            error = abs(float(sol.ys[-1]) - _forced_decay_exact(10.0))
            results[type(solver).__name__] = (error, int(sol.stats["num_steps"]))
    error, steps = results["AdamsBashforth3"]
    assert error <= 1e-5
    assert steps + 4 < 3 * results["Bosh3"][1]  # evaluations: ≤ steps + 2·2 start-up


def test_adams_rejection_keeps_the_history():
    """A rejected step leaves the state as it was: the step that follows from it is the
    same as a first attempt with the smaller step."""
    term = dfx.ODETerm(_forced_decay)
    solver = AdamsBashforth3()
    y, t, state = jnp.array(1.0), jnp.array(0.0), None
    state = solver.init(term, t, t + 0.1, y, None)
    for _ in range(3):  # two start-up steps and one Adams step
        y, _, _, state, _ = solver.step(term, t, t + 0.1, y, None, state, False)
        t = t + 0.1
    assert int(state.count) == 3
    np.testing.assert_allclose(state.ts, [0.1, 0.2, 0.3], rtol=1e-6)
    sol = dfx.diffeqsolve(
        term,
        solver,
        0.3,
        0.6,
        0.05,
        y,
        solver_state=state,
        stepsize_controller=dfx.PIDController(rtol=1e-9, atol=1e-9, dtmin=1e-6),
        max_steps=10_000,
        saveat=dfx.SaveAt(t1=True),
    )
    assert int(sol.stats["num_rejected_steps"]) >= 1
    assert abs(float(sol.ys[-1]) - _forced_decay_exact(0.6)) <= 1e-4


def test_adams_reaches_a_linear_steady_state():
    """dz/dt = A z + b (A stable, not symmetric) stops at −A⁻¹b: SteadyStateODE on
    f(z) = z + A z + b, whose residual is ‖A z + b‖ / ‖f(z)‖."""
    rng = np.random.default_rng(3)
    m = rng.standard_normal((N, N))
    a = -np.eye(N) + 0.3 * m / np.linalg.norm(m, 2)
    b = rng.standard_normal(N)
    args = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))

    def fn(z, args):
        a, b = args
        return z + a @ z + b

    counted = CountedFn(fn)
    solver = SteadyStateODE(rtol=1e-5, ode_solver=AdamsBashforth3())
    sol = imex_deq.fixed_point(counted, solver, jnp.zeros(N), args, max_steps=2000)
    assert sol.result == RESULTS.successful
    assert int(sol.nfe) == counted.read()
    steady = -np.linalg.solve(a, b)
    # ‖z − z*‖ ≤ ‖A⁻¹‖ ‖A z + b‖ ≤ 1/0.7 · rtol · ‖f(z)‖.
    assert relative_error(sol.value, steady) <= 1e-5 / 0.7 * 1.01 + 1e-6


def test_adams_under_vmap_counts_each_sample():
    """In a batch each sample stops at its own steady state and reports what it would
    alone (the start-up stages run while any sample still starts up; the others discard
    them and do not count them)."""
    a, b = affine_system(norm=1.0, seed=1)
    solver = SteadyStateODE(rtol=1e-5, atol=1e-5, ode_solver=AdamsBashforth3())

    @eqx.filter_jit
    def solve(a, b):
        def one(a, b):
            return imex_deq.fixed_point(affine_fn, solver, jnp.zeros(N), (a, b), max_steps=3000)

        return jax.vmap(one)(a, b)

    def run(*scales):
        matrices = jnp.asarray(np.stack([s * a for s in scales]), jnp.float32)
        return solve(matrices, jnp.asarray(np.stack([b] * len(scales)), jnp.float32))

    mixed = run(0.1, 0.9)
    assert bool(jnp.all(mixed.result == RESULTS.successful))
    assert int(mixed.nfe[0]) < int(mixed.nfe[1])
    assert int(mixed.nfe[0]) == int(run(0.1, 0.1).nfe[0])
    assert int(mixed.nfe[1]) == int(run(0.9, 0.9).nfe[1])
    for i, scale in enumerate((0.1, 0.9)):
        counted = CountedFn(affine_fn)
        args = (jnp.asarray(scale * a, jnp.float32), jnp.asarray(b, jnp.float32))
        alone = imex_deq.fixed_point(counted, solver, jnp.zeros(N), args, max_steps=3000)
        assert int(mixed.nfe[i]) == int(alone.nfe) == counted.read()


def test_adams_implicit_gradient_under_jit_and_vmap():
    """The implicit adjoint around an Adams solve: the gradient of a batch loss matches
    the Tsit5 solve's and central finite differences (float64)."""
    with enable_x64():
        cell = tiny_cell(jax.random.key(0), dtype=jnp.float64)
        xs = jax.random.normal(jax.random.key(1), (3, N), jnp.float64)
        exact_adjoint = imex_deq.ImplicitAdjoint(imex_deq.EarlyExitGMRES(rtol=1e-12, max_steps=N))

        def loss(cell, ode_solver):
            # A third-order method pays for very tight tolerances: 1e-8 here.
            solver = SteadyStateODE(rtol=1e-8, atol=1e-8, ode_solver=ode_solver)

            def one(x):
                sol = imex_deq.fixed_point(
                    cell, solver, jnp.zeros(N), x, max_steps=5000, adjoint=exact_adjoint
                )
                return jnp.sum(sol.value**2), sol.result

            values, results = jax.vmap(one)(xs)
            return jnp.mean(values), results

        grad = eqx.filter_jit(eqx.filter_grad(lambda c, s: loss(c, s)[0]))
        adams = grad(cell, AdamsBashforth3())
        tsit5 = grad(cell, dfx.Tsit5())
        _, results = eqx.filter_jit(loss)(cell, AdamsBashforth3())
        assert bool(jnp.all(results == RESULTS.successful))
        np.testing.assert_allclose(tree_flat(adams), tree_flat(tsit5), rtol=1e-5, atol=1e-7)
        fd = central_difference_grad(lambda c: loss(c, dfx.Tsit5())[0], cell, eps=1e-5)
        np.testing.assert_allclose(tree_flat(adams), tree_flat(fd), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ PseudoTransient


def test_pseudo_transient_converges_with_exact_nfe():
    for problem in AFFINE_PROBLEMS:
        counted = CountedFn(problem.fn)
        sol = imex_deq.fixed_point(
            counted,
            PseudoTransient(rtol=1e-5),
            problem.z0(jnp.float32),
            problem.args(jnp.float32),
            max_steps=200,
        )
        assert sol.result == RESULTS.successful
        assert float(sol.residual) <= 1e-5
        assert relative_error(sol.value, problem.exact(jnp.float32)) <= 1.5e-5 + 1e-6
        assert int(sol.nfe) == int(sol.num_steps) == counted.read()


def _slow_symmetric(n: int = N, seed: int = 4):
    """A = Q diag(0.3 .. 0.98) Qᵀ: plain iteration contracts the slow mode by 0.98 a step."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.linspace(0.3, 0.98, n)) @ q.T
    return a, rng.standard_normal(n)


def test_pseudo_transient_beats_plain_iteration_on_a_slow_problem():
    a, b = _slow_symmetric()
    args = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    exact = np.linalg.solve(np.eye(N) - a, b)
    steps = {}
    for solver in (PseudoTransient(rtol=1e-5), imex_deq.FixedPointIteration(rtol=1e-5)):
        sol = imex_deq.fixed_point(affine_fn, solver, jnp.zeros(N), args, max_steps=2000)
        assert sol.result == RESULTS.successful
        # ‖z − z*‖ ≤ ‖(I − A)⁻¹‖ ‖f(z) − z‖ = 50 · rtol · ‖f(z)‖.
        assert relative_error(sol.value, exact) <= 50 * 1e-5 * 1.01
        steps[type(solver).__name__] = int(sol.num_steps)
    assert steps["PseudoTransient"] < 0.6 * steps["FixedPointIteration"], steps


def test_pseudo_transient_through_optimistix():
    problem = next(p for p in AFFINE_PROBLEMS if p.name == "dict")
    counted = CountedFn(problem.fn)
    solver = PseudoTransient(rtol=1e-6)
    assert isinstance(solver, optx.AbstractFixedPointSolver)
    sol = optx.fixed_point(
        counted, solver, problem.z0(jnp.float32), problem.args(jnp.float32), max_steps=200
    )
    assert sol.result == RESULTS.successful
    assert relative_error(sol.value, problem.exact(jnp.float32)) <= 1e-5
    assert int(sol.stats["nfe"]) == counted.read() == int(sol.stats["num_steps"])


def test_pseudo_transient_returns_the_best_iterate_at_the_cap():
    a, b = _slow_symmetric()
    args = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    sol = imex_deq.fixed_point(
        affine_fn, PseudoTransient(rtol=1e-7, h_max=30.0), jnp.zeros(N), args, max_steps=40
    )
    assert sol.result == RESULTS.nonlinear_max_steps_reached
    assert 1 <= int(sol.stats["best_step"]) <= 40
    assert np.isfinite(float(sol.residual))


@pytest.mark.parametrize(
    "options",
    [
        {"h0": 0.0, "h_min": 0.0},
        {"h0": 5.0},
        {"h_min": 2.0},
        {"h_max": float("inf")},
        {"backoff": 1.0},
    ],
)
def test_pseudo_transient_validates_its_steps(options):
    with pytest.raises(ValueError, match="PseudoTransient"):
        PseudoTransient(**options)


def test_step_control_defaults_and_overrides():
    """Loose PI control for stability-limited Runge–Kutta tableaux, integral control at
    (rtol, rtol / 50) for Bosh3 and Adams; any option given overrides its default."""
    assert SteadyStateODE(rtol=1e-3).ode_control() == pytest.approx((5e-3, 5e-4, 0.4, 0.3))
    assert SteadyStateODE(rtol=1e-3, ode_solver=dfx.Heun()).ode_control() == pytest.approx(
        (5e-3, 5e-4, 0.4, 0.3)
    )
    for small_region in (dfx.Bosh3(), AdamsBashforth3()):
        control = SteadyStateODE(rtol=1e-3, ode_solver=small_region).ode_control()
        assert control == pytest.approx((1e-3, 2e-5, 0.0, 1.0))
    custom = SteadyStateODE(rtol=1e-3, ode_atol=1e-6, ode_pcoeff=0.0)
    assert custom.ode_control() == pytest.approx((5e-3, 1e-6, 0.0, 0.3))
    assert imex_deq.default_ode_control(dfx.Tsit5(), 1e-2) == pytest.approx((5e-2, 5e-3, 0.4, 0.3))
