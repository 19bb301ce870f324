"""Mixed precision: f in bfloat16, parameters, state, residuals and gradients in float32."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import relative_error, tiny_cell

import imex_deq
from imex_deq.data import load_dataset
from imex_deq.experiments import TrainConfig, Trainer
from imex_deq.experiments._training import build_model

N = 16
BATCH = 8
TOLERANCE = 3e-2
"""Relative error allowed against float32 (whole PyTrees, 2-norm). bfloat16 keeps 8
significant bits (spacing 2⁻⁷ ≈ 8e-3); observed errors are ~3e-3 (fixed point) and ~7e-3
(gradient) on this problem."""


def _solve_and_grad(f, solver_name: str, rtol: float):
    """Batch of fixed points, and the gradient of a loss on them w.r.t. f's parameters."""
    xs = jax.random.normal(jax.random.PRNGKey(1), (BATCH, N))
    adjoint = imex_deq.ImplicitAdjoint(linear_solver=imex_deq.Anderson(rtol=rtol), max_steps=100)
    solver = getattr(imex_deq, solver_name)(rtol=rtol)
    deq = imex_deq.DEQ(f, solver, adjoint=adjoint, max_steps=100)

    def loss(f):
        layer = eqx.tree_at(lambda d: d.f, deq, f)
        z, info = jax.vmap(layer)(xs)
        return jnp.mean(jnp.sin(z)), (z, info)

    grad_fn = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    (_, (z, info)), grads = grad_fn(f)
    return z, info, grads


@pytest.mark.parametrize("solver_name", ["Anderson", "SteadyStateODE"])
def test_bfloat16_fixed_point_and_gradient_close_to_float32(solver_name):
    cell = tiny_cell(jax.random.PRNGKey(0), N)
    z32, _, g32 = _solve_and_grad(cell, solver_name, 1e-6)
    mixed = imex_deq.MixedPrecision(cell)
    z16, info, g16 = _solve_and_grad(mixed, solver_name, 1e-2)

    assert bool(jnp.all(info.result == imex_deq.RESULTS.successful))
    # The state, the residual and the gradients stay float32.
    assert z16.dtype == jnp.float32
    assert info.residual.dtype == jnp.float32
    assert info.z_star.dtype == jnp.float32
    for leaf in jax.tree_util.tree_leaves(eqx.filter(g16, eqx.is_array)):
        assert leaf.dtype == jnp.float32
    # The stored parameters are untouched float32 master weights.
    assert mixed.f.weight.dtype == jnp.float32

    assert relative_error(z16, z32) < TOLERANCE
    assert relative_error(g16.f, g32) < TOLERANCE
    # bfloat16 really was used: the results differ from float32 by more than float32 noise.
    assert relative_error(z16, z32) > 1e-5


def test_mixed_precision_computes_in_bfloat16_and_returns_state_dtype():
    cell = tiny_cell(jax.random.PRNGKey(0), N)
    mixed = imex_deq.MixedPrecision(cell)
    z = jnp.zeros(N)
    x = jnp.ones(N)
    jaxpr = str(jax.make_jaxpr(mixed)(z, x))
    assert "bf16" in jaxpr
    assert "dot_general" in jaxpr
    out = mixed(z, x)
    assert out.dtype == jnp.float32 and out.shape == (N,)

    # A tuple state keeps its structure and per-leaf dtypes.
    def f(state, x):
        a, b = state
        return (jnp.tanh(a + x), 0.5 * b)

    state = (jnp.zeros(3), jnp.zeros(2))
    out = imex_deq.MixedPrecision(f)(state, jnp.ones(3))
    assert isinstance(out, tuple) and [o.dtype for o in out] == [jnp.float32] * 2


def test_train_config_precision_wraps_f():
    data = load_dataset("digits", limit_train=32, limit_test=16)
    config = TrainConfig(
        model="skip-reg",
        solver="anderson",
        backward="anderson",
        precision="bfloat16",
        rtol=1e-2,
        epochs=1,
        batch_size=16,
    )
    model = build_model(config, data)
    assert isinstance(model.layer.f, imex_deq.MixedPrecision)
    assert model.layer.f.compute_dtype == jnp.bfloat16
    trainer = Trainer(config, optax.adam(config.learning_rate))
    opt_state = trainer.optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = jnp.asarray(data.x_train[:16]), jnp.asarray(data.y_train[:16])
    new_model, _, metrics = trainer.step(model, opt_state, x, y, jax.random.PRNGKey(0))
    assert np.isfinite(float(metrics["loss"]))
    assert isinstance(new_model.layer.f, imex_deq.MixedPrecision)
    weights = jax.tree_util.tree_leaves(eqx.filter(new_model.layer.f, eqx.is_inexact_array))
    assert {leaf.dtype for leaf in weights} == {jnp.dtype(jnp.float32)}
    plain = build_model(TrainConfig(), data)
    assert not isinstance(plain.layer.f, imex_deq.MixedPrecision)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="float16")
