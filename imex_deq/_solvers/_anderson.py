"""Anderson acceleration (type II) with a bounded history and a restart safeguard."""

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
    count: Int[Array, ""]  # entries written since the start or the last restart
    best_g: Float[Array, " n"]  # f(z) - z at the kept (lowest-residual) iterate
    restarts: Int[Array, ""]
    restarted_from: Int[Array, ""]  # best_step of the iterate the last restart went back to


class Anderson(AbstractFixedPointSolver):
    """Anderson acceleration: the next iterate mixes the last `history` iterates and their
    images under f with weights that minimise the combined residual. One f evaluation per
    step.

    Safeguarded: when a mixed step raises the residual above `restart_ratio` times the
    lowest so far, the history is cleared and the next step is a plain (damped)
    fixed-point step from the lowest-residual iterate (at most once per such iterate, as a
    second restart from it would repeat the same steps). A solve that stops without
    converging returns that iterate (f applied to it), not the last one; `stats` reports
    its step (`best_step`) and the number of `restarts`.

    **Arguments:**

    - `rtol`, `atol`, `termination`: the stopping rule (see `Termination`).
    - `history`: how many past iterates to mix (memory grows with it, not with steps).
    - `ridge`: Tikhonov regularisation of the mixing least squares, relative to its scale
      (the largest squared residual norm in the history).
    - `damp`: fraction of the mixed iterate (rather than the mixed image) taken, in [0, 1).
    - `restart_ratio`: the residual growth over the best so far that triggers a restart,
      at least 1 (default 10; `float("inf")` never restarts). Values of 2–10 suit most
      problems: lower restarts more often and makes Anderson behave more like damped
      fixed-point iteration.
    """

    rtol: float = 1e-3
    atol: float = 1e-6
    termination: Termination = "rel"
    history: int = eqx.field(default=5, static=True)
    ridge: float = 1e-4
    damp: float = 0.0
    restart_ratio: float = 10.0

    returns_best = True
    history_fields = ("images", "residuals")

    def __check_init__(self):
        if self.history < 1:
            raise ValueError(f"Anderson: history must be at least 1, got {self.history}.")
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"Anderson: damp must lie in [0, 1), got {self.damp}.")
        if self.ridge < 0:
            raise ValueError(f"Anderson: ridge must be non-negative, got {self.ridge}.")
        if not self.restart_ratio >= 1:
            raise ValueError(
                f"Anderson: restart_ratio must be at least 1, got {self.restart_ratio}."
            )

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        flat, _ = jax.flatten_util.ravel_pytree(y)
        buffer = jnp.zeros((self.history, flat.size), flat.dtype)
        gram = jnp.zeros((self.history, self.history), flat.dtype)
        zero = jnp.array(0)
        progress = self.start(y, aux_struct)
        best_g = jnp.zeros_like(flat)
        return _AndersonState(progress, buffer, buffer, gram, zero, best_g, zero, zero)

    def step(self, fn, y, args, options, state: _AndersonState, tags):
        fz_tree, aux = fn(y, args)
        z, unravel = jax.flatten_util.ravel_pytree(y)
        fz, _ = jax.flatten_util.ravel_pytree(fz_tree)
        g = fz - z
        residual = scaled_residual(g, fz, self.termination)
        progress = self.record(state.progress, fz_tree, aux, residual, 1)
        improved = progress.best_step == progress.steps
        best_g = jnp.where(improved, g, state.best_g)

        # z came from mixing at least two entries, and made things much worse: restart
        # from the kept iterate, whose pair (f(z), f(z) - z) becomes the only entry. Not
        # twice from the same iterate: that would repeat the same steps.
        restart = (
            (state.count >= 2)
            & (progress.best_step != state.restarted_from)
            & (
                residual.astype(state.progress.residual.dtype)
                > self.restart_ratio * state.progress.residual
            )
        )
        best_fz, _ = jax.flatten_util.ravel_pytree(progress.value)
        slot = jnp.where(restart, 0, state.count % self.history)
        count = jnp.where(restart, 1, state.count + 1)
        # `buffer[...]` reads and `.at[slot].set` writes: see `history_fields`.
        new_residual = jnp.where(restart, best_g, g)
        images = state.images.at[slot].set(jnp.where(restart, best_fz, fz))
        residuals = state.residuals.at[slot].set(new_residual)
        used = jnp.arange(self.history) < jnp.minimum(count, self.history)
        # Only the new residual's row of the Gram matrix changes: a matrix-vector product
        # instead of a (batched, on XLA CPU slow) matrix-matrix one. Entries left from
        # before a restart are masked out by `used` until overwritten.
        row = residuals[...] @ new_residual
        gram = state.gram.at[slot, :].set(row).at[:, slot].set(row)
        scale = jnp.max(jnp.where(used, jnp.diagonal(gram), 0)) + jnp.finfo(z.dtype).tiny
        eye = jnp.eye(self.history, dtype=z.dtype)
        regularised = jnp.where(used[:, None] & used[None, :], gram + self.ridge * scale * eye, eye)
        weights = solve_spd(regularised, used.astype(z.dtype))
        weights = weights / jnp.sum(weights)
        z_next = weights @ images[...]
        if self.damp != 0.0:  # mix the iterates z = f(z) - (f(z) - z) in by `damp`
            z_next = z_next - self.damp * (weights @ residuals[...])
        restarts = state.restarts + restart.astype(state.restarts.dtype)
        restarted_from = jnp.where(restart, progress.best_step, state.restarted_from)
        new_state = _AndersonState(
            progress, images, residuals, gram, count, best_g, restarts, restarted_from
        )
        return unravel(z_next), new_state, aux

    def postprocess(self, fn, y, aux, args, options, state: _AndersonState, tags, result):
        y, aux, stats = super().postprocess(fn, y, aux, args, options, state, tags, result)
        return y, aux, {**stats, "restarts": state.restarts}
