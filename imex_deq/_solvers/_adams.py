"""A variable-step explicit Adams–Bashforth method of order 3, as a diffrax solver."""

from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree

# Bogacki–Shampine 3(2), the start-up steps: stage nodes, weights and error weights.
_BS_A21, _BS_A32 = 1 / 2, 3 / 4
_BS_B = (2 / 9, 1 / 3, 4 / 9)
_BS_E = (2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8)

HISTORY = 3
"""Derivative values an Adams–Bashforth 3 step interpolates."""


class AdamsState(eqx.Module):
    """The last `HISTORY` derivatives f(t, y) at the times they were evaluated, oldest
    first (the last one is at the current point), and how many of them are real: until
    there are three, steps are Bogacki–Shampine start-up steps."""

    ts: Float[Array, " 3"]
    fs: PyTree[Array]
    count: Int[Array, ""]

    @property
    def derivative(self) -> PyTree[Array]:
        """f(t, y) at the current point."""
        return jax.tree_util.tree_map(lambda f: f[-1], self.fs)

    @property
    def starting(self) -> Bool[Array, ""]:
        """Whether the next step is a start-up step."""
        return self.count < HISTORY


def _combine(y, h, coeffs, vectors):
    """y + h · Σ cᵢ vᵢ, leaf by leaf (the coefficients are scalars)."""

    def leaf(y_leaf, *v_leaves):
        total = sum(c * v for c, v in zip(coeffs, v_leaves))
        return y_leaf + (h * total).astype(y_leaf.dtype)

    return jax.tree_util.tree_map(leaf, y, *vectors)


def _take(fs, i):
    return jax.tree_util.tree_map(lambda f: f[i], fs)


def ab_weights(ts: Float[Array, " 3"], t1) -> tuple[tuple, tuple]:
    """Weights, per unit step h = t1 − t₂, of the derivatives at ts = (t₀, t₁, t₂) in the
    order-3 step (the integral over [t₂, t1] of their quadratic interpolant) and, for the
    last two, in the order-2 step (of their linear interpolant). Exact for any spacing;
    with equal spacing (5, −16, 23)/12 and (−1, 3)/2."""
    h = t1 - ts[2]
    a, b = ts[1] - ts[2], ts[0] - ts[2]  # both negative
    h2, h3 = h * h / 2, h * h * h / 3
    w2 = (h3 - (a + b) * h2 + a * b * h) / (a * b)
    w1 = (h3 - b * h2) / (a * (a - b))
    w0 = (h3 - a * h2) / (b * (b - a))
    order3 = (w0 / h, w1 / h, w2 / h)
    order2 = (h2 / (a * h), (h2 - a * h) / (-a * h))
    return order3, order2


class AdamsBashforth3(dfx.AbstractAdaptiveSolver):
    """Variable-step explicit Adams–Bashforth of order 3 for ODEs: one evaluation of the
    vector field per attempted step, at the new point, which the next step and
    `SteadyStateODE`'s steady-state test reuse.

    Each step integrates the quadratic through the last three derivatives at their actual
    times (variable-step coefficients, so the step size may change every step); the
    difference from the order-2 (linear) prediction is the error estimate, at no cost. The
    first two steps, before three derivatives exist, are Bogacki–Shampine 3(2) steps (three
    evaluations each, the last at the new point). A rejected step leaves the state, hence
    the history, untouched (diffrax keeps the old `solver_state`).

    The initial state (`init`) evaluates the vector field once. Dense output is cubic
    Hermite between the derivatives at both ends. Explicit: its stability region is small
    (on the negative real axis, h·λ ≥ −6/11 at constant step), so the controller keeps the
    steps short on stiff problems.
    """

    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar = dfx.ThirdOrderHermitePolynomialInterpolation

    def order(self, terms):
        return 3

    def init(self, terms, t0, t1, y0, args) -> AdamsState:
        return self.state_from_derivative(t0, terms.vf(t0, y0, args))

    def state_from_derivative(self, t0, f0) -> AdamsState:
        """The initial state from f(t0, y0), already evaluated elsewhere."""
        t0 = jnp.asarray(t0)
        fs = jax.tree_util.tree_map(lambda f: jnp.stack([f] * HISTORY), f0)
        return AdamsState(jnp.stack([t0] * HISTORY), fs, jnp.array(1))

    def step(self, terms, t0, t1, y0, args, solver_state: AdamsState, made_jump):
        del made_jump  # a jump is the caller's to restart from (no jumps in a DEQ)
        state = solver_state
        h = t1 - t0
        f0 = state.derivative
        starting = state.starting

        def start_up_stages():
            k2 = terms.vf(t0 + _BS_A21 * h, _combine(y0, h, (_BS_A21,), (f0,)), args)
            y_mid = _combine(y0, h, (_BS_A32,), (k2,))
            k3 = terms.vf(t0 + _BS_A32 * h, y_mid, args)
            return k2, k3

        def no_stages():
            return f0, f0

        # Under vmap the start-up stages run while any sample still starts up; the others
        # discard them below.
        k2, k3 = jax.lax.cond(eqxi.unvmap_any(starting), start_up_stages, no_stages)
        y_start = _combine(y0, h, _BS_B, (f0, k2, k3))

        # Adams weights; during start-up the history holds repeated times, so substitute
        # equally spaced ones (their result is discarded, and must stay finite for grads).
        ts = jnp.where(starting, t0 + h * jnp.arange(-2, 1, dtype=h.dtype), state.ts)
        order3, order2 = ab_weights(ts, t1)
        history = tuple(_take(state.fs, i) for i in range(HISTORY))
        y_adams = _combine(y0, h, order3, history)
        y_lower = _combine(y0, h, order2, history[1:])

        y1 = jax.tree_util.tree_map(lambda s, a: jnp.where(starting, s, a), y_start, y_adams)
        f1 = terms.vf(t1, y1, args)  # the one evaluation of an Adams step

        zero = jax.tree_util.tree_map(jnp.zeros_like, y0)
        error_start = _combine(zero, h, _BS_E, (f0, k2, k3, f1))
        error_adams = jax.tree_util.tree_map(lambda a, b: a - b, y_adams, y_lower)
        y_error = jax.tree_util.tree_map(
            lambda s, a: jnp.where(starting, s, a), error_start, error_adams
        )

        new_ts = jnp.concatenate([state.ts[1:], jnp.asarray(t1, state.ts.dtype)[None]])
        new_fs = jax.tree_util.tree_map(
            lambda old, new: jnp.concatenate([old[1:], new[None]]), state.fs, f1
        )
        new_state = AdamsState(new_ts, new_fs, jnp.minimum(state.count + 1, HISTORY))
        k0 = jax.tree_util.tree_map(lambda f: h * f, f0)
        k1 = jax.tree_util.tree_map(lambda f: h * f, f1)
        dense_info = dict(y0=y0, y1=y1, k0=k0, k1=k1)
        return y1, y_error, dense_info, new_state, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


def evaluations_per_attempt(state: AdamsState) -> Int[Array, ""]:
    """Vector-field evaluations of the next attempted step from `state`: 3 while starting
    up, then 1."""
    return jnp.where(state.starting, 3, 1)
