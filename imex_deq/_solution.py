"""The result of a fixed-point solve, and the rule that decides convergence."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int

from ._custom_types import State, Termination

RESULTS = optx.RESULTS
"""Result codes (optimistix's): `successful`, `nonlinear_max_steps_reached`,
`nonlinear_divergence`, `nonfinite`. Compare inside jit with `sol.result == RESULTS.successful`."""


class Solution(eqx.Module):
    """What a forward solve returns.

    **Fields:**

    - `value`: the equilibrium z*: f applied once more to the returned iterate. That
      iterate is the last one, except that `Anderson` and `Broyden` return their
      lowest-residual iterate when they stop without converging.
    - `result`: a `RESULTS` code.
    - `num_steps`: solver iterations taken.
    - `nfe`: evaluations of f (a Jacobian-vector product or an ODE stage counts as one).
    - `residual`: ‖f(z) − z‖ of the returned iterate z, relative to ‖f(z)‖ when the
      solver's termination is `"rel"`.
    - `stats`: solver-specific extras, e.g. `best_step` (the step whose iterate was
      returned) and, for `Anderson`, `restarts`.
    """

    value: State
    result: RESULTS
    num_steps: Int[Array, ""]
    nfe: Int[Array, ""]
    residual: Float[Array, ""]
    stats: dict[str, Any] = eqx.field(default_factory=dict)


def at_least_float32(dtype) -> jnp.dtype:
    """`dtype` if it has at least 32 bits, else float32. Unlike `jnp.promote_types`, this
    also works under `jax_numpy_dtype_promotion="strict"` (where float64 and float32 have
    no implicit promotion)."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def residual_dtype(z: State):
    """float32, or wider when the state is wider: residuals never run in bfloat16."""
    return jnp.result_type(*(at_least_float32(leaf.dtype) for leaf in jax.tree_util.tree_leaves(z)))


def tree_norm(tree: State) -> Float[Array, ""]:
    """Euclidean norm of a PyTree of arrays, as one flat vector."""
    leaves = [leaf.astype(at_least_float32(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(tree)]
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves))


def scaled_residual(difference: State, image: State, termination: Termination) -> Float[Array, ""]:
    """‖difference‖, divided by ‖image‖ (floored at a tiny number) when `termination="rel"`.
    For a fixed point, `difference = f(z) − z` and `image = f(z)`."""
    diff = tree_norm(difference)
    if termination == "abs":
        return diff
    return diff / jnp.maximum(tree_norm(image), 1e-30)


def residual_norm(fz: State, z: State, termination: Termination) -> Float[Array, ""]:
    """‖f(z) − z‖, divided by ‖f(z)‖ (floored at a tiny number) when `termination="rel"`."""
    return scaled_residual(jax.tree_util.tree_map(lambda a, b: a - b, fz, z), fz, termination)


def is_converged(
    residual: Float[Array, ""], termination: Termination, rtol: float, atol: float
) -> Bool[Array, ""]:
    """The termination rule shared by every solver."""
    return residual <= (atol if termination == "abs" else rtol)


def check_termination(termination: str, rtol: float, atol: float) -> None:
    """Trace-time validation of the termination options."""
    if termination not in ("abs", "rel"):
        raise ValueError(f"termination must be 'abs' or 'rel', got {termination!r}.")
    if not (rtol >= 0 and atol >= 0):
        raise ValueError(f"tolerances must be non-negative, got rtol={rtol}, atol={atol}.")
