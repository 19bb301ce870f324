"""Variational (locked) dropout for deep equilibrium models.

A DEQ evaluates its layer `f` many times inside a fixed-point solver. Ordinary
dropout would draw a fresh mask at every evaluation, so `f` would change from
one iteration to the next and there would be no fixed point to converge to.
Variational dropout (Gal & Ghahramani 2016; used by DEQ/MDEQ) draws the mask
*once* per forward pass and reuses it for every evaluation of `f`.

How a DEQ uses it:

```python
drop = VariationalDropout(0.25)
mask = drop.sample_mask((1, 1, channels), key)    # 1. draw before the solve
f = lambda z, args: layer(z, args[0], args[1])    # 2. the mask travels in args
z_star = solve(f, z0, args=(x, mask))             # 3. every f call: same mask
```

At inference pass `mask=None` (or build with `p=0`): dropout is the identity.
Because the mask is an ordinary input of `f`, the implicit-function-theorem
backward pass sees the same (fixed) `f` as the forward solve.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray


def apply_mask(x: Array, mask: Array | None) -> Array:
    """Multiply `x` by a (broadcastable) dropout mask; identity when `mask` is `None`.

    **Arguments:**

    - `x`: the activations.
    - `mask`: a mask from [`VariationalDropout.sample_mask`][], or `None`.

    **Returns:**

    `x * mask`, or `x` unchanged.
    """
    if mask is None:
        return x
    return x * mask


class VariationalDropout(eqx.Module):
    """Dropout whose mask is drawn once and then held fixed across solver iterations.

    The mask is already rescaled by `1 / (1 - p)`, so the expected activation is
    unchanged and no rescaling is needed at inference.
    """

    p: float = eqx.field(static=True)

    def __init__(self, p: float = 0.5):
        """**Arguments:**

        - `p`: probability of dropping a unit, in `[0, 1)`. `p = 0` disables dropout.
        """
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p={p} must lie in [0, 1)")
        self.p = float(p)

    def sample_mask(
        self, shape: Sequence[int], key: PRNGKeyArray, dtype: jnp.dtype = jnp.float32
    ) -> Array:
        """Draw one mask, to be reused for every evaluation of the DEQ layer.

        **Arguments:**

        - `shape`: the mask's shape; it must broadcast against the activations.
            Use `(1, 1, C)` to drop whole channels of a `(H, W, C)` feature map
            (MDEQ's choice), or `(H, W, C)` to drop single units.
        - `key`: the PRNG key. The same key gives the same mask.
        - `dtype`: the mask's floating dtype.

        **Returns:**

        An array of `shape` whose entries are `0` (dropped) or `1 / (1 - p)` (kept);
        all ones when `p = 0`.
        """
        shape = tuple(shape)
        if self.p == 0.0:
            return jnp.ones(shape, dtype)
        keep = jax.random.bernoulli(key, 1.0 - self.p, shape)
        return keep.astype(dtype) / jnp.asarray(1.0 - self.p, dtype)

    def apply(self, x: Array, mask: Array | None) -> Array:
        """Apply a previously drawn mask.

        **Arguments:**

        - `x`: the activations.
        - `mask`: the output of [`VariationalDropout.sample_mask`][], or `None`
            for inference mode.

        **Returns:**

        `x * mask`; `x` itself when `mask` is `None` or `p = 0`.
        """
        if self.p == 0.0:
            return x
        return apply_mask(x, mask)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Same as [`VariationalDropout.apply`][]."""
        return self.apply(x, mask)
