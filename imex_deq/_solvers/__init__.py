from ._anderson import Anderson as Anderson
from ._base import AbstractIterativeSolver as AbstractIterativeSolver
from ._base import AbstractSolver as AbstractSolver
from ._broyden import Broyden as Broyden
from ._fixed_point_iteration import FixedPointIteration as FixedPointIteration
from ._newton_krylov import NewtonKrylov as NewtonKrylov
from ._steady_state_ode import SteadyStateODE as SteadyStateODE
