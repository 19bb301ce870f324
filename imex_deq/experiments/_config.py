"""Validated configuration of one training run."""

import dataclasses
import math

from .._regularisers import JACOBIAN_NORMS
from ._registry import ADJOINTS, BASELINES, ODE_SOLVERS, SOLVERS, VARIANTS

ARCHITECTURES = ("dense", "conv", "cifar-small", "cifar-large")
"""`conv` is the paper's MNIST-conv model (`mnist_conv`); the CIFAR ones are its CIFAR-10
models (`cifar_small`, `cifar_large`)."""
PRECISIONS = ("float32", "bfloat16")
LR_SCHEDULES = ("constant", "cosine")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


def _check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {bound}, got {value}.")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {bound}, got {value}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run; invalid values raise `ValueError` naming
    the option. Defaults follow the paper's MNIST-dense setup, except where a measurement
    chose better: λ_skip = 1 (the paper's 0.01 leaves Skip Reg. DEQ at 34.8 test NFE on
    Fashion-MNIST, 1 brings it to 3.0 at the same accuracy: README "Results") and the
    `gmres-early` backward (`EarlyExitGMRES`: docs/performance.md).

    `data_parallel` splits each batch over all devices (parameters replicated; see
    `experiments._parallel`); `distributed` first joins a multi-host run
    (`jax.distributed.initialize`) and implies `data_parallel`. `precision="bfloat16"`
    evaluates the DEQ's f in bfloat16 with float32 parameters and state (`MixedPrecision`).
    `lr_schedule="cosine"` anneals Adam's step size from `learning_rate` to 0 over the run's
    `epochs` (the paper's conv runs); `"constant"` keeps it.
    `jac_on_demand=s` applies the Jacobian term only to steps where fewer than the share `s`
    of the batch's solves converged (with `jac_prob`, to a random fraction of those).
    `jac_norm` picks the Jacobian term: `"frobenius"` (Bai et al.'s ‖∂f/∂z‖_F² / d) or
    `"spectral"` (the squared spectral radius by power iteration, `spectral_regularisation`).
    `ode_rtol` / `ode_atol` set the continuous DEQ's step-size control (None:
    `SteadyStateODE`'s defaults, which it tightens by itself where a solve stalls,
    docs/results.md "the continuous column").
    """

    model: str = "skip-reg"
    solver: str = "continuous"
    ode_solver: str = "tsit5"
    ode_rtol: float | None = None
    ode_atol: float | None = None
    dataset: str = "digits"
    architecture: str = "dense"
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    seed: int = 0
    skip_weight: float = 1.0
    jac_weight: float = 0.0
    jac_prob: float = 1.0
    jac_on_demand: float | None = None
    jac_norm: str = "frobenius"
    augment: bool = False
    pretrain_steps: int = 0
    pretrain_depth: int = 5
    rtol: float = 5e-3
    max_steps: int = 50
    backward: str = "gmres-early"
    limit_train: int | None = None
    limit_test: int | None = None
    evals_per_epoch: int = 1
    timing_batches: int = 5
    out_dir: str | None = None
    checkpoint_every: int = 200
    resume: bool = False
    progress: bool = True
    stop_after_steps: int | None = None
    data_parallel: bool = False
    distributed: bool = False
    precision: str = "float32"

    def __post_init__(self):
        _check_choice("model", self.model, tuple(VARIANTS))
        _check_choice("solver", self.solver, tuple(SOLVERS))
        _check_choice("ode_solver", self.ode_solver, tuple(ODE_SOLVERS))
        if self.ode_solver != "tsit5" and self.solver != "continuous":
            raise ValueError(
                f"ode_solver {self.ode_solver!r} applies to solver 'continuous' only; got "
                f"solver {self.solver!r}."
            )
        for name in ("ode_rtol", "ode_atol"):
            if getattr(self, name) is None:
                continue
            _check_positive(name, getattr(self, name))
            if self.solver != "continuous":
                raise ValueError(
                    f"{name} applies to solver 'continuous' only; got solver {self.solver!r}."
                )
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        _check_choice("backward", self.backward, tuple(ADJOINTS))
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for name in ("epochs", "batch_size", "learning_rate", "rtol", "max_steps"):
            _check_positive(name, getattr(self, name))
        for name in ("skip_weight", "jac_weight", "pretrain_steps", "timing_batches", "seed"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        for name in ("pretrain_depth", "evals_per_epoch", "checkpoint_every"):
            _check_positive(name, getattr(self, name))
        if not 0.0 < self.jac_prob <= 1.0:
            raise ValueError(f"jac_prob must lie in (0, 1], got {self.jac_prob}.")
        if self.jac_on_demand is not None:
            if not 0.0 < self.jac_on_demand <= 1.0:
                raise ValueError(f"jac_on_demand must lie in (0, 1], got {self.jac_on_demand}.")
            if not self.jac_weight:
                raise ValueError("jac_on_demand needs jac_weight > 0 (the term it switches on).")
        if self.jac_norm not in JACOBIAN_NORMS:
            raise ValueError(
                f"jac_norm must be one of {sorted(JACOBIAN_NORMS)}, got {self.jac_norm!r}."
            )
        if self.model in BASELINES and (self.jac_weight or self.pretrain_steps):
            raise ValueError(
                f"the {self.model} baseline has no fixed point: jac_weight and pretrain_steps "
                "must be 0."
            )
        needs = ADJOINTS[self.backward].forward_solvers
        if needs is not None and self.model not in BASELINES and self.solver not in needs:
            raise ValueError(
                f"backward {self.backward!r} needs the forward solver to be one of "
                f"{', '.join(needs)}; got solver {self.solver!r}."
            )
        if self.resume and self.out_dir is None:
            raise ValueError("resume needs out_dir (where the checkpoint is).")

    @property
    def jac_variant_tag(self) -> str:
        """How the Jacobian term departs from Bai et al.'s on every step, e.g.
        `-ondemand0.9-spectral`; empty for the plain term. Names runs and reports."""
        on_demand = "" if self.jac_on_demand is None else f"-ondemand{self.jac_on_demand:g}"
        return on_demand + ("" if self.jac_norm == "frobenius" else f"-{self.jac_norm}")

    @property
    def name(self) -> str:
        """A short run name, e.g. `skip-reg-continuous-jac-s0`."""
        jac = "-jac" + self.jac_variant_tag if self.jac_weight else ""
        solver = "" if self.model in BASELINES else f"-{self.solver}"
        if self.ode_solver != "tsit5" and self.model not in BASELINES:
            solver += f"-{self.ode_solver}"
        return f"{self.model}{solver}{jac}-s{self.seed}"
