"""Anderson acceleration (type II) with a bounded history."""

import equinox as eqx
import jax.flatten_util
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._custom_types import Termination
from .._solution import scaled_residual
from ._base import AbstractFixedPointSolver, Progress
from ._small_linalg import solve_spd


class _AndersonState(eqx.Module):
    progress: Progress
    # The history, on the state raveled to one vector (one row per past iterate).
    images: Float[Array, "m n"]
    residuals: Float[Array, "m n"]
    gram: Float[Array, "m m"]  # residuals @ residuals.T, one row refreshed per step
    count: Int[Array, ""]


class Anderson(AbstractFixedPointSolver):
    """Anderson acceleration: the next iterate mixes the last `history` iterates and their
    images under f with weights that minimise the combined residual. One f evaluation per
    step.

    **Arguments:**

    - `rtol`, `atol`, `termination`: the stopping rule (see `Termination`).
    - `history`: how many past iterates to mix (memory grows with it, not with steps).
    - `ridge`: Tikhonov regularisation of the mixing least squares, relative to its scale.
    - `damp`: fraction of the mixed iterate (rather than the mixed image) taken, in [0, 1).
    """

    rtol: float = 1e-3
    atol: float = 1e-6
    termination: Termination = "rel"
    history: int = eqx.field(default=5, static=True)
    ridge: float = 1e-4
    damp: float = 0.0

    def __check_init__(self):
        if self.history < 1:
            raise ValueError(f"Anderson: history must be at least 1, got {self.history}.")
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"Anderson: damp must lie in [0, 1), got {self.damp}.")
        if self.ridge < 0:
            raise ValueError(f"Anderson: ridge must be non-negative, got {self.ridge}.")

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        flat, _ = jax.flatten_util.ravel_pytree(y)
        buffer = jnp.zeros((self.history, flat.size), flat.dtype)
        gram = jnp.zeros((self.history, self.history), flat.dtype)
        return _AndersonState(self.start(y, aux_struct), buffer, buffer, gram, jnp.array(0))

    def step(self, fn, y, args, options, state: _AndersonState, tags):
        fz_tree, aux = fn(y, args)
        z, unravel = jax.flatten_util.ravel_pytree(y)
        fz, _ = jax.flatten_util.ravel_pytree(fz_tree)
        g = fz - z
        residual = scaled_residual(g, fz, self.termination)
        progress = self.record(state.progress, fz_tree, aux, residual, 1)

        slot = state.count % self.history
        images = state.images.at[slot].set(fz)
        residuals = state.residuals.at[slot].set(g)  # unused slots stay zero
        used = jnp.arange(self.history) < jnp.minimum(state.count + 1, self.history)
        # Only the new residual's row of the Gram matrix changes: a matrix-vector product
        # instead of a (batched, on XLA CPU slow) matrix-matrix one.
        row = residuals @ residuals[slot]
        gram = state.gram.at[slot, :].set(row).at[:, slot].set(row)
        scale = jnp.max(jnp.diagonal(gram)) + jnp.finfo(z.dtype).tiny
        eye = jnp.eye(self.history, dtype=z.dtype)
        regularised = jnp.where(used[:, None] & used[None, :], gram + self.ridge * scale * eye, eye)
        weights = solve_spd(regularised, used.astype(z.dtype))
        weights = weights / jnp.sum(weights)
        z_next = weights @ images
        if self.damp != 0.0:  # mix the iterates z = f(z) - (f(z) - z) in by `damp`
            z_next = z_next - self.damp * (weights @ residuals)
        new_state = _AndersonState(progress, images, residuals, gram, state.count + 1)
        return unravel(z_next), new_state, aux
