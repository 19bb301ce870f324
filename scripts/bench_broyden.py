"""Per-iteration cost of imex-deq's discrete solvers against one evaluation of f.

The MNIST-dense DEQ's f(z, e) = relu(W1 z) + relu(W2 e) (width --width, batch --batch, the
same NumPy weights and data as `bench_peers.py`), each solve vmapped over the batch as the
DEQ layers do, forward only (`differentiable=False`, as inside `ImplicitAdjoint`). Every
solve runs a fixed number of steps (tolerance 1e-30: it never converges), so

    time per iteration = (T(--long steps) - T(--short steps)) / (--long - --short)

and likewise for one f evaluation (f iterated in a `lax.fori_loop`, vmapped). The overhead
ratio is (time per iteration - time of one f) / time of one f. Timings are interleaved
(every variant once per round) and reported as medians over --rounds rounds.

`LegacyBroyden` is the formulation before the "Broyden without overhead" change (a row
buffer written with `.at[slot].set` inside optimistix's vmapped loop), kept here so both
can be timed side by side.

Usage: python scripts/bench_broyden.py [--threads 1] [--memories 10,50] [--rounds 15]
Prints a markdown table to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import problem, report, threads, timing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memories", default="10,50", help="Broyden memories, comma separated")
    p.add_argument("--short", type=int, default=10, help="steps of the short solve")
    p.add_argument("--long", type=int, default=50, help="steps of the long solve")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-legacy", action="store_true", help="skip LegacyBroyden rows")
    p.add_argument("--no-others", action="store_true", help="skip FixedPoint/Anderson rows")
    p.add_argument("--no-floor", action="store_true", help="skip the hand-batched Broyden rows")
    return p.parse_args(argv)


def legacy_broyden_class():
    """The Broyden formulation before this script existed (for side-by-side timing)."""
    import equinox as eqx
    import jax.flatten_util
    import jax.numpy as jnp
    from jaxtyping import Array, Float, Int

    import imex_deq as deq
    from imex_deq._solvers._base import Progress

    class _State(eqx.Module):
        progress: Progress
        us: Float[Array, "m n"]
        vs: Float[Array, "m n"]
        previous_z: Float[Array, " n"]
        previous_g: Float[Array, " n"]
        count: Int[Array, ""]

    class LegacyBroyden(deq.Broyden):
        history_fields = ()  # optimistix's own loop, as before the buffered one

        def init(self, fn, y, args, options, f_struct, aux_struct, tags):
            flat, _ = jax.flatten_util.ravel_pytree(y)
            buffer = jnp.zeros((self.memory, flat.size), flat.dtype)
            progress = self.start(y, aux_struct)
            return _State(progress, buffer, buffer, flat, jnp.zeros_like(flat), jnp.array(0))

        def step(self, fn, y, args, options, state, tags):
            g_tree, aux = fn(y, args)
            z, unravel = jax.flatten_util.ravel_pytree(y)
            g, _ = jax.flatten_util.ravel_pytree(g_tree)
            residual = self.root_residual(g, z)
            progress = self.record(state.progress, y, aux, residual, 1)
            dz = z - state.previous_z
            dg = g - state.previous_g
            step = -g + state.us.T @ (state.vs @ g)
            dz_b = -dz + (state.us @ dz) @ state.vs
            denominator = dz_b @ dg
            usable = (state.count > 0) & (jnp.abs(denominator) > jnp.finfo(z.dtype).eps)
            safe = jnp.where(usable, denominator, 1)
            slot = jnp.maximum(state.count - 1, 0) % self.memory
            old_u, old_v = state.us[slot], state.vs[slot]
            u = jnp.where(usable, -step, old_u)
            v = jnp.where(usable, dz_b / safe, old_v)
            us = state.us.at[slot].set(u)
            vs = state.vs.at[slot].set(v)
            z_next = z - (step + u * (v @ g) - old_u * (old_v @ g))
            new_state = _State(progress, us, vs, z, g, state.count + 1)
            return unravel(z_next), new_state, aux

    return LegacyBroyden


def hand_batched_broyden_runner(f, memory: int, n: int):
    """Broyden's iteration written by hand on the whole batch, outside vmap: (batch,
    memory, width) buffers, one row written per step with `dynamic_update_slice`, the
    same two products with B per step, no convergence test, no best-iterate bookkeeping.
    What the formulation costs on XLA CPU with nothing else in the loop: the floor for
    `Broyden` (whose own loop does strictly more)."""
    import jax
    import jax.numpy as jnp

    def body(_, carry):
        z, previous_z, previous_g, us, vs, count = carry
        g = f(z) - z
        dz, dg = z - previous_z, g - previous_g
        step = -g + jnp.einsum("bmn,bm->bn", us, jnp.einsum("bmn,bn->bm", vs, g))
        dz_b = -dz + jnp.einsum("bm,bmn->bn", jnp.einsum("bmn,bn->bm", us, dz), vs)
        denominator = jnp.sum(dz_b * dg, -1)
        usable = (count > 0) & (jnp.abs(denominator) > jnp.finfo(z.dtype).eps)
        slot = jnp.maximum(count - 1, 0) % memory
        old_u, old_v = us[:, slot], vs[:, slot]
        u = jnp.where(usable[:, None], -step, old_u)
        v = jnp.where(usable[:, None], dz_b / jnp.where(usable, denominator, 1)[:, None], old_v)
        us = jax.lax.dynamic_update_slice(us, u[:, None], (0, slot, 0))
        vs = jax.lax.dynamic_update_slice(vs, v[:, None], (0, slot, 0))
        v_g = jnp.sum(v * g, -1, keepdims=True)
        old_v_g = jnp.sum(old_v * g, -1, keepdims=True)
        z_next = z - (step + u * v_g - old_u * old_v_g)
        return z_next, z, g, us, vs, count + 1

    @jax.jit
    def run(e):
        z0 = jnp.zeros_like(e)
        buffer = jnp.zeros((e.shape[0], memory, e.shape[1]), e.dtype)
        carry = (z0, z0, z0, buffer, buffer, jnp.array(0))
        z = jax.lax.fori_loop(0, n, body, carry)[0]
        return z, jnp.full(e.shape[:1], n)

    return run


def main(argv=None):
    args = parse_args(argv)
    threads.configure_threads(args.threads)
    import jax
    import jax.numpy as jnp

    import imex_deq as deq

    machine = threads.machine_line(args.threads)
    report.log(machine)
    weights = problem.init_weights(args.seed, 784, args.width, 10, spectral_norm=0.9)
    x, _, data = problem.make_batch(args.seed, args.batch, 784, 10)
    w = {k: jnp.asarray(v) for k, v in weights.items()}
    e = jax.nn.relu(jnp.asarray(x) @ w["we"].T + w["be"])

    def f(z, e):
        return jax.nn.relu(w["w1"] @ z) + jax.nn.relu(w["w2"] @ e)

    def batched_f(z):
        return jax.nn.relu(z @ w["w1"].T) + jax.nn.relu(e @ w["w2"].T)

    def f_runner(n):
        @jax.jit
        def run(e):
            return jax.vmap(lambda ei: jax.lax.fori_loop(0, n, lambda _, z: f(z, ei), ei))(e)

        return run

    def solver_runner(solver, n):
        @jax.jit
        def run(e):
            def one(ei):
                sol = solver.solve(f, jnp.zeros_like(ei), ei, max_steps=n, differentiable=False)
                return sol.value, sol.num_steps

            return jax.vmap(one)(e)

        return run

    never = 1e-30
    variants = {"f": f_runner}
    memories = [int(m) for m in args.memories.split(",") if m]
    Legacy = None if args.no_legacy else legacy_broyden_class()
    for m in memories:
        if Legacy is not None:
            variants[f"LegacyBroyden(memory={m})"] = lambda n, m=m: solver_runner(
                Legacy(rtol=never, memory=m), n
            )
        variants[f"Broyden(memory={m})"] = lambda n, m=m: solver_runner(
            deq.Broyden(rtol=never, memory=m), n
        )
        if not args.no_floor:
            variants[f"hand-batched Broyden(memory={m}), floor"] = lambda n, m=m: (
                hand_batched_broyden_runner(batched_f, m, n)
            )
    if not args.no_others:
        variants["FixedPointIteration"] = lambda n: solver_runner(
            deq.FixedPointIteration(rtol=never), n
        )
        variants["Anderson(history=6)"] = lambda n: solver_runner(
            deq.Anderson(rtol=never, history=6), n
        )

    runs = {}
    for name, make in variants.items():
        for n in (args.short, args.long):
            fn = make(n)
            out = jax.block_until_ready(fn(e))  # compile
            if name != "f":
                steps = int(jax.numpy.max(out[1]))
                assert steps == n, f"{name}: ran {steps} steps, expected {n}"
            runs[name, n] = fn
        report.log(f"compiled {name}")

    times = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, fn in runs.items():
            _, seconds = timing.timed(lambda fn=fn: jax.block_until_ready(fn(e)))
            times[key].append(seconds)

    span = args.long - args.short
    per_iter = {}
    for name in variants:
        diffs = [b - a for a, b in zip(times[name, args.short], times[name, args.long])]
        per_iter[name] = statistics.median(diffs) / span
    f_ms = 1e3 * per_iter["f"]

    print(machine)
    print(
        f"MNIST-dense f(z, e) = relu(W1 z) + relu(W2 e), width {args.width}, batch "
        f"{args.batch} (vmapped), float32, {data}. Time per iteration = median over "
        f"{args.rounds} interleaved rounds of (T({args.long} steps) - T({args.short} steps)) "
        f"/ {span}; forward only (differentiable=False)."
    )
    print()
    print(
        "| variant | ms / iteration | ms / f | overhead (iteration - f) / f "
        f"| ms total at {args.long} steps (median) |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        it_ms = 1e3 * per_iter[name]
        total = timing.median_ms(times[name, args.long])
        over = "—" if name == "f" else f"{(it_ms - f_ms) / f_ms:.2f}"
        print(f"| {name} | {it_ms:.3f} | {f_ms:.3f} | {over} | {total:.2f} |")


if __name__ == "__main__":
    main()
