"""Training regularisers: the skip loss and Jacobian regularisation."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._custom_types import State


def _tree_size(tree) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))


def _squared_norm(tree) -> Float[Array, ""]:
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def _unit(tree):
    norm = jnp.sqrt(_squared_norm(tree))
    return jax.tree_util.tree_map(lambda leaf: leaf / norm, tree)


def _normal_like(key: PRNGKeyArray, tree):
    """Standard normal noise shaped like `tree`'s leaves, one key per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def skip_loss(info, weight: float = 0.01) -> Float[Array, ""]:
    """λ_skip · mean |z* − z0|: the paper's mean absolute error between the equilibrium
    and the initial guess (Skip DEQ: the predictor's; Skip Reg. DEQ: f(0, x)).

    **Arguments:**

    - `info`: the `DEQInfo` of one sample, or of a vmapped batch.
    - `weight`: λ_skip (paper default 0.01).

    **Returns:**

    A scalar; gradients reach the predictor (through z0) and f (through z* and z0).
    """
    total = sum(
        jnp.sum(jnp.abs(a - b))
        for a, b in zip(jax.tree_util.tree_leaves(info.z_star), jax.tree_util.tree_leaves(info.z0))
    )
    return weight * total / _tree_size(info.z_star)


def jacobian_regularisation(
    f: Callable, z_star: State, x: PyTree[Array], *, key: PRNGKeyArray
) -> Float[Array, ""]:
    """Hutchinson estimate of ‖∂f/∂z‖_F² / d at z* (Bai et al. 2021): ‖εᵀ ∂f/∂z‖² / d with
    one ε ~ N(0, I) shaped like the state, d the state size. Differentiable in f's
    parameters (z* itself is held fixed). Call on one sample; vmap over a batch with one
    key per sample.
    """
    z_star = jax.lax.stop_gradient(z_star)
    _, vjp = jax.vjp(lambda z: f(z, x), z_star)
    (projected,) = vjp(_normal_like(key, z_star))
    return _squared_norm(projected) / _tree_size(z_star)


def spectral_regularisation(
    f: Callable, z_star: State, x: PyTree[Array], *, key: PRNGKeyArray, power_steps: int = 1
) -> Float[Array, ""]:
    """‖(∂f/∂z) v‖² at z*, v a unit estimate of ∂f/∂z's dominant eigenvector: an estimate of
    the squared spectral radius, the rate at which fixed-point solves contract. The
    Frobenius estimate (`jacobian_regularisation`) averages over all d directions, so one
    slow mode barely moves it; this term sees that mode.

    v starts from the residual f(z*) − z*, which a solve leaves mostly along its slowest
    mode (a random direction, drawn from `key`, where the residual is zero), and takes
    `power_steps` power iterations. On trained conv cells one step reads 92–97% of the
    radius that 12 steps from a random start read (docs/results.md). The iterations run
    on a gradient-free copy of f and x; only the last product is differentiable in f's
    parameters (and x). Call on one sample; vmap over a batch with one key per sample.
    """
    if power_steps < 0:
        raise ValueError(
            f"spectral_regularisation: power_steps must be non-negative, got {power_steps}."
        )
    z_star = jax.lax.stop_gradient(z_star)
    arrays, static = eqx.partition((f, x), eqx.is_array)
    f_frozen, x_frozen = eqx.combine(jax.lax.stop_gradient(arrays), static)

    def frozen_jvp(v):
        return jax.jvp(lambda z: f_frozen(z, x_frozen), (z_star,), (v,))[1]

    residual = jax.tree_util.tree_map(jnp.subtract, f_frozen(z_star, x_frozen), z_star)
    has_residual = _squared_norm(residual) > 0
    start = jax.tree_util.tree_map(
        lambda r, n: jnp.where(has_residual, r, n),
        _unit(residual),
        _unit(_normal_like(key, z_star)),
    )
    v = jax.lax.fori_loop(0, power_steps, lambda _, v: _unit(frozen_jvp(v)), start)
    _, image = jax.jvp(lambda z: f(z, x), (z_star,), (jax.lax.stop_gradient(v),))
    return _squared_norm(image)


JACOBIAN_NORMS = {"frobenius": jacobian_regularisation, "spectral": spectral_regularisation}
"""The Jacobian penalties a DEQ layer (and `TrainConfig.jac_norm`) can name."""
