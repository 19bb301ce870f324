"""Failure modes: misspelt and invalid options, non-convergence, non-finite values,
`throw=True`, and malformed states."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SOLVER_NAMES, N, affine_fn, affine_system, make_solver, tiny_cell

import imex_deq
from imex_deq import RESULTS


@pytest.fixture(scope="module")
def cell():
    return tiny_cell(jax.random.key(0))


@pytest.fixture(scope="module")
def hard_args():
    """‖A‖ = 0.95: far from converged after a few steps."""
    return tuple(jnp.asarray(v, jnp.float32) for v in affine_system(norm=0.95))


# ------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "construct",
    [
        lambda cell: imex_deq.Anderson(histroy=3),
        lambda cell: imex_deq.FixedPointIteration(dmap=0.5),
        lambda cell: imex_deq.Broyden(memroy=3),
        lambda cell: imex_deq.SteadyStateODE(ode_tol=1e-3),
        lambda cell: imex_deq.PhantomAdjoint(step=3),
        lambda cell: imex_deq.DEQ(cell, imex_deq.Anderson(), max_step=3),
        lambda cell: imex_deq.SkipRegDEQ(cell, imex_deq.Anderson(), adjiont=None),
    ],
    ids=["Anderson", "FixedPointIteration", "Broyden", "SteadyStateODE", "Phantom", "DEQ", "Skip"],
)
def test_misspelt_option_raises_type_error(construct, cell):
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        construct(cell)


def test_misspelt_fixed_point_option_raises_type_error():
    with pytest.raises(TypeError, match="max_step"):
        imex_deq.fixed_point(affine_fn, imex_deq.Anderson(), jnp.zeros(N), None, max_step=3)


@pytest.mark.parametrize(
    "construct, option",
    [
        (lambda: imex_deq.FixedPointIteration(damp=1.5), "damp"),
        (lambda: imex_deq.Anderson(damp=1.5), "damp"),
        (lambda: imex_deq.PhantomAdjoint(damp=1.5), "damp"),
        (lambda: imex_deq.Anderson(history=0), "history"),
        (lambda: imex_deq.Anderson(ridge=-1.0), "ridge"),
        (lambda: imex_deq.Broyden(memory=0), "memory"),
        (lambda: imex_deq.PhantomAdjoint(steps=0), "steps"),
        (lambda: imex_deq.Anderson(termination="foo"), "termination"),
        (lambda: imex_deq.SteadyStateODE(termination="foo"), "termination"),
        (lambda: imex_deq.NewtonKrylov(rtol=-1.0), "rtol"),
        (lambda: imex_deq.FixedPointIteration(atol=-1.0), "atol"),
        (lambda: imex_deq.NeuralODE(lambda z, x: z, t1=0.0), "t1"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_invalid_option_value_raises_value_error(construct, option):
    with pytest.raises(ValueError, match=rf"\b{option}\b") as error:
        construct()
    assert "foo" in str(error.value) or any(c.isdigit() for c in str(error.value))


def test_invalid_call_options(cell):
    with pytest.raises(ValueError, match="max_steps"):
        imex_deq.fixed_point(affine_fn, imex_deq.Anderson(), jnp.zeros(N), None, max_steps=0)
    with pytest.raises(ValueError, match="fixed_depth"):
        imex_deq.DEQ(cell, imex_deq.Anderson(), fixed_depth=0)
    with pytest.raises(TypeError, match="solver"):
        imex_deq.DEQ(cell, "anderson")
    with pytest.raises(TypeError, match="solver"):
        imex_deq.fixed_point(affine_fn, "anderson", jnp.zeros(N), None)
    with pytest.raises(TypeError, match="adjoint"):
        imex_deq.fixed_point(affine_fn, imex_deq.Anderson(), jnp.zeros(N), None, adjoint="implicit")
    with pytest.raises(TypeError, match="linear_solver"):
        imex_deq.ImplicitAdjoint(linear_solver=imex_deq.SteadyStateODE())


# ---------------------------------------------------------------- non-convergence


@pytest.mark.parametrize("name", ["FixedPointIteration", "Anderson", "SteadyStateODE"])
def test_max_steps_reached_per_sample_under_vmap(name, hard_args):
    a, b = hard_args
    # Sample 0 has A = 0: f(z) = b is reached after two evaluations (the discrete solvers
    # converge); sample 1 is the slow contraction.
    matrices = jnp.stack([jnp.zeros_like(a), a])
    bs = jnp.stack([b, b])
    solver = make_solver(name, rtol=1e-5)

    def solve(a, b):
        return imex_deq.fixed_point(affine_fn, solver, jnp.zeros(N), (a, b), max_steps=3)

    sol = jax.vmap(solve)(matrices, bs)  # does not raise
    assert bool((sol.result == RESULTS.nonlinear_max_steps_reached)[1])
    assert float(sol.residual[1]) > 1e-5
    if name == "SteadyStateODE":
        # Three ODE steps from t = 0 reach neither steady state.
        assert bool((sol.result == RESULTS.nonlinear_max_steps_reached)[0])
        assert bool(jnp.all(sol.num_steps == 3))
    else:
        assert bool((sol.result == RESULTS.successful)[0])
        assert int(sol.num_steps[0]) == 2
        assert int(sol.num_steps[1]) == 3
    assert bool(jnp.all(jnp.isfinite(sol.residual)))


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_nonfinite_input_and_parameters(name, cell):
    deq = imex_deq.DEQ(cell, make_solver(name, rtol=1e-4), max_steps=20)
    run = eqx.filter_jit(lambda deq, xs: jax.vmap(deq)(xs))
    xs = jnp.stack([jnp.ones(N), jnp.full(N, jnp.nan), jnp.ones(N).at[2].set(jnp.nan)])
    _, info = run(deq, xs)
    assert bool((info.result == RESULTS.successful)[0])
    assert bool((info.result == RESULTS.nonfinite)[1])
    assert bool((info.result == RESULTS.nonfinite)[2])

    bad = eqx.tree_at(lambda d: d.f.weight, deq, deq.f.weight.at[0, 1].set(jnp.nan))
    _, info = run(bad, xs[:1].repeat(3, axis=0))  # same shapes: no recompilation
    assert bool(jnp.all(info.result == RESULTS.nonfinite))


# ------------------------------------------------------------------------ throw


def test_throw_eager_raises_the_same_error_as_jit(hard_args):
    solver = imex_deq.Anderson(rtol=1e-5)
    quiet = imex_deq.fixed_point(affine_fn, solver, jnp.zeros(N), hard_args, max_steps=3)
    assert quiet.result == RESULTS.nonlinear_max_steps_reached
    with pytest.raises(eqx.EquinoxRuntimeError) as error:
        imex_deq.fixed_point(affine_fn, solver, jnp.zeros(N), hard_args, max_steps=3, throw=True)
    message = str(error.value)
    assert "Anderson(" in message
    assert "after 3 steps" in message and "max_steps=3" in message
    assert f"residual ~1e{int(np.floor(np.log10(float(quiet.residual))))} " in message
    assert isinstance(error.value, RuntimeError)


def test_throw_eager_success_returns_solution(hard_args):
    sol = imex_deq.fixed_point(
        affine_fn,
        imex_deq.Anderson(rtol=1e-5),
        jnp.zeros(N),
        hard_args,
        max_steps=200,
        throw=True,
    )
    assert sol.result == RESULTS.successful


def test_throw_inside_jit_raises_equinox_error(hard_args, cell):
    @eqx.filter_jit
    def solve(args):
        return imex_deq.fixed_point(
            affine_fn,
            imex_deq.Broyden(rtol=1e-5),
            jnp.zeros(N),
            args,
            max_steps=3,
            throw=True,
        ).value

    with pytest.raises(eqx.EquinoxRuntimeError) as error:
        jax.block_until_ready(solve(hard_args))
    message = str(error.value)
    assert "Broyden(" in message
    assert "max_steps=3" in message
    assert re.search(r"residual ~1e-?\d+", message)

    # A DEQ layer under vmap and jit, failing through non-finite input.
    deq = imex_deq.DEQ(cell, imex_deq.FixedPointIteration(), max_steps=10, throw=True)
    run = eqx.filter_jit(lambda deq, xs: jax.vmap(deq)(xs))
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"FixedPointIteration\(.*failed after 1 "):
        jax.block_until_ready(run(deq, jnp.full((2, N), jnp.nan)))
    zs, _ = run(deq, jnp.ones((2, N)))  # the same compiled function succeeds quietly
    assert bool(jnp.all(jnp.isfinite(zs)))


# ------------------------------------------------------------------ malformed state


def test_state_shape_mismatch_raises_at_trace_time():
    def grows(z, x):
        return jnp.concatenate([z, x[:1]])

    def trace(fn, z0):
        return jax.eval_shape(
            lambda x: imex_deq.fixed_point(fn, imex_deq.Anderson(), z0, x).value, jnp.ones(N)
        )

    with pytest.raises(ValueError, match=re.escape("float32[6]") + ".*" + re.escape("float32[7]")):
        trace(grows, jnp.zeros(N))
    with pytest.raises(ValueError, match=re.escape("float32[6]") + ".*" + re.escape("float16[6]")):
        trace(lambda z, x: (z + x).astype(jnp.float16), jnp.zeros(N))
    with pytest.raises(ValueError, match="structure"):
        trace(lambda z, x: z[0], (jnp.zeros(N), jnp.zeros(2)))


def test_deq_state_mismatch_and_integer_state():
    state = jax.ShapeDtypeStruct((N,), jnp.float32)
    deq = imex_deq.DEQ(lambda z, x: jnp.tanh(z[:4] + x), imex_deq.Anderson(), state_shape=state)
    with pytest.raises(ValueError, match=re.escape("float32[6]") + ".*" + re.escape("float32[4]")):
        jax.eval_shape(deq, jnp.ones(4))  # the state has size 6 but f returns size 4
    with pytest.raises(TypeError, match="floating point"):
        imex_deq.fixed_point(lambda z, x: z, imex_deq.Anderson(), jnp.zeros(N, jnp.int32))
    with pytest.raises(TypeError, match="int32"):
        jax.eval_shape(imex_deq.DEQ(lambda z, x: z, imex_deq.Anderson()), jnp.ones(N, jnp.int32))


def test_failed_solve_returns_last_iterate_and_residual(hard_args):
    """Two plain iterations from 0: z1 = b, value = f(z1) = A b + b, residual ‖A b‖/‖A b + b‖."""
    sol = imex_deq.fixed_point(
        affine_fn, imex_deq.FixedPointIteration(), jnp.zeros(N), hard_args, max_steps=2
    )
    a, b = (np.asarray(v, np.float64) for v in hard_args)
    assert sol.result == RESULTS.nonlinear_max_steps_reached
    assert int(sol.nfe) == int(sol.num_steps) == 2
    np.testing.assert_allclose(np.asarray(sol.value), a @ b + b, rtol=1e-5, atol=1e-6)
    expected = np.linalg.norm(a @ b) / np.linalg.norm(a @ b + b)
    np.testing.assert_allclose(float(sol.residual), expected, rtol=1e-5)


def test_nonfinite_input_in_neural_ode_and_fixed_depth(cell):
    """NaN input is `nonfinite` in the neural ODE and at fixed depth too, not a step cap."""
    xs = jnp.stack([jnp.ones(N), jnp.full(N, jnp.nan)])
    run = eqx.filter_jit(lambda layer, xs: jax.vmap(layer)(xs))
    _, info = run(imex_deq.NeuralODE(cell, max_steps=50), xs)
    assert bool((info.result == RESULTS.successful)[0])
    assert bool((info.result == RESULTS.nonfinite)[1])

    fixed = imex_deq.with_fixed_depth(imex_deq.DEQ(cell, imex_deq.Anderson()), 3)
    _, info = run(fixed, xs)
    assert bool((info.result == RESULTS.nonlinear_max_steps_reached)[0])  # 3 steps: not yet
    assert bool((info.result == RESULTS.nonfinite)[1])


def test_fixed_depth_throw_names_the_depth(cell):
    fixed = imex_deq.with_fixed_depth(imex_deq.DEQ(cell, imex_deq.Anderson(), throw=True), 2)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"FixedDepth\(.*after 2 steps"):
        fixed(jnp.ones(N))
