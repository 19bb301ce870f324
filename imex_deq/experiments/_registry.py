"""The names of forward solvers, backward strategies and model variants: one table each,
read by the CLI, `TrainConfig`'s validation, the training loop and the benchmark scripts."""

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import diffrax as dfx

from .._adjoint import (
    AbstractAdjoint,
    ImplicitAdjoint,
    PhantomAdjoint,
    UnrolledAdjoint,
    restarted_gmres,
)
from .._deq import DEQ, AbstractDEQ, SkipDEQ, SkipRegDEQ
from .._neural_ode import NeuralODE
from .._shine import ShineAdjoint
from .._solvers import (
    AbstractSolver,
    AdamsBashforth3,
    Anderson,
    Broyden,
    FixedPointIteration,
    NewtonKrylov,
    PseudoTransient,
    SteadyStateODE,
)

_Entry = TypeVar("_Entry")


def _lookup(table: Mapping[str, _Entry], kind: str, name: str) -> _Entry:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(table)}.")
    return table[name]


# ------------------------------------------------------------------------ forward solvers

SOLVERS: Mapping[str, type[AbstractSolver]] = MappingProxyType(
    {
        "continuous": SteadyStateODE,
        "anderson": Anderson,
        "broyden": Broyden,
        "fixed-point": FixedPointIteration,
        "newton-krylov": NewtonKrylov,
        "pseudo-transient": PseudoTransient,
    }
)
"""Forward solver classes by name (`--solver`, `TrainConfig.solver`); "continuous" is the
continuous DEQ's steady-state ODE solve."""

ODE_SOLVERS: Mapping[str, Callable[[], dfx.AbstractAdaptiveSolver]] = MappingProxyType(
    {
        "tsit5": dfx.Tsit5,
        "bosh3": dfx.Bosh3,
        "heun": dfx.Heun,
        "adams3": AdamsBashforth3,
    }
)
"""The continuous DEQ's ODE solvers by name (`SteadyStateODE(ode_solver=ODE_SOLVERS[name]())`)."""


def make_solver(
    name: str,
    rtol: float,
    ode_solver: str = "tsit5",
    ode_rtol: float | None = None,
    ode_atol: float | None = None,
) -> AbstractSolver:
    """The forward solver `SOLVERS[name]`, stopping at relative residual `rtol`
    (`termination="rel"`); for "continuous", integrating with `ODE_SOLVERS[ode_solver]`
    under step-size control `ode_rtol`, `ode_atol` (None: `SteadyStateODE`'s defaults).
    An unknown name is a `ValueError` listing the choices."""
    solver_class = _lookup(SOLVERS, "solver", name)
    make_ode_solver = _lookup(ODE_SOLVERS, "ODE solver", ode_solver)
    if solver_class is SteadyStateODE:
        return SteadyStateODE(
            rtol=rtol,
            termination="rel",
            ode_solver=make_ode_solver(),
            ode_rtol=ode_rtol,
            ode_atol=ode_atol,
        )
    return solver_class(rtol=rtol, termination="rel")


# --------------------------------------------------------------------- backward strategies


@dataclasses.dataclass(frozen=True)
class Backward:
    """One backward strategy: `build(rtol)` returns the adjoint, `rtol` being the
    tolerance of an iterative linear solve where it has one; `label` names it in tables;
    `implicit` says whether it is an implicit (IFT) adjoint."""

    build: Callable[[float], AbstractAdjoint]
    label: str
    implicit: bool
    forward_solvers: tuple[str, ...] | None = None
    """The forward solvers it works with (None: all)."""


ADJOINTS: Mapping[str, Backward] = MappingProxyType(
    {
        "gmres": Backward(lambda rtol: ImplicitAdjoint(restarted_gmres()), "Implicit(GMRES)", True),
        "gmres-early": Backward(lambda rtol: ImplicitAdjoint(), "Implicit(EarlyExitGMRES)", True),
        "anderson": Backward(
            lambda rtol: ImplicitAdjoint(linear_solver=Anderson(rtol=rtol)),
            "Implicit(Anderson)",
            True,
        ),
        "fixed-point": Backward(
            lambda rtol: ImplicitAdjoint(linear_solver=FixedPointIteration(rtol=rtol)),
            "Implicit(FixedPoint)",
            True,
        ),
        "shine": Backward(lambda rtol: ShineAdjoint(), "SHINE", False, ("anderson", "broyden")),
        "shine-refine": Backward(
            lambda rtol: ShineAdjoint(refine_steps=2), "SHINE+2", False, ("anderson", "broyden")
        ),
        "phantom": Backward(lambda rtol: PhantomAdjoint(steps=5, damp=0.5), "Phantom(5)", False),
        "jfb": Backward(lambda rtol: PhantomAdjoint(steps=1), "JFB (Phantom(1))", False),
        "unrolled": Backward(lambda rtol: UnrolledAdjoint(), "Unrolled", False),
    }
)
"""Backward strategies by name (`--backward`, `TrainConfig.backward`): the implicit adjoint
with lineax's restarted GMRES (`restarted_gmres()`), with `EarlyExitGMRES` (the library's
and training's default, stopping at relative residual 1e-3),
Anderson or fixed-point iteration for the linear system; SHINE (the forward Broyden or
Anderson inverse-Jacobian estimate, alone or with two refinement steps); five damped
phantom steps; Jacobian-free backprop (one undamped phantom step); plain backpropagation
through the solver."""


def make_adjoint(name: str, rtol: float) -> AbstractAdjoint:
    """The backward strategy `ADJOINTS[name]`; `rtol` is the tolerance of its iterative
    linear solve (Anderson, fixed point). An unknown name is a `ValueError`."""
    return _lookup(ADJOINTS, "backward strategy", name).build(rtol)


# -------------------------------------------------------------------------- model variants


@dataclasses.dataclass(frozen=True)
class ModelVariant:
    """One model variant: `layer(f, predictor, solver, *, adjoint, max_steps, state_shape)`
    wraps the cell `f` (and, where `predictor` is true, the explicit predictor g_φ) into the
    layer; `fixed_point` is false for the baselines (no solver, no Jacobian
    regularisation, no pretraining)."""

    layer: Callable[..., AbstractDEQ | NeuralODE]
    fixed_point: bool = True
    predictor: bool = False


def _vanilla(f, predictor, solver, **options) -> AbstractDEQ:
    return DEQ(f, solver, **options)


def _skip(f, predictor, solver, **options) -> AbstractDEQ:
    return SkipDEQ(f, predictor, solver, **options)


def _skip_reg(f, predictor, solver, **options) -> AbstractDEQ:
    return SkipRegDEQ(f, solver, **options)


def _neural_ode(f, predictor, solver, *, state_shape, **options) -> NeuralODE:
    return NeuralODE(f, rtol=solver.rtol, atol=solver.rtol, state_shape=state_shape)


def _explicit(f, predictor, solver, **options) -> AbstractDEQ:
    # The one-pass network z = f(0, x) every DEQ is measured against.
    return DEQ(f, solver, **options, fixed_depth=1)


VARIANTS: Mapping[str, ModelVariant] = MappingProxyType(
    {
        "vanilla": ModelVariant(_vanilla),
        "skip": ModelVariant(_skip, predictor=True),
        "skip-reg": ModelVariant(_skip_reg),
        "neural-ode": ModelVariant(_neural_ode, fixed_point=False),
        "explicit": ModelVariant(_explicit, fixed_point=False),
    }
)
"""Model variants by name (`--model`, `TrainConfig.model`): the Vanilla, Skip and Skip Reg.
DEQs, then the baselines: the neural ODE (the same f over t ∈ [0, 1] at the solver's
tolerance) and the explicit one-pass network f(0, x)."""

DEQ_VARIANTS = tuple(name for name, variant in VARIANTS.items() if variant.fixed_point)
BASELINES = tuple(name for name, variant in VARIANTS.items() if not variant.fixed_point)


def make_layer(
    variant: str,
    f: Callable,
    predictor: Callable | None,
    solver: AbstractSolver,
    *,
    adjoint: AbstractAdjoint,
    max_steps: int,
    state_shape: Any,
) -> AbstractDEQ | NeuralODE:
    """The layer of model variant `VARIANTS[variant]` around `f`."""
    spec = _lookup(VARIANTS, "model variant", variant)
    return spec.layer(
        f, predictor, solver, adjoint=adjoint, max_steps=max_steps, state_shape=state_shape
    )
