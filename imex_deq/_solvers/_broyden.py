"""Limited-memory ("good") Broyden's method on g(z) = f(z) − z."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._custom_types import Termination
from ._base import AbstractIterativeSolver


class _BroydenState(eqx.Module):
    us: Float[Array, "m n"]
    vs: Float[Array, "m n"]
    previous_z: Float[Array, " n"]
    previous_g: Float[Array, " n"]
    count: Int[Array, ""]


def _inverse_mv(us, vs, x):
    """B x with B = −I + Σ uᵢ vᵢᵀ, the approximate inverse Jacobian of g."""
    return -x + us.T @ (vs @ x)


def _inverse_rmv(us, vs, x):
    """xᵀ B."""
    return -x + (us @ x) @ vs


class Broyden(AbstractIterativeSolver):
    """Broyden's method with a rank-`memory` inverse-Jacobian approximation stored as a ring
    buffer of `memory` rank-one terms: memory is bounded, whatever `max_steps` is. The first
    step is a plain fixed-point step. One f evaluation per step.

    **Arguments:**

    - `rtol`, `atol`, `termination`: the stopping rule (see `Termination`).
    - `memory`: how many rank-one updates are kept; older ones are overwritten.
    """

    rtol: float = 1e-3
    atol: float = 1e-6
    termination: Termination = "rel"
    memory: int = eqx.field(default=10, static=True)

    def __check_init__(self):
        if self.memory < 1:
            raise ValueError(f"Broyden: memory must be at least 1, got {self.memory}.")

    def init(self, z):
        buffer = jnp.zeros((self.memory, z.size), z.dtype)
        return _BroydenState(buffer, buffer, z, jnp.zeros_like(z), jnp.array(0))

    def update(self, fn, z, state: _BroydenState):
        fz = fn(z)
        g = fz - z
        dz = z - state.previous_z
        dg = g - state.previous_g
        dz_b = _inverse_rmv(state.us, state.vs, dz)
        denominator = dz_b @ dg
        usable = (state.count > 0) & (jnp.abs(denominator) > jnp.finfo(z.dtype).eps)
        safe = jnp.where(usable, denominator, 1)
        u = jnp.where(usable, dz - _inverse_mv(state.us, state.vs, dg), 0)
        v = jnp.where(usable, dz_b / safe, 0)
        slot = jnp.maximum(state.count - 1, 0) % self.memory
        # Select one row, not the whole buffer: under vmap `usable` is per sample, and a
        # buffer-wide select would copy memory x n floats per sample every iteration.
        us = state.us.at[slot].set(jnp.where(usable, u, state.us[slot]))
        vs = state.vs.at[slot].set(jnp.where(usable, v, state.vs[slot]))
        z_next = z - _inverse_mv(us, vs, g)
        return fz, z_next, _BroydenState(us, vs, z, g, state.count + 1), jnp.array(1)
