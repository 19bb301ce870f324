"""A multiscale (MDEQ) cell from `imex_deq.nn` as the f of imex-deq's DEQ layers: tuple
states, implicit gradients against finite differences, Skip DEQ with the multiscale
predictor, one training step of the conv classifier, and the GPU benchmark script's
`--tiny` mode."""

import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import pytest
from helpers import central_difference_grad, enable_x64, relative_error

import imex_deq
from imex_deq import nn
from imex_deq.data import load_dataset
from imex_deq.experiments import TrainConfig, Trainer, build_conv_model

REPO = Path(__file__).resolve().parents[1]
CHANNELS = (4, 8)
SPATIAL = (8, 8)
SHAPES = nn.branch_shapes(CHANNELS, SPATIAL)  # ((8, 8, 4), (4, 4, 8))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda leaf: leaf.astype(dtype) if eqx.is_inexact_array(leaf) else leaf, tree
    )


def tiny_cell(dtype=jnp.float32) -> nn.MultiscaleDEQCell:
    """A 2-branch MDEQ cell (4 channels at 8x8, 8 channels at 4x4), damped.

    The freshly initialised cell is far from contractive (spectral radius of ∂f/∂z ≈ 4 at
    its fixed point; Anderson does not converge in 300 steps). Scaling weights down cannot
    make it contractive: every convolution is followed by a GroupNorm, which undoes the
    scale (shrinking the state makes the next GroupNorm amplify by as much). Damping two
    gains, the residual blocks' second convolution (weight-norm magnitude g x 0.1) and the
    post-fusion GroupNorm scale (x 0.1), leaves a non-contractive map (spectral radius
    ≈ 1.4) whose fixed point Anderson finds to 1e-12 in ~90 evaluations and where
    I − ∂f/∂z is well conditioned (condition number ≈ 120, nearest eigenvalue of ∂f/∂z to
    1 at distance ≈ 0.43), so the implicit-function-theorem gradient is well defined; the
    adjoint system is solved by GMRES (which, unlike a fixed-point iteration, does not need
    contractivity).
    """
    cell = nn.MultiscaleDEQCell(CHANNELS, key=jax.random.PRNGKey(0))
    cell = eqx.tree_at(
        lambda c: tuple(b.conv2.g for b in c.blocks),
        cell,
        tuple(0.1 * b.conv2.g for b in cell.blocks),
    )
    cell = eqx.tree_at(
        lambda c: tuple(p.norm.weight for p in c.post_fuse),
        cell,
        tuple(0.1 * p.norm.weight for p in cell.post_fuse),
    )
    return _cast(cell, dtype)


def state_shape(dtype=jnp.float32):
    return tuple(jax.ShapeDtypeStruct(s, dtype) for s in SHAPES)


def channels_last_normal(key, shape, dtype=jnp.float32):
    """Standard normal `(H, W, C)` draws equal to the `(C, H, W)` draws of the same key (the
    problems below were tuned in that layout)."""
    h, w, c = shape
    return jnp.transpose(jax.random.normal(key, (c, h, w), dtype), (1, 2, 0))


def injection(dtype=jnp.float32, key=1):
    return channels_last_normal(jax.random.PRNGKey(key), SHAPES[0], dtype)


def _check_structure(z, dtype=jnp.float32):
    assert isinstance(z, tuple) and len(z) == 2
    assert [leaf.shape for leaf in z] == list(SHAPES)
    assert all(leaf.dtype == dtype for leaf in z)


@eqx.filter_jit
def _batched(layer, xs):
    return jax.vmap(layer)(xs)


def test_multiscale_deq_solve_converges_with_tuple_state():
    deq = imex_deq.DEQ(
        tiny_cell(),
        imex_deq.Anderson(rtol=1e-4, history=8),
        state_shape=state_shape(),
        max_steps=200,
    )
    xs = jax.vmap(injection, in_axes=(None, 0))(jnp.float32, jnp.arange(3))
    z, info = _batched(deq, xs)
    assert isinstance(z, tuple) and [leaf.shape for leaf in z] == [(3, *s) for s in SHAPES]
    assert bool(jnp.all(info.result == imex_deq.RESULTS.successful))
    assert bool(jnp.all(info.residual <= 1e-4))
    # z is a fixed point of the cell.
    fz = jax.vmap(deq.f)(z, xs)
    assert relative_error(fz, z) < 1e-3


def test_multiscale_implicit_gradient_matches_finite_differences():
    with enable_x64():
        dtype = jnp.float64
        cell = tiny_cell(dtype)
        x = injection(dtype)
        readout = tuple(
            channels_last_normal(jax.random.PRNGKey(10 + i), s, dtype) for i, s in enumerate(SHAPES)
        )
        adjoint = imex_deq.ImplicitAdjoint(
            linear_solver=lx.GMRES(rtol=1e-12, atol=1e-12, restart=60, max_steps=20)
        )
        deq = imex_deq.DEQ(
            cell,
            imex_deq.Anderson(rtol=1e-13, atol=1e-13, termination="abs", history=8),
            adjoint=adjoint,
            state_shape=state_shape(dtype),
            max_steps=400,
        )

        def where(c):
            # A few parameters from different places of the cell: a post-fusion GroupNorm
            # scale, a residual block's GroupNorm shift, and a down-sampling GroupNorm shift.
            return (
                c.post_fuse[0].norm.weight,
                c.blocks[1].norm2.bias,
                c.fuse[1][0].layers[0].norm.bias,
            )

        def loss(params):
            layer = eqx.tree_at(lambda d: where(d.f), deq, params)
            z, info = layer(x)
            value = sum(jnp.sum(r * jnp.tanh(zi)) for r, zi in zip(readout, z))
            return value, info

        params = where(cell)
        (_, info), grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(params)
        assert info.result == imex_deq.RESULTS.successful
        assert float(info.residual) < 1e-11
        fd = central_difference_grad(lambda p: loss(p)[0], params, eps=1e-6)
        assert [g.dtype for g in grad] == [dtype] * 3
        error = relative_error(grad, fd)
        print(f"implicit vs finite-difference gradient: relative error {error:.2e}")
        assert error < 1e-6, error
        for g, f in zip(grad, fd):
            np.testing.assert_allclose(np.asarray(g), np.asarray(f), rtol=1e-5, atol=1e-8)


def test_skip_deq_with_multiscale_predictor_returns_state_structure():
    predictor = nn.MultiscaleSkipPredictor(CHANNELS, key=jax.random.PRNGKey(3))
    skip = imex_deq.SkipDEQ(
        tiny_cell(), predictor, imex_deq.Anderson(rtol=1e-3, history=8), max_steps=200
    )
    x = injection()
    z0 = predictor(x)
    _check_structure(z0)
    z, info = eqx.filter_jit(lambda layer, x: layer(x))(skip, x)
    _check_structure(z)
    _check_structure(info.z0)
    assert info.result == imex_deq.RESULTS.successful
    # Skip loss gradient reaches the predictor.
    grads = eqx.filter_jit(
        eqx.filter_grad(
            lambda p: imex_deq.skip_loss(eqx.tree_at(lambda s: s.predictor, skip, p)(x)[1], 1.0)
        )
    )(predictor)
    norm = sum(float(jnp.sum(g**2)) for g in jax.tree_util.tree_leaves(grads))
    assert norm > 0


@pytest.mark.parametrize("variant", ["skip"])
def test_conv_model_train_step_on_digits(variant):
    """One training step of `build_conv_model` (stem, multiscale Skip DEQ, head) on 8
    digits images (8x8x1), with a tiny 2-branch configuration."""
    data = load_dataset("digits", limit_train=16, limit_test=8)
    conv = nn.MultiscaleConfig(
        channels=CHANNELS, image_size=SPATIAL, in_channels=1, num_classes=data.num_classes
    )
    config = TrainConfig(
        model=variant,
        solver="anderson",
        backward="anderson",
        architecture="conv",
        batch_size=8,
        max_steps=10,
    )
    model = build_conv_model(
        variant,
        imex_deq.Anderson(rtol=config.rtol),
        config=conv,
        key=jax.random.PRNGKey(0),
        adjoint=imex_deq.ImplicitAdjoint(linear_solver=imex_deq.Anderson(rtol=config.rtol)),
        max_steps=config.max_steps,
    )
    assert isinstance(model.layer, imex_deq.SkipDEQ)
    assert isinstance(model.layer.f, nn.MultiscaleDEQCell)
    assert isinstance(model.layer.predictor, nn.MultiscaleSkipPredictor)
    trainer = Trainer(config, optax.adam(1e-3))
    opt_state = trainer.optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = jnp.asarray(data.x_train[:8]), jnp.asarray(data.y_train[:8])
    new_model, _, metrics = trainer.step(model, opt_state, x, y, jax.random.PRNGKey(0))
    for name in ("loss", "ce", "skip", "nfe", "backward_nfe"):
        assert np.isfinite(float(metrics[name])), name
    before = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    after = jax.tree_util.tree_leaves(eqx.filter(new_model, eqx.is_inexact_array))
    changed = [not np.allclose(a, b) for a, b in zip(before, after)]
    assert sum(changed) > len(changed) // 2


def test_gpu_bench_tiny_prints_table(tmp_path):
    # A smoke test of the script's plumbing: XLA's optimisations off to compile faster.
    env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(tmp_path))
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_bench.py"), "--tiny"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    out = done.stdout
    assert "| Model |" in out
    rows = {
        line.split("|")[1].strip(): line
        for line in out.splitlines()
        if line.startswith("| ") and "DEQ" in line or line.startswith("| Neural ODE")
    }
    assert len(rows) == 7, rows
    for timed_row in ("Vanilla DEQ (continuous)", "Skip DEQ (discrete)"):
        cells = [c.strip() for c in rows[timed_row].split("|")[2:-1]]
        assert all(cell != "—" for cell in cells[:7]), rows[timed_row]  # all numbers
        assert float(cells[1]) > 0  # train step seconds
    assert "not run" in rows["Neural ODE"]
    table = (tmp_path / "gpu_table.md").read_text()
    assert "| Model |" in table and "(incomplete" not in table
