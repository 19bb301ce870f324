"""Weight normalisation (Salimans & Kingma 2016) for convolutional layers.

Equinox (>= 0.11.4) ships [`equinox.nn.WeightNorm`][], which stores the
direction `v` (the wrapped layer's `weight`) and the magnitude `g`, and
computes `w = g * v / ||v||` with the norm taken over every axis except the
output-channel axis. We re-export it instead of writing our own.
"""

from typing import TypeVar

import equinox as eqx

_Layer = TypeVar("_Layer", bound=eqx.Module)

WeightNorm = eqx.nn.WeightNorm


def weight_norm(layer: _Layer) -> "eqx.nn.WeightNorm[_Layer]":
    """Wrap `layer` so that its `weight` is weight-normalised per output channel.

    **Arguments:**

    - `layer`: a layer with a `weight` array whose first axis is the output
        channel, e.g. [`equinox.nn.Conv2d`][] or [`equinox.nn.Linear`][].

    **Returns:**

    An [`equinox.nn.WeightNorm`][] wrapping `layer`; call it like `layer`.
    At initialisation it computes the same function as `layer`.
    """
    return eqx.nn.WeightNorm(layer, weight_name="weight", axis=0)
