"""Race to steady state: the continuous DEQ's ODE solvers against the discrete iterations.

Forward solves only (no training): on the MNIST-dense DEQ cell (see `bench/problem.py`:
f(z, e) = relu(W1 z) + relu(W2 e), ||W1|| = 0.9, random pixels) and on the mnist_conv
multiscale cell (`imex_deq.experiments.mnist_conv()`, fresh weights, random images) and
on a mildly stiff linear cell (relaxation rates 1 and 10, see `stiff_problem`), each
solver runs a vmapped batch from z = 0 to steady state at each relative tolerance:
SteadyStateODE with Tsit5 (with and without its stall tightening), Bosh3, Heun and
AdamsBashforth3 (default ode_rtol/ode_atol), PseudoTransient and FixedPointIteration.
Per row: mean and max NFE over the batch (a vmapped batch costs its max), the fraction
of samples that converged, and the time per batch (median of --calls calls after a
compile call).

Usage: python scripts/bench_steady_state.py [--threads 1] [--batch-dense 128]
       [--batch-conv 8] [--rtols 5e-3,1e-4] [--calls 3] [--max-steps 500]
       [--problems dense,conv,stiff] [--solvers SUBSTRING]
Prints a markdown table to stdout, progress to stderr; writes results/bench_steady_state.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import problem, report, threads, timing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="pin XLA to N threads")
    p.add_argument("--batch-dense", type=int, default=128)
    p.add_argument("--batch-conv", type=int, default=8)
    p.add_argument("--rtols", default="5e-3,1e-4")
    p.add_argument("--calls", type=int, default=3, help="timed calls per row, after compile")
    p.add_argument("--max-steps", type=int, default=500, help="ODE steps or iterations")
    p.add_argument("--problems", default="dense,conv,stiff")
    p.add_argument("--solvers", default=None, help="only the solvers whose label contains this")
    p.add_argument(
        "--conv-run",
        default=None,
        help="a trained mnist_conv run folder (with summary.json and checkpoint.eqx, e.g. "
        "docs/results/mnist-conv-10ep/mnist-conv/runs/skip-reg-anderson-s0): race its "
        "trained cell on test images instead of a fresh cell on random ones",
    )
    p.add_argument("--out", default="results/bench_steady_state.json")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    threads.configure_threads(ARGS.threads)  # before jax is imported

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import imex_deq as ideq
from imex_deq import experiments

SOLVERS = {
    "SteadyStateODE(Tsit5)": lambda rtol: ideq.SteadyStateODE(rtol=rtol, ode_solver=dfx.Tsit5()),
    "SteadyStateODE(Tsit5), no stall tightening": lambda rtol: ideq.SteadyStateODE(
        rtol=rtol, ode_solver=dfx.Tsit5(), ode_stall_factor=1.0
    ),
    "SteadyStateODE(Bosh3)": lambda rtol: ideq.SteadyStateODE(rtol=rtol, ode_solver=dfx.Bosh3()),
    "SteadyStateODE(Heun)": lambda rtol: ideq.SteadyStateODE(rtol=rtol, ode_solver=dfx.Heun()),
    "SteadyStateODE(AdamsBashforth3)": lambda rtol: ideq.SteadyStateODE(
        rtol=rtol, ode_solver=ideq.AdamsBashforth3()
    ),
    "PseudoTransient": lambda rtol: ideq.PseudoTransient(rtol=rtol),
    "FixedPointIteration": lambda rtol: ideq.FixedPointIteration(rtol=rtol),
}


class _DenseF(eqx.Module):
    w1: jax.Array
    w2: jax.Array

    def __call__(self, z, e):
        return jax.nn.relu(self.w1 @ z) + jax.nn.relu(self.w2 @ e)


def dense_problem(batch: int):
    """`(f, z0, injection)` of the MNIST-dense DEQ, batched."""
    w = problem.init_weights(seed=0)
    x, _, _ = problem.make_batch(seed=0, batch=batch, source="random")
    e = jax.nn.relu(jnp.asarray(x) @ jnp.asarray(w["we"]).T + jnp.asarray(w["be"]))
    f = _DenseF(jnp.asarray(w["w1"]), jnp.asarray(w["w2"]))
    return f, jnp.zeros_like(e), e


class _AffineF(eqx.Module):
    a: jax.Array

    def __call__(self, z, b):
        return self.a @ z + b


def stiff_problem(batch: int, width: int = 64):
    """`(f, z0, injection)` of f(z, b) = A z + b with A symmetric, its relaxation
    dz/dt = f(z, b) − z decaying at rates 1 (half the modes) and 10 (the other half):
    mildly stiff, and A has eigenvalue −9, so plain iteration diverges."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((width, width)))
    rates = np.repeat([-1.0, -10.0], width // 2)
    a = jnp.asarray(q @ np.diag(1.0 + rates) @ q.T, jnp.float32)
    b = jnp.asarray(rng.standard_normal((batch, width)), jnp.float32)
    return _AffineF(a), jnp.zeros_like(b), b


def conv_problem(batch: int):
    """`(f, z0, injection)` of the mnist_conv multiscale cell, batched."""
    config = experiments.mnist_conv()
    key = jax.random.PRNGKey(0)
    model = experiments.build_conv_model(
        "vanilla", ideq.FixedPointIteration(), config=config, key=key
    )
    h, w = config.image_size
    x = jax.random.normal(key, (batch, h, w, config.in_channels))
    injection = jax.vmap(model.embed)(x)
    return model.layer.f, jax.vmap(model.layer.zero_state)(injection), injection


def trained_conv_problem(run_dir: str, batch: int):
    """`(f, z0, injection)` of a trained mnist_conv run's cell on the first `batch` test
    images of its dataset, from z0 = 0."""
    import json

    from imex_deq.data import load_dataset

    with open(os.path.join(run_dir, "summary.json")) as fh:
        saved = json.load(fh)["config"]
    config = experiments.TrainConfig(**{**saved, "out_dir": run_dir, "progress": False})
    data = load_dataset(config.dataset)
    _, model = experiments.load_trained(config, data)
    injection = jax.vmap(model.embed)(jnp.asarray(data.x_test[:batch]))
    return model.layer.f, jax.vmap(model.layer.zero_state)(injection), injection


def make_solve(max_steps: int):
    @eqx.filter_jit
    def solve(solver, f, z0, injection):
        def one(z, x):
            sol = ideq.fixed_point(f, solver, z, x, max_steps=max_steps)
            return sol.nfe, sol.result == ideq.RESULTS.successful, sol.residual

        return jax.vmap(one)(z0, injection)

    return solve


def race(name: str, f, z0, injection, rtols, args) -> list[dict]:
    solve = make_solve(args.max_steps)
    rows = []
    for rtol in rtols:
        for label, make in SOLVERS.items():
            if args.solvers is not None and args.solvers not in label:
                continue
            solver = make(rtol)

            def call(solver=solver):
                return jax.block_until_ready(solve(solver, f, z0, injection))

            _, compile_s = timing.timed(call)
            times = []
            for _ in range(args.calls):
                out, seconds = timing.timed(call)
                times.append(seconds)
            nfe, converged, residual = out
            row = {
                "problem": name,
                "rtol": rtol,
                "solver": label,
                "nfe_mean": float(jnp.mean(nfe)),
                "nfe_max": int(jnp.max(nfe)),
                "converged": float(jnp.mean(converged)),
                "residual_max": float(jnp.max(residual)),
                "ms": timing.median_ms(times),
                "compile_s": compile_s,
            }
            report.log(row)
            rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        (
            "| problem | rtol | solver | NFE mean | NFE max | converged | max residual | "
            "ms / batch | compile s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['rtol']:g} | {r['solver']} | {r['nfe_mean']:.1f} | "
            f"{r['nfe_max']} | {r['converged']:.3f} | {r['residual_max']:.2e} | "
            f"{r['ms']:.1f} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main(args):
    started = time.perf_counter()
    report.log(f"jax {jax.__version__}, {threads.machine_line(args.threads)}")
    rtols = [float(r) for r in args.rtols.split(",")]
    rows = []
    problems = {
        f"mnist-dense (batch {args.batch_dense})": lambda: dense_problem(args.batch_dense),
        f"mnist_conv (batch {args.batch_conv})": lambda: conv_problem(args.batch_conv),
        f"stiff linear, rates 1 and 10 (batch {args.batch_dense})": lambda: stiff_problem(
            args.batch_dense
        ),
    }
    if args.conv_run is not None:
        problems = {
            **problems,
            f"mnist_conv trained, {os.path.basename(args.conv_run.rstrip('/'))} "
            f"(batch {args.batch_conv})": lambda: trained_conv_problem(
                args.conv_run, args.batch_conv
            ),
        }
    wanted = args.problems.split(",") + (["trained-conv"] if args.conv_run else [])
    for (name, build), key in zip(problems.items(), ("dense", "conv", "stiff", "trained-conv")):
        if key in wanted:
            rows += race(name, *build(), rtols, args)
    print(threads.machine_line(args.threads))
    print(render(rows))
    report.write_results(args.out, {"args": vars(args), "rows": rows}, started)


if __name__ == "__main__":
    main(ARGS)
