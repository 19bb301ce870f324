"""The stopping rules both libraries are configured with, and how torchdeq's solver names
map onto imex-deq's (`imex_deq.experiments.SOLVERS`)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DEQConfig:
    """One stopping rule for both sides: stop when the relative (or absolute) residual
    ||f(z) - z|| [/ ||f(z)||] <= tol, at most `max_iter` f evaluations; the same rule and
    solver for the adjoint (IFT) linear system."""

    solver: str  # torchdeq name: "fixed_point_iter" | "anderson" | "broyden"
    f_tol: float = 5e-3
    f_max_iter: int = 50
    b_tol: float = 5e-3
    b_max_iter: int = 50
    stop_mode: str = "rel"


@dataclasses.dataclass(frozen=True)
class ODEConfig:
    rtol: float = 1e-3
    atol: float = 1e-3
    t1: float = 1.0


TORCHDEQ_SOLVERS = {"fixed_point_iter": "fixed-point", "anderson": "anderson", "broyden": "broyden"}
"""torchdeq's solver names, each with the name of imex-deq's matching solver."""
ANDERSON_HISTORY = 6  # torchdeq's anderson_solver default m=6
