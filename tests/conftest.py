"""Test-wide JAX configuration.

- Strict dtype promotion: no implicit float32/float64 (or int/float) mixing anywhere in the
  library, so a float32 model never silently runs in float64 and vice versa.
- Rank promotion raises: no accidental broadcasting between arrays of different rank.
- XLA's CPU backend optimisation level 0: the suite is dominated by compiling many tiny
  programs, and LLVM optimisation buys nothing at this size (set XLA_FLAGS yourself to
  override).

float64 is enabled per test (see `helpers.enable_x64`), never globally, so the default
float32 path is what most tests exercise.
"""

import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # Before any computation initialises the backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
