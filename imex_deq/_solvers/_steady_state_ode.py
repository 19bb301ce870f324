"""The continuous DEQ: integrate dz/dt = f(z) − z until it stops moving."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, Int

from .._custom_types import Termination
from .._solution import RESULTS, Solution, residual_dtype, residual_norm, scaled_residual
from ._adams import AdamsBashforth3, evaluations_per_attempt
from ._base import AbstractSolver, verdict


def ode_stage_count(solver: dfx.AbstractAdaptiveSolver) -> int:
    """New vector-field evaluations per step of an explicit Runge–Kutta solver
    (first-same-as-last tableaux reuse one)."""
    tableau = getattr(solver, "tableau", None)
    if tableau is None:
        raise TypeError(
            f"SteadyStateODE supports explicit Runge–Kutta solvers, got {type(solver).__name__}."
        )
    stages = len(tableau.c) + 1
    return stages - 1 if tableau.fsal else stages


def ode_startup_count(solver: dfx.AbstractAdaptiveSolver) -> int:
    """Vector-field evaluations spent before the per-step stages: a first-same-as-last
    tableau evaluates its first stage once, on the first step. The first step is dt = 1, the
    relaxation's own time scale (diffrax's automatic selection would fall back to 0.01 here,
    as it sees a direction-wrapped term, and cost many small steps)."""
    ode_stage_count(solver)
    return 1 if solver.tableau.fsal else 0


def ode_initial_state(solver: dfx.AbstractAdaptiveSolver, term, y0, args):
    """diffrax's `solver_state` for the start with the first stage already evaluated (the
    one startup evaluation), or None for a tableau that is not first-same-as-last.

    Left to diffrax, the first stage is re-evaluated on every rejected attempt at the first
    step (its "first step" flag survives a rejection), which no step statistic reveals;
    evaluated here once, the count stays exact."""
    if ode_startup_count(solver) == 0:
        return None
    first_step, _ = solver.init(term, 0.0, 1.0, y0, args)  # (bool flag, f0) for FSAL RK
    return jnp.zeros_like(first_step), term.vf(0.0, y0, args)


# ------------------------------------------------------------- the steady-state integration


class _Tracker(eqx.Module):
    """Carried in the ODE state beside z, with a zero vector field: the residual of z and
    the evaluations spent by the attempted step that produced it. The steady-state event
    reads the first; the step-size controller sums the second."""

    residual: Float[Array, ""]
    evaluations: Float[Array, ""]


class _Relaxation(eqx.Module):
    """The vector field of (z, tracker): (f(z, args) − z, 0); f arrives through `args` so
    that differentiating through diffrax sees every parameter."""

    def __call__(self, t, y, fn_and_args):
        z, tracker = y
        fn, args = fn_and_args
        g = jax.tree_util.tree_map(lambda a, b: a - b, fn(z, args), z)
        return g, jax.tree_util.tree_map(jnp.zeros_like, tracker)


def _check_ode_solver(solver) -> None:
    if not isinstance(solver, (dfx.AbstractERK, AdamsBashforth3)):
        raise TypeError(
            "SteadyStateODE: ode_solver must be an explicit Runge–Kutta solver (Tsit5, "
            f"Dopri5, Bosh3, Heun, ...) or AdamsBashforth3, got {type(solver).__name__}."
        )


def _keeps_derivative(solver) -> bool:
    """Whether the solver's state holds f(z) − z at the new point after a step (first-same-
    as-last tableaux, Adams), so that the steady-state test costs no evaluation."""
    return isinstance(solver, AdamsBashforth3) or bool(solver.tableau.fsal)


def ode_attempt_evaluations(solver, state) -> Int[Array, ""]:
    """Vector-field evaluations of one attempted `SteadyStateODE` step from the ODE
    solver's `state`, the steady-state test included: the new stages of a first-same-as-
    last tableau (6 for Tsit5, 3 for Bosh3), the stages plus one of another tableau (3 for
    Heun), and 3 then 1 for `AdamsBashforth3` (start-up, then Adams steps)."""
    _check_ode_solver(solver)
    if isinstance(solver, AdamsBashforth3):
        return evaluations_per_attempt(state)
    extra = 0 if _keeps_derivative(solver) else 1
    return jnp.array(ode_stage_count(solver) + extra)


def _initial_solver_state(solver, t0, g0):
    """The ODE solver's state at the start from g0 = f(z0) − z0, evaluated once."""
    if isinstance(solver, AdamsBashforth3):
        return solver.state_from_derivative(t0, g0)
    if solver.tableau.fsal:
        return jnp.array(False), g0  # diffrax's (first step?, f0): f0 is already known
    return None


def _derivative(solver, state):
    """f(z) − z at the current point, read from the solver's state (or None)."""
    if isinstance(solver, AdamsBashforth3):
        return state.derivative
    return state[1] if solver.tableau.fsal else None


class _UntilSteady(dfx.AbstractAdaptiveSolver):
    """`solver` on (z, tracker), filling the tracker after each attempted step. Its state
    is (the solver's state, f(z) − z at the current point)."""

    solver: dfx.AbstractAdaptiveSolver
    termination: Termination = eqx.field(static=True)

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):
        return self.solver.interpolation_cls

    def order(self, terms):
        return self.solver.order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args):
        g0 = terms.vf(t0, y0, args)
        return _initial_solver_state(self.solver, t0, g0), g0

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        state, _ = solver_state
        evaluations = ode_attempt_evaluations(self.solver, state)
        y1, y_error, dense_info, state, result = self.solver.step(
            terms, t0, t1, y0, args, state, made_jump
        )
        g1 = _derivative(self.solver, state)
        if g1 is None:
            g1 = terms.vf(t1, y1, args)  # the steady-state test's own evaluation
        z1, old = y1
        residual = _residual(z1, g1[0], self.termination)
        tracker = _Tracker(
            jax.lax.stop_gradient(residual).astype(old.residual.dtype),
            evaluations.astype(old.evaluations.dtype),
        )
        return (z1, tracker), y_error, dense_info, (state, g1), result

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)


def _residual(z, g, termination):
    """The residual of z from g = f(z) − z (see `Termination`)."""
    return scaled_residual(g, jax.tree_util.tree_map(jnp.add, z, g), termination)


def _z_norm(scaled_error) -> Float[Array, ""]:
    """The controller's error norm: diffrax's RMS norm over z alone (not the tracker)."""
    return optx.rms_norm(scaled_error[0])


_MAX_TIGHTENING = 1e4
"""The most that stall tightening divides the step-size controller's tolerances by."""


class _CountingController(dfx.AbstractAdaptiveStepSizeController):
    """`controller`, also summing the evaluations that every attempted step reports in
    its tracker, accepted or rejected (the solver's own state forgets rejected steps), and
    tightening its tolerances where the residual stalls: each accepted step that does not
    lower the residual divides both tolerances by `stall_factor` from then on (down to
    `1 / _MAX_TIGHTENING` of the given ones). Dividing the tolerances is done by scaling
    the error estimate the controller sees, which is the same thing."""

    controller: dfx.PIDController
    stall_factor: float = eqx.field(static=True)

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):
        return self.controller.norm

    def wrap(self, direction):
        return _CountingController(self.controller.wrap(direction), self.stall_factor)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        tnext, state = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        return tnext, (state, jnp.array(0), jnp.ones((), y0[1].residual.dtype))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        state, evaluations, tightening = state
        y_error = jax.tree_util.tree_map(lambda e: e * tightening.astype(e.dtype), y_error)
        keep, *decision, state, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, state
        )
        evaluations = evaluations + y1_candidate[1].evaluations.astype(evaluations.dtype)
        stalled = keep & (y1_candidate[1].residual >= y0[1].residual)
        tightened = jnp.minimum(tightening * self.stall_factor, _MAX_TIGHTENING)
        tightening = jnp.where(stalled, tightened, tightening)
        return (keep, *decision, (state, evaluations, tightening), result)


_STABILITY_LIMITED = (dfx.Tsit5, dfx.Dopri5, dfx.Dopri8, dfx.Heun)


def default_ode_control(solver, rtol: float) -> tuple[float, float, float, float]:
    """`SteadyStateODE`'s default (ode_rtol, ode_atol, pcoeff, icoeff) for `solver` when
    it stops at relative residual `rtol`.

    A steady state needs a stable trajectory, not an accurate one. For Tsit5, Dopri5,
    Dopri8 and Heun the default is loose local error control (`5 * rtol`, `rtol / 2`) with
    Gustafsson's PI controller (0.4, 0.3), which holds steps near the stability limit
    without the reject-and-oscillate cycle of pure integral control. Measured with
    `scripts/bench_steady_state.py` (MNIST-dense cell, batch 128, NFE mean / max) and on
    the trained MNIST-dense Vanilla DEQ (Fashion-MNIST, 2 epochs, test NFE), every sample
    converged in each case: Tsit5 at rtol 1e-4 56.5 / 67 against 70.8 / 79 with integral
    control at (`rtol`, `rtol / 50`); trained, 35.1 against 44.7 at rtol 5e-3 and 85.9
    against 101.0 at 1e-4; Heun 50 / 52 against 88.5 / 94 at 5e-3. Looser still (`20 *
    rtol`, `2 * rtol`) leaves samples oscillating above the rule at 1e-4, and under vmap one
    such sample makes the batch pay the step cap.

    Loose control alone has a failure mode: on a stiff cell the error estimate holds the
    steps at the stability limit of the fast modes, whose residual then settles at a floor
    proportional to the local tolerance and possibly above the stopping rule (every step
    accepted, the residual constant, the solve at `max_steps`). Seen on the MNIST-conv
    cell early in training and on a linear cell with relaxation rates 1 and 10
    (docs/results.md, "the continuous column"; `scripts/bench_steady_state.py --problems
    stiff`; rates 0.5 and 3 stall as well). `SteadyStateODE` therefore divides both
    tolerances by `ode_stall_factor` after each accepted step that does not lower the
    residual, so the loose default serves cold starts and stiff cells alike.

    Bosh3 and `AdamsBashforth3` have smaller stability regions: with the loose PI control
    most samples never converged (0% at rtol 5e-3 for Adams), so they keep integral
    control at (`rtol`, `rtol / 50`).
    """
    if isinstance(solver, _STABILITY_LIMITED):
        return 5 * rtol, rtol / 2, 0.4, 0.3
    return rtol, rtol / 50, 0.0, 1.0


class SteadyStateODE(AbstractSolver):
    """The continuous ("infinite-time neural ODE") DEQ: integrates dz/dt = f(z, x) − z from
    t = 0 towards t = ∞ with an adaptive diffrax solver and stops at steady state, judged
    by the same termination rule as the discrete solvers.

    The steady-state test after each step reads f(z) − z at the new point from the ODE
    solver's state where it is there (first-same-as-last tableaux: Tsit5, Dopri5, Bosh3;
    `AdamsBashforth3`), and evaluates it otherwise (Heun). NFE counts every evaluation: 1
    at the start (f(z0), also the first stage), then per attempted step, rejected ones
    included, its new stages (6 for Tsit5, 3 for Bosh3, 2 + 1 for Heun, 1 for an Adams step
    and 3 for each of its two Bogacki–Shampine start-up steps). f at the returned state is
    the last one evaluated, so the solve returns it at no cost.

    **Arguments:**

    - `rtol`, `atol`, `termination`: the steady-state rule (see `Termination`).
    - `ode_solver`: an explicit Runge–Kutta diffrax solver or `AdamsBashforth3` (default
      `Tsit5`).
    - `ode_rtol`, `ode_atol`, `ode_pcoeff`, `ode_icoeff`: the step-size controller's local
      error tolerances and proportional / integral coefficients; None takes the default
      for `ode_solver` (`default_ode_control`).
    - `ode_stall_factor`: after each accepted step that does not lower the residual, both
      tolerances are divided by this from then on (at most 1e4 in all), which lifts a
      stiff solve off its stalled residual (`default_ode_control`); 1 turns it off. Static,
      so it is not a checkpoint leaf: checkpoints written before it existed still load.
    """

    rtol: float = 1e-3
    atol: float = 1e-6
    termination: Termination = "rel"
    ode_solver: dfx.AbstractAdaptiveSolver = eqx.field(default_factory=dfx.Tsit5)
    ode_rtol: float | None = None
    ode_atol: float | None = None
    ode_pcoeff: float | None = None
    ode_icoeff: float | None = None
    ode_stall_factor: float = eqx.field(default=10.0, static=True)

    def __check_init__(self):
        _check_ode_solver(self.ode_solver)
        if not self.ode_stall_factor >= 1:
            raise ValueError(
                f"SteadyStateODE: ode_stall_factor must be >= 1 (1 turns the tightening "
                f"off), got {self.ode_stall_factor!r}."
            )

    def ode_control(self) -> tuple[float, float, float, float]:
        """(ode_rtol, ode_atol, pcoeff, icoeff) in effect: those given, else the defaults
        for `ode_solver`."""
        default = default_ode_control(self.ode_solver, self.rtol)
        given = (self.ode_rtol, self.ode_atol, self.ode_pcoeff, self.ode_icoeff)
        return tuple(d if g is None else g for g, d in zip(given, default))

    def solve(self, fn, z0, args, *, max_steps, differentiable):
        def at_steady_state(t, y, fn_and_args, **kwargs):
            return self.converged(y[1].residual)

        ode_rtol, ode_atol, pcoeff, icoeff = self.ode_control()
        pid = dfx.PIDController(
            rtol=ode_rtol, atol=ode_atol, pcoeff=pcoeff, icoeff=icoeff, norm=_z_norm
        )
        term = dfx.ODETerm(_Relaxation())
        dtype = residual_dtype(z0)
        zero = jnp.zeros((), dtype)
        fn_and_args = (fn, args)
        g0 = term.vf(0.0, (z0, _Tracker(zero, zero)), fn_and_args)  # the first evaluation
        residual0 = jax.lax.stop_gradient(_residual(z0, g0[0], self.termination))
        y0 = (z0, _Tracker(residual0.astype(dtype), zero))
        t0 = jnp.zeros((), jnp.result_type(float))  # diffrax's time dtype
        sol = dfx.diffeqsolve(
            term,
            _UntilSteady(self.ode_solver, self.termination),
            t0=0.0,
            t1=jnp.inf,
            dt0=1.0,
            y0=y0,
            args=fn_and_args,
            stepsize_controller=_CountingController(pid, self.ode_stall_factor),
            event=dfx.Event(at_steady_state),
            saveat=dfx.SaveAt(t1=True, solver_state=True, controller_state=True),
            max_steps=max_steps,
            adjoint=dfx.RecursiveCheckpointAdjoint(),
            throw=False,
            solver_state=(_initial_solver_state(self.ode_solver, t0, g0), g0),
        )
        z_end = jax.tree_util.tree_map(lambda leaf: leaf[-1], sol.ys[0])
        g_end = sol.solver_state[1][0]
        fz = jax.tree_util.tree_map(jnp.add, z_end, g_end)
        residual = residual_norm(fz, z_end, self.termination).astype(dtype)
        steps = sol.stats["num_steps"]
        nfe = 1 + sol.controller_state[1]
        _, failure = verdict(self, residual, jnp.asarray(jnp.inf, residual.dtype), True)
        # A non-finite state is reported as such, whatever stopped the integration (with
        # NaNs diffrax rejects every step until it runs out of steps).
        result = RESULTS.where(
            ~jnp.isfinite(residual),
            RESULTS.nonfinite,
            RESULTS.where(
                sol.result == dfx.RESULTS.event_occurred,
                failure,
                RESULTS.where(
                    sol.result == dfx.RESULTS.max_steps_reached,
                    RESULTS.nonlinear_max_steps_reached,
                    RESULTS.nonlinear_divergence,
                ),
            ),
        )
        return Solution(fz, result, steps, nfe, residual)
