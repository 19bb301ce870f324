"""The paper's experiments: models, training loop, timing, tables, plots and the CLI."""

from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import load_checkpoint as load_checkpoint
from ._checkpoint import save_checkpoint as save_checkpoint
from ._config import TrainConfig as TrainConfig
from ._models import Classifier as Classifier
from ._models import DenseDEQCell as DenseDEQCell
from ._models import build_conv_model as build_conv_model
from ._models import build_dense_model as build_dense_model
from ._presets import cifar_large as cifar_large
from ._presets import cifar_small as cifar_small
from ._presets import imagenet_small as imagenet_small
from ._presets import mnist_conv as mnist_conv
from ._registry import ADJOINTS as ADJOINTS
from ._registry import SOLVERS as SOLVERS
from ._registry import VARIANTS as VARIANTS
from ._registry import make_adjoint as make_adjoint
from ._registry import make_solver as make_solver
from ._reproduce import reproduce as reproduce
from ._training import NonFiniteError as NonFiniteError
from ._training import Trainer as Trainer
from ._training import evaluate as evaluate
from ._training import load_trained as load_trained
from ._training import make_optimizer as make_optimizer
from ._training import make_trainer as make_trainer
from ._training import train as train
from ._training import with_model_precision as with_model_precision
