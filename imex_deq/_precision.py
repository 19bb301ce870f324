"""Mixed precision: evaluate f in a low-precision dtype, keep everything else in float32."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree


def _cast_floating(tree: PyTree, dtype) -> PyTree:
    """`tree` with every floating-point array leaf cast to `dtype` (others untouched)."""

    def cast(leaf):
        if eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map(cast, tree)


class MixedPrecision(eqx.Module):
    """Run `f(z, x)` in `compute_dtype` (default bfloat16) while its parameters, the state,
    the solver's residuals and the gradients stay in the state's dtype (float32).

    Each call casts z, x and f's floating-point parameters to `compute_dtype`, evaluates f,
    and casts the result back to the dtype of each leaf of z. The stored parameters are
    never changed, so the optimizer updates float32 master weights, and the casts are
    differentiable, so parameter gradients arrive in float32. Solvers see a float32 state
    throughout (their residual norms and Anderson's mixing run in float32).

    Expect the fixed point only to about the compute dtype's precision: bfloat16 has 8
    significant bits (relative spacing 2⁻⁷ ≈ 8e-3), so relative residuals below ~1e-2 are
    not reliably reachable; use `rtol` ≥ 1e-2 with it.

    **Arguments:**

    - `f`: `f(z, x, *rest) -> z`, an Equinox module or a function.
    - `compute_dtype`: the dtype f computes in.

    **Example:**

    ```python
    deq = DEQ(MixedPrecision(cell), Anderson(rtol=1e-2))
    ```
    """

    f: Callable
    compute_dtype: jnp.dtype = eqx.field(default=jnp.bfloat16, static=True)

    def __call__(self, z: PyTree, x: PyTree, *rest) -> PyTree:
        low = jnp.dtype(self.compute_dtype)
        f = _cast_floating(self.f, low)
        out = f(_cast_floating(z, low), _cast_floating(x, low), *_cast_floating(rest, low))
        return jax.tree_util.tree_map(lambda o, zi: o.astype(zi.dtype), out, z)


def with_precision(f: Callable, precision: str) -> Callable:
    """`f` unchanged for `"float32"`; `MixedPrecision(f)` for `"bfloat16"`."""
    if precision == "float32":
        return f
    if precision == "bfloat16":
        return MixedPrecision(f, compute_dtype=jnp.bfloat16)
    raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}.")
