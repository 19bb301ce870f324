"""The finite-time neural ODE baseline: dz/dt = f(z, x) on [0, t1]."""

from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._adjoint import tally_backward_nfe
from ._deq import DEQInfo, _Apply, draw_dropout_masks
from ._fixed_point import check_state
from ._solution import RESULTS
from ._solvers._steady_state_ode import ode_initial_state, ode_stage_count, ode_startup_count


class _Field(eqx.Module):
    def __call__(self, t, z, f_and_x):
        f, x = f_and_x
        return f(z, x)


class NeuralODE(eqx.Module):
    """Finite-time neural ODE z(t1), z(0) = 0, dz/dt = f(z, x): the baseline a continuous DEQ
    is compared with. Same diffrax solvers and PID control as `SteadyStateODE`;
    gradients by a standard diffrax adjoint.

    NFE forward: 1 (first-same-as-last stage) + new stages per step (diffrax's initial
    step-size selection evaluates nothing here). `info.result` is `nonfinite` when the
    initial vector field or the final state is not finite (NaN input or parameters).
    Backward NFE (through `backward_counter`) equals the forward NFE with
    `RecursiveCheckpointAdjoint` (one VJP per evaluation); with `BacksolveAdjoint` the
    backward solve's steps are not observable and it reads NaN.

    **Arguments:**

    - `f`: `f(z, x) -> z`.
    - `t1`: integration horizon (paper: 1).
    - `ode_solver`: explicit adaptive diffrax solver (default `Tsit5`).
    - `rtol`, `atol`: PID tolerances.
    - `max_steps`: ODE step cap.
    - `adjoint`: `diffrax.RecursiveCheckpointAdjoint()` (default) or `BacksolveAdjoint()`.
    - `state_shape`: `jax.ShapeDtypeStruct` PyTree of the state when it differs from x's.
    """

    f: Callable
    t1: float = 1.0
    ode_solver: dfx.AbstractAdaptiveSolver = eqx.field(default_factory=dfx.Tsit5)
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int = eqx.field(default=1000, static=True)
    adjoint: dfx.RecursiveCheckpointAdjoint | dfx.BacksolveAdjoint = eqx.field(
        default_factory=dfx.RecursiveCheckpointAdjoint
    )
    state_shape: PyTree[jax.ShapeDtypeStruct] | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        ode_stage_count(self.ode_solver)
        if not self.t1 > 0:
            raise ValueError(f"NeuralODE: t1 must be positive, got {self.t1}.")

    def __call__(
        self,
        x: PyTree[Array],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        backward_counter: Float[Array, ""] | None = None,
    ) -> tuple[PyTree[Array], DEQInfo]:
        """Returns `(z(t1), info)`; `info.residual` is NaN (there is no fixed point).
        `key` and `inference` control f's variational dropout, as for the DEQ layers."""
        like = x if self.state_shape is None else self.state_shape
        z0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), like)
        masks = draw_dropout_masks(self.f, key, inference, "NeuralODE")
        f = _Apply(self.f, masks)
        check_state(f, z0, x)
        term = dfx.ODETerm(_Field())
        # The first-same-as-last stage, evaluated once here so that the NFE count stays
        # exact when diffrax rejects first steps (see `ode_initial_state`).
        solver_state = ode_initial_state(self.ode_solver, term, z0, (f, x))
        if isinstance(self.adjoint, dfx.BacksolveAdjoint):
            # Its gradient comes from the backward solve; it must not see one through here.
            solver_state = jax.lax.stop_gradient(solver_state)
        sol = dfx.diffeqsolve(
            term,
            self.ode_solver,
            t0=0.0,
            t1=self.t1,
            dt0=None,
            y0=z0,
            args=(f, x),
            stepsize_controller=dfx.PIDController(rtol=self.rtol, atol=self.atol),
            saveat=dfx.SaveAt(t1=True),
            max_steps=self.max_steps,
            adjoint=self.adjoint,
            throw=False,
            solver_state=solver_state,
        )
        z1 = jax.tree_util.tree_map(lambda leaf: leaf[-1], sol.ys)
        steps = sol.stats["num_steps"]
        nfe = ode_startup_count(self.ode_solver) + steps * ode_stage_count(self.ode_solver)
        if backward_counter is not None:
            backward = nfe if isinstance(self.adjoint, dfx.RecursiveCheckpointAdjoint) else jnp.nan
            z1 = tally_backward_nfe(z1, backward_counter, backward)
        # With NaNs diffrax rejects every step until it runs out of steps: a non-finite
        # state or initial vector field is reported as `nonfinite`, not as a step cap.
        leaves = jax.tree_util.tree_leaves((z1, solver_state))
        finite = jnp.all(
            jnp.stack(
                [jnp.all(jnp.isfinite(leaf)) for leaf in leaves if eqx.is_inexact_array(leaf)]
            )
        )
        result = RESULTS.where(
            ~finite,
            RESULTS.nonfinite,
            RESULTS.where(
                sol.result == dfx.RESULTS.successful,
                RESULTS.successful,
                RESULTS.where(
                    sol.result == dfx.RESULTS.max_steps_reached,
                    RESULTS.nonlinear_max_steps_reached,
                    RESULTS.nonlinear_divergence,
                ),
            ),
        )
        residual = jnp.array(jnp.nan, jax.tree_util.tree_leaves(z1)[0].dtype)
        return z1, DEQInfo(z0, z1, residual, nfe, steps, result, masks)
