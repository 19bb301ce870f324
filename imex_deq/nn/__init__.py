"""Equinox building blocks for (multiscale, Skip) deep equilibrium models.

All modules work on ONE sample with channels-first `(C, H, W)` arrays; batch with
`jax.vmap`.
"""

from ._blocks import (
    ConvNorm as ConvNorm,
    default_groups as default_groups,
    ResidualBlock as ResidualBlock,
)
from ._dropout import apply_mask as apply_mask, VariationalDropout as VariationalDropout
from ._multiscale import (
    branch_shapes as branch_shapes,
    build_multiscale_model as build_multiscale_model,
    cifar_large as cifar_large,
    cifar_small as cifar_small,
    ClassificationHead as ClassificationHead,
    count_parameters as count_parameters,
    Downsample as Downsample,
    imagenet_small as imagenet_small,
    mnist_conv as mnist_conv,
    MultiscaleConfig as MultiscaleConfig,
    MultiscaleDEQCell as MultiscaleDEQCell,
    MultiscaleModel as MultiscaleModel,
    MultiscaleSkipPredictor as MultiscaleSkipPredictor,
    Stem as Stem,
    Upsample as Upsample,
)
from ._weight_norm import weight_norm as weight_norm, WeightNorm as WeightNorm
