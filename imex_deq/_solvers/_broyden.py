"""Limited-memory ("good") Broyden's method on g(z) = f(z) − z."""

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.flatten_util
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, Int

from .._custom_types import Termination
from ._base import AbstractRootFinder, Progress

_CHUNK = 10
"""Rows of the rank-one buffers multiplied together; a block of rows none of which has been
written yet (in any sample of a vmapped batch) is skipped, so a solve that stops after k
steps pays for about k rows, not for `memory`."""


class _BroydenState(eqx.Module):
    progress: Progress
    # The rank-one terms and the previous step, on the state raveled to one vector.
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


def _both_products(us, vs, x, y, filled):
    """`(B x, yᵀ B)`, reading only the blocks of `_CHUNK` rows below `filled` (an upper
    bound on the rows written, the same across a vmapped batch: rows not yet written are
    zero and add nothing)."""
    memory = us.shape[0]
    bx, yb = -x, -y
    for start in range(0, memory, _CHUNK):
        rows = slice(start, min(start + _CHUNK, memory))

        def block(operands, rows=rows):
            u, v, x, y = operands
            u, v = u[rows], v[rows]
            return u.T @ (v @ x), (u @ y) @ v

        def skip(operands):
            return jnp.zeros_like(operands[2]), jnp.zeros_like(operands[3])

        if start == 0 and memory <= _CHUNK:
            add_x, add_y = block((us, vs, x, y))
        else:
            add_x, add_y = jax.lax.cond(filled > start, block, skip, (us, vs, x, y))
        bx, yb = bx + add_x, yb + add_y
    return bx, yb


class Broyden(AbstractRootFinder, optx.AbstractFixedPointSolver):
    """Broyden's method with a rank-`memory` inverse-Jacobian approximation stored as a ring
    buffer of `memory` rank-one terms: memory is bounded, whatever `max_steps` is. The first
    step is a plain fixed-point step (z ← z + g(z)). One evaluation per step.

    A root finder on g(z); for a fixed point (`fixed_point`, `optx.fixed_point`) it runs
    on g(z) = f(z) − z. Its initial inverse-Jacobian estimate is −I, right for g(z) =
    f(z) − z with a small ∂f/∂z (and for any g whose Jacobian is near −I).

    A solve that stops without converging returns the lowest-residual iterate, not the
    last one; `stats["best_step"]` says which step evaluated it.

    **Arguments:**

    - `rtol`, `atol`, `termination`: the stopping rule (see `Termination`).
    - `memory`: how many rank-one updates are kept; older ones are overwritten.
    """

    rtol: float = 1e-3
    atol: float = 1e-6
    termination: Termination = "rel"
    memory: int = eqx.field(default=10, static=True)

    returns_best = True
    history_fields = ("us", "vs")

    def __check_init__(self):
        if self.memory < 1:
            raise ValueError(f"Broyden: memory must be at least 1, got {self.memory}.")

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        flat, _ = jax.flatten_util.ravel_pytree(y)
        us = jnp.zeros((self.memory, flat.size), flat.dtype)
        vs = jnp.zeros((self.memory, flat.size), flat.dtype)
        progress = self.start(y, aux_struct)
        return _BroydenState(progress, us, vs, flat, jnp.zeros_like(flat), jnp.array(0))

    def step(self, fn, y, args, options, state: _BroydenState, tags):
        g_tree, aux = fn(y, args)
        z, unravel = jax.flatten_util.ravel_pytree(y)
        g, _ = jax.flatten_util.ravel_pytree(g_tree)
        residual = self.root_residual(g, z)
        progress = self.record(state.progress, y, aux, residual, 1)

        dz = z - state.previous_z
        dg = g - state.previous_g
        # Rows written so far: count − 1 (the first step writes nothing usable). Under vmap
        # the largest count of the batch bounds every sample's.
        filled = eqxi.unvmap_max(state.count) - 1
        # B g and dzᵀ B in one pass over the filled rows (`state.us[...]` reads a buffer).
        step, dz_b = _both_products(state.us[...], state.vs[...], g, dz, filled)
        denominator = dz_b @ dg
        usable = (state.count > 0) & (jnp.abs(denominator) > jnp.finfo(z.dtype).eps)
        safe = jnp.where(usable, denominator, 1)
        # The previous step was z = previous_z - B previous_g, so B dg = B g + dz and
        # Broyden's u = dz - B dg is -B g: one product with B per step instead of two.
        slot = jnp.maximum(state.count - 1, 0) % self.memory
        old_u, old_v = state.us[slot], state.vs[slot]
        u = jnp.where(usable, -step, old_u)
        v = jnp.where(usable, dz_b / safe, old_v)
        # Write one row (under vmap `usable` is per sample; a buffer-wide select would
        # copy memory x n floats per sample each step).
        us = state.us.at[slot].set(u)
        vs = state.vs.at[slot].set(v)
        # B_new g = B g + u (v . g) - old_u (old_v . g): the ring slot's old term is replaced.
        z_next = z - (step + u * (v @ g) - old_u * (old_v @ g))
        new_state = _BroydenState(progress, us, vs, z, g, state.count + 1)
        return unravel(z_next), new_state, aux
