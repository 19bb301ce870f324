"""Test-wide JAX configuration.

- Strict dtype promotion: no implicit float32/float64 (or int/float) mixing anywhere in the
  library, so a float32 model never silently runs in float64 and vice versa.
- Rank promotion raises: no accidental broadcasting between arrays of different rank.

float64 is enabled per test (see `helpers.enable_x64`), never globally, so the default
float32 path is what most tests exercise.
"""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
