"""Shared test utilities: comparisons, finite differences, evaluation counting, and the
problems every solver is tested on."""

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import imex_deq

N = 6
"""State size of every test problem."""


def enable_x64():
    """Context manager: float64 inside, the previous setting restored on exit."""
    try:
        from jax.experimental import enable_x64 as context  # older JAX
    except ImportError:
        return jax.enable_x64(True)
    return context()


# --------------------------------------------------------------------------- comparisons


def tree_allclose(x, y, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """Same PyTree structure, same leaf shapes and dtypes, and all leaves close."""
    x_leaves, x_def = jax.tree_util.tree_flatten(x)
    y_leaves, y_def = jax.tree_util.tree_flatten(y)
    if x_def != y_def:
        return False
    for a, b in zip(x_leaves, y_leaves):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not np.allclose(a, b, rtol=rtol, atol=atol):
            return False
    return True


def tree_flat(tree) -> np.ndarray:
    """All leaves (None skipped) as one float64 NumPy vector."""
    leaves = [np.asarray(leaf, np.float64).reshape(-1) for leaf in jax.tree_util.tree_leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def relative_error(x, reference) -> float:
    """‖x − reference‖ / ‖reference‖ over whole PyTrees of the same structure."""
    assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(reference)
    a, b = tree_flat(x), tree_flat(reference)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ------------------------------------------------------------------ finite differences


def central_difference_grad(loss: Callable, params, *, eps: float = 1e-5):
    """Central finite-difference gradient of the scalar `loss(params)` with respect to every
    inexact-array leaf of `params` (an Equinox module or any PyTree).

    Returns the gradient in `eqx.filter_grad`'s layout: the same structure as `params`, with
    None at non-array leaves. All 2·P perturbed losses are evaluated by one jitted vmap.
    """
    diff, static = eqx.partition(params, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(diff)
    size = flat.size

    @jax.jit
    @jax.vmap
    def batched(vector):
        return loss(eqx.combine(unravel(vector), static))

    basis = jnp.asarray(eps, flat.dtype) * jnp.eye(size, dtype=flat.dtype)
    values = batched(jnp.concatenate([flat[None, :] + basis, flat[None, :] - basis]))
    gradient = (values[:size] - values[size:]) / jnp.asarray(2 * eps, flat.dtype)
    return unravel(gradient)


# --------------------------------------------------------------- evaluation counting


class CountedFn:
    """Wraps `fn(z, args)` so that every evaluation actually executed at run time is counted
    by a `jax.debug.callback`: primal evaluations, and also Jacobian-vector products of a
    linearisation (`jax.linearize`, as Newton–Krylov uses), each counted once.

    Call it eagerly, one sample at a time (not under vmap: a batched callback fires once per
    batch). Read `count` after `jax.effects_barrier()` (done by `read()`).
    """

    def __init__(self, fn: Callable):
        self.count = 0

        def tick(*_):
            self.count += 1

        @jax.custom_jvp
        def counted(z, args):
            jax.debug.callback(tick)
            return fn(z, args)

        @counted.defjvp
        def counted_jvp(primals, tangents):
            jax.debug.callback(tick)
            out, tangent_out = jax.jvp(fn, primals, tangents)
            # Depends on the tangent, so it lands in the linear part of a linearisation and
            # runs on every Jacobian-vector product.
            jax.debug.callback(tick, tangents[0])
            return out, tangent_out

        self.fn = counted

    def __call__(self, z, args):
        return self.fn(z, args)

    def read(self) -> int:
        jax.effects_barrier()
        return self.count


class CountedVJP:
    """Wraps `fn(z, args)` so that every vector–Jacobian product executed at run time is
    counted by a `jax.debug.callback` in its custom VJP rule (primal evaluations are not
    counted). Differentiable inputs are `z` and `args`. Read `count` with `read()`."""

    def __init__(self, fn: Callable):
        self.count = 0

        def tick(*_):
            self.count += 1

        @jax.custom_vjp
        def counted(z, args):
            return fn(z, args)

        def counted_fwd(z, args):
            return fn(z, args), (z, args)

        def counted_bwd(residuals, cotangent):
            jax.debug.callback(tick, cotangent)
            _, vjp = jax.vjp(fn, *residuals)
            return vjp(cotangent)

        counted.defvjp(counted_fwd, counted_bwd)
        self.fn = counted

    def __call__(self, z, args):
        return self.fn(z, args)

    def read(self) -> int:
        jax.effects_barrier()
        return self.count


# ------------------------------------------------------------------------ problems


def affine_system(n: int = N, *, norm: float = 0.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) in float64 NumPy with spectral norm ‖A‖₂ = `norm`, so z ↦ A z + b contracts."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    a = norm * m / np.linalg.norm(m, 2)
    b = rng.standard_normal(n)
    return a, b


@dataclasses.dataclass(frozen=True)
class AffineProblem:
    """z = A z + b with the state laid out as an array or as a PyTree of arrays.

    `fn(z, (A, b))` flattens the state, applies the affine map and restores the layout.
    """

    name: str
    split: Callable[[jax.Array], object]

    @staticmethod
    def join(state) -> jax.Array:
        return jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree_util.tree_leaves(state)])

    def fn(self, z, args):
        a, b = args
        return self.split(a @ self.join(z) + b)

    def args(self, dtype, *, norm: float = 0.6, seed: int = 0):
        a, b = affine_system(norm=norm, seed=seed)
        return jnp.asarray(a, dtype), jnp.asarray(b, dtype)

    def z0(self, dtype):
        return self.split(jnp.zeros(N, dtype))

    def exact(self, dtype, *, norm: float = 0.6, seed: int = 0):
        """(I − A)⁻¹ b, in float64, laid out like the state and cast to `dtype`."""
        a, b = affine_system(norm=norm, seed=seed)
        return self.split(jnp.asarray(np.linalg.solve(np.eye(N) - a, b), dtype))


def _split_array(v):
    return v


def _split_tuple(v):
    return (v[:2], v[2:])


def _split_dict(v):
    return {"u": v[:2], "w": v[2:].reshape(2, 2)}


AFFINE_PROBLEMS = [
    AffineProblem("array", _split_array),
    AffineProblem("tuple", _split_tuple),
    AffineProblem("dict", _split_dict),
]
"""The affine contraction with an array state, a tuple state and a dict state (one 2-D
leaf)."""


def affine_fn(z, args):
    """The affine contraction on an array state: `A @ z + b`."""
    a, b = args
    return a @ z + b


class TinyCell(eqx.Module):
    """f(z, x) = tanh(W z + U x + c) with ‖W‖₂ = 0.5: a contraction (tanh is 1-Lipschitz)."""

    weight: jax.Array
    inject: jax.Array
    bias: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.weight @ z + self.inject @ x + self.bias)


def tiny_cell(key, n: int = N, *, dtype=jnp.float32, norm: float = 0.5) -> TinyCell:
    kw, ku, kb = jax.random.split(key, 3)
    w = np.asarray(jax.random.normal(kw, (n, n)), np.float64)
    w = norm * w / np.linalg.norm(w, 2)
    u = np.asarray(jax.random.normal(ku, (n, n)), np.float64) / np.sqrt(n)
    c = 0.1 * np.asarray(jax.random.normal(kb, (n,)), np.float64)
    return TinyCell(jnp.asarray(w, dtype), jnp.asarray(u, dtype), jnp.asarray(c, dtype))


class TinyPredictor(eqx.Module):
    """x ↦ tanh(P x + q), the explicit network of a Skip DEQ."""

    weight: jax.Array
    bias: jax.Array

    def __call__(self, x):
        return jnp.tanh(self.weight @ x + self.bias)


def tiny_predictor(key, n: int = N, *, dtype=jnp.float32) -> TinyPredictor:
    kw, kb = jax.random.split(key)
    w = jax.random.normal(kw, (n, n), dtype) / jnp.asarray(np.sqrt(n), dtype)
    return TinyPredictor(w, jnp.asarray(0.1, dtype) * jax.random.normal(kb, (n,), dtype))


# ------------------------------------------------------------------------- solvers

SOLVER_NAMES = ["FixedPointIteration", "Anderson", "Broyden", "NewtonKrylov", "SteadyStateODE"]


def make_solver(name: str, **options) -> imex_deq.AbstractSolver:
    """A solver by class name; `gmres=...` sets NewtonKrylov's linear solver."""
    gmres = options.pop("gmres", None)
    if name == "NewtonKrylov" and gmres is not None:
        options["linear_solver"] = gmres
    return getattr(imex_deq, name)(**options)


def tight_gmres():
    import lineax as lx

    return lx.GMRES(rtol=1e-12, atol=1e-12, restart=10, max_steps=20)
