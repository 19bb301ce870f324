"""Variational dropout through the DEQ layers: one mask per solve, shared by every iteration
and by the adjoint; a key is required in training; `inference=True` switches it off.
Also the stochastic Jacobian regularisation of the training loop."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import central_difference_grad, enable_x64

import imex_deq
from imex_deq import nn
from imex_deq.experiments import TrainConfig, Trainer, build_conv_model, make_optimizer

WIDTH = 6


class DropoutCell(eqx.Module):
    """f(z, x, mask) = tanh(W (mask ⊙ z)) / 2 + x, following the dropout protocol."""

    weight: jax.Array
    dropout_rate: float = eqx.field(static=True, default=0.5)

    def sample_dropout_masks(self, key):
        keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, (WIDTH,))
        return keep.astype(self.weight.dtype) / (1.0 - self.dropout_rate)

    def __call__(self, z, x, masks=None):
        masked = z if masks is None else z * masks
        return 0.5 * jnp.tanh(self.weight @ masked) + x


def _cell(rate=0.5):
    weight = jax.random.normal(jax.random.PRNGKey(0), (WIDTH, WIDTH)) / jnp.sqrt(WIDTH)
    return DropoutCell(weight, rate)


def _x():
    return jax.random.normal(jax.random.PRNGKey(1), (WIDTH,))


def _deq(cell, layer=imex_deq.DEQ):
    return layer(cell, imex_deq.FixedPointIteration(rtol=1e-6, atol=1e-7), max_steps=200)


@pytest.mark.parametrize("layer", [imex_deq.DEQ, imex_deq.SkipRegDEQ])
def test_training_without_a_key_is_an_error(layer):
    with pytest.raises(ValueError, match=r"variational dropout \(rate 0.5\).*key=.*inference"):
        _deq(_cell(), layer)(_x())


def test_one_mask_per_solve_is_shared_by_every_iteration():
    deq, key = _deq(_cell()), jax.random.PRNGKey(2)
    z, info = eqx.filter_jit(lambda d, x, k: d(x, key=k))(deq, _x(), key)
    mask = deq.f.sample_dropout_masks(key)
    np.testing.assert_array_equal(info.dropout_masks, mask)
    assert bool(info.result == imex_deq.RESULTS.successful)
    # z* is a fixed point of f with that one mask (a fresh mask per iteration has none).
    np.testing.assert_allclose(deq.f(z, _x(), mask), z, atol=1e-5)
    # The same key gives the same solve; another key another mask and another z*.
    z_again, _ = deq(_x(), key=key)
    np.testing.assert_array_equal(z, z_again)
    other = jax.random.PRNGKey(3)
    assert not np.array_equal(deq.f.sample_dropout_masks(other), mask)
    assert not np.allclose(deq(_x(), key=other)[0], z)


def test_inference_switches_dropout_off():
    z, info = _deq(_cell())(_x(), inference=True)
    z_plain, _ = _deq(_cell(rate=0.0))(_x())
    np.testing.assert_allclose(z, z_plain, atol=1e-6)
    assert info.dropout_masks is None


def test_skip_reg_initial_guess_uses_the_mask():
    deq, key = _deq(_cell(), imex_deq.SkipRegDEQ), jax.random.PRNGKey(4)
    _, info = deq(_x(), key=key)
    mask = deq.f.sample_dropout_masks(key)
    np.testing.assert_allclose(info.z0, deq.f(jnp.zeros(WIDTH), _x(), mask), atol=1e-6)


def test_adjoint_uses_the_same_mask():
    """The implicit gradient equals the finite-difference gradient of the map with the
    solve's mask held fixed."""
    with enable_x64():
        cell = jax.tree.map(lambda a: a.astype(jnp.float64), _cell())
        x = _x().astype(jnp.float64)
        key = jax.random.PRNGKey(5)
        solver = imex_deq.FixedPointIteration(rtol=1e-12, atol=1e-13)
        deq = imex_deq.DEQ(cell, solver, max_steps=500)

        def loss(weight):
            z, _ = eqx.tree_at(lambda d: d.f.weight, deq, weight)(x, key=key)
            return jnp.sum(jnp.sin(z))

        grad = jax.grad(loss)(cell.weight)
        fd = central_difference_grad(loss, cell.weight, eps=1e-6)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_jacobian_regularisation_uses_the_mask():
    deq, key = _deq(_cell()), jax.random.PRNGKey(6)
    _, info = deq(_x(), key=key)
    mask = deq.f.sample_dropout_masks(key)
    ours = deq.jacobian_regularisation(_x(), info, key=jax.random.PRNGKey(7))
    expected = imex_deq.jacobian_regularisation(
        lambda z, x: deq.f(z, x, mask), info.z_star, _x(), key=jax.random.PRNGKey(7)
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_multiscale_model_dropout_reaches_the_cell():
    config = nn.MultiscaleConfig(channels=(4, 8), image_size=(8, 8), in_channels=1, dropout=0.25)
    model = build_conv_model(
        "vanilla", imex_deq.Anderson(rtol=1e-2), config=config, key=jax.random.PRNGKey(0),
        max_steps=5,
    )  # fmt: skip
    image = jnp.ones((8, 8, 1))
    with pytest.raises(ValueError, match="dropout"):
        model(image)
    _, info, _ = model.forward(image, key=jax.random.PRNGKey(1))
    assert [m.shape for m in info.dropout_masks] == [(1, 1, 4), (1, 1, 8)]
    assert model.forward(image, inference=True)[1].dropout_masks is None


def test_stochastic_jacobian_regularisation_applies_to_a_fraction_of_steps():
    with pytest.raises(ValueError, match="jac_prob"):
        TrainConfig(jac_weight=1.0, jac_prob=0.0)
    config = TrainConfig(
        model="vanilla", solver="anderson", jac_weight=1.0, jac_prob=0.5, batch_size=4
    )
    model = imex_deq.experiments.build_dense_model(
        "vanilla", imex_deq.Anderson(rtol=1e-2), in_features=8, key=jax.random.PRNGKey(0),
        width=8, max_steps=10,
    )  # fmt: skip
    trainer = Trainer(config, make_optimizer(config, 10))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
    y = jnp.arange(4) % 10
    loss = eqx.filter_jit(trainer.loss)
    applied = []
    for step in range(12):
        _, metrics = loss((model, jnp.zeros(())), x, y, jax.random.PRNGKey(step))
        applied.append(float(metrics["jac_applied"]))
        if applied[-1] == 0.0:
            assert float(metrics["jac"]) == 0.0
        else:
            assert float(metrics["jac"]) > 0.0
    assert 0 < sum(applied) < len(applied)


def test_jacobian_regularisation_on_demand_applies_only_while_solves_fail():
    with pytest.raises(ValueError, match="jac_on_demand must lie"):
        TrainConfig(jac_weight=1.0, jac_on_demand=1.5)
    with pytest.raises(ValueError, match="jac_on_demand needs jac_weight"):
        TrainConfig(jac_on_demand=0.9)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
    y = jnp.arange(4) % 10

    def applied(rtol, max_steps):
        config = TrainConfig(
            model="vanilla", solver="anderson", jac_weight=1.0, jac_on_demand=0.9, batch_size=4
        )
        model = imex_deq.experiments.build_dense_model(
            "vanilla", imex_deq.Anderson(rtol=rtol), in_features=8, key=jax.random.PRNGKey(0),
            width=8, max_steps=max_steps,
        )  # fmt: skip
        trainer = Trainer(config, make_optimizer(config, 10))
        _, metrics = eqx.filter_jit(trainer.loss)(
            (model, jnp.zeros(())), x, y, jax.random.PRNGKey(2)
        )
        return float(metrics["converged"]), float(metrics["jac_applied"]), float(metrics["jac"])

    converged, on, jac = applied(rtol=1e-12, max_steps=2)
    assert (converged, on) == (0.0, 1.0) and jac > 0.0
    converged, on, jac = applied(rtol=1e-2, max_steps=50)
    assert (converged, on, jac) == (1.0, 0.0, 0.0)
    assert "-jac-ondemand0.9-" in TrainConfig(jac_weight=1.0, jac_on_demand=0.9).name


def test_spectral_jacobian_term_trains_and_names_its_runs():
    with pytest.raises(ValueError, match="jac_norm must be one of"):
        TrainConfig(jac_weight=1.0, jac_norm="nuclear")
    config = TrainConfig(
        model="vanilla", solver="anderson", jac_weight=1.0, jac_norm="spectral", batch_size=4
    )
    assert config.name == "vanilla-anderson-jac-spectral-s0"
    assert dataclasses.replace(config, jac_weight=0.0).name == "vanilla-anderson-s0"
    model = imex_deq.experiments.build_dense_model(
        "vanilla", imex_deq.Anderson(rtol=1e-2), in_features=8, key=jax.random.PRNGKey(0),
        width=8, max_steps=10,
    )  # fmt: skip
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
    y = jnp.arange(4) % 10
    trainer = Trainer(config, make_optimizer(config, 10))
    _, metrics = eqx.filter_jit(trainer.loss)((model, jnp.zeros(())), x, y, jax.random.PRNGKey(2))
    _, info, injection = jax.vmap(lambda image: model.forward(image))(x)
    keys = jax.random.split(jax.random.split(jax.random.PRNGKey(2), 3)[1], 4)
    expected = jnp.mean(
        jax.vmap(lambda i, n, k: model.layer.jacobian_regularisation(i, n, key=k, norm="spectral"))(
            injection, info, keys
        )
    )
    np.testing.assert_allclose(metrics["jac"], expected, rtol=1e-5)
