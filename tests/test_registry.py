"""The one table of names: every solver, backward strategy and model variant builds, an
unknown name is a ValueError listing the choices, and the CLI and `TrainConfig` offer
exactly the table's names."""

import jax
import jax.numpy as jnp
import pytest

import imex_deq
from imex_deq.experiments import (
    ADJOINTS,
    ODE_SOLVERS,
    SOLVERS,
    VARIANTS,
    DenseDEQCell,
    TrainConfig,
    make_adjoint,
    make_solver,
)
from imex_deq.experiments._registry import BASELINES, DEQ_VARIANTS, make_layer
from imex_deq.experiments.cli import parser


@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_solver_builds_with_the_relative_stopping_rule(name):
    solver = make_solver(name, 1e-3)
    assert isinstance(solver, SOLVERS[name])
    assert isinstance(solver, imex_deq.AbstractSolver)
    assert solver.rtol == 1e-3 and solver.termination == "rel"


@pytest.mark.parametrize("name", list(ADJOINTS))
def test_every_backward_strategy_builds(name):
    adjoint = make_adjoint(name, 1e-4)
    assert isinstance(adjoint, imex_deq.AbstractAdjoint)
    assert isinstance(adjoint, imex_deq.ImplicitAdjoint) == ADJOINTS[name].implicit
    if name in ("anderson", "fixed-point"):  # rtol reaches the iterative linear solve
        assert adjoint.linear_solver.solver.rtol == 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_builds_its_layer(name):
    f = DenseDEQCell(4, key=jax.random.PRNGKey(0))
    predictor = f.w_x if VARIANTS[name].predictor else None
    layer = make_layer(
        name,
        f,
        predictor,
        make_solver("fixed-point", 1e-3),
        adjoint=make_adjoint("gmres", 1e-3),
        max_steps=5,
        state_shape=jax.ShapeDtypeStruct((4,), jnp.float32),
    )
    expected = imex_deq.NeuralODE if name == "neural-ode" else imex_deq.AbstractDEQ
    assert isinstance(layer, expected)
    assert (name in BASELINES) != (name in DEQ_VARIANTS)


def test_variant_groups():
    assert DEQ_VARIANTS == ("vanilla", "skip", "skip-reg")
    assert BASELINES == ("neural-ode", "explicit")
    assert [n for n, v in VARIANTS.items() if v.predictor] == ["skip"]


@pytest.mark.parametrize(
    ("build", "kind"),
    [
        (lambda: make_solver("newton", 1e-3), "solver"),
        (lambda: make_adjoint("adjoint-ode", 1e-3), "backward strategy"),
        (
            lambda: make_layer(
                "resnet", None, None, None, adjoint=None, max_steps=1, state_shape=None
            ),
            "model variant",
        ),
    ],
)
def test_unknown_name_lists_the_choices(build, kind):
    with pytest.raises(ValueError, match=f"unknown {kind} '") as info:
        build()
    table = {"solver": SOLVERS, "backward strategy": ADJOINTS, "model variant": VARIANTS}[kind]
    assert all(name in str(info.value) for name in table)


def test_tables_are_read_only():
    with pytest.raises(TypeError):
        SOLVERS["mine"] = imex_deq.Anderson  # type: ignore[index]


def test_cli_and_config_offer_the_table():
    train = parser()._subparsers._group_actions[0].choices["train"]
    choices = {action.dest: action.choices for action in train._actions if action.choices}
    assert tuple(choices["solver"]) == tuple(SOLVERS)
    assert tuple(choices["backward"]) == tuple(ADJOINTS)
    assert tuple(choices["model"]) == tuple(VARIANTS)
    for field, table in (("solver", SOLVERS), ("backward", ADJOINTS), ("model", VARIANTS)):
        for name in table:
            TrainConfig(**{field: name, **({"solver": "anderson"} if field == "backward" else {})})
        with pytest.raises(ValueError, match=f"{field} must be one of"):
            TrainConfig(**{field: "no-such-name"})


def test_shine_backward_needs_a_quasi_newton_forward_solver():
    from imex_deq.experiments import TrainConfig

    assert TrainConfig(solver="broyden", backward="shine").backward == "shine"
    with pytest.raises(ValueError, match="backward 'shine' needs the forward solver.*'continuous'"):
        TrainConfig(solver="continuous", backward="shine")


@pytest.mark.parametrize("name", list(ODE_SOLVERS))
def test_continuous_solver_integrates_with_the_chosen_ode_solver(name):
    solver = make_solver("continuous", 1e-3, ode_solver=name)
    assert isinstance(solver, imex_deq.SteadyStateODE)
    assert type(solver.ode_solver) is type(ODE_SOLVERS[name]())
    config = TrainConfig(solver="continuous", ode_solver=name)
    suffix = "" if name == "tsit5" else f"-{name}"
    assert config.name == f"skip-reg-continuous{suffix}-s0"  # runs with other ODE solvers
    train = parser()._subparsers._group_actions[0].choices["train"]
    choices = {action.dest: action.choices for action in train._actions if action.choices}
    assert tuple(choices["ode_solver"]) == tuple(ODE_SOLVERS)


def test_ode_solver_needs_the_continuous_solver_and_a_known_name():
    with pytest.raises(ValueError, match="ode_solver must be one of tsit5, bosh3"):
        TrainConfig(ode_solver="rk4")
    with pytest.raises(ValueError, match="ode_solver 'adams3' applies to solver 'continuous'"):
        TrainConfig(solver="anderson", ode_solver="adams3")
    with pytest.raises(ValueError, match="unknown ODE solver 'rk4'"):
        make_solver("continuous", 1e-3, ode_solver="rk4")


def test_ode_step_size_control_reaches_the_continuous_solver():
    solver = make_solver("continuous", 1e-2, ode_rtol=1e-3, ode_atol=1e-5)
    assert solver.ode_control()[:2] == (1e-3, 1e-5)
    default = make_solver("continuous", 1e-2)
    assert default.ode_control()[:2] == (5e-2, 5e-3)  # Tsit5's loose default
    config = TrainConfig(solver="continuous", ode_rtol=1e-3, ode_atol=1e-5)
    assert config.name == "skip-reg-continuous-s0"
    args = parser().parse_args(["train", "--ode-rtol", "1e-3", "--ode-atol", "1e-5"])
    assert (args.ode_rtol, args.ode_atol) == (1e-3, 1e-5)


def test_ode_step_size_control_needs_the_continuous_solver_and_a_positive_value():
    with pytest.raises(ValueError, match="ode_rtol applies to solver 'continuous' only"):
        TrainConfig(solver="anderson", ode_rtol=1e-3)
    with pytest.raises(ValueError, match="ode_atol must be > 0, got -1"):
        TrainConfig(solver="continuous", ode_atol=-1.0)
