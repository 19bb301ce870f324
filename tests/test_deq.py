"""DEQ layers: continuous vs discrete, initial guesses of Skip and Skip Reg. DEQs, the
regularisers, fixed-depth mode, a jitted training step, and the neural ODE baseline."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    CountedFn,
    N,
    relative_error,
    tiny_cell,
    tiny_predictor,
    tree_allclose,
    tree_flat,
)

import imex_deq
from imex_deq import RESULTS

BATCH = 3


@pytest.fixture(scope="module")
def cell():
    return tiny_cell(jax.random.key(0))


@pytest.fixture(scope="module")
def predictor():
    return tiny_predictor(jax.random.key(1))


@pytest.fixture(scope="module")
def xs():
    return jax.random.normal(jax.random.key(2), (BATCH, N), jnp.float32)


def _nonzero(tree) -> bool:
    flat = tree_flat(tree)
    return flat.size > 0 and bool(np.all(np.isfinite(flat))) and float(np.abs(flat).max()) > 0


@eqx.filter_jit
def batch_grad(model, xs):
    """Gradient of a task loss (mean ‖z*‖² plus a linear term) over a batch, and the infos."""

    def loss(model):
        zs, info = jax.vmap(model)(xs)
        return jnp.mean(jnp.sum(zs**2 + zs, axis=-1)), info

    return eqx.filter_grad(loss, has_aux=True)(model)


def test_continuous_and_discrete_deq_agree(cell, xs):
    tol = {"rtol": 1e-5, "atol": 1e-6}
    discrete = imex_deq.DEQ(cell, imex_deq.Anderson(**tol, history=3), max_steps=100)
    continuous = imex_deq.DEQ(cell, imex_deq.SteadyStateODE(**tol), max_steps=200)
    grad_d, info_d = batch_grad(discrete, xs)
    grad_c, info_c = batch_grad(continuous, xs)
    for info in (info_d, info_c):
        assert bool(jnp.all(info.result == RESULTS.successful))
        assert bool(jnp.all(info.residual <= 1e-5))
    # Continuous DEQs spend far more evaluations on the same equilibrium.
    assert bool(jnp.all(info_c.nfe > info_d.nfe))
    # ‖z − z*‖ ≤ ‖f(z) − z‖ / (1 − 0.5) ≤ 2 · rtol · ‖f(z)‖ for each.
    for i in range(BATCH):
        assert relative_error(info_c.z_star[i], info_d.z_star[i]) < 1e-4
    # The default implicit adjoint solves its linear system to rtol 1e-4.
    assert relative_error(grad_c.f, grad_d.f) < 1e-3
    assert _nonzero(grad_d.f)


def test_skip_reg_deq(cell, xs):
    deq = imex_deq.SkipRegDEQ(cell, imex_deq.FixedPointIteration(rtol=1e-5), max_steps=100)

    @eqx.filter_jit
    def skip_grad(model):
        def loss(model):
            _, info = jax.vmap(model)(xs)
            return imex_deq.skip_loss(info), info

        return eqx.filter_grad(loss, has_aux=True)(model)

    grad, info = skip_grad(deq)
    expected = jax.vmap(lambda x: cell(jnp.zeros(N), x))(xs)
    assert tree_allclose(info.z0, expected, rtol=1e-6, atol=1e-7)
    assert bool(jnp.all(info.result == RESULTS.successful))
    assert not tree_allclose(info.z0, info.z_star)  # the guess is not already the answer
    # The skip loss trains f through z0 = f(0, x) (and through z*).
    assert _nonzero(grad.f.inject)
    assert _nonzero(grad.f.bias)


def test_skip_deq(cell, predictor, xs):
    deq = imex_deq.SkipDEQ(cell, predictor, imex_deq.FixedPointIteration(rtol=1e-5), max_steps=100)

    @eqx.filter_jit
    def skip_grad(model):
        def loss(model):
            _, info = jax.vmap(model)(xs)
            return imex_deq.skip_loss(info, weight=1.0), info

        return eqx.filter_grad(loss, has_aux=True)(model)

    grad, info = skip_grad(deq)
    assert tree_allclose(info.z0, jax.vmap(predictor)(xs), rtol=1e-6, atol=1e-7)
    assert bool(jnp.all(info.result == RESULTS.successful))
    assert _nonzero(grad.predictor.weight)
    assert _nonzero(grad.predictor.bias)
    # skip_loss = weight · mean |z* − z0| exactly.
    expected = jnp.mean(jnp.abs(info.z_star - info.z0))
    assert np.isclose(float(imex_deq.skip_loss(info, weight=1.0)), float(expected), rtol=1e-6)
    assert np.isclose(
        float(imex_deq.skip_loss(info, weight=0.01)), 0.01 * float(expected), rtol=1e-6
    )


class _Linear(eqx.Module):
    weight: jax.Array

    def __call__(self, z, x):
        return self.weight @ z + x


def test_jacobian_regularisation_expectation_on_linear_f():
    weight = jax.random.normal(jax.random.key(3), (N, N), jnp.float32)
    f = _Linear(weight)
    z = jnp.ones(N)
    x = jnp.zeros(N)
    keys = jax.random.split(jax.random.key(4), 20_000)
    estimates = jax.jit(jax.vmap(lambda key: imex_deq.jacobian_regularisation(f, z, x, key=key)))(
        keys
    )
    exact = float(jnp.sum(weight**2)) / N  # ‖J‖_F² / d with J = W
    # Relative standard error of the mean is about sqrt(2/d)/sqrt(20000) < 1%.
    assert abs(float(jnp.mean(estimates)) - exact) < 0.05 * exact
    assert float(jnp.std(estimates)) > 0  # a genuine random estimate, not a constant


def test_jacobian_regularisation_gradient(cell, xs):
    deq = imex_deq.DEQ(cell, imex_deq.FixedPointIteration(rtol=1e-5), max_steps=100)

    @eqx.filter_jit
    def grad_of_penalty(model):
        def penalty(model):
            _, info = jax.vmap(model)(xs)
            keys = jax.random.split(jax.random.key(5), BATCH)
            values = jax.vmap(lambda x, i, k: model.jacobian_regularisation(x, i, key=k))(
                xs, info, keys
            )
            return jnp.mean(values)

        return eqx.filter_value_and_grad(penalty)(model)

    value, grad = grad_of_penalty(deq)
    assert float(value) > 0
    assert _nonzero(grad.f.weight)  # ∂f/∂z = diag(tanh') W depends on W, U and c
    assert _nonzero(grad.f.inject)


def _symmetric_with_radius(radius, key):
    """A symmetric N×N matrix with eigenvalues radius, ±radius/2 and below (one dominant)."""
    q, _ = jnp.linalg.qr(jax.random.normal(key, (N, N), jnp.float32))
    eigenvalues = jnp.concatenate(
        [jnp.array([radius, -radius / 2]), jnp.linspace(-radius / 3, radius / 3, N - 2)]
    )
    return (q * eigenvalues[None, :]) @ q.T


def test_spectral_regularisation_is_the_squared_spectral_radius_on_linear_f():
    weight = _symmetric_with_radius(0.9, jax.random.key(8))
    f, z, x = _Linear(weight), jnp.ones(N), jnp.zeros(N)
    value = imex_deq.spectral_regularisation(f, z, x, key=jax.random.key(9), power_steps=40)
    np.testing.assert_allclose(value, 0.81, rtol=1e-4)
    # The Frobenius term averages all N directions, so it reads the slow mode at a fraction.
    assert float(jnp.sum(weight**2)) / N < float(value) / 3
    # With no power step, v is the unit residual f(z) − z.
    residual = weight @ z - z
    unit_residual = residual / jnp.linalg.norm(residual)
    np.testing.assert_allclose(
        imex_deq.spectral_regularisation(f, z, x, key=jax.random.key(9), power_steps=0),
        jnp.sum(jnp.square(weight @ unit_residual)),
        rtol=1e-5,
    )
    # At an exact fixed point (z = 0 for x = 0) the iterations start from a random direction.
    zero = jnp.zeros(N)
    at_fixed_point = imex_deq.spectral_regularisation(
        f, zero, x, key=jax.random.key(9), power_steps=40
    )
    np.testing.assert_allclose(at_fixed_point, 0.81, rtol=1e-4)
    with pytest.raises(ValueError, match="power_steps must be non-negative"):
        imex_deq.spectral_regularisation(f, z, x, key=jax.random.key(9), power_steps=-1)


def test_spectral_regularisation_gradient_matches_finite_differences():
    """At a converged eigenvector the power iterations' own dependence on W is stationary,
    so the gradient through the last product alone equals the whole function's."""
    weight = _symmetric_with_radius(0.8, jax.random.key(10))
    z, x = jnp.ones(N), jnp.zeros(N)

    def penalty(w):
        return imex_deq.spectral_regularisation(
            _Linear(w), z, x, key=jax.random.key(11), power_steps=60
        )

    grad = jax.jit(jax.grad(penalty))(weight)
    direction = _symmetric_with_radius(1.0, jax.random.key(12))
    eps = 1e-3
    fd = (penalty(weight + eps * direction) - penalty(weight - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(jnp.sum(grad * direction), fd, rtol=2e-2)


def test_layer_jacobian_regularisation_takes_the_norm(cell, xs):
    deq = imex_deq.DEQ(cell, imex_deq.FixedPointIteration(rtol=1e-5), max_steps=100)
    _, info = deq(xs[0])
    key = jax.random.key(13)
    spectral = deq.jacobian_regularisation(xs[0], info, key=key, norm="spectral")
    expected = imex_deq.spectral_regularisation(deq.f, info.z_star, xs[0], key=key)
    np.testing.assert_allclose(spectral, expected, rtol=1e-6)
    grad = jax.grad(lambda f: imex_deq.spectral_regularisation(f, info.z_star, xs[0], key=key))(
        cell
    )
    assert _nonzero(grad.weight)
    with pytest.raises(ValueError, match="norm must be one of"):
        deq.jacobian_regularisation(xs[0], info, key=key, norm="nuclear")


def test_fixed_depth_mode(cell, predictor, xs):
    solver = imex_deq.Anderson(rtol=1e-5)
    model = (imex_deq.SkipDEQ(cell, predictor, solver), {"other": jnp.ones(2)})
    fixed = imex_deq.with_fixed_depth(model, 3)
    assert fixed[0].fixed_depth == 3
    assert imex_deq.with_fixed_depth(fixed, None)[0].fixed_depth is None
    with pytest.raises(ValueError, match="no DEQ layer"):
        imex_deq.with_fixed_depth({"other": jnp.ones(2)}, 3)

    @eqx.filter_jit
    def run(deq, xs):
        def loss(counter):
            zs, info = jax.vmap(lambda x: deq(x, backward_counter=counter))(xs)
            return jnp.sum(zs), info

        return jax.grad(loss, has_aux=True)(jnp.zeros(()))

    backward_nfe, info = run(fixed[0], xs)
    assert bool(jnp.all(info.nfe == 3))
    assert bool(jnp.all(info.steps == 3))
    # Summed over the batch: 3 VJPs per sample.
    assert float(backward_nfe) == 3 * BATCH

    def three_times(x):
        z = predictor(x)
        for _ in range(3):
            z = cell(z, x)
        return z

    assert tree_allclose(info.z_star, jax.vmap(three_times)(xs), rtol=1e-6, atol=1e-6)


def test_jitted_training_step(cell, predictor, xs):
    solver = imex_deq.Anderson(rtol=1e-4, history=2)
    model = imex_deq.SkipDEQ(cell, predictor, solver, max_steps=50)
    targets = jnp.full((BATCH, N), 0.3, jnp.float32)
    optimiser = optax.adam(1e-2)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, xs, targets):
        def loss(model):
            zs, info = jax.vmap(model)(xs)
            return jnp.mean((zs - targets) ** 2) + imex_deq.skip_loss(info), info

        (value, info), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        # optax.adam's bias correction mixes int32 step counts with floats, which strict
        # promotion rejects (optax's matter; imex_deq's Trainer does the same).
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimiser.update(
                grads, opt_state, eqx.filter(model, eqx.is_inexact_array)
            )
        return eqx.apply_updates(model, updates), opt_state, value, info

    new_model, opt_state, value, info = step(model, opt_state, xs, targets)
    assert np.isfinite(float(value))
    assert bool(jnp.all(info.result == RESULTS.successful))
    for old, new in [(model.f, new_model.f), (model.predictor, new_model.predictor)]:
        for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)):
            assert not np.allclose(np.asarray(a), np.asarray(b))
            assert bool(jnp.all(jnp.isfinite(b)))
    # A second step reuses the compiled function and lowers the loss.
    _, _, value2, _ = step(new_model, opt_state, xs, targets)
    assert float(value2) < float(value)


@pytest.mark.parametrize(
    "adjoint",
    [imex_deq.ImplicitAdjoint(), imex_deq.UnrolledAdjoint(), imex_deq.PhantomAdjoint(steps=2)],
    ids=["implicit", "unrolled", "phantom"],
)
def test_backward_counter_sums_over_batch(adjoint, cell, xs):
    deq = imex_deq.DEQ(cell, imex_deq.FixedPointIteration(rtol=1e-4), adjoint=adjoint)

    @eqx.filter_jit
    def run(deq, xs):
        def loss(counter):
            zs, info = jax.vmap(lambda x: deq(x, backward_counter=counter))(xs)
            return jnp.sum(zs), info

        return jax.grad(loss, has_aux=True)(jnp.zeros(()))

    backward_nfe, info = run(deq, xs)
    assert bool(jnp.all(info.result == RESULTS.successful))
    if isinstance(adjoint, imex_deq.UnrolledAdjoint):
        assert float(backward_nfe) == int(jnp.sum(info.nfe))
    elif isinstance(adjoint, imex_deq.PhantomAdjoint):
        assert float(backward_nfe) == 2 * BATCH
    else:  # one VJP plus at least one GMRES product per sample
        assert float(backward_nfe) >= 2 * BATCH


def test_neural_ode(cell, xs):
    counted = CountedFn(cell)
    node = imex_deq.NeuralODE(counted)
    x = xs[0]
    z1, info = node(x)
    assert int(info.nfe) > 0
    assert int(info.nfe) == counted.read()  # every evaluation counted, no more
    assert info.result == RESULTS.successful
    assert bool(jnp.isnan(info.residual))  # no fixed point to measure
    assert z1.shape == (N,) and z1.dtype == jnp.float32

    node = imex_deq.NeuralODE(cell)

    @eqx.filter_jit
    def backward(node, x):
        def loss(counter):
            z1, info = node(x, backward_counter=counter)
            return jnp.sum(z1), info

        return jax.grad(loss, has_aux=True)(jnp.zeros(()))

    backward_nfe, info2 = backward(node, x)
    assert int(info2.nfe) == int(info.nfe)
    assert float(backward_nfe) == int(info2.nfe)
    assert tree_allclose(info2.z_star, z1, rtol=1e-6, atol=1e-6)


def test_skip_reg_nfe_counts_the_initial_guess(cell, xs):
    counted = CountedFn(cell)
    deq = imex_deq.SkipRegDEQ(counted, imex_deq.FixedPointIteration(rtol=1e-5), max_steps=100)
    _, info = deq(xs[0])
    assert info.result == RESULTS.successful
    assert int(info.nfe) == counted.read() == int(info.steps) + 1  # f(0, x), then the solve


def test_fixed_depth_solver(cell, xs):
    x = xs[0]
    sol = imex_deq.fixed_point(
        cell, imex_deq.FixedDepth(4), jnp.zeros(N), x, adjoint=imex_deq.UnrolledAdjoint()
    )
    z = [jnp.zeros(N)]
    for _ in range(4):
        z.append(cell(z[-1], x))
    assert tree_allclose(sol.value, z[4], rtol=1e-6, atol=1e-6)
    assert int(sol.nfe) == int(sol.num_steps) == 4
    assert np.isclose(float(sol.residual), float(imex_deq.residual_norm(z[4], z[3], "rel")))
    with pytest.raises(ValueError, match="depth"):
        imex_deq.FixedDepth(0)
