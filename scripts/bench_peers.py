"""imex-deq against its PyTorch peers (torchdeq, torchdiffeq) on the MNIST-dense DEQ.

Both sides get the SAME weights (built once in NumPy, `bench/problem.init_weights`, loaded
into both), the SAME batch, float32, and the same number of threads (torch.set_num_threads(N);
XLA_FLAGS intra-op threads N and the process pinned to N CPUs). Needs the `bench` extra:
    .venv/bin/pip install torch==2.13.0 torchdeq==0.1.0 torchdiffeq

First a parity check per row at tightened tolerances: z* and all six parameter gradients
must agree to a relative difference < --parity-tol; a row whose parity fails is reported
with the reason and gets no timing row. Then, per row, interleaved training steps
(forward + backward + Adam), each from the initial weights, timed with the median of
--steps; JAX compile time (first call) apart.

Rows: torchdeq fixed_point_iter / anderson / broyden (forward, IFT backward with the same
solver) vs imex-deq's FixedPointIteration / Anderson / Broyden with
ImplicitAdjoint(linear_solver=<same solver>); torchdiffeq odeint_adjoint (dopri5, t in
[0, 1]) vs imex-deq's NeuralODE (Dopri5; BacksolveAdjoint, and its default
RecursiveCheckpointAdjoint) and vs imex-deq's continuous DEQ (SteadyStateODE, defaults);
the explicit network (f applied once) on both sides as the floor.

Usage: python scripts/bench_peers.py [--steps 20] [--batch 128] [--threads N]
Writes results/bench_peers.json; prints a markdown table to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import configs, problem, report, threads, timing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=("digits", "random"), default="digits")
    p.add_argument("--tol", type=float, default=5e-3, help="forward relative tolerance")
    p.add_argument("--b-tol", type=float, default=5e-3, help="adjoint solve relative tolerance")
    p.add_argument("--max-iter", type=int, default=50)
    p.add_argument("--ode-rtol", type=float, default=1e-3)
    p.add_argument("--ode-atol", type=float, default=1e-3)
    p.add_argument("--parity-tol", type=float, default=1e-4)
    p.add_argument(
        "--ode-parity-tol",
        type=float,
        default=None,
        help="parity threshold for the neural-ODE rows (default: --parity-tol). "
        "With f's ReLU kinks, adaptive dopri5 gradients agree only to ~1e-3 "
        "across libraries even at rtol 1e-8 (float64 shows the same)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="results/bench_peers.json")
    return p.parse_args(argv)


@dataclasses.dataclass
class Row:
    name: str
    peer: str
    imex: str
    torch_core: Callable[[], Any]  # builds a fresh models_torch core
    jax_core: Callable  # models_jax core, for timing
    parity_name: str | None  # key into the parity results (None: not applicable)
    fixed_point: bool  # whether the shared residual applies


def build_rows(args):
    from bench import models_jax as mj
    from bench import models_torch as mt

    import imex_deq as deq

    rows = []
    for solver, label, memory in (
        ("fixed_point_iter", "FixedPointIteration", None),
        ("anderson", "Anderson", None),
        ("broyden", "Broyden", None),
        ("broyden", "Broyden", 10),
    ):
        cfg = configs.DEQConfig(solver, args.tol, args.max_iter, args.b_tol, args.max_iter, "rel")
        core = mj.deq_core(
            mj.imex_solver(solver, args.tol, "rel", args.max_iter, memory),
            deq.ImplicitAdjoint(
                linear_solver=mj.imex_solver(solver, args.b_tol, "rel", args.max_iter, memory),
                max_steps=args.max_iter,
            ),
            max_steps=args.max_iter,
        )
        if solver == "broyden":
            mem = f"memory={args.max_iter if memory is None else memory}"
            label = f"Broyden({mem})"
        rows.append(
            Row(
                f"DEQ {solver}" + ("" if memory is None else f" (imex memory {memory})"),
                f"torchdeq {solver} + IFT({solver})",
                f"{label} + ImplicitAdjoint({label})",
                functools.partial(mt.DEQCore, cfg),
                core,
                solver if memory is None else f"{solver}_m{memory}",
                True,
            )
        )
    ode = configs.ODEConfig(args.ode_rtol, args.ode_atol, 1.0)
    for adjoint, label in (
        ("backsolve", "BacksolveAdjoint"),
        ("checkpoint", "RecursiveCheckpointAdjoint"),
    ):
        core = mj.neural_ode_core(args.ode_rtol, args.ode_atol, adjoint=adjoint)
        rows.append(
            Row(
                f"neural ODE ({adjoint})",
                "torchdiffeq odeint_adjoint dopri5",
                f"NeuralODE(Dopri5, {label})",
                functools.partial(mt.ODECore, ode),
                core,
                f"neural_ode_{adjoint}",
                False,
            )
        )
    core = mj.deq_core(
        deq.SteadyStateODE(rtol=args.tol, termination="rel"),
        deq.ImplicitAdjoint(),
        max_steps=args.max_iter,
    )
    rows.append(
        Row(
            "continuous DEQ vs neural ODE",
            "torchdiffeq odeint_adjoint dopri5",
            "SteadyStateODE(Tsit5) + ImplicitAdjoint(GMRES)",
            functools.partial(mt.ODECore, ode),
            core,
            "continuous_deq",
            False,
        )
    )
    core = mj.deq_core(
        deq.SteadyStateODE(rtol=args.tol, termination="rel", ode_atol=1e-4),
        deq.ImplicitAdjoint(),
        max_steps=args.max_iter,
    )
    rows.append(
        Row(
            "continuous DEQ (ode_atol 1e-4) vs neural ODE",
            "torchdiffeq odeint_adjoint dopri5",
            "SteadyStateODE(Tsit5, ode_atol=1e-4) + ImplicitAdjoint(GMRES)",
            functools.partial(mt.ODECore, ode),
            core,
            "continuous_deq",
            False,
        )
    )
    rows.append(
        Row(
            "explicit (f once)",
            "torch f(0, x)",
            "jax f(0, x)",
            mt.ExplicitCore,
            mj.explicit_core(),
            "explicit",
            False,
        )
    )
    return rows


def run_parity(args, weights, x, y):
    """Tightened tolerances; returns {name: Parity}."""
    from bench import models_jax as mj
    from bench import models_torch as mt
    from bench.parity import parity_check

    import imex_deq as deq

    tight, iters = 1e-6, 400
    out = {}
    for solver, memory in [(s, None) for s in configs.TORCHDEQ_SOLVERS] + [("broyden", 10)]:
        cfg = configs.DEQConfig(solver, tight, iters, tight, iters, "rel")
        core = mj.deq_core(
            mj.imex_solver(solver, tight, "rel", iters, memory),
            deq.ImplicitAdjoint(
                linear_solver=mj.imex_solver(solver, tight, "rel", iters, memory),
                max_steps=iters,
            ),
            max_steps=iters,
        )
        key = solver if memory is None else f"{solver}_m{memory}"
        label = "" if memory is None else f", imex Broyden memory={memory}"
        out[key] = parity_check(
            f"{solver} (rel tol {tight:g}, max_iter {iters}{label})",
            weights,
            x,
            y,
            mt.DEQCore(cfg),
            core,
            tol=args.parity_tol,
        )
        report.log(out[key].line())
    ode_tol = 1e-8
    ode = configs.ODEConfig(ode_tol, ode_tol, 1.0)
    ode_parity = args.parity_tol if args.ode_parity_tol is None else args.ode_parity_tol
    for adjoint in ("backsolve", "checkpoint"):
        core = mj.neural_ode_core(ode_tol, ode_tol, adjoint=adjoint)
        name = f"neural_ode_{adjoint}"
        out[name] = parity_check(
            f"neural ODE torchdiffeq vs NeuralODE({adjoint}) (rtol=atol={ode_tol:g})",
            weights,
            x,
            y,
            mt.ODECore(ode),
            core,
            tol=ode_parity,
            residual_mode=None,
        )
        report.log(out[name].line())
    # The continuous DEQ solves a different problem from the finite-time neural ODE it is
    # timed against; its parity is with torchdeq's equilibrium (same f, same z*).
    core = mj.deq_core(
        deq.SteadyStateODE(rtol=tight, termination="rel"),
        deq.ImplicitAdjoint(
            linear_solver=mj.imex_solver("anderson", tight, "rel", iters), max_steps=iters
        ),
        max_steps=iters,
    )
    out["continuous_deq"] = parity_check(
        f"continuous DEQ (SteadyStateODE rtol {tight:g}) vs torchdeq anderson equilibrium",
        weights,
        x,
        y,
        mt.DEQCore(configs.DEQConfig("anderson", tight, iters, tight, iters, "rel")),
        core,
        tol=args.parity_tol,
    )
    report.log(out["continuous_deq"].line())
    out["explicit"] = parity_check(
        "explicit f(0, x)",
        weights,
        x,
        y,
        mt.ExplicitCore(),
        mj.explicit_core(),
        tol=args.parity_tol,
        residual_mode=None,
    )
    report.log(out["explicit"].line())
    return out


def time_row(row: Row, args, weights, x, y):
    import jax
    import numpy as np
    import torch
    from bench import models_jax as mj
    from bench import models_torch as mt

    # PyTorch side.
    net = mt.TorchNet(weights, row.torch_core())
    net.train()
    state0 = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()

    def torch_reset():
        net.load_state_dict(state0)
        opt.state.clear()

    # JAX side.
    init, step = mj.jax_train_step(row.jax_core, args.lr)
    params0 = mj.jax_params(weights)
    opt0 = init(params0)
    xs, ys = jax.device_put(x), jax.device_put(y)

    def jax_run():
        return jax.block_until_ready(step(params0, opt0, xs, ys))

    (_, _, jstats), jax_first = timing.timed(jax_run)

    for _ in range(2):  # torch warm-up
        torch_reset()
        tstats = mt.torch_step(net, opt, xt, yt)

    t_times, j_times, t_stats, j_stats = [], [], [], []
    for _ in range(args.steps):  # interleaved, so both see the same machine load
        torch_reset()
        tstats, seconds = timing.timed(mt.torch_step, net, opt, xt, yt)
        t_times.append(seconds)
        t_stats.append(tstats)
        (_, _, jstats), seconds = timing.timed(jax_run)
        j_times.append(seconds)
        j_stats.append(jstats)

    jax_step = statistics.median(j_times)
    nfe = np.stack([np.asarray(s["fwd_nfe"]) for s in j_stats])
    res = {
        "row": row.name,
        "peer": row.peer,
        "imex": row.imex,
        "peer_ms": timing.median_ms(t_times),
        "imex_ms": 1e3 * jax_step,
        "peer_ms_min": 1e3 * min(t_times),
        "imex_ms_min": 1e3 * min(j_times),
        "imex_compile_s": max(jax_first - jax_step, 0.0),
        "peer_fwd_nfe": statistics.fmean(s["fwd_nfe"] for s in t_stats),
        "peer_bwd_vjps": statistics.fmean(s["bwd_vjps"] for s in t_stats),
        "peer_bwd_f_evals": statistics.fmean(s["bwd_evals"] for s in t_stats),
        "imex_fwd_nfe_mean": float(nfe.mean()),
        "imex_fwd_nfe_batch_max": int(nfe.max()),
        "imex_bwd_nfe": float(np.mean([float(s["bwd_nfe_total"]) for s in j_stats])) / args.batch,
        "imex_converged": float(np.mean([np.asarray(s["converged"]).mean() for s in j_stats])),
        "imex_loss": float(j_stats[-1]["loss"]),
        "peer_loss": t_stats[-1]["loss"],
    }
    res["ratio"] = res["peer_ms"] / res["imex_ms"]
    if row.fixed_point:
        res["peer_residual_max"] = float(
            problem.shared_residual(weights, t_stats[-1]["z"], t_stats[-1]["e"], "rel").max()
        )
        res["imex_residual_max"] = float(
            problem.shared_residual(
                weights, np.asarray(j_stats[-1]["z"]), np.asarray(j_stats[-1]["e"]), "rel"
            ).max()
        )
        res["imex_residual_mean"] = float(
            problem.shared_residual(
                weights, np.asarray(j_stats[-1]["z"]), np.asarray(j_stats[-1]["e"]), "rel"
            ).mean()
        )
    return res


def fmt_nfe(x) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.1f}" if abs(x - round(x)) > 0.05 else f"{round(x)}"


def table(results, parity, skipped) -> str:
    lines = [
        (
            "| row | peer | imex-deq | peer ms/step median (min) | imex ms/step median (min) "
            "| ratio peer/imex (medians) | imex compile s "
            "| fwd NFE peer | fwd NFE imex mean (max) | bwd NFE peer | bwd NFE imex | imex converged "
            "| parity |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        p = parity.get(r["parity"])
        ok = "n/a" if p is None else (f"ok ({max([p.z_rel, *p.grad_rel.values()]):.0e})")
        bwd_peer = fmt_nfe(r["peer_bwd_vjps"])
        if r["peer_bwd_f_evals"] and r["peer_bwd_f_evals"] != r["peer_bwd_vjps"]:
            bwd_peer += f" (+{fmt_nfe(r['peer_bwd_f_evals'])} f)"
        bwd_imex = (
            "n/a"
            if r["imex"].startswith("NeuralODE(Dopri5, Backsolve")
            else fmt_nfe(r["imex_bwd_nfe"])
        )
        lines.append(
            f"| {r['row']} | {r['peer']} | {r['imex']} | {r['peer_ms']:.1f} ({r['peer_ms_min']:.1f}) "
            f"| {r['imex_ms']:.1f} ({r['imex_ms_min']:.1f}) "
            f"| {r['ratio']:.2f} | {r['imex_compile_s']:.1f} | {fmt_nfe(r['peer_fwd_nfe'])} "
            f"| {r['imex_fwd_nfe_mean']:.1f} ({r['imex_fwd_nfe_batch_max']}) | {bwd_peer} "
            f"| {bwd_imex} | {100 * r['imex_converged']:.0f}% | {ok} |"
        )
    for name, why in skipped:
        lines.append(f"| {name} | — | — | — | — | — | — | — | — | — | — | — | FAILED: {why} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    threads.configure_threads(args.threads)
    import jax
    import torch
    import torchdeq
    import torchdiffeq

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    machine = threads.machine_line(args.threads)
    versions = (
        f"jax {jax.__version__}, torch {torch.__version__}, torchdeq "
        f"{getattr(torchdeq, '__version__', '0.1.0')}, torchdiffeq {torchdiffeq.__version__}"
    )
    report.log(machine)
    report.log(versions)
    weights = problem.init_weights(args.seed, 784, args.width, 10, spectral_norm=0.9)
    x, y, data = problem.make_batch(args.seed, args.batch, 784, 10, source=args.data)
    report.log(f"data: {data}")
    total = time.perf_counter()

    report.log("parity checks (tightened tolerances) ...")
    parity = run_parity(args, weights, x, y)

    results, skipped = [], []
    for row in build_rows(args):
        p = parity.get(row.parity_name)
        if p is not None and not p.ok:
            report.log(f"skip timing of {row.name}: parity failed: {p.why}")
            skipped.append((row.name, p.why))
            continue
        report.log(f"[{time.perf_counter() - total:6.1f}s] timing {row.name} ...")
        r = time_row(row, args, weights, x, y)
        r["parity"] = row.parity_name
        report.log(
            f"    peer {r['peer_ms']:.1f} ms, imex {r['imex_ms']:.1f} ms (compile "
            f"{r['imex_compile_s']:.1f}s), ratio {r['ratio']:.2f}; NFE fwd {r['peer_fwd_nfe']:.1f}"
            f" / {r['imex_fwd_nfe_mean']:.1f}, bwd {r['peer_bwd_vjps']:.1f} / {r['imex_bwd_nfe']:.1f}"
        )
        results.append(r)

    print(machine)
    print(versions)
    print(
        f"MNIST-dense DEQ 784->{args.width}->10, batch {args.batch}, float32, {data}; same NumPy "
        f"weights both sides (||W1||_2 = 0.9). DEQ rows: stop at shared rel residual "
        f"||f(z)-z||/||f(z)|| <= {args.tol:g}, max {args.max_iter} iterations; adjoint solve "
        f"rel tol {args.b_tol:g}. ODE rows: dopri5 rtol {args.ode_rtol:g} atol "
        f"{args.ode_atol:g}. Median of {args.steps} interleaved steps (forward + backward + "
        f"Adam), each from the initial weights; ratio > 1: imex-deq faster."
    )
    print()
    for p in parity.values():
        print(p.line())
    print()
    print(table(results, parity, skipped))
    for r in results:
        if "peer_residual_max" in r:
            print(
                f"shared residual ({r['row']}): peer max {r['peer_residual_max']:.2e}, imex max "
                f"{r['imex_residual_max']:.2e} (mean {r['imex_residual_mean']:.2e}), tol {args.tol:g}"
            )
    report.write_results(
        args.out,
        {
            "machine": machine,
            "versions": versions,
            "data": data,
            "config": vars(args),
            "parity": {k: dataclasses.asdict(v) for k, v in parity.items()},
            "skipped": [{"row": n, "why": w} for n, w in skipped],
            "rows": results,
        },
        total,
    )


if __name__ == "__main__":
    main()
