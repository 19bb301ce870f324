"""Equinox building blocks for (multiscale, Skip) deep equilibrium models.

All modules work on ONE sample with channels-last `(H, W, C)` arrays; batch with
`jax.vmap`.
"""

from ._blocks import Conv2d as Conv2d
from ._blocks import ConvNorm as ConvNorm
from ._blocks import GroupNorm as GroupNorm
from ._blocks import ResidualBlock as ResidualBlock
from ._blocks import default_groups as default_groups
from ._dropout import VariationalDropout as VariationalDropout
from ._dropout import apply_mask as apply_mask
from ._multiscale import ClassificationHead as ClassificationHead
from ._multiscale import Downsample as Downsample
from ._multiscale import MultiscaleConfig as MultiscaleConfig
from ._multiscale import MultiscaleDEQCell as MultiscaleDEQCell
from ._multiscale import MultiscaleModel as MultiscaleModel
from ._multiscale import MultiscaleSkipPredictor as MultiscaleSkipPredictor
from ._multiscale import Stem as Stem
from ._multiscale import Upsample as Upsample
from ._multiscale import branch_shapes as branch_shapes
from ._multiscale import build_multiscale_model as build_multiscale_model
from ._multiscale import count_parameters as count_parameters
from ._weight_norm import WeightNorm as WeightNorm
from ._weight_norm import weight_norm as weight_norm
