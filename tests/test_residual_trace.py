"""`residual_trace`: the per-step residuals of a discrete solver agree with what
`fixed_point` reports when it stops, on array and PyTree states; a map plain iteration
cannot solve shows up as a residual that never falls; bad arguments are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imex_deq


def contraction(z, x):
    return 0.5 * jnp.tanh(z) + x


@pytest.mark.parametrize(
    "solver",
    [imex_deq.FixedPointIteration(), imex_deq.Anderson(), imex_deq.Broyden()],
    ids=lambda s: type(s).__name__,
)
def test_trace_matches_fixed_point(solver):
    x = jnp.linspace(-1.0, 1.0, 5)
    z0 = jnp.zeros(5)
    sol = imex_deq.fixed_point(contraction, solver, z0, x, max_steps=50)
    residuals, nfe = imex_deq.residual_trace(contraction, solver, z0, x, steps=40)
    assert residuals.shape == nfe.shape == (40,)
    last = int(sol.num_steps) - 1
    assert int(nfe[last]) == int(sol.nfe)
    np.testing.assert_allclose(residuals[last], sol.residual, rtol=1e-3, atol=1e-12)
    assert bool(residuals[last] <= solver.rtol) and bool(residuals[last - 1] > solver.rtol)


def test_trace_on_a_pytree_state_under_jit():
    def fn(z, x):
        a, b = z
        return 0.5 * jnp.tanh(b) + x, 0.25 * a

    z0 = (jnp.zeros(3), jnp.zeros(3))
    x = jnp.ones(3)
    solver = imex_deq.Anderson(rtol=1e-5)
    trace = jax.jit(lambda x: imex_deq.residual_trace(fn, solver, z0, x, steps=30))
    residuals, nfe = trace(x)
    sol = imex_deq.fixed_point(fn, solver, z0, x, max_steps=30)
    last = int(sol.num_steps) - 1
    np.testing.assert_allclose(residuals[last], sol.residual, rtol=1e-3, atol=1e-12)
    np.testing.assert_array_equal(nfe, np.arange(1, 31))


def test_oscillating_map_never_converges_under_plain_iteration():
    residuals, _ = imex_deq.residual_trace(
        lambda z, x: -2.0 * z + x,
        imex_deq.FixedPointIteration(),
        jnp.zeros(2),
        jnp.ones(2),
        steps=20,
    )
    assert bool(jnp.all(residuals[1:] > 0.5))


def test_bad_arguments_are_refused():
    z0 = jnp.zeros(2)
    with pytest.raises(TypeError, match="discrete solver"):
        imex_deq.residual_trace(contraction, imex_deq.SteadyStateODE(), z0, z0, steps=5)
    with pytest.raises(ValueError, match="steps"):
        imex_deq.residual_trace(contraction, imex_deq.Anderson(), z0, z0, steps=0)
    with pytest.raises(ValueError, match="same structure"):
        imex_deq.residual_trace(lambda z, x: z[:1], imex_deq.Anderson(), z0, z0, steps=5)
