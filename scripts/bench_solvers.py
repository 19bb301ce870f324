"""Training-step cost of every imex-deq solver x adjoint pair on the MNIST-dense DEQ.

Model (see `bench/problem.py`): Linear 784->W + ReLU embedding; DEQ with
f(z, x) = relu(W1 z) + relu(W2 x) (no bias, W1 rescaled to spectral norm --w1-norm so that f
is a contraction); head W->10; cross-entropy; optax Adam. ONE eqx.filter_jit step does solve
+ loss + adjoint + update. For each pair it reports the compile time (first call) apart from
the median of --steps timed steps, the mean forward NFE per sample (and the batch max, which
is what a vmapped solve costs), the backward NFE per sample (gradient of per-sample
`backward_counter`s, summed, divided by the batch; see `bench/models_jax.jax_forward`), and
the fraction of samples whose forward solve converged.

Solvers and adjoints are imex-deq's named ones (`imex_deq.experiments.SOLVERS` and
`ADJOINTS`, as `imex-deq train --solver/--backward` builds them), here under their class
names and labels.

Usage: python scripts/bench_solvers.py [--steps 20] [--batch 128] [--threads N]
Writes results/bench_solvers.json; prints a markdown table to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import problem, report, threads, timing

SOLVER_NAMES = ("FixedPointIteration", "Anderson", "Broyden", "NewtonKrylov", "SteadyStateODE")
ADJOINT_NAMES = (
    "Implicit(GMRES)",
    "Implicit(Anderson)",
    "Implicit(FixedPoint)",
    "Phantom(5)",
    "Unrolled",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per pair (after compile)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=128, help="DEQ state size")
    p.add_argument("--threads", type=int, default=None, help="pin XLA to N threads")
    p.add_argument("--rtol", type=float, default=5e-3, help="forward relative tolerance")
    p.add_argument(
        "--adjoint-rtol",
        type=float,
        default=1e-3,
        help="relative tolerance of the iterative adjoint linear solvers",
    )
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument(
        "--w1-norm",
        type=float,
        default=0.9,
        help="spectral norm W1 is rescaled to; 0 keeps the default U(+-1/sqrt(n)) init",
    )
    p.add_argument("--data", choices=("random", "digits"), default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--solvers", default=",".join(SOLVER_NAMES))
    p.add_argument("--adjoints", default=",".join(ADJOINT_NAMES))
    p.add_argument(
        "--carry",
        action="store_true",
        help="carry the Adam updates from step to step (default: every timed step "
        "starts from the initial weights, so all pairs solve the same problem; "
        "carried, Adam at lr 1e-3 pushes ||W1|| from 0.90 to ~1.0 in 20 steps)",
    )
    p.add_argument("--out", default="results/bench_solvers.json")
    return p.parse_args(argv)


def registry_names(labels: list[str], kind: str) -> dict[str, str]:
    """`{label: name}` for the solver class names or adjoint labels asked for, `name` being
    the key of `imex_deq.experiments.SOLVERS` or `ADJOINTS`; an unknown label exits."""
    from imex_deq.experiments import ADJOINTS, SOLVERS

    if kind == "solver":
        known = {cls.__name__: name for name, cls in SOLVERS.items()}
    else:
        known = {spec.label: name for name, spec in ADJOINTS.items()}
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise SystemExit(f"unknown {kind}(s) {unknown}; choose from {', '.join(known)}")
    return {label: known[label] for label in labels}


def bench_pair(solver_name, adjoint_name, args, weights, x, y, names):
    """Time one pair; `names` maps the labels to registry names (`registry_names`)."""
    import jax
    import numpy as np
    from bench import models_jax

    from imex_deq.experiments import make_adjoint, make_solver

    make_core = models_jax.deq_core(
        make_solver(names[solver_name], args.rtol),
        make_adjoint(names[adjoint_name], args.adjoint_rtol),
        max_steps=args.max_steps,
    )
    init, step = models_jax.jax_train_step(make_core, args.lr)
    params = models_jax.jax_params(weights)
    opt_state = init(params)
    xs = jax.device_put(x)
    ys = jax.device_put(y)

    params0, opt_state0 = params, opt_state

    def run(params, opt_state):
        return jax.block_until_ready(step(params, opt_state, xs, ys))

    (params, opt_state, stats), first = timing.timed(run, params, opt_state)

    times, fwd, fwd_max, bwd, conv = [], [], [], [], []
    for _ in range(args.steps):
        if not args.carry:  # every timed step solves the same problem
            params, opt_state = params0, opt_state0
        (params, opt_state, stats), seconds = timing.timed(run, params, opt_state)
        times.append(seconds)
        nfe = np.asarray(stats["fwd_nfe"])
        fwd.append(float(nfe.mean()))
        fwd_max.append(int(nfe.max()))
        bwd.append(float(stats["bwd_nfe_total"]) / args.batch)
        conv.append(float(np.asarray(stats["converged"]).mean()))
    step_s = statistics.median(times)
    # Compile time = first call minus one ordinary step (the first call also runs once).
    return {
        "solver": solver_name,
        "adjoint": adjoint_name,
        "first_call_s": first,
        "compile_s": max(first - step_s, 0.0),
        "step_ms_median": 1e3 * step_s,
        "step_ms_min": 1e3 * min(times),
        "step_ms_max": 1e3 * max(times),
        "fwd_nfe_mean": statistics.fmean(fwd),
        "fwd_nfe_batch_max": max(fwd_max),
        "bwd_nfe_mean": statistics.fmean(bwd),
        "converged": statistics.fmean(conv),
        "final_loss": float(stats["loss"]),
    }


def table(rows) -> str:
    lines = [
        (
            "| solver | adjoint | compile (s) | step median (ms) | fwd NFE/sample (batch max) "
            "| bwd NFE/sample | converged |"
        ),
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['solver']} | {r['adjoint']} | — | — | — | — | {r['error']} |")
            continue
        lines.append(
            f"| {r['solver']} | {r['adjoint']} | {r['compile_s']:.1f} | {r['step_ms_median']:.1f} "
            f"| {r['fwd_nfe_mean']:.1f} ({r['fwd_nfe_batch_max']}) | {r['bwd_nfe_mean']:.1f} "
            f"| {100 * r['converged']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    threads.configure_threads(args.threads)
    import jax
    import numpy as np

    solvers = [s for s in args.solvers.split(",") if s]
    adjoints = [a for a in args.adjoints.split(",") if a]
    names = {**registry_names(solvers, "solver"), **registry_names(adjoints, "adjoint")}
    machine = threads.machine_line(args.threads)
    weights = problem.init_weights(
        args.seed, 784, args.width, 10, spectral_norm=args.w1_norm if args.w1_norm > 0 else None
    )
    x, y, data = problem.make_batch(args.seed, args.batch, 784, 10, source=args.data)
    w1_norm = float(np.linalg.norm(weights["w1"], 2))
    report.log(machine)
    report.log(f"jax {jax.__version__}, data: {data}, W1 spectral norm {w1_norm:.3f}")
    rows = []
    total = time.perf_counter()
    for s in solvers:
        for a in adjoints:
            if s == "NewtonKrylov" and a == "Unrolled":
                report.log(f"skip {s} x {a}: NewtonKrylov refuses to be unrolled")
                continue
            report.log(f"[{time.perf_counter() - total:6.1f}s] {s} x {a} ...")
            try:
                r = bench_pair(s, a, args, weights, x, y, names)
            except Exception as exc:  # noqa: BLE001 - report the failure, keep going
                r = {"solver": s, "adjoint": a, "error": f"{type(exc).__name__}: {exc}"[:200]}
                report.log(f"    FAILED: {r['error']}")
            else:
                report.log(
                    f"    compile {r['compile_s']:.1f}s, step {r['step_ms_median']:.1f} ms, "
                    f"fwd {r['fwd_nfe_mean']:.1f}, bwd {r['bwd_nfe_mean']:.1f}, "
                    f"conv {100 * r['converged']:.0f}%"
                )
            rows.append(r)

    print(machine)
    print(
        f"DEQ MLP 784->{args.width}, state {args.width}, batch {args.batch}, {data}; "
        f"W1 spectral norm {w1_norm:.3f}; forward: termination 'rel' rtol {args.rtol:g}, "
        f"max_steps {args.max_steps}; iterative adjoints rtol {args.adjoint_rtol:g}; "
        f"median of {args.steps} steps (solve + loss + adjoint + Adam in one filter_jit), "
        f"{'updates carried' if args.carry else 'each from the initial weights'}; "
        f"compile = first call - median step."
    )
    print()
    print(table(rows))
    report.write_results(
        args.out,
        {
            "machine": machine,
            "jax_version": jax.__version__,
            "config": dict(vars(args), w1_spectral_norm=w1_norm, data=data),
            "rows": rows,
        },
        total,
    )


if __name__ == "__main__":
    main()
