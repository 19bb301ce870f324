"""Tiny dense solves written with plain array ops.

No LAPACK call: a batched LAPACK kernel on a batch sharded over several CPU devices
deadlocks jaxlib's thread pool (see STACK_NOTES), and for m ≤ ~10 unrolled elimination is
as fast anyway.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float


def solve_spd(matrix: Float[Array, "m m"], rhs: Float[Array, " m"]) -> Float[Array, " m"]:
    """Solve a small symmetric positive definite system by Gaussian elimination (no pivoting
    needed for SPD matrices), unrolled over its static size."""
    m = matrix.shape[0]
    a = matrix
    b = rhs
    for k in range(m):
        pivot = a[k, k]
        factors = a[:, k] / pivot
        below = jnp.arange(m) > k
        factors = jnp.where(below, factors, 0)
        a = a - factors[:, None] * a[k][None, :]
        b = b - factors * b[k]
    x = jnp.zeros_like(b)
    for k in reversed(range(m)):
        x = x.at[k].set((b[k] - a[k] @ x) / a[k, k])
    return x
