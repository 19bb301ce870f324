"""DEQ layers: Vanilla, Skip and Skip Reg. DEQ, each one sample in (batch with jax.vmap)."""

import abc
import dataclasses
from collections.abc import Callable
from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._adjoint import AbstractAdjoint, ImplicitAdjoint, UnrolledAdjoint, tally_backward_nfe
from ._custom_types import State
from ._fixed_point import fixed_point
from ._regularisers import JACOBIAN_NORMS
from ._solution import RESULTS
from ._solvers._base import AbstractSolver
from ._solvers._fixed_depth import FixedDepth


class DEQInfo(eqx.Module):
    """Per-sample record of one DEQ (or neural ODE) evaluation.

    **Fields:**

    - `z0`: the initial guess, differentiable into whatever produced it (the skip loss
      trains the predictor through it).
    - `z_star`: the equilibrium, carrying the adjoint's gradient.
    - `residual`: final residual (see the solver's `termination`).
    - `nfe`: forward function evaluations, the initial guess's included (Skip Reg. DEQ's
      f(0, x)).
    - `steps`: solver steps.
    - `result`: a `RESULTS` code.
    - `dropout_masks`: the variational-dropout masks f was solved with (`None` without
      dropout); Jacobian regularisation reuses them.
    """

    z0: State
    z_star: State
    residual: Float[Array, ""]
    nfe: Int[Array, ""]
    steps: Int[Array, ""]
    result: RESULTS
    dropout_masks: PyTree[Array] | None = None


class _Apply(eqx.Module):
    """`fn(z, x) = f(z, x)`, or `f(z, x, dropout_masks)`, as a PyTree, so the adjoint sees
    f's parameters and every evaluation sees the same masks."""

    f: Callable
    dropout_masks: PyTree[Array] | None = None

    def __call__(self, z, x):
        if self.dropout_masks is None:
            return self.f(z, x)
        return self.f(z, x, self.dropout_masks)


def has_dropout(f: Callable) -> bool:
    """Whether `f` follows the variational-dropout protocol with a non-zero rate: it has
    `dropout_rate` (a float) and `sample_dropout_masks(key)`, and takes the masks as a
    third argument, `f(z, x, masks)` (`imex_deq.nn.MultiscaleDEQCell` does)."""
    return hasattr(f, "sample_dropout_masks") and getattr(f, "dropout_rate", 0.0) > 0.0


def draw_dropout_masks(
    f: Callable, key: PRNGKeyArray | None, inference: bool, layer: str
) -> PyTree[Array] | None:
    """One solve's variational-dropout masks (see `has_dropout`), or `None` when f has no
    dropout or `inference` is set; a clear error when a training call forgets the key."""
    if inference or not has_dropout(f):
        return None
    if key is None:
        raise ValueError(
            f"{layer}: f has variational dropout (rate {f.dropout_rate}); pass key=... to "
            "draw this solve's mask, or inference=True to evaluate without dropout."
        )
    return f.sample_dropout_masks(key)


class AbstractDEQ(eqx.Module):
    """A deep equilibrium layer x ↦ z* = f(z*, x). Subclasses choose the initial guess.

    Options shared by every DEQ layer (keyword only):

    - `adjoint`: gradient strategy (default `ImplicitAdjoint()`).
    - `max_steps`: solver step cap.
    - `throw`: raise when a solve fails instead of reporting it in `info.result`.
    - `fixed_depth`: if set, apply f exactly this many times from z0 with plain backprop
      (pretraining): the solve becomes `FixedDepth(fixed_depth)` (with the solver's
      tolerances) under `UnrolledAdjoint`; see `with_fixed_depth`.
    - `state_shape`: `jax.ShapeDtypeStruct` PyTree of the state when it differs from x's.
    """

    f: eqx.AbstractVar[Callable]
    solver: eqx.AbstractVar[AbstractSolver]
    adjoint: AbstractAdjoint = eqx.field(default_factory=ImplicitAdjoint, kw_only=True)
    max_steps: int = eqx.field(default=50, static=True, kw_only=True)
    throw: bool = eqx.field(default=False, static=True, kw_only=True)
    fixed_depth: int | None = eqx.field(default=None, static=True, kw_only=True)
    state_shape: PyTree[jax.ShapeDtypeStruct] | None = eqx.field(
        default=None, static=True, kw_only=True
    )

    def __check_init__(self):
        if not isinstance(self.solver, AbstractSolver):
            raise TypeError(
                f"{type(self).__name__}: solver must be an imex-deq solver, "
                f"got {type(self.solver).__name__}."
            )
        if self.fixed_depth is not None and self.fixed_depth < 1:
            raise ValueError(
                f"{type(self).__name__}: fixed_depth must be None or at least 1, "
                f"got {self.fixed_depth}."
            )

    initial_guess_nfe: ClassVar[int] = 0
    """Evaluations of f that `initial_guess` spends (counted in `info.nfe`)."""

    @abc.abstractmethod
    def initial_guess(self, fn: Callable, x: PyTree[Array]) -> State:
        """z0 for input x; `fn(z, x)` is f with this solve's dropout masks bound."""

    def zero_state(self, x: PyTree[Array]) -> State:
        """Zeros shaped like the state (`state_shape`, else like x)."""
        like = x if self.state_shape is None else self.state_shape
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), like)

    def __call__(
        self,
        x: PyTree[Array],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        backward_counter: Float[Array, ""] | None = None,
    ) -> tuple[State, DEQInfo]:
        """Returns `(z*, info)`.

        **Arguments:**

        - `x`: one input sample.
        - `key`: draws f's variational-dropout mask, one per solve, shared by every
          iteration and by the adjoint (as `equinox.nn.Dropout` takes a key). Required
          when f has dropout, unless `inference=True`.
        - `inference`: switch dropout off.
        - `backward_counter`: a scalar zero; differentiate with respect to it to read the
          backward NFE.
        """
        masks = draw_dropout_masks(self.f, key, inference, type(self).__name__)
        fn = _Apply(self.f, masks)
        z0 = self.initial_guess(fn, x)
        if self.initial_guess_nfe and backward_counter is not None:
            # One VJP through the guess's evaluations, run only when a gradient reaches z0.
            z0 = tally_backward_nfe(z0, backward_counter, self.initial_guess_nfe)
        if self.fixed_depth is None:
            solver, adjoint, max_steps = self.solver, self.adjoint, self.max_steps
        else:
            solver = FixedDepth(
                self.fixed_depth,
                rtol=self.solver.rtol,
                atol=self.solver.atol,
                termination=self.solver.termination,
            )
            adjoint, max_steps = UnrolledAdjoint(), self.fixed_depth
        sol = fixed_point(
            fn,
            solver,
            z0,
            x,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=self.throw,
            backward_counter=backward_counter,
        )
        nfe = sol.nfe + self.initial_guess_nfe
        info = DEQInfo(z0, sol.value, sol.residual, nfe, sol.num_steps, sol.result, masks)
        return sol.value, info

    def jacobian_regularisation(
        self,
        x: PyTree[Array],
        info: DEQInfo,
        *,
        key: PRNGKeyArray,
        norm: Literal["frobenius", "spectral"] = "frobenius",
    ) -> Float[Array, ""]:
        """`jacobian_regularisation(f, info.z_star, x, key=key)` (`norm="frobenius"`) or
        `spectral_regularisation(...)` (`norm="spectral"`), with the dropout masks the
        solve used."""
        regulariser = JACOBIAN_NORMS.get(norm)
        if regulariser is None:
            raise ValueError(
                f"jacobian_regularisation: norm must be one of {sorted(JACOBIAN_NORMS)}, "
                f"got {norm!r}."
            )
        return regulariser(_Apply(self.f, info.dropout_masks), info.z_star, x, key=key)


class DEQ(AbstractDEQ):
    """Vanilla DEQ: z0 = 0.

    **Arguments:**

    - `f`: `f(z, x) -> z`, any callable or Equinox module on PyTrees.
    - `solver`: a discrete solver (`Anderson`, ...) or `SteadyStateODE` (continuous DEQ).
    - keyword options: see `AbstractDEQ`.

    **Example:**

    ```python
    deq = DEQ(f, Anderson(rtol=5e-3))
    z_star, info = jax.vmap(deq)(xs)
    ```
    """

    f: Callable
    solver: AbstractSolver

    def initial_guess(self, fn, x):
        return self.zero_state(x)


class SkipDEQ(AbstractDEQ):
    """Skip DEQ: an explicit network predicts z0 = predictor(x); the solve corrects it.
    Train the predictor with `skip_loss(info)`.

    **Arguments:**

    - `f`: `f(z, x) -> z`.
    - `predictor`: `predictor(x) -> z0`, same structure as the state.
    - `solver`: as for `DEQ`.
    """

    f: Callable
    predictor: Callable
    solver: AbstractSolver

    def initial_guess(self, fn, x):
        return self.predictor(x)


class SkipRegDEQ(AbstractDEQ):
    """Skip Reg. DEQ: z0 = f(0, x), no extra parameters; `skip_loss(info)` pulls f(0, x)
    towards z*. The evaluation f(0, x) is counted in `info.nfe` (and, when a gradient
    reaches z0, its VJP in the backward NFE).

    **Arguments:**

    - `f`: `f(z, x) -> z`.
    - `solver`: as for `DEQ`.
    """

    f: Callable
    solver: AbstractSolver

    initial_guess_nfe = 1

    def initial_guess(self, fn, x):
        return fn(self.zero_state(x), x)


def with_fixed_depth(model: PyTree, depth: int | None) -> PyTree:
    """Return `model` with every DEQ layer inside it switched to fixed-depth mode
    (`depth` applications of f, plain backprop), or back to solving when `depth` is None.
    """
    is_deq = lambda node: isinstance(node, AbstractDEQ)

    def find(tree):
        return [n for n in jax.tree_util.tree_leaves(tree, is_leaf=is_deq) if is_deq(n)]

    layers = find(model)
    if not layers:
        raise ValueError("with_fixed_depth: the model contains no DEQ layer.")
    replaced = [dataclasses.replace(layer, fixed_depth=depth) for layer in layers]
    return eqx.tree_at(find, model, replaced)
