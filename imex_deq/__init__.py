"""imex-deq: implicit-explicit deep equilibrium models (Skip DEQs, continuous DEQs) in JAX."""

from ._adjoint import AbstractAdjoint as AbstractAdjoint
from ._adjoint import AbstractEquilibriumAdjoint as AbstractEquilibriumAdjoint
from ._adjoint import ImplicitAdjoint as ImplicitAdjoint
from ._adjoint import PhantomAdjoint as PhantomAdjoint
from ._adjoint import UnrolledAdjoint as UnrolledAdjoint
from ._deq import DEQ as DEQ
from ._deq import AbstractDEQ as AbstractDEQ
from ._deq import DEQInfo as DEQInfo
from ._deq import SkipDEQ as SkipDEQ
from ._deq import SkipRegDEQ as SkipRegDEQ
from ._deq import with_fixed_depth as with_fixed_depth
from ._early_exit_gmres import EarlyExitGMRES as EarlyExitGMRES
from ._fixed_point import fixed_point as fixed_point
from ._linear_solve import FixedPointLinearSolver as FixedPointLinearSolver
from ._neural_ode import NeuralODE as NeuralODE
from ._precision import MixedPrecision as MixedPrecision
from ._regularisers import jacobian_regularisation as jacobian_regularisation
from ._regularisers import skip_loss as skip_loss
from ._regularisers import spectral_regularisation as spectral_regularisation
from ._residual_trace import residual_trace as residual_trace
from ._shine import ShineAdjoint as ShineAdjoint
from ._solution import RESULTS as RESULTS
from ._solution import Solution as Solution
from ._solution import residual_norm as residual_norm
from ._solvers import AbstractFixedPointSolver as AbstractFixedPointSolver
from ._solvers import AbstractRootFinder as AbstractRootFinder
from ._solvers import AbstractSolver as AbstractSolver
from ._solvers import AdamsBashforth3 as AdamsBashforth3
from ._solvers import Anderson as Anderson
from ._solvers import Broyden as Broyden
from ._solvers import FixedDepth as FixedDepth
from ._solvers import FixedPointIteration as FixedPointIteration
from ._solvers import NewtonKrylov as NewtonKrylov
from ._solvers import Progress as Progress
from ._solvers import PseudoTransient as PseudoTransient
from ._solvers import SteadyStateODE as SteadyStateODE
from ._solvers import default_ode_control as default_ode_control
from ._solvers import linear_solve_matvecs as linear_solve_matvecs

__version__ = "0.1.0"
