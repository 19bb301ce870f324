"""Forward solves: every solver finds the fixed point of the affine contraction, reports
success, a residual within tolerance and an honest function-evaluation count; batches
converge per sample; Broyden's memory does not grow with `max_steps`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
from helpers import (
    AFFINE_PROBLEMS,
    SOLVER_NAMES,
    CountedFn,
    N,
    affine_fn,
    affine_system,
    enable_x64,
    make_solver,
    relative_error,
)

import imex_deq
from imex_deq import RESULTS

# Termination tolerance per dtype: well above rounding, well below the default.
RTOL = {"float32": 1e-5, "float64": 1e-10}
MAX_STEPS = {"SteadyStateODE": 2000}


# Every layout in float32; in float64 the array and the dict (a 1-D and a 2-D leaf).
CASES = [("float32", p) for p in AFFINE_PROBLEMS] + [
    ("float64", p) for p in AFFINE_PROBLEMS if p.name != "tuple"
]


@pytest.mark.parametrize("dtype_name, problem", CASES, ids=[f"{d}-{p.name}" for d, p in CASES])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_affine_fixed_point(name, dtype_name, problem):
    if dtype_name == "float64":
        with enable_x64():
            _check_affine_fixed_point(name, problem, jnp.float64)
    else:
        _check_affine_fixed_point(name, problem, jnp.float32)


def _check_affine_fixed_point(name, problem, dtype):
    rtol = RTOL[jnp.dtype(dtype).name]
    solver = make_solver(name, rtol=rtol, atol=rtol)
    counted = CountedFn(problem.fn)
    z0 = problem.z0(dtype)
    sol = imex_deq.fixed_point(
        counted, solver, z0, problem.args(dtype), max_steps=MAX_STEPS.get(name, 200)
    )
    true_nfe = counted.read()

    assert sol.result == RESULTS.successful
    # The state keeps its layout and dtype; the residual is at least float32.
    assert jax.tree_util.tree_structure(sol.value) == jax.tree_util.tree_structure(z0)
    assert all(leaf.dtype == dtype for leaf in jax.tree_util.tree_leaves(sol.value))
    assert sol.residual.dtype == dtype
    assert 0 <= float(sol.residual) <= rtol
    # With ‖A‖ = 0.6, ‖f(z) − z*‖ ≤ 0.6/0.4 · ‖f(z) − z‖ ≤ 1.5 · rtol · ‖f(z)‖.
    eps = float(jnp.finfo(dtype).eps)
    assert relative_error(sol.value, problem.exact(dtype)) <= 1.5 * rtol + 100 * eps

    assert int(sol.num_steps) >= 1
    if name == "NewtonKrylov":
        # The count assumes every GMRES restart cycle runs all `restart` Arnoldi products;
        # lineax's GMRES may break down (stop a cycle) early, so it is an upper bound.
        assert true_nfe >= 2 * int(sol.num_steps)  # a linearisation and >= 1 JVP per step
        assert int(sol.nfe) >= true_nfe
    else:
        assert int(sol.nfe) == true_nfe
    if name in ("FixedPointIteration", "Anderson", "Broyden"):
        assert int(sol.nfe) == int(sol.num_steps)  # one evaluation per step


@pytest.fixture(scope="module")
def vmapped_solve():
    @eqx.filter_jit
    def solve(solver, a, b):
        def one(a, b):
            return imex_deq.fixed_point(affine_fn, solver, jnp.zeros(N), (a, b), max_steps=500)

        return jax.vmap(one)(a, b)

    return solve


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_per_sample_convergence_under_vmap(name, vmapped_solve):
    a, b = affine_system(norm=1.0, seed=1)
    easy, hard = 0.1 * a, 0.9 * a
    # GMRES restarted every 2 products (below the state size 6) so that its count of
    # restart cycles, and hence NewtonKrylov's NFE, reflects the difficulty.
    gmres = lx.GMRES(rtol=1e-2, atol=1e-4, restart=2, max_steps=20)
    solver = make_solver(name, rtol=1e-5, atol=1e-5, gmres=gmres)
    bs = jnp.asarray(np.stack([b, b]), jnp.float32)

    def run(*matrices):
        return vmapped_solve(solver, jnp.asarray(np.stack(matrices), jnp.float32), bs)

    mixed = run(easy, hard)
    assert mixed.nfe.shape == (2,)
    assert bool(jnp.all(mixed.result == RESULTS.successful))
    assert bool(jnp.all(mixed.residual <= 1e-5))
    for i, matrix in enumerate((easy, hard)):
        exact = np.linalg.solve(np.eye(N) - matrix, b)
        assert relative_error(mixed.value[i], exact) <= 1e-4
    # The easy sample stops early; the hard one keeps going.
    assert int(mixed.nfe[0]) < int(mixed.nfe[1])
    assert int(mixed.num_steps[0]) <= int(mixed.num_steps[1])
    # Each sample reports what it would report in a batch of its own kind.
    assert int(mixed.nfe[0]) == int(run(easy, easy).nfe[0])
    assert int(mixed.nfe[1]) == int(run(hard, hard).nfe[1])


def _shapes_in(jaxpr, found: set) -> set:
    """Every intermediate shape of a jaxpr, sub-jaxprs (loops, conds, calls) included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            found.add(tuple(getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _shapes_in(inner, found)
    return found


@pytest.mark.parametrize("name, option", [("Broyden", "memory"), ("Anderson", "history")])
def test_solver_memory_independent_of_max_steps(name, option):
    solver = make_solver(name, **{option: 3})
    args = tuple(jnp.asarray(x, jnp.float32) for x in affine_system())

    def shapes(max_steps):
        def solve(args):
            return imex_deq.fixed_point(
                affine_fn, solver, jnp.zeros(N), args, max_steps=max_steps
            ).value

        return _shapes_in(jax.make_jaxpr(solve)(args).jaxpr, set())

    few, many = shapes(10), shapes(100_000)
    assert (3, N) in few  # the ring buffer is there ...
    assert few == many  # ... and nothing is sized by max_steps
    assert max(max(s, default=0) for s in many) < 100
    # The state the solver carries between steps is the bounded buffer.
    y = jax.ShapeDtypeStruct((N,), jnp.float32)
    state = jax.eval_shape(lambda y: solver.init(affine_fn, y, args, {}, y, None, frozenset()), y)
    buffer_shapes = {leaf.shape for leaf in jax.tree_util.tree_leaves(state) if leaf.ndim == 2}
    # Anderson also keeps its history x history Gram matrix.
    assert buffer_shapes - {(3, 3)} == {(3, N)}


def test_broyden_converges_past_its_memory():
    """Many more steps than `memory`: the ring buffer wraps and the solve still converges."""
    args = tuple(jnp.asarray(x, jnp.float32) for x in affine_system(norm=0.95, seed=2))
    counted = CountedFn(affine_fn)
    sol = imex_deq.fixed_point(
        counted, imex_deq.Broyden(rtol=1e-5, memory=2), jnp.zeros(N), args, max_steps=200
    )
    assert sol.result == RESULTS.successful
    assert int(sol.num_steps) > 2
    assert int(sol.nfe) == counted.read()
    a, b = affine_system(norm=0.95, seed=2)
    assert relative_error(sol.value, np.linalg.solve(np.eye(N) - a, b)) <= 1e-3


# ------------------------------------------------------------ as optimistix solvers


@pytest.mark.parametrize("name", ["FixedPointIteration", "Anderson", "Broyden", "NewtonKrylov"])
def test_optimistix_fixed_point_on_a_pytree(name):
    """`optx.fixed_point` runs the solver itself, on a dict state; the NFE it reports in
    `stats` is what a counting callback sees."""
    problem = next(p for p in AFFINE_PROBLEMS if p.name == "dict")
    counted = CountedFn(problem.fn)
    solver = make_solver(name, rtol=1e-6)
    if name in ("FixedPointIteration", "Anderson", "Broyden"):
        assert isinstance(solver, optx.AbstractFixedPointSolver)
    sol = optx.fixed_point(
        counted, solver, problem.z0(jnp.float32), problem.args(jnp.float32), max_steps=200
    )
    assert sol.result == RESULTS.successful
    assert relative_error(sol.value, problem.exact(jnp.float32)) <= 1e-5
    assert set(sol.stats) >= {"num_steps", "nfe", "residual", "best_step"}
    assert float(sol.stats["residual"]) <= 1e-6
    if name == "NewtonKrylov":
        assert int(sol.stats["nfe"]) >= counted.read()  # GMRES may break down early
    else:
        assert int(sol.stats["nfe"]) == counted.read() == int(sol.stats["num_steps"])


@pytest.mark.parametrize("name", ["Broyden", "NewtonKrylov"])
def test_optimistix_root_find(name):
    """y + 0.1 y³ = c, a root problem that is not written as a fixed point."""
    c = jnp.array([1.0, -2.0, 3.0, 0.5])

    def g(y, c):
        return c - y - 0.1 * y**3

    solver = make_solver(name, atol=1e-6, termination="abs")
    assert isinstance(solver, optx.AbstractRootFinder)
    counted = CountedFn(g)
    sol = optx.root_find(counted, solver, jnp.zeros(4), c, max_steps=100)
    assert sol.result == RESULTS.successful
    assert float(jnp.max(jnp.abs(g(sol.value, c)))) <= 1e-5
    assert float(sol.stats["residual"]) <= 1e-6
    assert int(sol.stats["nfe"]) >= counted.read() >= int(sol.stats["num_steps"])
    if name == "Broyden":
        assert int(sol.stats["nfe"]) == counted.read()


# ----------------------------------------------- best iterate and Anderson's safeguard


def _hard_map(scale: float, n: int = 8, seed: int = 0):
    """f(z) = tanh(W z + b) with W = −scale · (symmetric, eigenvalues 0.2 .. 1): plain
    iteration oscillates, and for large `scale` Anderson and Broyden struggle too."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = -scale * q @ np.diag(np.linspace(0.2, 1.0, n)) @ q.T
    b = 0.3 * rng.standard_normal(n)
    return (jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32))


def _tanh_map(z, args):
    w, b = args
    return jnp.tanh(w @ z + b)


def _step_by_step(solver, args, steps):
    """The iterates a solver evaluates in `steps` steps from 0, and its state after each,
    by calling its optimistix `step` one at a time (as `fixed_point` does: root finders
    see f(z) − z, and f(z) is the auxiliary output)."""
    if isinstance(solver, optx.AbstractRootFinder):
        fn = lambda y, a: (_tanh_map(y, a) - y, _tanh_map(y, a))
    else:
        fn = lambda y, a: (_tanh_map(y, a), _tanh_map(y, a))
    y = jnp.zeros(8)
    struct = jax.eval_shape(lambda: y)
    state = solver.init(fn, y, args, {}, struct, struct, frozenset())
    step = jax.jit(lambda y, state: solver.step(fn, y, args, {}, state, frozenset())[:2])
    iterates, states = [], []
    for _ in range(steps):
        iterates.append(y)
        y, state = step(y, state)
        states.append(state)
    return iterates, states


@pytest.mark.parametrize("name, scale", [("Anderson", 20.0), ("Broyden", 4.0)])
def test_step_cap_returns_the_lowest_residual_iterate(name, scale):
    args = _hard_map(scale)
    solver = make_solver(name, rtol=1e-5)
    sol = imex_deq.fixed_point(_tanh_map, solver, jnp.zeros(8), args, max_steps=40)
    iterates, _ = _step_by_step(solver, args, 40)
    residuals = [float(imex_deq.residual_norm(_tanh_map(y, args), y, "rel")) for y in iterates]
    best = int(np.argmin(residuals))
    assert sol.result == RESULTS.nonlinear_max_steps_reached
    assert int(sol.num_steps) == int(sol.nfe) == 40
    assert residuals[-1] > 2 * residuals[best]  # the last iterate is not the best one
    assert int(sol.stats["best_step"]) == best + 1
    np.testing.assert_allclose(sol.value, _tanh_map(iterates[best], args), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(sol.residual), residuals[best], rtol=1e-4)


def test_anderson_restarts_from_the_best_iterate():
    args = _hard_map(20.0)
    options = {"atol": 1e-5, "termination": "abs"}
    solver = imex_deq.Anderson(**options, restart_ratio=10.0)
    sol = imex_deq.fixed_point(_tanh_map, solver, jnp.zeros(8), args, max_steps=60)
    plain = imex_deq.fixed_point(
        _tanh_map,
        imex_deq.Anderson(**options, restart_ratio=float("inf")),
        jnp.zeros(8),
        args,
        max_steps=60,
    )
    assert int(plain.stats["restarts"]) == 0
    assert int(sol.stats["restarts"]) >= 1
    # On this problem the safeguard pays: a residual an order of magnitude lower.
    assert float(sol.residual) < 0.1 * float(plain.residual)

    iterates, states = _step_by_step(solver, args, 60)
    residuals = [float(imex_deq.residual_norm(_tanh_map(y, args), y, "abs")) for y in iterates]
    restarts = [int(s.restarts) for s in states]
    assert restarts[-1] == int(sol.stats["restarts"])
    for k in range(1, 59):
        if restarts[k] > restarts[k - 1]:  # step k + 1 restarted
            best = int(np.argmin(residuals[: k + 1]))
            assert residuals[k] > 10.0 * residuals[best]
            # The next iterate is a plain fixed-point step from the best one.
            np.testing.assert_allclose(
                iterates[k + 1], _tanh_map(iterates[best], args), rtol=1e-6, atol=1e-6
            )


@pytest.mark.parametrize("name", ["Anderson", "Broyden"])
def test_converged_solves_return_their_last_iterate(name):
    """On the shared problems nothing changes: no restart, the last iterate is the best."""
    for problem in AFFINE_PROBLEMS:
        sol = imex_deq.fixed_point(
            problem.fn,
            make_solver(name, rtol=1e-5),
            problem.z0(jnp.float32),
            problem.args(jnp.float32),
            max_steps=200,
        )
        assert sol.result == RESULTS.successful
        assert int(sol.stats["best_step"]) == int(sol.num_steps)
        assert int(sol.stats.get("restarts", 0)) == 0


def test_newton_krylov_nfe_is_exact_without_breakdown():
    """With GMRES restarted below the state size, no Krylov space breaks down early and
    NewtonKrylov's count (a linearisation, then lineax GMRES's products) is exact."""
    problem = AFFINE_PROBLEMS[0]
    counted = CountedFn(problem.fn)
    gmres = lx.GMRES(rtol=1e-3, atol=1e-6, restart=2, max_steps=10)
    sol = imex_deq.fixed_point(
        counted,
        imex_deq.NewtonKrylov(rtol=1e-5, linear_solver=gmres),
        problem.z0(jnp.float32),
        problem.args(jnp.float32),
        max_steps=50,
    )
    assert sol.result == RESULTS.successful
    assert int(sol.nfe) == counted.read()


def _reference_broyden(f, z0, memory, steps):
    """Limited-memory good Broyden written out in NumPy, one Python step at a time, with
    the same ring buffer, safeguard and best-iterate rule as `Broyden`: `(best z, its
    step, us, vs)` after `steps` evaluations."""
    n = z0.size
    us, vs = np.zeros((memory, n)), np.zeros((memory, n))
    z, previous_z, previous_g = z0.copy(), z0.copy(), np.zeros(n)
    best, best_residual, best_step = z0, np.inf, 0
    for count in range(steps):
        g = f(z) - z
        residual = np.linalg.norm(g) / np.linalg.norm(z + g)
        if residual < best_residual or count == 0:
            best, best_residual, best_step = z, residual, count + 1
        dz, dg = z - previous_z, g - previous_g
        step = -g + us.T @ (vs @ g)
        dz_b = -dz + (us @ dz) @ vs
        denominator = dz_b @ dg
        slot = max(count - 1, 0) % memory
        old_u, old_v = us[slot].copy(), vs[slot].copy()
        if count > 0 and abs(denominator) > np.finfo(np.float64).eps:
            us[slot], vs[slot] = -step, dz_b / denominator
        u, v = us[slot], vs[slot]
        previous_z, previous_g = z, g
        z = z - (step + u * (v @ g) - old_u * (old_v @ g))
    return best, best_step, us, vs


@pytest.mark.parametrize("memory", [3, 25])
def test_broyden_matches_reference_iterates(memory):
    """float64, a vmapped batch whose samples stop at different steps: the DEQ solve
    (`differentiable=False`, the buffered loop with blocks of rows skipped until written),
    the optimistix loop (`differentiable=True`) and a plain NumPy Broyden give the same
    iterate after the same number of steps, and the same `us`, `vs`."""
    with enable_x64():
        rng = np.random.default_rng(3)
        n, batch = 12, 3
        w = rng.normal(size=(n, n)) * (0.9 / np.sqrt(n))
        bs = rng.normal(size=(batch, n))
        scales = np.array([0.2, 0.6, 1.0])  # different contraction: different step counts
        max_steps = 40

        def solve(b, scale, differentiable):
            fn = lambda z, a: jnp.tanh(a[1] * (jnp.asarray(w) @ z) + a[0])
            solver = imex_deq.Broyden(rtol=1e-9, memory=memory)
            sol = solver.solve(
                fn, jnp.zeros(n), (b, scale), max_steps=max_steps, differentiable=differentiable
            )
            return sol.value, sol.num_steps, sol.stats["best_step"]

        for differentiable in (False, True):
            values, steps, best_steps = jax.jit(
                jax.vmap(lambda b, s, d=differentiable: solve(b, s, d))
            )(jnp.asarray(bs), jnp.asarray(scales))
            assert len(set(np.asarray(steps).tolist())) > 1  # samples stopped apart
            for i in range(batch):
                f = lambda z, i=i: np.tanh(scales[i] * (w @ z) + bs[i])
                best, best_step, _, _ = _reference_broyden(f, np.zeros(n), memory, int(steps[i]))
                assert int(best_steps[i]) == best_step
                # The solve returns f at the kept iterate.
                np.testing.assert_allclose(values[i], f(best), rtol=1e-10, atol=1e-12)

        # The state after a fixed number of steps, through optimistix's interface.
        f = lambda z, i=0: np.tanh(scales[0] * (w @ z) + bs[0])
        fn = lambda z, a: jnp.tanh(scales[0] * (jnp.asarray(w) @ z) + a) - z
        solver = imex_deq.Broyden(rtol=1e-30, atol=0.0, termination="abs", memory=memory)
        sol = optx.root_find(fn, solver, jnp.zeros(n), jnp.asarray(bs[0]), max_steps=7, throw=False)
        _, _, us, vs = _reference_broyden(f, np.zeros(n), memory, 7)
        np.testing.assert_allclose(sol.state.us, us, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(sol.state.vs, vs, rtol=1e-6, atol=1e-9)
