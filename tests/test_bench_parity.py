"""Parity of imex-deq with torchdeq on a tiny MNIST-dense DEQ (state 16, batch 4): the same
NumPy weights and batch in both libraries must give the same equilibrium z* and the same
gradients of every parameter. Runs only where the `bench` extra (torch, torchdeq) is
installed; the helpers live in scripts/bench/ (problem, configs, models_jax, models_torch,
parity), shared with scripts/bench_peers.py.
"""

import os
import sys

import numpy as np
import pytest

pytest.importorskip(
    "torchdeq", reason="torchdeq not installed (pip install torch==2.13.0 torchdeq==0.1.0)"
)

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
)
from bench import configs, models_jax, models_torch, problem
from bench.parity import parity_check

import imex_deq as deq

TOL = 1e-6  # tightened stopping tolerance (relative residual) for the parity run
ITERS = 300
PARITY = 1e-4  # required relative agreement of z* and gradients


@pytest.fixture(scope="module")
def tiny_problem():
    weights = problem.init_weights(seed=3, d_in=32, width=16, classes=10, spectral_norm=0.9)
    x, y, _ = problem.make_batch(seed=3, batch=4, d_in=32, classes=10, source="random")
    return weights, x, y


@pytest.mark.parametrize("solver", list(configs.TORCHDEQ_SOLVERS))
def test_deq_parity_with_torchdeq(tiny_problem, solver):
    weights, x, y = tiny_problem
    cfg = configs.DEQConfig(solver, TOL, ITERS, TOL, ITERS, "rel")
    make_core = models_jax.deq_core(
        models_jax.imex_solver(solver, TOL, "rel", ITERS),
        deq.ImplicitAdjoint(
            linear_solver=models_jax.imex_solver(solver, TOL, "rel", ITERS), max_steps=ITERS
        ),
        max_steps=ITERS,
    )
    parity = parity_check(solver, weights, x, y, models_torch.DEQCore(cfg), make_core, tol=PARITY)
    assert parity.z_rel < PARITY, parity.line()
    for name in problem.PARAM_NAMES:
        assert parity.grad_rel[name] < PARITY, parity.line()
    # Both sides really reached the equilibrium, judged by the one shared residual.
    assert parity.residual_peer <= 10 * TOL, parity.line()
    assert parity.residual_imex <= 10 * TOL, parity.line()
    assert parity.ok, parity.line()


def test_gradient_default_is_not_ift_in_torchdeq(tiny_problem):
    """torchdeq's default backward is the one-step (phantom) gradient, not the implicit one:
    the benchmark must set ift=True. Guard that the difference is visible, so a parity pass
    means the IFT configuration is in force."""
    import torch
    from torchdeq import get_deq

    weights, x, y = tiny_problem
    net = models_torch.TorchNet(
        weights, models_torch.DEQCore(configs.DEQConfig("anderson", TOL, ITERS, TOL, ITERS))
    )
    one_step = get_deq(
        core="sliced", f_solver="anderson", f_max_iter=ITERS, f_tol=TOL, f_stop_mode="rel"
    )
    net.core.deq = one_step
    logits, _, _ = net(torch.from_numpy(x))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(y).long()).backward()
    g_one_step = net.f.w1.weight.grad.numpy()

    make_core = models_jax.deq_core(
        models_jax.imex_solver("anderson", TOL, "rel", ITERS),
        deq.ImplicitAdjoint(
            linear_solver=models_jax.imex_solver("anderson", TOL, "rel", ITERS), max_steps=ITERS
        ),
        max_steps=ITERS,
    )
    _, g_ift, _, _, _, _ = models_jax.jax_grad_fn(make_core)(models_jax.jax_params(weights), x, y)
    assert problem.rel_diff(g_one_step, np.asarray(g_ift["w1"])) > 10 * PARITY


def test_nfe_counter_counts_forward_and_vjps(tiny_problem):
    """The PyTorch-side NFE counter: fixed-point forward evaluations, and one VJP per IFT
    solver step plus the final parameter VJP."""
    import torch

    weights, x, y = tiny_problem
    cfg = configs.DEQConfig("fixed_point_iter", 1e-3, 50, 1e-3, 50, "rel")
    net = models_torch.TorchNet(weights, models_torch.DEQCore(cfg))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    stats = models_torch.torch_step(net, opt, torch.from_numpy(x), torch.from_numpy(y).long())
    assert stats["fwd_nfe"] >= 2  # solver steps + the IFT re-application of f
    assert stats["fwd_nfe"] <= 50 + 1
    assert stats["bwd_vjps"] >= 2  # at least one adjoint step and the parameter VJP
    assert stats["bwd_evals"] == 1  # IFTGrad re-evaluates f(z*) once in the backward
