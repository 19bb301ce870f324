"""The MNIST-dense model on the JAX side (imex-deq), built from `problem`'s NumPy weights.

A "core" is `make(f) -> layer`: it wraps f into the layer that maps one embedded sample e to
`(z, DEQInfo)` and accepts a `backward_counter`. Imports jax at import time: import this
module only after `threads.configure_threads`.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import imex_deq as deq
from imex_deq.experiments import SOLVERS

from .configs import ANDERSON_HISTORY, TORCHDEQ_SOLVERS
from .problem import PARAM_NAMES


class DenseF(eqx.Module):
    """f(z, e) = relu(W1 z) + relu(W2 e)."""

    w1: jax.Array
    w2: jax.Array

    def __call__(self, z, e):
        return jax.nn.relu(self.w1 @ z) + jax.nn.relu(self.w2 @ e)


@jax.custom_vjp
def _count_one_vjp(z, counter):
    """Identity on `z`; in the backward pass `counter` receives gradient 1 (one VJP)."""
    return z


def _count_fwd(z, counter):
    return z, counter


def _count_bwd(counter, grad):
    return grad, jnp.ones_like(counter)


_count_one_vjp.defvjp(_count_fwd, _count_bwd)


class Explicit(eqx.Module):
    """The explicit network: f applied once, from z = 0."""

    f: DenseF

    def __call__(self, e, *, backward_counter=None):
        z0 = jnp.zeros_like(e)
        z = self.f(z0, e)
        if backward_counter is not None:
            z = _count_one_vjp(z, backward_counter)
        one = jnp.array(1)
        info = deq.DEQInfo(z0, z, jnp.array(jnp.nan, e.dtype), one, one, deq.RESULTS.successful)
        return z, info


def imex_solver(name: str, tol: float, stop_mode: str, max_iter: int, memory: int | None = None):
    """The imex-deq solver matching a torchdeq solver name (`configs.TORCHDEQ_SOLVERS`),
    with the same stopping rule and the same history/memory as torchdeq's defaults
    (`memory` overrides Broyden's)."""
    if name not in TORCHDEQ_SOLVERS:
        raise ValueError(
            f"unknown torchdeq solver {name!r}; choose one of {list(TORCHDEQ_SOLVERS)}"
        )
    cls = SOLVERS[TORCHDEQ_SOLVERS[name]]
    kwargs = {"termination": stop_mode}
    if stop_mode == "rel":
        kwargs["rtol"] = tol
    else:
        kwargs["atol"] = tol
    if cls is deq.Anderson:
        kwargs["history"] = ANDERSON_HISTORY
    if cls is deq.Broyden:
        # torchdeq keeps every rank-one update (LBFGS_thres = max_iter).
        kwargs["memory"] = max_iter if memory is None else memory
    return cls(**kwargs)


def deq_core(solver, adjoint=None, max_steps: int = 50) -> Callable:
    """A DEQ with `solver` and `adjoint` (default `ImplicitAdjoint()`)."""
    adjoint = deq.ImplicitAdjoint() if adjoint is None else adjoint
    return lambda f: deq.DEQ(f, solver, adjoint=adjoint, max_steps=max_steps)


def neural_ode_core(
    rtol: float,
    atol: float,
    *,
    t1: float = 1.0,
    adjoint: str = "backsolve",
    ode_solver=None,
    max_steps: int = 4096,
) -> Callable:
    """A neural ODE over [0, t1] (Dopri5 by default); `adjoint` is "backsolve"
    (`BacksolveAdjoint`) or "checkpoint" (`RecursiveCheckpointAdjoint`)."""
    ode_adjoint = (
        dfx.BacksolveAdjoint() if adjoint == "backsolve" else dfx.RecursiveCheckpointAdjoint()
    )
    return lambda f: deq.NeuralODE(
        f,
        t1=t1,
        ode_solver=dfx.Dopri5() if ode_solver is None else ode_solver,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        adjoint=ode_adjoint,
    )


def explicit_core() -> Callable:
    """The explicit network (f once, from zero)."""
    return Explicit


def jax_params(weights: dict[str, np.ndarray]) -> dict:
    return {k: jnp.asarray(weights[k]) for k in PARAM_NAMES}


def jax_forward(make_core: Callable, params: dict, xs, counters):
    """Batched forward: `(logits, z, e, info)`; info fields are per sample.

    `counters` holds ONE backward counter PER SAMPLE (shape (batch,)), vmapped with the
    data. The documented pattern, one unbatched scalar counter closed over by the vmap,
    under-counts whenever the backward NFE does not depend on batched data (a Python int
    such as PhantomAdjoint's `steps`): JAX's vmap of a custom_vjp does not sum an
    unbatched constant cotangent over the batch, so it reads the NFE of ONE sample.
    Per-sample counters are exact for every adjoint; their gradients are summed."""
    layer = make_core(DenseF(params["w1"], params["w2"]))

    def one(x, counter):
        e = jax.nn.relu(params["we"] @ x + params["be"])
        z, info = layer(e, backward_counter=counter)
        return params["wh"] @ z + params["bh"], z, e, info

    return jax.vmap(one)(xs, counters)


def jax_loss(make_core: Callable, params: dict, counters, xs, ys):
    logits, z, e, info = jax_forward(make_core, params, xs, counters)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ys))
    return loss, (z, e, info)


def jax_grad_fn(make_core: Callable) -> Callable:
    """jitted `(params, xs, ys) -> (loss, grads, z, e, info, backward_nfe_total)`."""

    @eqx.filter_jit
    def grad(params, xs, ys):
        counters = jnp.zeros(xs.shape[:1], jnp.float32)
        (loss, (z, e, info)), (g, g_counter) = jax.value_and_grad(
            lambda p, c: jax_loss(make_core, p, c, xs, ys), argnums=(0, 1), has_aux=True
        )(params, counters)
        return loss, g, z, e, info, jnp.sum(g_counter)

    return grad


def jax_train_step(make_core: Callable, learning_rate: float = 1e-3):
    """`(init_opt_state, step)`; step is ONE eqx.filter_jit'd function doing solve, loss,
    adjoint and the Adam update: `step(params, opt_state, xs, ys) -> (params, opt_state,
    stats)` with stats = dict(loss, fwd_nfe (per sample), bwd_nfe_total, converged (per
    sample), residual (per sample), z, e)."""
    optimiser = optax.adam(learning_rate)

    @eqx.filter_jit
    def step(params, opt_state, xs, ys):
        counters = jnp.zeros(xs.shape[:1], jnp.float32)
        (loss, (z, e, info)), (g, g_counter) = jax.value_and_grad(
            lambda p, c: jax_loss(make_core, p, c, xs, ys), argnums=(0, 1), has_aux=True
        )(params, counters)
        updates, opt_state = optimiser.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        stats = {
            "loss": loss,
            "fwd_nfe": info.nfe,
            "bwd_nfe_total": jnp.sum(g_counter),
            "converged": info.result == deq.RESULTS.successful,
            "residual": info.residual,
            "z": z,
            "e": e,
        }
        return params, opt_state, stats

    return optimiser.init, step
