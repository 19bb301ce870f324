"""optimistix's solve loop with a solver's history arrays carried as in-place buffers."""

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import optimistix as optx


def _tree_allfinite(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def buffered_solve(solver, fn, y0, args, *, max_steps, buffers):
    """Run `solver.init` / `step` / `terminate` / `postprocess` exactly as optimistix's
    loop does (same steps, same results), as an `optx.Solution`, for the non-differentiable
    solve. The difference is the loop: `equinox.internal.while_loop` with the state's
    history arrays (`buffers(state)`) as buffers. Under `vmap` a plain while loop selects
    every carried array between the new and the old value for the samples that have
    stopped, a copy of the whole history per step; a buffer is written in place, one row
    per step, with the selection folded into that row. `step` must read a buffer with
    `buffer[...]` and write it with `buffer.at[i].set(row)` only.

    `fn(y, args) -> (out, aux)` is the function the solver iterates on (for a root finder
    g; for a fixed-point solver f)."""
    options, tags = {}, frozenset()
    f_struct, aux_struct = jax.eval_shape(fn, y0, args)
    state0 = solver.init(fn, y0, args, options, f_struct, aux_struct, tags)

    def terminate_and_result(y, state):
        terminate, result = solver.terminate(fn, y, args, options, state, tags)
        return terminate, optx.RESULTS.where(_tree_allfinite(y), result, optx.RESULTS.nonfinite)

    dynamic0, static = eqx.partition(state0, eqx.is_array)
    terminate0, result0 = terminate_and_result(y0, state0)
    carry0 = (y0, jnp.array(0), dynamic0, terminate0, result0)

    def cond_fun(carry):
        *_, terminate, result = carry
        return jnp.invert(terminate) & (result == optx.RESULTS.successful)

    def body_fun(carry):
        y, num_steps, dynamic, _, _ = carry
        state = eqx.combine(static, dynamic)
        new_y, new_state, _ = solver.step(fn, y, args, options, state, tags)
        terminate, result = terminate_and_result(y, new_state)
        new_dynamic, _ = eqx.partition(new_state, eqx.is_array)
        return new_y, num_steps + 1, new_dynamic, terminate, result

    y, num_steps, dynamic, terminate, result = eqxi.while_loop(
        cond_fun,
        body_fun,
        carry0,
        max_steps=max_steps,
        buffers=lambda carry: buffers(carry[2]),
        kind="lax",
    )
    state = eqx.combine(static, dynamic)
    result = optx.RESULTS.where(
        (result == optx.RESULTS.successful) & jnp.invert(terminate),
        optx.RESULTS.nonlinear_max_steps_reached,
        result,
    )
    aux0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_struct)
    value, aux, stats = solver.postprocess(fn, y, aux0, args, options, state, tags, result)
    stats = {"num_steps": num_steps, "max_steps": max_steps, **stats}
    return optx.Solution(value=value, result=result, aux=aux, stats=stats, state=state)
